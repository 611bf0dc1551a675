"""Prefect tasks of batch scoring, thin wrappers.

What is predicted and summarised is `core.inference.scoring`; the model version, reading the partition, writing the
run's version and publishing it (the manifest flip) are `adapters.scoring_store`; scoring on a Dask cluster
is `dask_engine.scoring`.
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from adapters import registry, scoring_store
from adapters.cluster import cluster_address
from adapters.locks import Held, ensure_lock, hold
from adapters.registry import CHAMPION
from adapters.settings import get_settings
from adapters.store import s3_filesystem
from core.data.dataset import DatasetConfig
from core.inference.scoring import (
    Manifest,
    OutputPlan,
    Partition,
    ScoringRequest,
    ScoringSummary,
    new_version,
    output_folder,
    plan_output,
    use_cluster,
)
from dask_engine.scoring import score_on_cluster
from tasks.retrying import IO, IO_ANY_ERROR

log = logging.getLogger(__name__)


@task(name="resolve-model-version", **IO)
def resolve_model_version(model_name: str, requested: str | None) -> str:
    """Prefect task: the given version (checked), or the champion's (see `scoring_store.resolve_version`)."""
    version = scoring_store.resolve_version(model_name, requested)
    log.info("scoring with %s v%s%s", model_name, version, "" if requested else f" (the {CHAMPION})")
    return version


@task(name="load-model", **IO)
def load_model(model_name: str, version: str) -> Any:
    """Prefect task: a registered version's fitted pipeline (sklearn flavour: a classifier or a regressor)."""
    return registry.load_model(model_name, version, where="scoring")


@task(name="inspect-partition", **IO)
def inspect_partition(source: str, config: DatasetConfig) -> Partition:
    """Prefect task: list the partition's Parquet files and check their footers (rows, columns)."""
    partition = scoring_store.inspect_partition_files(source, config, get_settings())
    log.info("partition %s: %d file(s), %d rows", source, len(partition.files), partition.rows)
    return partition


def scoring_lock_name(output: str) -> str:
    """The Prefect concurrency limit that serialises scoring runs of one output (a digest of its folder)."""
    return "scoring-output-" + hashlib.sha256(output.encode()).hexdigest()[:24]


@contextmanager
def output_lock(output: str | None, model_name: str, source: str, version: str) -> Iterator[Held]:
    """Hold the output's lock for the block: runs of one output plan, write and publish one at a time.

    Waits up to `scoring_max_run_seconds` for a run before; the run's version is named once the lock is held,
    so versions are published in the order they were named.
    """
    settings = get_settings()
    folder = output_folder(output, settings.bucket, model_name, source, version)
    log.info("taking the lock of output %s (one scoring run at a time)", folder)
    with hold(ensure_lock(scoring_lock_name(folder)), timeout_seconds=settings.scoring_max_run_seconds) as held:
        yield held  # (`hold` logs how long it waited)


@task(name="plan-output", cache_policy=NO_CACHE)
def make_output_plan(output: str | None, model_name: str, source: str, version: str) -> OutputPlan:
    """Prefect task: the output prefix (given or default) and this run's version under it."""
    from prefect.runtime import flow_run

    run = new_version(datetime.now(UTC), f"{(flow_run.get_id() or 'local')[:8]}-{uuid.uuid4().hex[:8]}")
    plan = plan_output(output, get_settings().bucket, model_name, source, version, run)
    log.info("predictions go to %s (written under %s, published by its manifest)", plan.output, plan.prefix)
    return plan


@task(name="score-partition", **IO, timeout_seconds=6 * 3600)
def score_partition(model: Any, request: ScoringRequest) -> ScoringSummary:
    """Prefect task: score into the run's version; progress shows as a Prefect progress artifact."""
    from prefect.artifacts import create_progress_artifact, update_progress_artifact

    progress_id = create_progress_artifact(
        progress=0.0, key="scoring-progress", description="Batch scoring: share of rows scored"
    )

    def report(done: int, total: int) -> None:
        update_progress_artifact(progress_id, progress=100.0 * done / max(total, 1))

    filesystem = s3_filesystem(get_settings())
    return scoring_store.score_partition_files(model, request, filesystem, report)


@task(name="choose-engine", cache_policy=NO_CACHE)
def choose_engine(engine: str, partition: Partition) -> str | None:
    """Prefect task: the Dask scheduler to score on, or None for this process (`core.inference.scoring.use_cluster`)."""
    address = cluster_address(get_settings())
    chosen = address if use_cluster(engine, partition.rows, address) else None
    log.info("engine %s: scoring %d rows %s", engine, partition.rows, f"on the cluster {chosen}" if chosen else "here")
    return chosen


@task(name="score-partition-on-cluster", **IO, timeout_seconds=6 * 3600)
def score_partition_on_cluster(address: str, request: ScoringRequest) -> ScoringSummary:
    """Prefect task: score on the Dask cluster, one partition per file, into the run's version (nothing published)."""
    return score_on_cluster(address, request, get_settings())


@task(name="publish-predictions", **IO)
def publish_predictions(plan: OutputPlan, summary: ScoringSummary) -> Manifest:
    """Prefect task: summary, then the manifest flip, then expired versions (see `scoring_store.publish_output`)."""
    return scoring_store.publish_output(plan, summary, get_settings())


@task(name="discard-version", **IO_ANY_ERROR)
def discard_version(plan: OutputPlan) -> int:
    """Prefect task: delete a failed run's version (never the published one), so nothing half-written remains."""
    return scoring_store.discard_version(plan, get_settings())


@task(name="publish-scoring-summary", cache_policy=NO_CACHE)
def publish_scoring_summary(summary: ScoringSummary, summary_uri: str) -> None:
    """Prefect task: the summary as a markdown artifact (key `batch-scoring`) of the flow run."""
    from prefect.artifacts import create_markdown_artifact

    create_markdown_artifact(
        markdown=f"{summary.to_markdown()}\nSummary file: `{summary_uri}`\n",
        key="batch-scoring",
        description=f"Batch scoring of {summary.source} with {summary.model_name} v{summary.model_version}",
    )
