"""Batch scoring and drift statistics over partitions on a Dask cluster.

The same work as the single-process paths (`adapters.scoring_store.score_partition_files`,
`core.drift_analysis.analyse`), spread over a cluster's workers:
- the source is read with dask.dataframe from S3 (s3fs, `adapters.cluster.s3_storage_options`), one
  partition per Parquet file, in sorted file order, with Arrow-backed columns (the predictions keep the
  id and time columns' Arrow types);
- each worker loads the model **once** (a cache in the worker process keyed by tracking server, model
  and version, `worker_model`), not once per partition, and predicts its partitions `chunk_rows` rows at
  a time;
- scoring: each partition writes its own prediction file `part-<file index>.parquet` under the run's
  version (the same names as the single-process path) and returns a partial tally; the flow merges the
  tallies into the summary and publishes the manifest exactly as before (one PUT, the flip);
- drift: each partition returns counts over the reference's bins (`core.drift.window_partial`), summed
  in the flow into the figures of the whole window (`core.drift.partial_drifts`), plus the labelled rows'
  labels and scores when labels are given.

Memory per worker is bounded by the cluster's `memory_limit` (`MLOPS_DASK_WORKER_MEMORY` for the local
stack's workers) and is, per task, about one input file's needed columns plus a chunk's predictions; each
run records every worker's limit and peak resident memory (`worker_memory`).
"""

from __future__ import annotations

import logging
import resource
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from adapters import registry
from adapters.cluster import s3_storage_options
from adapters.scoring_store import write_predictions
from adapters.settings import Settings
from adapters.store import fs_path, s3_filesystem
from core.dataset import DatasetConfig
from core.drift import (
    DriftThresholds,
    MonitoringError,
    WindowPartial,
    WindowReference,
    merge_partials,
    window_partial,
)
from core.drift_analysis import WindowResult, join_labels, judge_window
from core.features import prepare_inputs
from core.metrics import model_classes, model_scores
from core.scoring import (
    OutputPlan,
    Partition,
    PartitionFile,
    PredictionTally,
    ScoringInputError,
    ScoringSummary,
    scoring_task,
)

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = "20s"

# --- on the workers: the model, once per worker process -------------------------------------------------

MODELS_KEPT = 2  # models a worker keeps (the newest used); a long-lived cluster does not fill up with old versions
_MODELS: dict[tuple[str, str, str], Any] = {}
_MODELS_LOCK = threading.Lock()
_LOADS: list[tuple[str, str]] = []  # every load this process did: (model, version), for the tests and logs


def worker_model(model_name: str, version: str, settings: Settings) -> Any:
    """The registered model, loaded at most once per worker process (tasks on the worker share it)."""
    key = (settings.mlflow_tracking_uri, model_name, version)
    with _MODELS_LOCK:
        if key not in _MODELS:
            while len(_MODELS) >= MODELS_KEPT:
                _MODELS.pop(next(iter(_MODELS)))
            _MODELS[key] = registry.load_model(model_name, version, settings)
            _LOADS.append((model_name, version))
        return _MODELS[key]


def model_loads() -> list[tuple[str, str]]:
    """The models this process loaded (run on each worker with `Client.run`)."""
    return list(_LOADS)


def _peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux counts KiB


def _worker_memory(dask_worker: Any) -> dict[str, float]:
    limit = dask_worker.memory_manager.memory_limit or 0
    return {"limit_mb": round(limit / 2**20, 1), "peak_rss_mb": round(_peak_rss_bytes() / 2**20, 1)}


def worker_memory(client: Any) -> dict[str, dict[str, float]]:
    """Each worker's memory limit and peak resident memory since it started (MB), by worker address."""
    return client.run(_worker_memory)


# --- reading: one dask partition per Parquet file --------------------------------------------------------


def read_files(uris: list[str], columns: list[str] | None, settings: Settings) -> Any:
    """A dask DataFrame over these Parquet files (one partition per file, in this order), Arrow-backed."""
    import dask.dataframe as dd

    return dd.read_parquet(
        uris,
        columns=columns,
        storage_options=s3_storage_options(settings),
        split_row_groups=False,
        dtype_backend="pyarrow",
        calculate_divisions=False,
    )


def _client(address: str) -> Any:
    from distributed import Client

    return Client(address, timeout=CONNECT_TIMEOUT, set_as_default=False)


# --- scoring ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScoringJob:
    """What every partition's task needs (sent once with the graph)."""

    model_name: str
    model_version: str
    config: DatasetConfig
    plan: OutputPlan
    chunk_rows: int
    scored_at: datetime
    settings: Settings = field(repr=False)


@dataclass
class PartResult:
    """One partition's outcome: where its predictions went, its rows and chunks, its tally."""

    index: int
    uri: str
    target: str
    rows: int
    chunks: int
    task: str
    tally: PredictionTally
    seconds: float


def score_part(frame: pd.DataFrame, index: int, file: PartitionFile, job: ScoringJob) -> PartResult:
    """On a worker: score one file's rows chunk by chunk into `part-<index>.parquet` of the run's version.

    Raises:
        ScoringInputError: A chunk cannot be scored (names the file and rows), or the row count is not the footer's.
    """
    started = time.perf_counter()
    model = worker_model(job.model_name, job.model_version, job.settings)
    classes = model_classes(model)
    task = scoring_task(job.config, classes, job.model_name, job.model_version)
    tally = PredictionTally([str(c) for c in classes])
    table = pa.Table.from_pandas(frame, preserve_index=False)
    if table.num_rows != file.rows:
        raise ScoringInputError(f"{file.uri}: read {table.num_rows} rows, but its footer says {file.rows}")
    target = job.plan.prefix + job.plan.part_name(index)
    with s3_filesystem(job.settings).open_output_stream(fs_path(target)) as sink:
        batches = table.to_batches(max_chunksize=job.chunk_rows)
        _, chunks = write_predictions(
            batches, sink, model, job.config, job.model_version, job.scored_at, file.uri, tally
        )
    return PartResult(index, file.uri, target, table.num_rows, chunks, task, tally, time.perf_counter() - started)


def score_on_cluster(
    address: str,
    config: DatasetConfig,
    partition: Partition,
    plan: OutputPlan,
    chunk_rows: int,
    model_name: str,
    model_version: str,
    settings: Settings,
) -> ScoringSummary:
    """Score every file of the partition on the cluster into the run's version; returns the merged summary.

    Nothing is published: the caller flips the manifest (`scoring_store.publish_output`) as for the
    single-process path, and discards the version on failure.
    """
    from dask import delayed

    scored_at = datetime.now(UTC)
    summary = ScoringSummary(
        model_name, model_version, partition.source, plan.output, scored_at.isoformat(), config.task.value
    )
    summary.engine = "dask"
    job = ScoringJob(model_name, model_version, config, plan, chunk_rows, scored_at, settings)
    files = [(index, file) for index, file in enumerate(partition.files) if file.rows > 0]
    for file in partition.files:
        if file.rows == 0:
            log.warning("%s has no rows; nothing to score", file.uri)
    started = time.perf_counter()
    with _client(address) as client:
        summary.workers = len(client.scheduler_info()["workers"])
        results: list[PartResult] = []
        if files:
            frame = read_files([f.uri for _, f in files], list(partition.columns), settings)
            tasks = [
                delayed(score_part, pure=False)(part, index, file, job)
                for part, (index, file) in zip(frame.to_delayed(), files, strict=True)
            ]
            results = client.gather(client.compute(tasks))
        memory = worker_memory(client)
    summary.seconds = round(time.perf_counter() - started, 3)
    tally: PredictionTally | None = None
    for result in sorted(results, key=lambda r: r.index):
        summary.rows += result.rows
        summary.chunks += result.chunks
        summary.files += 1
        summary.parts[result.uri] = result.target
        summary.task = result.task
        if tally is None:
            tally = PredictionTally(list(result.tally.labels))
        tally.merge(result.tally)
    if tally is not None:
        tally.fill(summary)
    summary.worker_memory_limit_mb = {worker: m["limit_mb"] for worker, m in memory.items()}
    summary.worker_peak_rss_mb = {worker: m["peak_rss_mb"] for worker, m in memory.items()}
    log.info(
        "scored %d rows from %d file(s) on %d Dask worker(s) with %s v%s in %.1fs; peak RSS per worker (MB): %s",
        summary.rows,
        summary.files,
        summary.workers,
        model_name,
        model_version,
        summary.seconds,
        summary.worker_peak_rss_mb,
    )
    return summary


# --- drift statistics --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DriftJob:
    """What every partition's drift task needs."""

    model_name: str
    model_version: str
    config: DatasetConfig
    reference: WindowReference
    key: str  # the column labels join on
    settings: Settings = field(repr=False)


@dataclass
class DriftPart:
    """One partition's counts, and its labelled rows' labels and model outputs (labels given)."""

    index: int
    partial: WindowPartial
    labels: np.ndarray | None = None
    scores: np.ndarray | None = None


def drift_part(frame: pd.DataFrame, index: int, job: DriftJob, labels: pd.DataFrame | None) -> DriftPart:
    """On a worker: one partition's counts over the reference's bins (and its labelled rows)."""
    model = worker_model(job.model_name, job.model_version, job.settings)
    features = prepare_inputs(frame, job.config)
    if len(features):
        scores = model_scores(model, features)
    else:  # a model cannot score no rows
        classes = job.reference.classes
        scores = np.zeros((0, len(classes))) if classes else np.zeros(0)
    partial = window_partial(features, job.reference, job.config, scores)
    if labels is None:
        return DriftPart(index, partial)
    y = join_labels(frame, job.key, labels, job.config.id_column, job.config.target)
    known = y.notna().to_numpy()
    return DriftPart(index, partial, y[known].to_numpy(), scores[known])


@dataclass(frozen=True)
class WindowCounts:
    """A window's merged counts, its labelled rows (in row order), and the workers' memory."""

    partial: WindowPartial
    labels: np.ndarray | None
    scores: np.ndarray | None
    workers: int
    worker_memory: dict[str, dict[str, float]]
    seconds: float


def drift_on_cluster(
    address: str,
    uris: list[str],
    job: DriftJob,
    labels: pd.DataFrame | None,
) -> WindowCounts:
    """Count a window's Parquet files on the cluster against the reference's bins, merged (see the module).

    Raises:
        MonitoringError: A file lacks a feature column (names the file and the columns).
    """
    from dask import delayed

    started = time.perf_counter()
    frame = read_files(uris, None, job.settings)
    missing = [c for c in job.config.feature_names if c not in frame.columns]
    if missing:
        raise MonitoringError(f"partition {', '.join(uris[:3])} lacks the feature columns {missing}")
    needed = list(dict.fromkeys([*job.config.feature_names, *([job.key] if job.key in frame.columns else [])]))
    frame = frame[needed]
    with _client(address) as client:
        workers = len(client.scheduler_info()["workers"])
        shared = client.scatter(labels, broadcast=True) if labels is not None else None
        tasks = [
            delayed(drift_part, pure=False)(part, index, job, shared) for index, part in enumerate(frame.to_delayed())
        ]
        parts = sorted(client.gather(client.compute(tasks)), key=lambda p: p.index)
        memory = worker_memory(client)
    partial = merge_partials([p.partial for p in parts])
    y = scores = None
    if labels is not None:
        y = np.concatenate([p.labels for p in parts])
        scores = np.concatenate([p.scores for p in parts])
    seconds = time.perf_counter() - started
    log.info(
        "drift counts of %d rows from %d file(s) on %d worker(s) in %.1fs", partial.rows, len(uris), workers, seconds
    )
    return WindowCounts(partial, y, scores, workers, memory, seconds)


def parquet_rows(uris: list[str], settings: Settings) -> int:
    """Rows of these Parquet files, from their footers (nothing else is read)."""
    filesystem = s3_filesystem(settings)
    total = 0
    for uri in uris:
        with filesystem.open_input_file(fs_path(uri)) as handle:
            total += pq.ParquetFile(handle).metadata.num_rows
    return total


def window_result(
    name: str,
    source: str,
    counts: WindowCounts,
    reference: WindowReference,
    holdout: dict[str, float],
    thresholds: DriftThresholds,
    labelled_given: bool,
) -> WindowResult:
    """The window's verdict from its merged counts: what `core.drift_analysis.analyse` gives on the whole frame."""
    from core.decay import labelled_performance
    from core.drift import partial_drifts

    if counts.partial.rows == 0:
        return judge_window(name, source, 0, [], None, None, 0, thresholds)
    features, prediction = partial_drifts(reference, counts.partial, thresholds)
    performance, labelled = None, 0
    if labelled_given and counts.labels is not None and counts.scores is not None:
        labelled = len(counts.labels)
        if labelled >= thresholds.min_labelled_rows:
            performance = labelled_performance(counts.labels, counts.scores, list(reference.classes), holdout)
    return judge_window(name, source, counts.partial.rows, features, prediction, performance, labelled, thresholds)
