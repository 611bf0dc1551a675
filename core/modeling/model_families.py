"""The model families the search tries: each family's estimator and its search space, scaled to the data.

A family builds a classifier or a regressor as the task needs (`base_estimator`); some fit only one kind
(`CLASSIFICATION_ONLY`, `REGRESSION_ONLY`). `lightgbm` is LightGBM's scikit-learn estimator (one OpenMP thread: a
trial runs beside others, and a served model answers one row in about 5 ms instead of 13 ms with every thread);
on the Dask engine its chosen configuration is fitted on every training row by LightGBM's Dask estimator.
`suggest` draws one configuration from ranges that fit the data: leaf sizes are capped by the smallest class in a
CV training fold (by the fold's size for regression, `DataShape.max_leaf`), so no configuration can only ever
predict the prior. The search itself is `core/modeling/search.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import optuna
from sklearn.base import BaseEstimator
from sklearn.ensemble import (
    HistGradientBoostingClassifier,
    HistGradientBoostingRegressor,
    RandomForestClassifier,
    RandomForestRegressor,
)
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.tree import DecisionTreeClassifier, DecisionTreeRegressor


class ModelFamily(StrEnum):
    """Model families the search can try (each builds a classifier or a regressor as the task needs)."""

    logistic_regression = "logistic_regression"
    ridge = "ridge"
    hist_gradient_boosting = "hist_gradient_boosting"
    random_forest = "random_forest"
    decision_tree = "decision_tree"
    lightgbm = "lightgbm"


CLASSIFICATION_ONLY = {ModelFamily.logistic_regression: ModelFamily.ridge}
REGRESSION_ONLY = {ModelFamily.ridge: ModelFamily.logistic_regression}
DEFAULT_FAMILIES = {
    True: [ModelFamily.logistic_regression, ModelFamily.hist_gradient_boosting],  # classification
    False: [ModelFamily.ridge, ModelFamily.hist_gradient_boosting],  # regression
}


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


def _leaf(trial: optuna.Trial, shape: DataShape, low: int = 1, name: str = "min_samples_leaf") -> int:
    high = shape.max_leaf
    return trial.suggest_int(name, min(low, high), high, log=high > 2 * low)


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
        case ModelFamily.lightgbm:
            return {
                "n_estimators": trial.suggest_int("n_estimators", 100, 300, step=100),
                "learning_rate": trial.suggest_float("learning_rate", 0.03, 0.3, log=True),
                "num_leaves": trial.suggest_int("num_leaves", 8, 64, log=True),
                "min_child_samples": _leaf(trial, shape, name="min_child_samples"),
                "reg_lambda": trial.suggest_float("reg_lambda", 1e-4, 10, log=True),
            }
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
        case ModelFamily.lightgbm:
            from lightgbm import LGBMClassifier, LGBMRegressor

            cls = LGBMClassifier if classification else LGBMRegressor
            return cls(random_state=seed, n_jobs=1, verbose=-1)
    raise ValueError(f"unknown model family {family!r}")
