"""Which engine trains a snapshot: pandas in the flow's process, or Dask on a cluster (pure)."""

from __future__ import annotations

from core.data.dataset import DatasetConfig


def choose_engine(config: DatasetConfig, rows: int | None) -> str:
    """`pandas` or `dask` for a snapshot of `rows` rows (None: unknown, e.g. CSV or SQL without a row count).

    `auto` (the default) chooses dask from `dask_min_rows` rows, except for a model with a feature service:
    the Dask engine does not join one, and the pandas engine does.
    """
    if config.engine != "auto":
        return config.engine
    if config.feature_service:
        return "pandas"
    return "dask" if rows is not None and rows >= config.dask_min_rows else "pandas"
