"""Model search: Optuna (TPE, seeded) over each model family, cross-validated on training rows only.

Every trial builds its own estimator (`sklearn.base.clone`), and the model that is refitted and shipped
is built from exactly the chosen trial's parameters, so the registered pipeline is the one the search
picked (a test checks it against the logged parameters).

The search space fits the data (`core/modeling/model_families.py`): leaf sizes are capped by the smallest class in
a CV training fold (by the fold's size for regression), so no configuration can only ever predict the
prior. A trial whose CV score equals the constant predictor's (`DummyClassifier(strategy="prior")` /
`DummyRegressor()`, scored on the same folds) is logged as degenerate and chosen only when every trial is
(`core/modeling/search_results.py`). Folds are scored one at a time and Optuna's median pruner stops a trial whose
running mean falls below the completed trials' at the same fold.

Trials run in batches (`SearchSpec.trials_per_batch` per family, every family at once) that may run in
parallel anywhere (`run_batch`: the flow sends them to a Dask cluster): Optuna is asked for a whole
batch, told the results in trial order, and a trial is pruned only against trials of earlier batches.
So the same seed, data and batch size give the same trials and the same choice on one worker or many,
unless `time_budget_seconds` ends the search first (then fewer trials may run on a slower machine).
With `trials_per_batch=1` the search is the sequential one (each trial sees every earlier trial).

A classifier is calibrated after the choice when it helps (`core/modeling/calibration.py`: sigmoid or
isotonic, chosen on the chosen configuration's out-of-fold predictions, never the holdout); the estimator
inside the calibration is still exactly the chosen trial's configuration refitted on all training rows.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import optuna
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field
from sklearn.base import BaseEstimator, clone
from sklearn.dummy import DummyClassifier, DummyRegressor
from sklearn.metrics import get_scorer
from sklearn.pipeline import Pipeline

from core.data.dataset import DatasetConfig, TaskType
from core.data.features import build_preprocessor, prepare_inputs, prepare_target
from core.modeling.calibration import calibrate, choose_calibration, fold_predictions
from core.modeling.folds import cv_folds
from core.modeling.metrics import Scoring, scoring_for
from core.modeling.model_families import (
    CLASSIFICATION_ONLY,
    DEFAULT_FAMILIES,
    REGRESSION_ONLY,
    DataShape,
    ModelFamily,
    base_estimator,
    suggest,
)
from core.modeling.search_results import SearchResult, Trial, choose

log = logging.getLogger(__name__)

# A CV score within this of the constant predictor's counts as the constant predictor's.
DEGENERATE_TOLERANCE = 1e-9


class SearchSpec(BaseModel):
    """How much searching to do, and over what."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    families: list[ModelFamily] | None = Field(
        None,
        min_length=1,
        title="Model families",
        description="Families to search, each with `trials_per_family` Optuna trials; empty for the task's "
        "default (logistic_regression + hist_gradient_boosting; ridge + hist_gradient_boosting for regression). "
        "The Dask engine (big snapshots) searches lightgbm too.",
    )
    trials_per_family: int = Field(
        4, ge=1, le=200, title="Trials per family", description="Optuna trials (TPE) for each family."
    )
    cv_folds: int = Field(
        3, ge=2, le=10, title="CV folds", description="Folds on training rows (stratified for classification)."
    )
    trials_per_batch: int = Field(
        2,
        ge=1,
        le=200,
        title="Trials per batch",
        description="Trials of each family drawn together and run in parallel (on the Dask cluster when there "
        "is one); a batch is pruned against the earlier batches only. The same value gives the same trials "
        "and choice on any number of workers; 1 is the fully sequential search. Raise it for a bigger cluster.",
    )
    time_budget_seconds: float | None = Field(
        None,
        gt=0,
        title="Time budget (s)",
        description="Start no new batch after this long (the first batch of every family always runs); "
        "empty for no limit. With a budget, a slower machine may run fewer trials.",
    )

    def families_for(self, task: TaskType) -> list[ModelFamily]:
        """The families to search for `task`, in order, without repeats; a family of the other kind is refused.

        Raises:
            ValueError: A family that cannot fit the task (e.g. logistic_regression for a regression).
        """
        families = list(dict.fromkeys(self.families or DEFAULT_FAMILIES[task.is_classification]))
        wrong = CLASSIFICATION_ONLY if not task.is_classification else REGRESSION_ONLY
        for family in families:
            if family in wrong:
                raise ValueError(
                    f"model family {family.value!r} does not fit a {task.value} task: use {wrong[family].value!r}"
                )
        return families


def make_pipeline(config: DatasetConfig, estimator: BaseEstimator, seed: int = 0) -> Pipeline:
    """Preprocessing and model in one pipeline, so serving applies exactly the training transformations.

    `seed` seeds the preprocessing's own randomness (the target encoder's cross-fitting folds).
    """
    return Pipeline([("preprocess", build_preprocessor(config, seed)), ("model", estimator)])


def build_model(config: DatasetConfig, family: ModelFamily | str, params: dict[str, Any], seed: int) -> Pipeline:
    """An unfitted pipeline of `family` with exactly `params` (what the search refits and ships)."""
    estimator = clone(base_estimator(ModelFamily(family), config.task.is_classification, seed))
    return make_pipeline(config, estimator.set_params(**params), seed)


def _plain(params: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.item() if isinstance(v, np.generic) else v) for k, v in params.items()}


def _data_shape(y: pd.Series, folds: list[tuple[Any, Any]], classification: bool) -> DataShape:
    fold_rows = min(len(train) for train, _ in folds)
    if not classification:
        return DataShape(fold_rows, None)
    smallest = min(int(y.iloc[train].value_counts().min()) for train, _ in folds)
    return DataShape(fold_rows, smallest)


def _fold_scores(
    pipeline: Pipeline,
    X: pd.DataFrame,
    y: pd.Series,
    folds: list[tuple[Any, Any]],
    scorer: Callable[..., float],
    after_fold: Callable[[int, Any, Any, float], bool] | None = None,
) -> list[float]:
    """Fit on each fold's training rows and score its validation rows, one fold at a time.

    With `after_fold`, it is called after each fold with (fold index, the fold's fitted model, its validation
    rows, the running mean); after a fold but the last, True ends the trial there (pruned) and the scores so
    far are returned.
    """
    scores: list[float] = []
    for step, (train, valid) in enumerate(folds):
        fitted = clone(pipeline).fit(X.iloc[train], y.iloc[train])
        scores.append(float(scorer(fitted, X.iloc[valid], y.iloc[valid])))
        stop = after_fold is not None and after_fold(step, fitted, valid, float(np.mean(scores)))
        if stop and step < len(folds) - 1:
            break
    return scores


def constant_baseline(
    X: pd.DataFrame, y: pd.Series, folds: list[tuple[Any, Any]], scoring: Scoring, classification: bool
) -> list[float]:
    """CV scores of the constant predictor (class prior, or the mean) on the same folds."""
    dummy = DummyClassifier(strategy="prior") if classification else DummyRegressor(strategy="mean")
    return _fold_scores(Pipeline([("model", dummy)]), X, y, folds, get_scorer(scoring.scorer))


def _quiet_optuna() -> None:
    # Our own log line per trial says more (family, params, state); Optuna's would repeat it.
    optuna.logging.set_verbosity(optuna.logging.WARNING)


def _pruner() -> optuna.pruners.BasePruner:
    """Median pruning across folds (Optuna's), the same in the driver and in every trial.

    A trial stops when its running mean falls below the median of the completed trials' at the same fold,
    once two trials completed.
    """
    return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)


@dataclass(frozen=True)
class SearchData:
    """What every trial reads: the rows, the folds, the scorer and the constant predictor's fold scores.

    Built once per search; on a cluster it is sent to the workers once and every trial reads that copy.
    """

    config: DatasetConfig
    X: pd.DataFrame = field(repr=False)
    y: pd.Series = field(repr=False)
    folds: list[tuple[Any, Any]] = field(repr=False)
    scoring: Scoring
    shape: DataShape
    baseline_scores: list[float]
    seed: int


def prepare_search(train: pd.DataFrame, config: DatasetConfig, spec: SearchSpec, seed: int) -> SearchData:
    """Inputs, target, folds (seeded), the search space's scale and the constant predictor's CV scores."""
    classification = config.task.is_classification
    X, y = prepare_inputs(train, config), prepare_target(train, config)
    scoring = scoring_for(config.task)
    times = train[config.time_column].reset_index(drop=True) if config.split_strategy == "time" else None
    folds = cv_folds(X, y, config, spec.cv_folds, seed, times)
    shape = _data_shape(y, folds, classification)
    return SearchData(
        config, X, y, folds, scoring, shape, constant_baseline(X, y, folds, scoring, classification), seed
    )


@dataclass(frozen=True)
class TrialJob:
    """One configuration to cross-validate, and what its pruning compares with.

    `earlier` holds the family's trials that completed in earlier batches, and only those: a trial is
    never pruned against one that runs beside it, so the outcome does not depend on which finishes first.
    """

    family: ModelFamily
    params: dict[str, Any]
    index: int  # the trial's number in its family's study
    earlier: tuple[optuna.trial.FrozenTrial, ...] = field(default=(), repr=False)

    @property
    def name(self) -> str:
        """e.g. `hist_gradient_boosting-3` (the Prefect task run's name)."""
        return f"{self.family.value}-{self.index}"


@dataclass(frozen=True)
class TrialOutcome:
    """Fold scores of one trial (fewer than the folds when pruned), in the scorer's higher-is-better sense."""

    scores: list[float]
    pruned: bool
    degenerate: bool
    seconds: float
    # A completed classifier trial's `fold_predictions` per fold (what calibration reads), else None
    predictions: tuple[tuple[np.ndarray, np.ndarray], ...] | None = field(default=None, repr=False)

    @property
    def running_means(self) -> list[float]:
        """The running CV mean after each fold (what the pruner compares)."""
        return [float(np.mean(self.scores[: i + 1])) for i in range(len(self.scores))]


def evaluate_trial(data: SearchData, job: TrialJob) -> TrialOutcome:
    """Cross-validate one configuration, fold by fold, pruned by Optuna's median pruner against `job.earlier`.

    Pure and self-contained (a fresh estimator, a throw-away in-memory study holding only the earlier
    trials), so it runs the same in this process or on any worker of a cluster.
    """
    judge = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0), pruner=_pruner())
    judge.add_trials(job.earlier)
    trial = judge.ask()

    pipeline = build_model(data.config, job.family, job.params, data.seed)  # never shared between trials
    kept: list[tuple[np.ndarray, np.ndarray]] | None = [] if data.config.task.is_classification else None
    classes = list(np.unique(data.y.to_numpy()))

    def after_fold(step: int, fitted: Any, valid: Any, running_mean: float) -> bool:
        nonlocal kept
        if kept is not None:  # the fold's predictions, which calibration reads if this trial is chosen
            try:
                kept.append(fold_predictions(fitted, data.X.iloc[valid], classes))
            except ValueError:  # a fold without a class: calibration fits the folds itself and says why
                kept = None
        if step == len(data.folds) - 1:
            return False
        trial.report(running_mean, step)
        return trial.should_prune()

    started = time.perf_counter()
    scores = _fold_scores(pipeline, data.X, data.y, data.folds, get_scorer(data.scoring.scorer), after_fold)
    seconds = time.perf_counter() - started
    pruned = len(scores) < len(data.folds)
    degenerate = not pruned and all(
        abs(s - b) <= DEGENERATE_TOLERANCE for s, b in zip(scores, data.baseline_scores, strict=True)
    )
    predictions = tuple(kept) if kept is not None and not pruned else None
    return TrialOutcome(scores, pruned, degenerate, seconds, predictions)


def refit(data: SearchData, family: str, params: dict[str, Any]) -> Pipeline:
    """The chosen configuration, built from exactly its parameters, fitted on all training rows."""
    return build_model(data.config, family, params, data.seed).fit(data.X, data.y)


def refit_rows(train: pd.DataFrame, config: DatasetConfig, family: str, params: dict[str, Any], seed: int) -> Pipeline:
    """The chosen configuration fitted on `train` (every training row, when the search saw a sample of them)."""
    return build_model(config, family, params, seed).fit(prepare_inputs(train, config), prepare_target(train, config))


RunBatch = Callable[[list[TrialJob]], list[TrialOutcome]]


def _trial_record(job: TrialJob, outcome: TrialOutcome) -> Trial:
    state = "pruned" if outcome.pruned else ("degenerate" if outcome.degenerate else "complete")
    return Trial(
        job.family.value,
        job.params,
        outcome.running_means[-1],
        float(np.std(outcome.scores)),
        outcome.seconds,
        job.index,
        state,
        len(outcome.scores),
    )


def trial_key(family: str, params: dict[str, Any]) -> tuple[str, str]:
    """A configuration's key (family, its parameters as sorted JSON): equal keys fit equal models."""
    return family, json.dumps(params, sort_keys=True, default=str)


def run_trials(
    data: SearchData,
    spec: SearchSpec,
    run_batch: RunBatch | None = None,
    on_trial: Callable[[int, int, Trial], None] | None = None,
    predictions: dict[tuple[str, str], Any] | None = None,
) -> list[Trial]:
    """Optuna (TPE, seeded per family) over each family, in batches of `spec.trials_per_batch` per family.

    Each round asks every family for its next batch, hands all of them to `run_batch` (which may run
    them in parallel, anywhere, but returns the outcomes in the order given) and tells Optuna the
    results in trial order. The trials, their pruning and the choice therefore depend on the seed and
    the batch size, never on how many workers ran them. Returns the trials family by family, numbered.
    """
    _quiet_optuna()
    families = spec.families_for(data.config.task)
    studies = {
        family: optuna.create_study(
            direction="maximize", sampler=optuna.samplers.TPESampler(seed=data.seed + index), pruner=_pruner()
        )
        for index, family in enumerate(families)
    }
    run_batch = run_batch or (lambda jobs: [evaluate_trial(data, job) for job in jobs])
    total = len(families) * spec.trials_per_family
    done: list[Trial] = []
    started = time.perf_counter()
    while True:
        asked: list[tuple[optuna.Study, optuna.Trial, TrialJob]] = []
        for family, study in studies.items():
            earlier = tuple(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))
            for _ in range(min(spec.trials_per_batch, spec.trials_per_family - len(study.trials))):
                trial = study.ask()
                job = TrialJob(family, _plain(suggest(family, trial, data.shape)), trial.number, earlier)
                asked.append((study, trial, job))
        if not asked:
            break
        outcomes = run_batch([job for _, _, job in asked])
        if len(outcomes) != len(asked):
            raise RuntimeError(f"{len(asked)} trials were run but {len(outcomes)} outcomes came back")
        for (study, trial, job), outcome in zip(asked, outcomes, strict=True):
            for step, value in enumerate(outcome.running_means):
                trial.report(value, step)
            if outcome.pruned:
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            else:
                study.tell(trial, outcome.running_means[-1])
            done.append(_trial_record(job, outcome))
            if predictions is not None and outcome.predictions is not None:
                predictions[trial_key(job.family.value, job.params)] = outcome.predictions
            _log_trial(done[-1], len(done), total, data.scoring)
            if on_trial is not None:
                on_trial(len(done), total, done[-1])
        elapsed = time.perf_counter() - started
        if spec.time_budget_seconds is not None and elapsed >= spec.time_budget_seconds and len(done) < total:
            log.info("time budget: the search stopped after %d of %d trials (%.1fs)", len(done), total, elapsed)
            break
    order = {family.value: index for index, family in enumerate(families)}
    ranked = sorted(done, key=lambda t: (order[t.family], t.number))
    return [replace(t, number=number) for number, t in enumerate(ranked)]


def _log_trial(trial: Trial, done: int, total: int, scoring: Scoring) -> None:
    log.info(
        "trial %d/%d %s %s: cv %s %.4f ± %.4f (%.1fs)%s",
        done,
        total,
        trial.family,
        trial.params,
        scoring.metric,
        scoring.sign * trial.cv_mean,
        trial.cv_std,
        trial.seconds,
        "" if trial.state == "complete" else f" [{trial.state}]",
    )


def run_search(
    data: SearchData,
    spec: SearchSpec,
    run_batch: RunBatch | None = None,
    fit: Callable[[SearchData, str, dict[str, Any]], Pipeline] = refit,
    on_trial: Callable[[int, int, Trial], None] | None = None,
) -> SearchResult:
    """Run the trials (`run_trials`), choose (`choose`), refit the chosen configuration on all rows (`fit`).

    A classifier is then calibrated when it helps (`core.modeling.calibration.choose_calibration`, on the
    chosen configuration's out-of-fold predictions on `data.folds`): the refitted estimator is shipped
    inside a `CalibratedClassifierCV`, or as it is.
    """
    families = spec.families_for(data.config.task)
    log.info(
        "search: %s x %d trials (batches of %d), %d-fold CV on %d rows (%s); constant predictor scores %.4f; "
        "leaves up to %d rows",
        [f.value for f in families],
        spec.trials_per_family,
        spec.trials_per_batch,
        spec.cv_folds,
        len(data.X),
        data.scoring.metric,
        data.scoring.sign * float(np.mean(data.baseline_scores)),
        data.shape.max_leaf,
    )
    kept: dict[tuple[str, str], Any] = {}  # completed classifier trials' out-of-fold predictions
    trials = run_trials(data, spec, run_batch, on_trial, kept)
    best = choose(trials)
    model = fit(data, best.family, best.params)
    calibration = None
    if data.config.task.is_classification:  # on the chosen trial's own fold models' predictions, when kept
        unfitted = build_model(data.config, best.family, best.params, data.seed)
        oof = kept.get(trial_key(best.family, best.params))
        calibration = choose_calibration(unfitted, data.X, data.y, data.folds, predictions=oof)
        model = calibrate(model, calibration)
    log.info(
        "chosen: trial %d, %s %s (cv %s %.4f on %d rows), refitted",
        best.number,
        best.family,
        best.params,
        data.scoring.metric,
        data.scoring.sign * best.cv_mean,
        len(data.X),
    )
    return SearchResult(
        model,
        best.family,
        best.params,
        best.cv_mean,
        data.scoring.scorer,
        trials,
        data.scoring.metric,
        float(np.mean(data.baseline_scores)),
        calibration,
    )


def search_models(
    train: pd.DataFrame,
    config: DatasetConfig,
    spec: SearchSpec,
    seed: int,
    on_trial: Callable[[int, int, Trial], None] | None = None,
    run_batch: RunBatch | None = None,
) -> SearchResult:
    """Optuna search over each family with CV on `train`; refit the chosen configuration on all of `train`.

    Args:
        train: Training rows (never the holdout).
        config: Dataset description.
        spec: Families, trial budget, batch size, folds and time budget.
        seed: Seeds the samplers, the folds and the models.
        on_trial: Called after each trial with (done, total, trial), for progress reporting.
        run_batch: Runs a batch of trials (default: one after another in this process).
    """
    return run_search(prepare_search(train, config, spec, seed), spec, run_batch, on_trial=on_trial)
