"""Prefect tasks of the Dask engine: choose the engine, load, validate, split and fit big snapshots.

The work runs on the Dask cluster (`dask_engine`: snapshots, validation, split, training); the rules (engine
choice, full-data checks, the evaluated holdout, the search sample, where the final fit runs, the model) are pure
(`core.dask_engine`). The model search itself is the pandas engine's, on the search sample (`tasks.preparation`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from adapters.data_versions import freeze_files, frozen_files, read_manifest
from adapters.expectations import validate_with_full_data
from adapters.settings import get_settings
from core.dask_engine.choice import choose_engine
from core.dask_engine.fitting import fit_bytes_per_row, plan_fit
from core.dask_engine.split import DaskSplit
from core.data.dataset import DatasetConfig
from core.data.validation import ValidationReport
from core.modeling.calibration import base_classifier, calibrate
from core.modeling.search import SearchResult, refit_rows
from core.modeling.training_record import DASK_CLUSTER
from dask_engine.snapshots import DaskSnapshot, columns_of, count_rows, open_snapshot
from dask_engine.split import split_snapshot, training_rows
from dask_engine.training import train_lightgbm
from dask_engine.validation import full_data_stats
from tasks.retrying import IO

log = logging.getLogger(__name__)


@task(name="engine", **IO)
def choose_snapshot_engine(config: DatasetConfig, data_version: str | None = None) -> str:
    """Prefect task: `pandas` or `dask`.

    With `engine: auto`, by the row count in the Parquet footers, or in the manifest of the frozen `data_version`
    (the source may have changed since).
    """
    rows = None
    if config.engine == "auto":
        rows = _frozen_rows(config, data_version) if data_version else count_rows(config, get_settings())
    engine = choose_engine(config, rows)
    log.info("engine %s (config %s, %s rows, dask from %d)", engine, config.engine, rows, config.dask_min_rows)
    return engine


@task(name="load-big", **IO)
def load_big_snapshot(config: DatasetConfig) -> DaskSnapshot:
    """Prefect task: the snapshot's partitions, row count and data version (no data read)."""
    return open_snapshot(config, get_settings())


def _frozen_rows(config: DatasetConfig, data_version: str) -> int | None:
    manifest = read_manifest(get_settings(), config.model_name, data_version)
    return manifest.rows if manifest is not None and manifest.format == "parquet" else None


@task(name="load-big-frozen", **IO, timeout_seconds=3600)
def load_frozen_big_snapshot(config: DatasetConfig, data_version: str) -> DaskSnapshot:
    """Prefect task: the model's frozen `data_version`, read in place by the cluster.

    Each blob's hash is checked as it streams through the flow's process first; a big run is so reproduced on
    the engine that trained it.
    """
    manifest, uris = frozen_files(get_settings(), config.model_name, data_version)
    log.info(
        "frozen data version %s of %s: %d file(s), %d rows", data_version, config.model_name, len(uris), manifest.rows
    )
    return DaskSnapshot(manifest.source, tuple(uris), manifest.rows, data_version)


@task(name="freeze-big", **IO, timeout_seconds=3600)
def freeze_big_snapshot(config: DatasetConfig, snapshot: DaskSnapshot) -> DaskSnapshot:
    """Prefect task: keep the partitions as the model's data version, before validation; the snapshot by its content.

    Each file is read once in chunks to hash it (the flow's memory holds one chunk), then copied inside S3 when its
    blob is absent. The snapshot's data version becomes the content version every engine computes, so the run
    can be reproduced from it (`mlops reproduce`, `--data-version`).
    """
    settings = get_settings()
    frozen = freeze_files(
        settings,
        config.model_name,
        config.source,
        config.format,
        snapshot.files,
        snapshot.rows,
        columns_of(snapshot, settings),
        str(flow_run.get_id()) if flow_run.get_id() else None,  # the Prefect flow run that froze it
        config.name,
    )
    return replace(snapshot, data_version=frozen.manifest.data_version)


@task(name="validate-big", cache_policy=NO_CACHE)
def check_big_snapshot(snapshot: DaskSnapshot, config: DatasetConfig, seed: int) -> ValidationReport:
    """Prefect task: Great Expectations on a sample plus full-data checks computed on the cluster."""
    stats, columns, duplicated, sample = full_data_stats(
        snapshot, config, get_settings(), config.validation_sample_rows, seed
    )
    return validate_with_full_data(sample, config, stats, columns, duplicated)


@task(name="split-big", cache_policy=NO_CACHE)
def split_big_snapshot(snapshot: DaskSnapshot, config: DatasetConfig) -> DaskSplit:
    """Prefect task: the frozen holdout by id hash on the cluster; its evaluated subset comes back."""
    return split_snapshot(snapshot, config, get_settings())


@dataclass(frozen=True)
class BigFit:
    """The shipped model of a big snapshot, and where and on how many training rows it was fitted."""

    model: Any
    where: str
    rows: int
    reason: str | None


@task(name="fit-big", cache_policy=NO_CACHE)
def fit_big_candidate(
    snapshot: DaskSnapshot, split: DaskSplit, config: DatasetConfig, search: SearchResult, seed: int
) -> BigFit:
    """Prefect task: the search's chosen configuration fitted on every training row (`core.dask_engine.fitting`).

    LightGBM by its Dask estimator on the cluster; another family in this process when the training rows fit in
    its memory (estimated on the search sample, against what `psutil` says is available), else on the largest
    sample by id hash that does. Calibrated as the search chose (on the search sample's out-of-fold predictions).
    """
    import psutil

    settings = get_settings()
    inputs = getattr(base_classifier(search.model), "n_features_in_", len(config.input_columns))
    frame_bytes = split.train.memory_usage(deep=True).sum() / max(split.rows_sample, 1)
    per_row = fit_bytes_per_row(frame_bytes, inputs)
    available = psutil.virtual_memory().available
    plan = plan_fit(config, search.family, split.rows_train, split.rows_sample, per_row, available)
    if plan.reuse:
        fit = BigFit(search.model, plan.where, split.rows_sample, plan.reason)
    elif plan.where == DASK_CLUSTER:
        model, _ = train_lightgbm(snapshot, split, config, settings, search.params, seed)
        fit = BigFit(_calibrated(model, search), plan.where, split.rows_train, plan.reason)
    else:
        train = training_rows(snapshot, config, settings, plan.below)
        model = refit_rows(train, config, search.family, search.params, seed)
        fit = BigFit(_calibrated(model, search), plan.where, len(train), plan.reason)
    log.info(
        "final fit of %s %s: %d of %d training rows in the %s (%.0f bytes a row estimated, %.1f GiB available)%s",
        search.family,
        search.params,
        fit.rows,
        split.rows_train,
        fit.where,
        per_row,
        available / 2**30,
        f": {fit.reason}" if fit.reason else "",
    )
    return fit


def _calibrated(model: Any, search: SearchResult) -> Any:
    """The final fit calibrated as the search chose for its configuration (none for a regressor)."""
    return calibrate(model, search.calibration) if search.calibration is not None else model
