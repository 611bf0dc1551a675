"""The holdout: the latest period of a time-ordered table, or rows held out by a hash of their id.

- time (the default with a time column): rows at or after a cut-off are the holdout, the model is scored on
  the period after everything it learnt from, as it will be used; the cut-off is the config's `split.cutoff`,
  else the time below which `1 - holdout_fraction` of the rows fall. As rows are appended, the cut-off only
  moves forward, so no holdout row was ever a training row of an earlier champion.
- random: blake2b(salt + id) decides, so a row stays out across runs and versions, whatever else changes.
"""

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
    """Training rows and holdout rows of one snapshot, and how they were split (for the run and the card)."""

    train: pd.DataFrame = field(repr=False)
    holdout: pd.DataFrame = field(repr=False)
    strategy: str = "random"
    why: str = ""
    cutoff: str | None = None

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


def search_sample(train: pd.DataFrame, config: DatasetConfig) -> pd.DataFrame:
    """About `search_sample_rows` of the training rows for the model search, chosen by id hash; all when fewer.

    The rows whose `holdout_buckets` are lowest, whole buckets at a time, until there are at least
    `search_sample_rows` of them (at most one bucket, about 1/10,000 of the rows, over): the same rows in every
    run on the same data, whatever their order, and training rows only because `train` holds no other.
    """
    if len(train) <= config.search_sample_rows:
        return train
    buckets = holdout_buckets(train[config.id_column], config.holdout_salt)
    below = int(np.searchsorted(np.cumsum(np.bincount(buckets, minlength=_BUCKETS)), config.search_sample_rows)) + 1
    return train.loc[buckets < below].reset_index(drop=True)


def as_utc(values: pd.Series) -> pd.Series:
    """Date/time values (datetime or ISO text) as UTC timestamps; naive ones are read as UTC, others are NaT."""
    if pd.api.types.is_datetime64_any_dtype(values.dtype):
        return pd.to_datetime(values, utc=True)
    return pd.to_datetime(values, utc=True, errors="coerce", format="ISO8601")


def time_cutoff(times: pd.Series, fraction: float) -> pd.Timestamp:
    """The time at which the latest `fraction` of the rows (with a time) begins."""
    ordered = times.dropna().sort_values(ignore_index=True)
    if ordered.empty:
        raise ValueError("the time column has no values: a time split needs them (or split strategy: random)")
    return ordered.iloc[min(len(ordered) - 1, int(np.floor((1 - fraction) * len(ordered))))]


def _time_mask(frame: pd.DataFrame, config: DatasetConfig) -> tuple[np.ndarray, str, str]:
    times = as_utc(frame[config.time_column])
    if config.split.cutoff is not None:
        cutoff = pd.Timestamp(config.split.cutoff)
        cutoff = cutoff.tz_localize("UTC") if cutoff.tzinfo is None else cutoff.tz_convert("UTC")
        how = f"rows at or after the configured cut-off {cutoff.isoformat()}"
    else:
        cutoff = time_cutoff(times, config.holdout_fraction)
        how = f"the latest {config.holdout_fraction:.0%} of rows by {config.time_column} (from {cutoff.isoformat()})"
    undated = int(times.isna().sum())
    why = (
        f"time: the holdout is {how}, so the model is scored on a period after everything it learnt from; "
        "the CV folds keep time order (each fold validates on rows later than its training rows)"
        + (f"; {undated} row(s) without a {config.time_column} are training rows" if undated else "")
    )
    return (times >= cutoff).fillna(False).to_numpy(dtype=bool), why, cutoff.isoformat()


def split_frame(frame: pd.DataFrame, config: DatasetConfig) -> Split:
    """Split a validated frame into training rows and holdout rows: the latest period, or ids by hash."""
    if config.split_strategy == "time":
        mask, why, cutoff = _time_mask(frame, config)
        strategy = "time"
    else:
        mask = holdout_mask(frame[config.id_column], config.holdout_fraction, config.holdout_salt)
        strategy, cutoff = "random", None
        reason = "configured (split strategy random)" if config.split.strategy == "random" else "no time_column"
        why = f"random: ids held out by a hash of the id ({reason}); a row stays out across runs"
    split = Split(
        train=frame.loc[~mask].reset_index(drop=True),
        holdout=frame.loc[mask].reset_index(drop=True),
        strategy=strategy,
        why=why,
        cutoff=cutoff,
    )
    for part, name in ((split.train, "training"), (split.holdout, "holdout")):
        if part[config.target].nunique() < 2:
            kind = "classes" if config.task.is_classification else "distinct values"
            raise ValueError(f"the {name} part has fewer than two {kind} of {config.target!r}; need more data")
    log.info("split: %d training rows, %d holdout rows; %s", len(split.train), len(split.holdout), why)
    return split


def time_folds(times: pd.Series, n_folds: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Expanding-window folds in time order: fold k trains on the earliest k+1 blocks, validates on the next.

    The rows are ordered by time (rows without a time first, then ties in row order) and cut into
    `n_folds + 1` blocks of nearly equal size, as scikit-learn's `TimeSeriesSplit` does; indices are
    positions in `times`. A block boundary never cuts rows of the same time apart, so no validation row
    shares its time with a training row.
    """
    stamps = as_utc(times)
    keys = stamps.dt.tz_convert(None).to_numpy(dtype="datetime64[ns]").astype("int64")
    keys[stamps.isna().to_numpy()] = np.iinfo("int64").min  # undated rows first
    order = np.argsort(keys, kind="stable")
    ordered = keys[order]
    n = len(order)
    bounds = [n * k // (n_folds + 1) for k in range(1, n_folds + 1)]
    folds = []
    for k, bound in enumerate(bounds):
        start = bound
        while 0 < start < n and ordered[start] == ordered[start - 1]:
            start += 1  # keep equal times on one side
        end = bounds[k + 1] if k + 1 < len(bounds) else n
        while 0 < end < n and ordered[end] == ordered[end - 1]:
            end += 1
        if start >= end:
            raise ValueError(f"too few distinct times for {n_folds} time-ordered folds: lower cv_folds")
        folds.append((np.sort(order[:start]), np.sort(order[start:end])))
    return folds
