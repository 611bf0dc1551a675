"""The split of a big snapshot on the cluster: the frozen holdout by id hash, its evaluated subset collected.

Which rows are holdout, training or evaluated is `core.dask_engine.split`; this runs it on every
partition and brings back only the evaluated holdout, a few thousand training rows and the counts.
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
    split_counts,
    train_part,
)
from core.data.dataset import DatasetConfig
from dask_engine.snapshots import DaskSnapshot, read_frame, tree_reduce

log = logging.getLogger(__name__)

_TRAIN_SAMPLE_ROWS = 5_000


def _check_parts(config: DatasetConfig, train_sample: pd.DataFrame, train_rows: int, holdout: pd.DataFrame) -> None:
    for part, rows, name in ((train_sample, train_rows, "training"), (holdout, len(holdout), "holdout")):
        if rows == 0 or part[config.target].nunique() < 2:
            kind = "classes" if config.task.is_classification else "distinct values"
            raise ValueError(f"the {name} part has fewer than two {kind} of {config.target!r}; need more data")


def split_snapshot(snapshot: DaskSnapshot, config: DatasetConfig, settings: Settings) -> DaskSplit:
    """The frozen holdout by id hash per partition (the same ids as `core.data.split`), its evaluated subset collected.

    Only ids below `evaluation_threshold` (a subset of the holdout of about `max_holdout_rows` rows) come to
    this process; the counts and the training window are computed on the cluster.
    """
    from dask import delayed

    client = dask_client(settings)
    frame = read_frame(snapshot, settings)
    below = evaluation_threshold(config, snapshot.rows)
    holdout = frame.map_partitions(holdout_part, config, below, meta=frame._meta)
    counts = tree_reduce([delayed(split_counts)(p, config) for p in frame.to_delayed()], merge_split_counts)
    sample = (
        frame.partitions[0]
        .map_partitions(train_part, config, meta=frame._meta)
        .head(_TRAIN_SAMPLE_ROWS, npartitions=1, compute=False)
    )
    wanted = [delayed(pd.concat)(holdout.to_delayed()), counts, delayed(pd.concat)(sample.to_delayed())]
    holdout_frame, totals, train_sample = client.compute(wanted, sync=True)
    holdout_frame = holdout_frame.reset_index(drop=True)
    _check_parts(config, train_sample, totals["train"], holdout_frame)
    window = (totals["low"], totals["high"]) if totals["low"] is not None else None
    log.info(
        "split on the cluster: %d training rows, %d holdout rows, %d of them evaluated (ids below bucket %d)",
        totals["train"],
        totals["holdout"],
        len(holdout_frame),
        below,
    )
    return DaskSplit(
        holdout_frame, train_sample.reset_index(drop=True), totals["train"], totals["holdout"], window, below
    )
