"""Model search: Optuna (TPE, seeded) over each model family, cross-validated on training rows only.

Every trial builds its own estimator (`sklearn.base.clone`), and the model that is refitted and shipped
is built from exactly the chosen trial's parameters, so the registered pipeline is the one the search
picked (a test checks it against the logged parameters).

The search space fits the data: leaf sizes are capped by the smallest class in a CV training fold (by
the fold's size for regression), so no configuration can only ever predict the prior. A trial whose CV
score equals the constant predictor's (`DummyClassifier(strategy="prior")` / `DummyRegressor()`, scored
on the same folds) is logged as degenerate and chosen only when every trial is. Folds are scored one at
a time and Optuna's median pruner stops a trial whose running mean falls below the other trials' at
the same fold. The same seed and data give the same trials and the same choice, unless
`time_budget_seconds` ends the search first (then fewer trials may run on a slower machine).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import numpy as np
import optuna
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field
from sklearn.base import BaseEstimator, clone
from sklearn.dummy import DummyClassifier, DummyRegressor
from sklearn.ensemble import (
    HistGradientBoostingClassifier,
    HistGradientBoostingRegressor,
    RandomForestClassifier,
    RandomForestRegressor,
)
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.metrics import get_scorer
from sklearn.model_selection import KFold, StratifiedKFold
from sklearn.pipeline import Pipeline
from sklearn.tree import DecisionTreeClassifier, DecisionTreeRegressor

from core.dataset import DatasetConfig, TaskType
from core.features import build_preprocessor, prepare_inputs, prepare_target
from core.metrics import Scoring, scoring_for

log = logging.getLogger(__name__)

# A CV score within this of the constant predictor's counts as the constant predictor's.
DEGENERATE_TOLERANCE = 1e-9


class ModelFamily(StrEnum):
    """Model families the search can try (each builds a classifier or a regressor as the task needs)."""

    logistic_regression = "logistic_regression"
    ridge = "ridge"
    hist_gradient_boosting = "hist_gradient_boosting"
    random_forest = "random_forest"
    decision_tree = "decision_tree"


CLASSIFICATION_ONLY = {ModelFamily.logistic_regression: ModelFamily.ridge}
REGRESSION_ONLY = {ModelFamily.ridge: ModelFamily.logistic_regression}
DEFAULT_FAMILIES = {
    True: [ModelFamily.logistic_regression, ModelFamily.hist_gradient_boosting],  # classification
    False: [ModelFamily.ridge, ModelFamily.hist_gradient_boosting],  # regression
}


class SearchSpec(BaseModel):
    """How much searching to do, and over what."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    families: list[ModelFamily] | None = Field(
        None,
        min_length=1,
        title="Model families",
        description="Families to search, each with `trials_per_family` Optuna trials; empty for the task's "
        "default (logistic_regression + hist_gradient_boosting; ridge + hist_gradient_boosting for regression).",
    )
    trials_per_family: int = Field(
        4, ge=1, le=200, title="Trials per family", description="Optuna trials (TPE) for each family."
    )
    cv_folds: int = Field(
        3, ge=2, le=10, title="CV folds", description="Folds on training rows (stratified for classification)."
    )
    time_budget_seconds: float | None = Field(
        None,
        gt=0,
        title="Time budget (s)",
        description="Stop searching after this long (each family gets its share; at least one trial each); "
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


@dataclass(frozen=True)
class DataShape:
    """What the search space is scaled to: rows in a CV training fold and the smallest class there."""

    fold_rows: int
    smallest_class: int | None  # None for regression

    @property
    def max_leaf(self) -> int:
        """Largest `min_samples_leaf` worth trying: half the smallest class (classification) or 5 % of a fold."""
        bound = self.smallest_class // 2 if self.smallest_class is not None else self.fold_rows // 20
        return max(1, min(200, bound))


def _leaf(trial: optuna.Trial, shape: DataShape, low: int = 1) -> int:
    high = shape.max_leaf
    return trial.suggest_int("min_samples_leaf", min(low, high), high, log=high > 2 * low)


def suggest(family: ModelFamily, trial: optuna.Trial, shape: DataShape) -> dict[str, Any]:
    """Draw one configuration of `family` from ranges scaled to the data (`DataShape.max_leaf`)."""
    match family:
        case ModelFamily.logistic_regression:
            return {
                "C": trial.suggest_float("C", 1e-3, 1e2, log=True),
                "class_weight": trial.suggest_categorical("class_weight", [None, "balanced"]),
            }
        case ModelFamily.ridge:
            return {"alpha": trial.suggest_float("alpha", 1e-3, 1e3, log=True)}
        case ModelFamily.hist_gradient_boosting:
            return {
                "learning_rate": trial.suggest_float("learning_rate", 0.03, 0.3, log=True),
                "max_leaf_nodes": trial.suggest_int("max_leaf_nodes", 8, 64, log=True),
                "min_samples_leaf": _leaf(trial, shape),
                "l2_regularization": trial.suggest_float("l2_regularization", 1e-4, 10, log=True),
                "max_iter": trial.suggest_int("max_iter", 100, 300, step=100),
            }
        case ModelFamily.random_forest:
            return {
                "n_estimators": trial.suggest_int("n_estimators", 100, 200, step=100),
                "max_depth": trial.suggest_categorical("max_depth", [6, 10, None]),
                "min_samples_leaf": _leaf(trial, shape),
                "max_features": trial.suggest_categorical("max_features", ["sqrt", 0.5]),
            }
        case ModelFamily.decision_tree:
            return {"max_depth": trial.suggest_int("max_depth", 1, 3), "min_samples_leaf": _leaf(trial, shape)}
    raise ValueError(f"unknown model family {family!r}")


def base_estimator(family: ModelFamily, classification: bool, seed: int) -> BaseEstimator:
    """The family's unfitted estimator with fixed settings (each trial clones it)."""
    match family:
        case ModelFamily.logistic_regression:
            return LogisticRegression(max_iter=1000)
        case ModelFamily.ridge:
            return Ridge()
        case ModelFamily.hist_gradient_boosting:
            cls = HistGradientBoostingClassifier if classification else HistGradientBoostingRegressor
            return cls(random_state=seed)
        case ModelFamily.random_forest:
            cls = RandomForestClassifier if classification else RandomForestRegressor
            return cls(random_state=seed, n_jobs=-1)
        case ModelFamily.decision_tree:
            cls = DecisionTreeClassifier if classification else DecisionTreeRegressor
            return cls(random_state=seed)
    raise ValueError(f"unknown model family {family!r}")


@dataclass(frozen=True)
class Trial:
    """One configuration's cross-validated score (in the scorer's higher-is-better sense)."""

    family: str
    params: dict[str, Any]
    cv_mean: float
    cv_std: float
    seconds: float
    number: int = 0
    state: str = "complete"  # complete | pruned | degenerate
    folds: int = 0


@dataclass(frozen=True)
class SearchResult:
    """The refitted best pipeline and every trial behind the choice."""

    model: Pipeline = field(repr=False)
    family: str
    params: dict[str, Any]
    cv_mean: float
    scoring: str
    trials: list[Trial]
    metric: str = ""
    baseline: float = math.nan

    @property
    def cv_metric(self) -> float:
        """The chosen trial's CV score as its metric reads (e.g. RMSE positive)."""
        return self.cv_mean if self.metric in ("", self.scoring) else -self.cv_mean

    def trials_frame(self) -> pd.DataFrame:
        """Trials as a table (for the run's artifacts)."""
        return pd.DataFrame(
            [
                {
                    "number": t.number,
                    "family": t.family,
                    "state": t.state,
                    "folds": t.folds,
                    "cv_mean": t.cv_mean,
                    "cv_std": t.cv_std,
                    "seconds": t.seconds,
                }
                | {f"param_{k}": v for k, v in t.params.items()}
                for t in self.trials
            ]
        )


def make_pipeline(config: DatasetConfig, estimator: BaseEstimator) -> Pipeline:
    """Preprocessing and model in one pipeline, so serving applies exactly the training transformations."""
    return Pipeline([("preprocess", build_preprocessor(config)), ("model", estimator)])


def build_model(config: DatasetConfig, family: ModelFamily | str, params: dict[str, Any], seed: int) -> Pipeline:
    """An unfitted pipeline of `family` with exactly `params` (what the search refits and ships)."""
    estimator = clone(base_estimator(ModelFamily(family), config.task.is_classification, seed))
    return make_pipeline(config, estimator.set_params(**params))


def _plain(params: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.item() if isinstance(v, np.generic) else v) for k, v in params.items()}


def _folds(X: pd.DataFrame, y: pd.Series, config: DatasetConfig, n_folds: int, seed: int) -> list[tuple[Any, Any]]:
    """Train/validation indices of each fold; stratified for classification (every class needs n_folds rows)."""
    if not config.task.is_classification:
        return list(KFold(n_splits=n_folds, shuffle=True, random_state=seed).split(X))
    counts = y.value_counts()
    if counts.min() < n_folds:
        smallest = _plain({"class": counts.idxmin()})["class"]
        raise ValueError(
            f"class {smallest!r} of {config.target!r} has {counts.min()} training rows, fewer than "
            f"cv_folds={n_folds}: lower cv_folds or add rows of that class"
        )
    return list(StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed).split(X, y))


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
    trial: optuna.Trial | None = None,
) -> list[float]:
    """Fit on each fold's training rows and score its validation rows, one fold at a time.

    With a trial, the running mean is reported after each fold and the trial is pruned when Optuna's
    pruner says so (`optuna.TrialPruned`).
    """
    scores: list[float] = []
    for step, (train, valid) in enumerate(folds):
        fitted = clone(pipeline).fit(X.iloc[train], y.iloc[train])
        scores.append(float(scorer(fitted, X.iloc[valid], y.iloc[valid])))
        if trial is not None:
            trial.report(float(np.mean(scores)), step)
            if step < len(folds) - 1 and trial.should_prune():
                raise optuna.TrialPruned(f"running CV mean {np.mean(scores):.4f} after {step + 1} folds")
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


@dataclass
class _Search:
    """The state one search shares across families: data, folds, scorer, the baseline and the trials so far."""

    config: DatasetConfig
    X: pd.DataFrame
    y: pd.Series
    folds: list[tuple[Any, Any]]
    scoring: Scoring
    shape: DataShape
    baseline_scores: list[float]
    total: int
    on_trial: Callable[[int, int, Trial], None] | None
    trials: list[Trial] = field(default_factory=list)

    def objective(self, family: ModelFamily, base: BaseEstimator) -> Callable[[optuna.Trial], float]:
        """Optuna objective: one configuration of `family`, its own clone of `base`, scored fold by fold."""
        scorer = get_scorer(self.scoring.scorer)

        def run(trial: optuna.Trial) -> float:
            params = suggest(family, trial, self.shape)
            pipeline = make_pipeline(self.config, clone(base).set_params(**params))  # never shared between trials
            trial.set_user_attr("params", _plain(params))
            started = time.perf_counter()
            try:
                scores = _fold_scores(pipeline, self.X, self.y, self.folds, scorer, trial)
            finally:
                trial.set_user_attr("seconds", time.perf_counter() - started)
            degenerate = all(
                abs(s - b) <= DEGENERATE_TOLERANCE for s, b in zip(scores, self.baseline_scores, strict=True)
            )
            trial.set_user_attr("degenerate", degenerate)
            trial.set_user_attr("cv_std", float(np.std(scores)))
            return float(np.mean(scores))

        return run

    def record(self, family: ModelFamily) -> Callable[[optuna.Study, optuna.trial.FrozenTrial], None]:
        """Optuna callback: keep the finished trial, log it and report progress."""

        def callback(study: optuna.Study, frozen: optuna.trial.FrozenTrial) -> None:
            pruned = frozen.state is optuna.trial.TrialState.PRUNED
            state = "pruned" if pruned else ("degenerate" if frozen.user_attrs.get("degenerate") else "complete")
            values = list(frozen.intermediate_values.values())
            result = Trial(
                family.value,
                frozen.user_attrs.get("params", {}),
                float(values[-1]) if pruned else float(frozen.value),
                float(frozen.user_attrs.get("cv_std", math.nan)),
                float(frozen.user_attrs.get("seconds", 0.0)),
                len(self.trials),
                state,
                len(values),
            )
            self.trials.append(result)
            log.info(
                "trial %d/%d %s %s: cv %s %.4f ± %.4f (%.1fs)%s",
                len(self.trials),
                self.total,
                result.family,
                result.params,
                self.scoring.metric,
                self.scoring.sign * result.cv_mean,
                result.cv_std,
                result.seconds,
                "" if state == "complete" else f" [{state}]",
            )
            if self.on_trial is not None:
                self.on_trial(len(self.trials), self.total, result)

        return callback


def search_models(
    train: pd.DataFrame,
    config: DatasetConfig,
    spec: SearchSpec,
    seed: int,
    on_trial: Callable[[int, int, Trial], None] | None = None,
) -> SearchResult:
    """Optuna search over each family with CV on `train`; refit the chosen configuration on all of `train`.

    Args:
        train: Training rows (never the holdout).
        config: Dataset description.
        spec: Families, trial budget, folds and time budget.
        seed: Seeds the samplers, the folds and the models.
        on_trial: Called after each trial with (done, total, trial), for progress reporting.
    """
    _quiet_optuna()
    classification = config.task.is_classification
    families = spec.families_for(config.task)
    X, y = prepare_inputs(train, config), prepare_target(train, config)
    scoring = scoring_for(config.task)
    folds = _folds(X, y, config, spec.cv_folds, seed)
    shape = _data_shape(y, folds, classification)
    baseline_scores = constant_baseline(X, y, folds, scoring, classification)
    search = _Search(
        config, X, y, folds, scoring, shape, baseline_scores, len(families) * spec.trials_per_family, on_trial
    )
    log.info(
        "search: %s x %d trials, %d-fold CV on %d rows (%s); constant predictor scores %.4f; leaves up to %d rows",
        [f.value for f in families],
        spec.trials_per_family,
        spec.cv_folds,
        len(X),
        scoring.metric,
        scoring.sign * float(np.mean(baseline_scores)),
        shape.max_leaf,
    )
    started = time.perf_counter()
    for index, family in enumerate(families):
        base = base_estimator(family, classification, seed)
        study = optuna.create_study(
            direction="maximize",
            sampler=optuna.samplers.TPESampler(seed=seed + index),
            pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0),
        )
        objective, callbacks = search.objective(family, base), [search.record(family)]
        # The first trial always runs (a family is never skipped); the budget then shares what is left.
        study.optimize(objective, n_trials=1, callbacks=callbacks)
        timeout = None
        if spec.time_budget_seconds is not None:
            timeout = max(spec.time_budget_seconds - (time.perf_counter() - started), 0.0) / (len(families) - index)
        if spec.trials_per_family > 1 and (timeout is None or timeout > 0):
            study.optimize(objective, n_trials=spec.trials_per_family - 1, timeout=timeout, callbacks=callbacks)
        if len(study.trials) < spec.trials_per_family:
            log.info("time budget: %s stopped after %d trials", family.value, len(study.trials))

    best = choose(search.trials)
    model = build_model(config, best.family, best.params, seed).fit(X, y)
    log.info(
        "chosen: trial %d, %s %s (cv %s %.4f), refitted on %d rows",
        best.number,
        best.family,
        best.params,
        scoring.metric,
        scoring.sign * best.cv_mean,
        len(X),
    )
    return SearchResult(
        model,
        best.family,
        best.params,
        best.cv_mean,
        scoring.scorer,
        search.trials,
        scoring.metric,
        float(np.mean(baseline_scores)),
    )


def choose(trials: list[Trial]) -> Trial:
    """The best complete trial; degenerate trials only when nothing else completed (earliest wins ties).

    Raises:
        ValueError: No trial completed (every one was pruned, which the pruner's start-up trials prevent).
    """
    complete = [t for t in trials if t.state == "complete"]
    if not complete:
        complete = [t for t in trials if t.state == "degenerate"]
        if complete:
            log.warning("every trial scored the constant predictor's CV score: the chosen model is degenerate")
    if not complete:
        raise ValueError("no search trial completed")
    return max(complete, key=lambda t: (t.cv_mean, -t.number))
