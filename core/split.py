"""Frozen holdout: a row is held out by a hash of its id, so it stays out across runs and versions."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from core.dataset import DatasetConfig

log = logging.getLogger(__name__)

_BUCKETS = 10_000


@dataclass(frozen=True)
class Split:
    """Training rows and frozen holdout rows of one snapshot."""

    train: pd.DataFrame = field(repr=False)
    holdout: pd.DataFrame = field(repr=False)


def holdout_mask(ids: pd.Series, fraction: float, salt: str) -> np.ndarray:
    """True for ids in the holdout: blake2b(salt + id) mod 10,000 below `fraction` * 10,000.

    Depends only on the id's text and the salt, never on row order, row count or other rows.
    """
    key = salt.encode()
    threshold = round(fraction * _BUCKETS)
    buckets = np.fromiter(
        (
            int.from_bytes(hashlib.blake2b(str(i).encode(), digest_size=8, key=key).digest(), "big") % _BUCKETS
            for i in ids
        ),
        dtype=np.int64,
        count=len(ids),
    )
    return buckets < threshold


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
