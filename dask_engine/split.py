"""The split of a big snapshot on the cluster: the frozen holdout by id hash, its evaluated subset collected.

Which rows are holdout, training, evaluated or sampled is `core.dask_engine.split`; this runs it on every
partition and brings back only the evaluated holdout, the search sample and the counts, in one pass; and, for a
final fit in the flow's process, the training rows below a bucket (`training_rows`).
"""

from __future__ import annotations

import logging

import pandas as pd

from adapters.cluster import dask_client
from adapters.settings import Settings
from core.dask_engine.split import (
    DaskSplit,
    evaluation_threshold,
    holdout_part,
    merge_split_counts,
    sample_threshold,
    split_counts,
    train_part,
)
from core.data.dataset import DatasetConfig
from dask_engine.snapshots import DaskSnapshot, read_frame, tree_reduce

log = logging.getLogger(__name__)


def _check_parts(config: DatasetConfig, train_sample: pd.DataFrame, train_rows: int, holdout: pd.DataFrame) -> None:
    for part, rows, name in ((train_sample, train_rows, "training"), (holdout, len(holdout), "holdout")):
        if rows == 0 or part[config.target].nunique() < 2:
            kind = "classes" if config.task.is_classification else "distinct values"
            raise ValueError(f"the {name} part has fewer than two {kind} of {config.target!r}; need more data")


def split_snapshot(snapshot: DaskSnapshot, config: DatasetConfig, settings: Settings) -> DaskSplit:
    """The frozen holdout by id hash per partition (the same ids as `core.data.split`), its evaluated subset collected.

    Only ids below `evaluation_threshold` (a subset of the holdout of about `max_holdout_rows` rows) and the search
    sample (training ids below `sample_threshold`, about `search_sample_rows` rows, in file order) come to this
    process; the counts and the training window are computed on the cluster.
    """
    from dask import delayed

    client = dask_client(settings)
    frame = read_frame(snapshot, settings)
    below = evaluation_threshold(config, snapshot.rows)
    holdout = frame.map_partitions(holdout_part, config, below, meta=frame._meta)
    counts = tree_reduce([delayed(split_counts)(p, config) for p in frame.to_delayed()], merge_split_counts)
    sampled = sample_threshold(config, snapshot.rows)
    sample = frame.map_partitions(train_part, config, sampled, meta=frame._meta)
    wanted = [delayed(pd.concat)(holdout.to_delayed()), counts, delayed(pd.concat)(sample.to_delayed())]
    holdout_frame, totals, train_sample = client.compute(wanted, sync=True)
    holdout_frame = holdout_frame.reset_index(drop=True)
    _check_parts(config, train_sample, totals["train"], holdout_frame)
    window = (totals["low"], totals["high"]) if totals["low"] is not None else None
    log.info(
        "split on the cluster: %d training rows (%d of them the search sample, ids below bucket %d), %d holdout "
        "rows, %d of them evaluated (ids below bucket %d)",
        totals["train"],
        len(train_sample),
        sampled,
        totals["holdout"],
        len(holdout_frame),
        below,
    )
    train_sample = train_sample.reset_index(drop=True)
    return DaskSplit(holdout_frame, train_sample, totals["train"], totals["holdout"], window, below, sampled)


def training_rows(snapshot: DaskSnapshot, config: DatasetConfig, settings: Settings, below: int) -> pd.DataFrame:
    """The training rows whose id bucket is below `below` (every one with `EVERY_TRAINING_ROW`), in file order."""
    client = dask_client(settings)
    frame = read_frame(snapshot, settings)
    rows = client.compute(frame.map_partitions(train_part, config, below, meta=frame._meta), sync=True)
    log.info("collected %d training rows (ids below bucket %d) from the cluster", len(rows), below)
    return rows.reset_index(drop=True)
