"""Frozen holdout: a row is held out by a hash of its id, so it stays out across runs and versions."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from core.data.dataset import DatasetConfig

log = logging.getLogger(__name__)

_BUCKETS = 10_000


@dataclass(frozen=True)
class Split:
    """Training rows and frozen holdout rows of one snapshot."""

    train: pd.DataFrame = field(repr=False)
    holdout: pd.DataFrame = field(repr=False)

    @property
    def rows_train(self) -> int:
        """Training rows (the Dask engine's split has the same properties)."""
        return len(self.train)

    @property
    def rows_holdout(self) -> int:
        """Holdout rows."""
        return len(self.holdout)

    def training_window(self, column: str | None) -> tuple[str, str] | None:
        """First and last value of the time column in the training rows."""
        if column is None:
            return None
        values = self.train[column].dropna()
        if values.empty:
            return None
        return tuple(v.isoformat() if hasattr(v, "isoformat") else str(v) for v in (values.min(), values.max()))


def holdout_buckets(ids: pd.Series, salt: str) -> np.ndarray:
    """Each id's bucket in [0, 10,000): blake2b(salt + id) mod 10,000 (the Dask engine hashes per partition)."""
    key = salt.encode()
    return np.fromiter(
        (
            int.from_bytes(hashlib.blake2b(str(i).encode(), digest_size=8, key=key).digest(), "big") % _BUCKETS
            for i in ids
        ),
        dtype=np.int64,
        count=len(ids),
    )


def holdout_threshold(fraction: float) -> int:
    """Buckets below this are held out."""
    return round(fraction * _BUCKETS)


def holdout_mask(ids: pd.Series, fraction: float, salt: str) -> np.ndarray:
    """True for ids in the holdout: blake2b(salt + id) mod 10,000 below `fraction` * 10,000.

    Depends only on the id's text and the salt, never on row order, row count or other rows.
    """
    return holdout_buckets(ids, salt) < holdout_threshold(fraction)


def split_frame(frame: pd.DataFrame, config: DatasetConfig) -> Split:
    """Split a validated frame into training rows and holdout rows by id."""
    mask = holdout_mask(frame[config.id_column], config.holdout_fraction, config.holdout_salt)
    split = Split(train=frame.loc[~mask].reset_index(drop=True), holdout=frame.loc[mask].reset_index(drop=True))
    for part, name in ((split.train, "training"), (split.holdout, "holdout")):
        if part[config.target].nunique() < 2:
            kind = "classes" if config.task.is_classification else "distinct values"
            raise ValueError(f"the {name} part has fewer than two {kind} of {config.target!r}; need more data")
    log.info("split: %d training rows, %d holdout rows", len(split.train), len(split.holdout))
    return split
