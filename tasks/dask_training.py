"""Prefect tasks of the Dask engine: choose the engine, load, validate, split and train big snapshots.

The work runs on the Dask cluster (`dask_engine`: snapshots, validation, split, training); the rules (engine
choice, full-data checks, the evaluated holdout, the model) are pure (`core.dask_engine`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import replace

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from adapters.data_versions import freeze_files, frozen_files, read_manifest
from adapters.expectations import validate_frame
from adapters.settings import get_settings
from core.dask_engine.checks import combined_report, full_data_failures
from core.dask_engine.choice import choose_engine
from core.dask_engine.split import DaskSplit
from core.data.dataset import DatasetConfig
from core.data.validation import ValidationReport
from core.modeling.search import SearchResult
from dask_engine.snapshots import DaskSnapshot, columns_of, count_rows, open_snapshot
from dask_engine.split import split_snapshot
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
    checks, failures = full_data_failures(stats, config, columns, duplicated)
    sample_report = validate_frame(sample, config.model_copy(update={"min_rows": min(config.min_rows, len(sample))}))
    report = combined_report(sample_report, len(sample), stats, checks, failures)
    log.info(
        "validation (GX on %d sampled rows, full-data checks on %d rows): %s",
        len(sample),
        stats["rows"],
        report.summary(),
    )
    return report


@task(name="split-big", cache_policy=NO_CACHE)
def split_big_snapshot(snapshot: DaskSnapshot, config: DatasetConfig) -> DaskSplit:
    """Prefect task: the frozen holdout by id hash on the cluster; its evaluated subset comes back."""
    return split_snapshot(snapshot, config, get_settings())


@task(name="train-big", cache_policy=NO_CACHE)
def train_big_candidate(snapshot: DaskSnapshot, split: DaskSplit, config: DatasetConfig, seed: int) -> SearchResult:
    """Prefect task: LightGBM's Dask estimator on every training row; the local model in a raw-rows pipeline."""
    model, params = train_lightgbm(snapshot, split, config, get_settings(), seed)
    scoring = "roc_auc" if config.task.is_classification else "neg_root_mean_squared_error"
    # No cross-validation on the cluster: one configuration, judged on the holdout like every candidate.
    return SearchResult(
        model=model, family="lightgbm_dask", params=params, cv_mean=math.nan, scoring=scoring, trials=[]
    )
