"""The data a training run learns from, whatever the engine: load, join features, validate, split and train.

The `pandas` engine reads the snapshot into memory (and joins the feature store's features as of each row's
time when the model has a feature service); the `dask` engine keeps the partitions on the cluster, validates a
sample with Great Expectations plus full-data checks computed there, and trains LightGBM's Dask estimator.
The dataset config's `engine` chooses (`auto` counts the Parquet rows).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pandas as pd

from core.dask_engine.split import DaskSplit
from core.data.dataset import DatasetConfig
from core.data.feature_history import JoinReport
from core.data.split import Split
from core.data.validation import DataValidationError, ValidationReport
from core.modeling.search import SearchResult, SearchSpec
from tasks.dask_training import (
    check_big_snapshot,
    choose_snapshot_engine,
    freeze_big_snapshot,
    load_big_snapshot,
    load_frozen_big_snapshot,
    split_big_snapshot,
    train_big_candidate,
)
from tasks.features import join_features
from tasks.loading import load_snapshot
from tasks.reports import store_validation_report
from tasks.split import split_snapshot
from tasks.training import train_candidate
from tasks.validation import check_snapshot


@dataclass(frozen=True)
class PreparedData:
    """A validated snapshot, ready to split.

    Attributes:
        snapshot: The snapshot (in memory, or the cluster's partitions with the `dask` engine).
        frame: The rows to learn from (after the feature join), None with the `dask` engine.
        join: The feature store's point-in-time join report, when there is a feature service.
        report: The validation report (it passed).
    """

    snapshot: Any
    frame: pd.DataFrame | None
    join: JoinReport | None
    report: ValidationReport

    @property
    def data_version(self) -> str:
        """The snapshot's data version."""
        return self.snapshot.data_version

    @property
    def on_cluster(self) -> bool:
        """Whether the rows stay on the Dask cluster."""
        return self.frame is None


def prepare_data(config: DatasetConfig, seed: int, data_version: str | None = None) -> PreparedData:
    """Load (and freeze) and validate the snapshot (store the report); raise `DataValidationError` when it fails.

    With `data_version`, the model's frozen version of that name, on the engine the config chooses for its size.
    On the `dask` engine the partitions are frozen by streaming them (hashed in chunks, copied inside S3), and a
    frozen version is read in place from its blobs.
    """
    if choose_snapshot_engine(config, data_version) == "dask":
        big = load_frozen_big_snapshot(config, data_version) if data_version else None
        snapshot, frame, join = big or freeze_big_snapshot(config, load_big_snapshot(config)), None, None
        report = check_big_snapshot(snapshot, config, seed)
    else:
        snapshot = load_snapshot(config, data_version)  # frozen before it is validated
        # With a feature service, the store's features as of each row's time; lost rows are counted, not hidden.
        frame, join = join_features(snapshot.frame, config) if config.feature_service else (snapshot.frame, None)
        report = check_snapshot(frame, config, snapshot.data_version, join)
    store_validation_report(config.name, snapshot.data_version, report.to_json(), report.to_markdown())
    if not report.success:
        raise DataValidationError(report.failures, report)
    return PreparedData(snapshot, frame, join, report)


def split_data(data: PreparedData, config: DatasetConfig) -> Split | DaskSplit:
    """Split off the frozen holdout: in memory, or by id hash per partition on the cluster."""
    return split_big_snapshot(data.snapshot, config) if data.on_cluster else split_snapshot(data.frame, config)


def fit_candidate(
    data: PreparedData, split: Split | DaskSplit, config: DatasetConfig, search: SearchSpec, seed: int
) -> SearchResult:
    """Train the candidate on the training rows of `split` (`split_data`).

    In memory: the model search with cross-validation. On the cluster: LightGBM's Dask estimator on every
    training row.
    """
    if data.on_cluster:
        return train_big_candidate(data.snapshot, split, config, seed)
    return train_candidate(split.train, config, search, seed)
