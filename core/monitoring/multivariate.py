"""Multivariate drift: whether a classifier can tell the window's rows from the reference's (pure).

Per-feature statistics miss a change in how features move together (each column the same, their relation not),
and fire on shifts of features the model hardly uses. A domain classifier sees the rows whole: gradient-boosted
trees learn to tell reference rows (0) from window rows (1), and their cross-validated ROC AUC says how well they
can. About 0.5: the two are alike; towards 1: they differ.

**The threshold comes from permutations**: the same cross-validation with the rows' domain labels shuffled gives
the AUCs of two samples that cannot differ; the window has drifted when its AUC is above every permuted one
(p < 1 / (permutations + 1)) and at least `min_auc`, so a huge window does not drift on a difference too small to
matter. **What separates the windows**: the features whose shuffling lowers the held-out AUC most (permutation
importance on each fold's held-out rows), named when drifted.

Both sides are sampled to at most `MAX_ROWS` rows each (seeded), so the cost does not grow with the window. The
trees get one OpenMP thread: on 2 cores with other work running, two threads took 23-42 s instead of 2.8-3.1 s
(spinning threads waiting for each other; `bench/monitoring_scale.py`), and on a quiet machine one is as fast.
No I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

MAX_ROWS = 5000  # rows per side at most
FOLDS = 3
IMPORTANCE_FLOOR = 0.01  # a feature separates the windows when shuffling it lowers the AUC by at least this
NAMED_FEATURES = 5


@dataclass(frozen=True)
class MultivariateDrift:
    """The domain classifier's verdict on one window.

    Attributes:
        auc: Cross-validated ROC AUC of telling window rows from reference rows.
        threshold: The AUC above which the window drifted (the highest permuted AUC, at least `min_auc`).
        permuted: The AUCs with the domain labels shuffled (the null distribution).
        drifted: `auc` is above `threshold`.
        features: (feature, AUC drop when shuffled) of the features that separate the windows, most first;
            computed only when drifted.
        rows: Rows used per side (reference, window).
    """

    auc: float
    threshold: float
    permuted: list[float]
    drifted: bool
    features: list[tuple[str, float]] = field(default_factory=list)
    rows: tuple[int, int] = (0, 0)

    @property
    def p_value(self) -> float:
        """The permutation p-value: the share of permuted AUCs (and the observed one) at least as high."""
        return (1 + sum(a >= self.auc for a in self.permuted)) / (1 + len(self.permuted))

    def describe(self) -> str:
        """One line for reports and reasons."""
        named = ", ".join(f"{name} ({drop:.3f})" for name, drop in self.features)
        verdict = (
            f"drifted: AUC {self.auc:.3f} > {self.threshold:.3f}"
            if self.drifted
            else (f"no multivariate drift: AUC {self.auc:.3f} <= {self.threshold:.3f}")
        )
        return verdict + (f"; separated by {named}" if named else "")


MAX_CATEGORIES = 250  # a column's rarer categories beyond these share one code (the trees take up to 255)


def domain_frame(reference: pd.DataFrame, current: pd.DataFrame, columns: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Both sides as the trees take them, encoded once: numbers as float, other columns as category codes.

    Returns the matrix (reference rows first) and which of its columns are categorical.
    """
    both = pd.concat([reference[columns], current[columns]], ignore_index=True)
    matrix = np.empty((len(both), len(columns)))
    categorical = np.zeros(len(columns), dtype=bool)
    for k, column in enumerate(columns):
        values = both[column]
        if pd.api.types.is_bool_dtype(values) or not pd.api.types.is_numeric_dtype(values):
            text = values.where(values.isna(), values.astype(str))
            ranked = text.value_counts().index[:MAX_CATEGORIES]  # the most frequent keep their own code
            codes = pd.Categorical(text, categories=ranked).codes.astype(float)
            codes[(codes < 0) & text.notna().to_numpy()] = MAX_CATEGORIES  # the rest: one code
            matrix[:, k] = np.where(codes < 0, np.nan, codes)  # missing stays missing
            categorical[k] = True
        else:
            matrix[:, k] = values.to_numpy(dtype=float, na_value=np.nan)
    return matrix, categorical


def _classifier(categorical: np.ndarray, seed: int) -> Any:
    from sklearn.ensemble import HistGradientBoostingClassifier

    return HistGradientBoostingClassifier(
        max_iter=30, learning_rate=0.2, max_leaf_nodes=15, early_stopping=False,
        categorical_features=categorical if categorical.any() else None, random_state=seed,
    )  # fmt: skip


def _folds(domain: np.ndarray, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    from sklearn.model_selection import StratifiedKFold

    return list(StratifiedKFold(FOLDS, shuffle=True, random_state=seed).split(np.zeros(len(domain)), domain))


Folds = list[tuple[np.ndarray, np.ndarray]]


def cross_validated_auc(
    matrix: np.ndarray, categorical: np.ndarray, domain: np.ndarray, folds: Folds, seed: int
) -> float:
    """ROC AUC of the out-of-fold scores of a domain classifier."""
    from sklearn.metrics import roc_auc_score

    scores = np.empty(len(domain))
    for fit, held in folds:
        model = _classifier(categorical, seed).fit(matrix[fit], domain[fit])
        scores[held] = model.predict_proba(matrix[held])[:, 1]
    return float(roc_auc_score(domain, scores))


def separating_features(
    matrix: np.ndarray, categorical: np.ndarray, columns: list[str], domain: np.ndarray, folds: Folds, seed: int
) -> list[tuple[str, float]]:
    """The features whose shuffling lowers the held-out AUC by at least `IMPORTANCE_FLOOR`, most first."""
    from sklearn.inspection import permutation_importance

    drops = np.zeros(len(columns))
    for fit, held in folds:
        model = _classifier(categorical, seed).fit(matrix[fit], domain[fit])
        result = permutation_importance(
            model, matrix[held], domain[held], scoring="roc_auc", n_repeats=3, random_state=seed
        )
        drops += result.importances_mean / len(folds)
    ranked = sorted(zip(columns, drops, strict=True), key=lambda pair: -pair[1])
    return [(str(name), float(drop)) for name, drop in ranked if drop >= IMPORTANCE_FLOOR][:NAMED_FEATURES]


def domain_classifier_drift(
    reference: pd.DataFrame,
    current: pd.DataFrame,
    columns: list[str],
    permutations: int,
    min_auc: float,
    seed: int = 0,
) -> MultivariateDrift:
    """Whether a domain classifier tells `current` from `reference` better than chance (see the module)."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1, user_api="openmp"):
        return _domain_classifier_drift(reference, current, columns, permutations, min_auc, seed)


def _domain_classifier_drift(
    reference: pd.DataFrame, current: pd.DataFrame, columns: list[str], permutations: int, min_auc: float, seed: int
) -> MultivariateDrift:
    rng = np.random.default_rng(seed)
    sides = [side.iloc[np.sort(rng.choice(len(side), MAX_ROWS, replace=False))] if len(side) > MAX_ROWS else side
             for side in (reference, current)]  # fmt: skip
    matrix, categorical = domain_frame(sides[0], sides[1], columns)
    domain = np.r_[np.zeros(len(sides[0]), dtype=int), np.ones(len(sides[1]), dtype=int)]
    folds = _folds(domain, seed)
    auc = cross_validated_auc(matrix, categorical, domain, folds, seed)
    permuted = [
        cross_validated_auc(matrix, categorical, rng.permutation(domain), folds, seed) for _ in range(permutations)
    ]
    threshold = max([min_auc, *permuted])
    drifted = auc > threshold
    features = separating_features(matrix, categorical, columns, domain, folds, seed) if drifted else []
    return MultivariateDrift(auc, threshold, permuted, drifted, features, (len(sides[0]), len(sides[1])))
