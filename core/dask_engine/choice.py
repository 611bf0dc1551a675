"""Which engine trains a snapshot: pandas in the flow's process, or Dask on a cluster (pure)."""

from __future__ import annotations

from core.data.dataset import DatasetConfig


def choose_engine(config: DatasetConfig, rows: int | None) -> str:
    """`pandas` or `dask` for a snapshot of `rows` rows (None: unknown, e.g. CSV without metadata)."""
    if config.engine != "auto":
        return config.engine
    return "dask" if rows is not None and rows >= config.dask_min_rows else "pandas"
