"""The batch scoring flow: score a dataset partition in S3 with the champion (or a given version).

This module wires tasks and handles state: the tasks are `tasks/scoring.py`, what is predicted and
summarised is `core/inference/scoring.py`, reading, staging and publishing in S3 is `adapters/scoring_store.py`.
Runs of one output go one at a time (a lock per output). Each run writes a version of its own under the
output and publishes it by replacing the output's `manifest.json` last (one PUT), so readers (who go
through the manifest) see the previous complete run until the new one is complete; a failure discards the
run's version. Layout: `core/inference/scoring.py`.

`engine` chooses where: in the flow's process, or on a Dask cluster with one task per file, the model
loaded once per worker and the summary merged from per-file tallies (`dask_engine/scoring.py`); the
publication (the manifest flip) is the same.

Every task type is scored: a classifier (binary or multiclass) writes the predicted class and the
probability of every class, a regressor its predicted value (see `core.inference.scoring.predict_chunk`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from prefect import flow
from pydantic import BaseModel, ConfigDict, Field

from core.inference.scoring import ScoringRequest
from tasks.loading import load_dataset_config
from tasks.scoring import (
    choose_engine,
    discard_version,
    inspect_partition,
    load_model,
    make_output_plan,
    output_lock,
    publish_predictions,
    publish_scoring_summary,
    resolve_model_version,
    score_partition,
    score_partition_on_cluster,
)

S3_URI = r"^s3://[^/]+(/.*)?$"


class ScoringParams(BaseModel):
    """Parameters of one batch scoring run (shown as a form in the Prefect UI)."""

    # Versions typed as numbers (3) are taken as their text ("3").
    model_config = ConfigDict(frozen=True, extra="forbid", coerce_numbers_to_str=True)

    dataset: str = Field(
        "credit-risk",
        title="Dataset",
        description="A bundled dataset name (credit-risk), a local YAML path or an s3:// URI of a dataset config. "
        "Gives the model name and the id, time and feature columns.",
    )
    source: str = Field(
        title="Source",
        description="s3:// URI of the partition to score: a folder of Parquet files "
        "(e.g. s3://mlops/datasets/credit-risk/month=2025-06/) or one Parquet file.",
        pattern=S3_URI,
    )
    model_version: str | None = Field(
        None,
        title="Model version",
        description="Registered version to score with; empty means the version holding the `champion` alias.",
        pattern=r"^[0-9]+$",
    )
    chunk_rows: int = Field(
        50_000,
        ge=100,
        title="Chunk rows",
        description="Rows read, predicted and written at a time: bounds the memory a run needs.",
    )
    output: str | None = Field(
        None,
        title="Output",
        description="s3:// folder of the output (manifest.json, versions/<run>/ with the predictions and "
        "summary.json); empty means s3://<bucket>/predictions/batch/<model>/<partition>/v<version>/.",
        pattern=S3_URI,
    )
    engine: Literal["auto", "local", "dask"] = Field(
        "auto",
        title="Engine",
        description="local: chunks in the flow's process; dask: one task per file on the Dask cluster "
        "(MLOPS_DASK_ADDRESS, else the local stack's scheduler); auto: the cluster when there is one and the "
        "partition has at least 1,000,000 rows.",
    )


@dataclass(frozen=True)
class ScoringOutcome:
    """What a run did."""

    model_name: str
    model_version: str
    rows: int
    chunks: int
    files: int
    output: str  # the output prefix; read it through its manifest (`adapters.scoring_store.current_output`)
    summary_uri: str  # this run's summary, in its version
    task: str = "binary"  # binary, multiclass or regression: what the predictions hold
    manifest_uri: str = ""  # `<output>/manifest.json`, which names this run's files once published
    prediction_files: tuple[str, ...] = ()  # this run's prediction files, as the manifest lists them


@flow(
    name="scoring",
    description="Score a dataset partition in S3 with the champion (or a given version), in bounded memory.",
    # The predictions and the summary go to S3 explicitly; no Prefect result lands in a local folder.
    persist_result=False,
)
def scoring(params: ScoringParams) -> ScoringOutcome:
    """Score `params.source` chunk by chunk and publish the predictions with a summary."""
    config = load_dataset_config(params.dataset)
    version = resolve_model_version(config.model_name, params.model_version)
    partition = inspect_partition(params.source, config)
    address = choose_engine(params.engine, partition)
    model = None if address else load_model(config.model_name, version)  # on the cluster, each worker loads it
    with output_lock(params.output, config.model_name, params.source, version):  # one run at a time per output
        plan = make_output_plan(params.output, config.model_name, params.source, version)
        request = ScoringRequest(config, partition, plan, params.chunk_rows, config.model_name, version)
        try:
            summary = score_partition_on_cluster(address, request) if address else score_partition(model, request)
            manifest = publish_predictions(plan, summary)
        except BaseException:
            discard_version(plan)
            raise
    publish_scoring_summary(summary, manifest.summary)
    return ScoringOutcome(
        config.model_name,
        version,
        summary.rows,
        summary.chunks,
        summary.files,
        plan.output,
        manifest.summary,
        summary.task,
        plan.manifest_uri,
        manifest.files,
    )
