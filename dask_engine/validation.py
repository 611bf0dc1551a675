"""Full-data checks of a big snapshot on the cluster: every partition summarised, merged, and a sample.

What the summaries hold and how the failures are worded is `core.dask_engine.checks`; Great Expectations
checks the sample this returns (`tasks.dask_training.check_big_snapshot`).
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from adapters.cluster import dask_client
from adapters.settings import Settings
from core.dask_engine.checks import Stats, merge_stats, partition_stats
from core.data.dataset import DatasetConfig
from dask_engine.snapshots import DaskSnapshot, read_frame, tree_reduce


def full_data_stats(
    snapshot: DaskSnapshot, config: DatasetConfig, settings: Settings, sample_rows: int, seed: int
) -> tuple[Stats, list[str], int, pd.DataFrame]:
    """On the cluster: every partition's summary (merged by a tree reduction), duplicated ids, and a sample.

    Returns (merged stats, column names, duplicated id count, sample as pandas).
    """
    from dask import delayed

    client = dask_client(settings)
    frame = read_frame(snapshot, settings)
    columns = [str(c) for c in frame.columns]
    stats = tree_reduce([delayed(partition_stats)(p, config) for p in frame.to_delayed()], merge_stats)
    duplicated: Any = 0
    if config.id_column in columns:
        ids = frame[config.id_column].dropna()
        duplicated = ids.count() - ids.drop_duplicates(split_out=max(frame.npartitions // 2, 1)).count()
    fraction = min(1.0, sample_rows / max(snapshot.rows, 1))
    sample = frame.sample(frac=fraction, random_state=seed) if fraction < 1 else frame
    # One graph of delayed objects (mixing them with expressions reorders the results in dask 2026.8)
    duplicated = duplicated.to_delayed() if hasattr(duplicated, "to_delayed") else delayed(duplicated)
    wanted = [stats, duplicated, delayed(pd.concat)(sample.to_delayed())]
    merged, duplicated, sample_frame = client.compute(wanted, sync=True)
    return merged, columns, int(duplicated), sample_frame.reset_index(drop=True)
