"""Batch scoring of a partition on a Dask cluster: one task per Parquet file, the tallies merged.

The same work as the single-process path (`adapters.scoring_store.score_partition_files`), spread over a
cluster's workers:
- the source is read with dask.dataframe from S3 (s3fs, `adapters.cluster.s3_storage_options`), one
  partition per Parquet file, in sorted file order, with Arrow-backed columns (the predictions keep the
  id and time columns' Arrow types);
- each worker loads the model **once** (`dask_engine.workers.worker_model`), not once per partition, and
  predicts its partitions `chunk_rows` rows at a time;
- each partition writes its own prediction file `part-<file index>.parquet` under the run's version (the
  same names as the single-process path) and returns a partial tally; the flow merges the tallies into
  the summary and publishes the manifest exactly as before (one PUT, the flip).

Memory per worker is bounded by the cluster's `memory_limit` (`MLOPS_DASK_WORKER_MEMORY` for the local
stack's workers) and is, per task, about one input file's needed columns plus a chunk's predictions; each
run records every worker's limit and peak resident memory (`dask_engine.workers.worker_memory`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pandas as pd
import pyarrow as pa

from adapters.cluster import connect
from adapters.scoring_store import ChunkScorer, write_predictions
from adapters.settings import Settings
from adapters.store import fs_path, s3_filesystem
from core.data.dataset import DatasetConfig
from core.inference.scoring import (
    OutputPlan,
    Partition,
    PartitionFile,
    PredictionTally,
    ScoringInputError,
    ScoringRequest,
    ScoringSummary,
    scoring_task,
)
from core.modeling.metrics import model_classes
from dask_engine.snapshots import read_files
from dask_engine.workers import worker_memory, worker_model

log = logging.getLogger(__name__)


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
        scorer = ChunkScorer(model, job.config, job.model_version, job.scored_at)
        _, chunks = write_predictions(batches, sink, scorer, file.uri, tally)
    return PartResult(index, file.uri, target, table.num_rows, chunks, task, tally, time.perf_counter() - started)


def _files_with_rows(partition: Partition) -> list[tuple[int, PartitionFile]]:
    """The files to score with their index in the partition (an empty file is skipped, with a warning)."""
    for file in partition.files:
        if file.rows == 0:
            log.warning("%s has no rows; nothing to score", file.uri)
    return [(index, file) for index, file in enumerate(partition.files) if file.rows > 0]


def _score_parts(
    client: Any, files: list[tuple[int, PartitionFile]], partition: Partition, job: ScoringJob
) -> list[PartResult]:
    """One task per file on the cluster; their results, in any order."""
    from dask import delayed

    if not files:
        return []
    frame = read_files([f.uri for _, f in files], list(partition.columns), job.settings)
    tasks = [
        delayed(score_part, pure=False)(part, index, file, job)
        for part, (index, file) in zip(frame.to_delayed(), files, strict=True)
    ]
    return client.gather(client.compute(tasks))


def _merge_results(summary: ScoringSummary, results: list[PartResult], memory: dict[str, dict[str, float]]) -> None:
    """Each file's rows, chunks, prediction file and tally into the run's summary, in file order."""
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


def score_on_cluster(address: str, request: ScoringRequest, settings: Settings) -> ScoringSummary:
    """Score every file of the partition on the cluster into the run's version; returns the merged summary.

    Nothing is published: the caller flips the manifest (`scoring_store.publish_output`) as for the
    single-process path, and discards the version on failure.
    """
    scored_at = datetime.now(UTC)
    partition, plan = request.partition, request.plan
    summary = ScoringSummary(
        request.model_name,
        request.model_version,
        partition.source,
        plan.output,
        scored_at.isoformat(),
        request.config.task.value,
    )
    summary.engine = "dask"
    job = ScoringJob(
        request.model_name, request.model_version, request.config, plan, request.chunk_rows, scored_at, settings
    )
    files = _files_with_rows(partition)
    started = time.perf_counter()
    with connect(address) as client:
        summary.workers = len(client.scheduler_info()["workers"])
        results = _score_parts(client, files, partition, job)
        memory = worker_memory(client)
    summary.seconds = round(time.perf_counter() - started, 3)
    _merge_results(summary, results, memory)
    log.info(
        "scored %d rows from %d file(s) on %d Dask worker(s) with %s v%s in %.1fs; peak RSS per worker (MB): %s",
        summary.rows,
        summary.files,
        summary.workers,
        request.model_name,
        request.model_version,
        summary.seconds,
        summary.worker_peak_rss_mb,
    )
    return summary
