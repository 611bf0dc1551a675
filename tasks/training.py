"""Model search: several model families, random search, cross-validation on training rows only."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import numpy as np
import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict, Field
from scipy.stats import loguniform, randint
from sklearn.base import BaseEstimator
from sklearn.ensemble import HistGradientBoostingClassifier, RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import ParameterSampler, StratifiedKFold, cross_validate
from sklearn.pipeline import Pipeline
from sklearn.tree import DecisionTreeClassifier

from mlops.dataset import DatasetConfig, TaskType
from tasks.features import build_preprocessor, prepare_inputs, prepare_target

log = logging.getLogger(__name__)


class ModelFamily(StrEnum):
    """Model families the search can try."""

    logistic_regression = "logistic_regression"
    hist_gradient_boosting = "hist_gradient_boosting"
    random_forest = "random_forest"
    decision_tree = "decision_tree"


class SearchSpec(BaseModel):
    """How much searching to do, and over what."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    families: list[ModelFamily] = Field(
        default=[ModelFamily.logistic_regression, ModelFamily.hist_gradient_boosting],
        min_length=1,
        title="Model families",
        description="Families to search; each gets `trials_per_family` random configurations.",
    )
    trials_per_family: int = Field(
        4, ge=1, le=200, title="Trials per family", description="Random-search budget for each family."
    )
    cv_folds: int = Field(3, ge=2, le=10, title="CV folds", description="Stratified folds on training rows.")


def _search_space(family: ModelFamily, seed: int) -> tuple[BaseEstimator, dict[str, Any]]:
    """The estimator and the distributions its hyper-parameters are drawn from."""
    match family:
        case ModelFamily.logistic_regression:
            return LogisticRegression(max_iter=1000), {
                "C": loguniform(1e-3, 1e2),
                "class_weight": [None, "balanced"],
            }
        case ModelFamily.hist_gradient_boosting:
            return HistGradientBoostingClassifier(random_state=seed), {
                "learning_rate": loguniform(0.03, 0.3),
                "max_leaf_nodes": randint(8, 64),
                "min_samples_leaf": randint(10, 200),
                "l2_regularization": loguniform(1e-4, 10),
                "max_iter": [100, 200, 300],
            }
        case ModelFamily.random_forest:
            return RandomForestClassifier(random_state=seed, n_jobs=-1), {
                "n_estimators": [100, 200],
                "max_depth": [6, 10, None],
                "min_samples_leaf": [1, 5, 20],
                "max_features": ["sqrt", 0.5],
            }
        case ModelFamily.decision_tree:
            return DecisionTreeClassifier(random_state=seed), {
                "max_depth": [1, 2, 3],
                "min_samples_leaf": [50, 200],
            }
    raise ValueError(f"unknown model family {family!r}")


def scoring_for(task: TaskType) -> str:
    """Cross-validation score used to rank configurations."""
    return "roc_auc" if task is TaskType.binary else "roc_auc_ovr"


@dataclass(frozen=True)
class Trial:
    """One configuration's cross-validated score."""

    family: str
    params: dict[str, Any]
    cv_mean: float
    cv_std: float
    seconds: float


@dataclass(frozen=True)
class SearchResult:
    """The refitted best pipeline and every trial behind the choice."""

    model: Pipeline = field(repr=False)
    family: str
    params: dict[str, Any]
    cv_mean: float
    scoring: str
    trials: list[Trial]

    def trials_frame(self) -> pd.DataFrame:
        """Trials as a table (for the run's artifacts)."""
        return pd.DataFrame(
            [
                {"family": t.family, "cv_mean": t.cv_mean, "cv_std": t.cv_std, "seconds": t.seconds}
                | {f"param_{k}": v for k, v in t.params.items()}
                for t in self.trials
            ]
        )


def make_pipeline(config: DatasetConfig, estimator: BaseEstimator) -> Pipeline:
    """Preprocessing and model in one pipeline, so serving applies exactly the training transformations."""
    return Pipeline([("preprocess", build_preprocessor(config)), ("model", estimator)])


def _plain(params: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.item() if isinstance(v, np.generic) else v) for k, v in params.items()}


def search_models(
    train: pd.DataFrame,
    config: DatasetConfig,
    spec: SearchSpec,
    seed: int,
    on_trial: Callable[[int, int, Trial], None] | None = None,
) -> SearchResult:
    """Random search over each family with stratified CV on `train`; refit the best on all of `train`.

    Args:
        train: Training rows (never the holdout).
        config: Dataset description.
        spec: Families, budget and folds.
        seed: Seeds the sampler, the folds and the models.
        on_trial: Called after each trial with (done, total, trial), for progress reporting.
    """
    X, y = prepare_inputs(train, config), prepare_target(train, config)
    scoring = scoring_for(config.task)
    folds = StratifiedKFold(n_splits=spec.cv_folds, shuffle=True, random_state=seed)
    plan = [
        (family, estimator, params)
        for family in dict.fromkeys(spec.families)
        for estimator, space in [_search_space(family, seed)]
        for params in ParameterSampler(space, n_iter=spec.trials_per_family, random_state=seed)
    ]
    trials: list[Trial] = []
    best: tuple[float, BaseEstimator, Trial] | None = None
    for done, (family, estimator, params) in enumerate(plan, start=1):
        started = time.perf_counter()
        pipeline = make_pipeline(config, estimator).set_params(**{f"model__{k}": v for k, v in params.items()})
        scores = cross_validate(pipeline, X, y, cv=folds, scoring=scoring, error_score="raise")["test_score"]
        trial = Trial(
            family.value,
            _plain(params),
            float(np.mean(scores)),
            float(np.std(scores)),
            time.perf_counter() - started,
        )
        trials.append(trial)
        log.info(
            "trial %d/%d %s %s: cv %s %.4f ± %.4f (%.1fs)",
            done,
            len(plan),
            trial.family,
            trial.params,
            scoring,
            trial.cv_mean,
            trial.cv_std,
            trial.seconds,
        )
        if on_trial is not None:
            on_trial(done, len(plan), trial)
        if best is None or trial.cv_mean > best[0]:
            best = (trial.cv_mean, pipeline, trial)
    assert best is not None  # plan is never empty: families has min_length=1, trials >= 1
    _, pipeline, trial = best
    model = pipeline.fit(X, y)
    log.info(
        "best: %s %s (cv %s %.4f), refitted on %d rows",
        trial.family,
        trial.params,
        scoring,
        trial.cv_mean,
        len(X),
    )
    return SearchResult(model, trial.family, trial.params, trial.cv_mean, scoring, trials)


@task(name="train", cache_policy=NO_CACHE)
def train_candidate(train: pd.DataFrame, config: DatasetConfig, spec: SearchSpec, seed: int) -> SearchResult:
    """Prefect task: search and refit; progress shows as a Prefect progress artifact."""
    from prefect.artifacts import create_progress_artifact, update_progress_artifact

    progress_id = create_progress_artifact(
        progress=0.0, key="search-progress", description="Model search: share of trials done"
    )

    def report(done: int, total: int, trial: Trial) -> None:
        update_progress_artifact(progress_id, progress=100.0 * done / total)

    return search_models(train, config, spec, seed, on_trial=report)
