"""Monitoring's Prefect tasks: thin wrappers over core (statistics, rules, reports) and adapters (I/O).

The drift statistics and rules are in `core/monitoring/drift.py` (decay in `core/monitoring/decay.py`, windows and
the verdict in `core/monitoring/drift_analysis.py`), the reports in `core/monitoring/drift_report.py` and the page per
model over time in `core/monitoring/model_page.py`, the reference, prediction log, report and page storage in
`adapters/monitoring_store.py`; the retraining trigger is `services/retraining.py`.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from adapters import monitoring_store
from adapters.cluster import cluster_address
from adapters.history_store import list_changes
from adapters.settings import get_settings
from adapters.snapshots import read_snapshot
from core.data.dataset import DatasetConfig
from core.inference.scoring import ScoringInputError, use_cluster
from core.monitoring.drift import DriftThresholds, MonitoringError
from core.monitoring.drift_analysis import (
    REFERENCE_ROWS,
    Champion,
    Verdict,
    Window,
    WindowResult,
    label_frame,
    partition_window,
    prediction_log_window,
    reference_sample,
    result_json,
    with_estimator,
)
from core.monitoring.drift_analysis import analyse_window as analyse_one
from core.monitoring.drift_report import StoredReport, report_html
from core.monitoring.model_page import StoredPage, model_page_html, page_uri
from dask_engine.drift import ClusterPartition, analyse_on_cluster
from dask_engine.snapshots import parquet_rows
from tasks.retrying import IO

log = logging.getLogger(__name__)


@task(name="log-reference", **IO)
def log_reference(
    run_id: str, model: Any, rows: pd.DataFrame, config: DatasetConfig, seed: int = 0, scores: Any = None
) -> str:
    """Prefect task: store the reference (features + the model's outputs on `rows`) in the model's run.

    `rows` are rows the model was not fitted on (the training flow passes its holdout, with the scores its
    evaluation computed on them as `scores`, so they are not predicted again). Monitoring compares recent data
    with it. Returns the artifact path in the run.
    """
    frame = reference_sample(rows, model, config, REFERENCE_ROWS, seed, scores)
    return monitoring_store.store_reference(get_settings(), run_id, frame)


@task(name="load-champion-reference", **IO)
def load_champion_reference(model_name: str) -> Champion:
    """Prefect task: the current champion with its training reference and holdout metrics."""
    return monitoring_store.load_champion(get_settings(), model_name)


@task(name="fit-performance-estimator", cache_policy=NO_CACHE)
def fit_performance_estimator(champion: Champion, config: DatasetConfig) -> Champion:
    """Prefect task: the champion with its estimator of performance without labels, fitted on its reference rows."""
    fitted = with_estimator(champion, config)
    if fitted.estimator is not None:
        log.info("performance estimator: %s", fitted.estimator.method)
    return fitted


@task(name="load-partition", **IO)
def load_partition(uri: str, config: DatasetConfig) -> Window:
    """Prefect task: a recent partition (file or folder, the dataset's format); labels join on the id column."""
    return partition_window(read_snapshot(uri, config.format, get_settings()).frame, uri, config)


@task(name="load-prediction-log", **IO)
def load_prediction_log(model_name: str, days: int, config: DatasetConfig) -> Window:
    """Prefect task: what the serving API logged in the last `days` UTC dates (today and the `days - 1` before).

    Labels join on each record's id, or its request id (see `core.monitoring.prediction_log.prediction_log_key`).
    """
    now = datetime.now(UTC)
    frames, source = monitoring_store.read_prediction_log(get_settings(), model_name, days, now)
    window = prediction_log_window(frames, source, now, days, config)
    log.info("prediction log: %d rows from %d file(s)", len(window.frame), len(frames))
    return window


@task(name="load-labels", **IO)
def load_labels(uri: str, config: DatasetConfig) -> pd.DataFrame:
    """Prefect task: late-arriving labels (the dataset's id column and target), file or folder."""
    return label_frame(read_snapshot(uri, config.format, get_settings()).frame, uri, config)


@task(name="analyse-window", cache_policy=NO_CACHE)
def analyse_window(
    window: Window, champion: Champion, config: DatasetConfig, labels: pd.DataFrame | None, thresholds: DriftThresholds
) -> WindowResult:
    """Prefect task: compare one window with the champion's reference (see `analyse_window` in core.monitoring)."""
    result = analyse_one(window, champion, config, labels, thresholds)
    log.info("%s: %s", window.name, "; ".join(result.reasons) or result.note)
    return result


@task(name="store-monitoring-report", **IO)
def store_report(
    champion: Champion,
    windows: list[Window],
    results: list[WindowResult],
    verdict: Verdict,
    config: DatasetConfig,
    retraining: str = "",
) -> StoredReport:
    """Prefect task: the HTML report and the JSON result to `s3://<bucket>/reports/monitoring/<model>/<time>-<run>/`.

    `retraining` (e.g. why drifted data outside the training source is not retrained on) goes into both; the JSON
    also has when the run stored it (`at`, ISO 8601 UTC, the folder's time), and the HTML links the model's page over
    time (created or updated by `update_model_page` right after).
    """
    from prefect.runtime import flow_run

    settings = get_settings()
    now, model = datetime.now(UTC), champion.model_name
    folder = monitoring_store.report_folder(settings, model, now, flow_run.get_id())
    over_time = StoredPage(page_uri(settings.bucket, model), monitoring_store.page_link(settings, model))
    page = report_html(champion, windows, results, config, retraining, over_time)
    extra = {"model": model, "champion": champion.version, "retraining": retraining, "at": now.isoformat()}
    body = result_json(results, verdict, extra)
    return monitoring_store.store_report(settings, folder, page, body)


@task(name="update-model-page", **IO)
def update_model_page(model_name: str) -> StoredPage:
    """Prefect task: the model's page over time, from its stored results and champion history, to S3.

    `s3://<bucket>/reports/monitoring/<model>/index.html` (`core/monitoring/model_page.py`); it reads the newest
    `MAX_RUNS` results, so run it after `store_report` for the page to show this run.
    """
    settings = get_settings()
    runs, total = monitoring_store.read_results(settings, model_name)
    page = model_page_html(model_name, runs, list_changes(model_name, settings), total, datetime.now(UTC))
    return monitoring_store.store_page(settings, model_name, page)


@task(name="publish-monitoring-summary", cache_policy=NO_CACHE)
def publish_summary(markdown: str) -> None:
    """Prefect task: the summary table as the run's `drift-report` markdown artifact."""
    from prefect.artifacts import create_markdown_artifact

    create_markdown_artifact(markdown=markdown, key="drift-report", description="Drift monitoring summary")


# --- a big partition: statistics over its partitions on the Dask cluster ---------------------


@task(name="choose-drift-engine", **IO)
def choose_drift_engine(engine: str, uri: str, config: DatasetConfig) -> ClusterPartition | None:
    """Prefect task: the Dask scheduler and Parquet files to count the partition with, or None (here).

    `local`: here; `dask`: the cluster (an error without one, or for CSV data); `auto`: the cluster when
    there is one, the data is Parquet without a feature service, and it has at least 1,000,000 rows
    (`core.inference.scoring.CLUSTER_MIN_ROWS`, read from the footers).
    """
    from adapters.scoring_store import list_partition_files

    settings = get_settings()
    address = cluster_address(settings)
    if engine == "local" or (engine == "auto" and address is None):
        return None
    if config.format != "parquet" or config.feature_service:
        if engine == "dask":
            why = "the data is CSV" if config.format != "parquet" else "the dataset joins a feature service"
            raise MonitoringError(f"engine 'dask' counts Parquet partitions only, but {why}: use engine local")
        return None
    try:
        files = list_partition_files(uri, settings)
    except ScoringInputError:
        if engine == "dask":
            raise
        return None  # auto: the local path reads it and names what is wrong
    rows = parquet_rows(files, settings) if engine == "auto" else 0
    chosen = address if use_cluster(engine, rows, address) else None
    log.info("engine %s: partition %s %s", engine, uri, f"counted on the cluster {chosen}" if chosen else "read here")
    return ClusterPartition(chosen, uri, tuple(files)) if chosen else None


@task(name="analyse-partition-on-cluster", **IO)
def analyse_partition_on_cluster(
    cluster: ClusterPartition,
    champion: Champion,
    config: DatasetConfig,
    labels: pd.DataFrame | None,
    thresholds: DriftThresholds,
) -> tuple[Window, WindowResult]:
    """Prefect task: the partition's drift figures from per-partition counts merged (the same as on the whole frame).

    The window carries no rows (they stay on the cluster), so the report shows its figures without plots
    (see `dask_engine.drift.analyse_on_cluster`).
    """
    return analyse_on_cluster(cluster, champion, config, labels, thresholds, get_settings())
