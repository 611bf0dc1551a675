"""The Dask engine's split, partition by partition (pure): the frozen holdout and what the flow keeps of it.

Each partition hashes its ids with `core.data.split`'s function, so the holdout is the pandas engine's, id for
id. Only ids below `evaluation_threshold` (a subset of the holdout of about `max_holdout_rows` rows) are
collected for evaluation; the training rows' count and time window are counted per partition and merged.

The training rows are the ids whose bucket is at or above the holdout's threshold; those in the first buckets of
that range, up to `sample_threshold`, are the search sample (about `search_sample_rows` rows): the same rows in
every run on the same data, never holdout rows. A bigger sample (`fit_sample_threshold`) starts at the same
bucket, so it holds the search sample.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from core.data.dataset import DatasetConfig
from core.data.split import holdout_buckets, holdout_threshold

_BUCKETS = 10_000
EVERY_TRAINING_ROW = _BUCKETS  # as a `below` bound: no training id is left out


def evaluation_threshold(config: DatasetConfig, rows: int) -> int:
    """Buckets below this are the evaluated holdout: a subset of the frozen holdout of about `max_holdout_rows`.

    The frozen holdout is every id whose bucket is below `holdout_threshold`; for a big snapshot only ids
    below this (smaller or equal) threshold are collected and scored, so they are holdout rows, the same
    ones in every run on the same data, and never training rows.
    """
    full = holdout_threshold(config.holdout_fraction)
    wanted = math.ceil(config.max_holdout_rows / max(rows, 1) * _BUCKETS)
    return max(1, min(full, wanted))


def sample_threshold(config: DatasetConfig, rows: int) -> int:
    """Training ids below this bucket (and at or above the holdout's) are the search sample.

    About `search_sample_rows` of the snapshot's `rows` (the footers' count, known before the split); every
    training row when the snapshot has fewer.
    """
    start = holdout_threshold(config.holdout_fraction)
    wanted = math.ceil(config.search_sample_rows / max(rows, 1) * _BUCKETS)
    return min(_BUCKETS, start + max(1, wanted))


def fit_sample_threshold(config: DatasetConfig, rows_train: int, fit_rows: int) -> int:
    """Training ids below this bucket are a sample of at most about `fit_rows` of the `rows_train` training rows.

    It starts where the search sample starts, so it holds the search sample whenever it is bigger.
    """
    start = holdout_threshold(config.holdout_fraction)
    share = min(1.0, fit_rows / max(rows_train, 1))
    return min(_BUCKETS, start + max(1, math.floor(share * (_BUCKETS - start))))


def _buckets(frame: pd.DataFrame, config: DatasetConfig) -> pd.Series:
    return pd.Series(holdout_buckets(frame[config.id_column], config.holdout_salt), index=frame.index)


def holdout_part(frame: pd.DataFrame, config: DatasetConfig, below: int) -> pd.DataFrame:
    """One partition's rows whose id bucket is below `below` (the evaluated holdout with `evaluation_threshold`)."""
    return frame.loc[_buckets(frame, config).to_numpy() < below]


def train_part(frame: pd.DataFrame, config: DatasetConfig, below: int = _BUCKETS) -> pd.DataFrame:
    """One partition's training rows (ids outside the frozen holdout); with `below`, only ids below that bucket.

    `below` is `sample_threshold` for the search sample, `fit_sample_threshold` for a bigger sample.
    """
    buckets = _buckets(frame, config).to_numpy()
    return frame.loc[(buckets >= holdout_threshold(config.holdout_fraction)) & (buckets < below)]


def split_counts(frame: pd.DataFrame, config: DatasetConfig) -> dict[str, Any]:
    """One partition's training and holdout rows, and its training rows' first and last time."""
    buckets = _buckets(frame, config).to_numpy()
    held = buckets < holdout_threshold(config.holdout_fraction)
    train = frame.loc[~held]
    out: dict[str, Any] = {"train": int((~held).sum()), "holdout": int(held.sum()), "low": None, "high": None}
    if config.time_column and len(train):
        times = train[config.time_column].dropna()
        if len(times):
            out["low"], out["high"] = str(times.min()), str(times.max())
    return out


def merge_split_counts(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """The `split_counts` of two partitions together (associative)."""
    lows = [v for v in (a["low"], b["low"]) if v is not None]
    highs = [v for v in (a["high"], b["high"]) if v is not None]
    return {
        "train": a["train"] + b["train"],
        "holdout": a["holdout"] + b["holdout"],
        "low": min(lows) if lows else None,
        "high": max(highs) if highs else None,
    }


@dataclass(frozen=True)
class DaskSplit:
    """What the flow's process keeps of a big snapshot's split: the evaluated holdout and the search sample.

    `train` is the search sample (training ids below `sample_threshold`): the model search's rows, and the
    model's signature, input example and explanation baseline.
    """

    holdout: pd.DataFrame = field(repr=False)
    train: pd.DataFrame = field(repr=False)
    rows_train: int
    rows_holdout: int  # the whole frozen holdout; `holdout` is its evaluated subset
    window: tuple[str, str] | None
    evaluation_threshold: int
    sample_threshold: int = _BUCKETS

    strategy: str = "random"
    why: str = (
        "random: ids held out by a hash of the id, partition by partition (the Dask engine draws no time-ordered "
        "holdout yet)"
    )

    @property
    def rows_sample(self) -> int:
        """Training rows in the search sample."""
        return len(self.train)

    def training_window(self, column: str | None) -> tuple[str, str] | None:
        """First and last time of the training rows (computed on the cluster)."""
        return self.window if column else None
