"""The search's cross-validation folds: shuffled (stratified for classification), or in time order."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from sklearn.model_selection import KFold, StratifiedKFold

from core.data.dataset import DatasetConfig
from core.data.split import time_folds


def cv_folds(
    X: pd.DataFrame, y: pd.Series, config: DatasetConfig, n_folds: int, seed: int, times: pd.Series | None = None
) -> list[tuple[Any, Any]]:
    """Train/validation indices of each fold.

    With `times` (the time split): expanding windows in time order (`core.data.split.time_folds`), every
    class in each fold's training and validation rows. Else shuffled folds, stratified for classification
    (every class needs n_folds rows).
    """
    if times is not None:
        folds = time_folds(times, n_folds)
        if config.task.is_classification:
            everywhere = set(y.unique())
            for number, (train, valid) in enumerate(folds, start=1):
                for part, rows in (("training", train), ("validation", valid)):
                    missing = everywhere - set(y.iloc[rows].unique())
                    if missing:
                        raise ValueError(
                            f"time-ordered CV fold {number} of {n_folds} has no {config.target!r} = "
                            f"{sorted(map(str, missing))} in its {part} rows: lower cv_folds, add rows, or use "
                            "split strategy random"
                        )
        return folds
    if not config.task.is_classification:
        return list(KFold(n_splits=n_folds, shuffle=True, random_state=seed).split(X))
    counts = y.value_counts()
    if counts.min() < n_folds:
        smallest = counts.idxmin()
        smallest = smallest.item() if isinstance(smallest, np.generic) else smallest
        raise ValueError(
            f"class {smallest!r} of {config.target!r} has {counts.min()} training rows, fewer than "
            f"cv_folds={n_folds}: lower cv_folds or add rows of that class"
        )
    return list(StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed).split(X, y))
