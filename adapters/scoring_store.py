"""Batch scoring's outside world: the model version, the partition's files in S3, staging and publishing.

Memory stays bounded by the chunk size, not the partition size: each file is read with pyarrow's
`ParquetFile.iter_batches` (only the id, time and feature columns; buffered reads instead of
pre-buffering whole row groups), and each chunk's predictions go at once to a `ParquetWriter` that
streams to S3. What a chunk's predictions and the summary hold is `core.scoring`.

Nothing half-written (S3 has no rename):
- every part is first written under a staging prefix, `s3://<output bucket>/_staging/scoring/<token>/`;
- only once every file is scored are the parts copied to the output prefix; parts of an earlier run
  there that this run does not overwrite are deleted, and `summary.json` is written last: it is the
  completion marker, present only when the prefix holds one complete run;
- the staging prefix is deleted on success and on failure (`discard_staging_prefix`), and a failure
  while copying removes what was copied. Only a killed process can leave objects, and then only under
  `_staging/` (a lifecycle rule on that prefix cleans them).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from adapters.clients import S3Location, mlflow_client, put_bytes, s3_client
from adapters.registry import CHAMPION, champion_version
from adapters.settings import Settings, get_settings
from adapters.store import BucketNotFoundError, fs_path, list_keys, s3_filesystem
from core.dataset import DatasetConfig
from core.metrics import model_classes
from core.scoring import (
    PARQUET_SUFFIXES,
    SUMMARY_NAME,
    ModelVersionError,
    OutputPlan,
    Partition,
    PartitionFile,
    PredictionTally,
    ScoringInputError,
    ScoringSummary,
    is_own_output,
    missing_columns,
    predict_chunk,
    required_columns,
    scoring_task,
)

log = logging.getLogger(__name__)

# Read each column through a 2 MiB buffer rather than whole column chunks, so a file written with one
# huge row group does not have to fit in memory.
READ_BUFFER_BYTES = 2 << 20


def resolve_version(model_name: str, requested: str | None) -> str:
    """The version to score with: `requested` (checked to exist), else the one holding the champion alias.

    Raises:
        ModelVersionError: No champion and no version given, or the version is not registered.
    """
    from mlflow.exceptions import MlflowException

    if requested is None:
        version = champion_version(model_name)
        if version is None:
            raise ModelVersionError(
                f"model {model_name!r} has no {CHAMPION!r} alias (no version was ever promoted) and no "
                "model_version was given: train and promote one first, or pass model_version"
            )
        return version
    try:
        mlflow_client(get_settings()).get_model_version(model_name, requested)
    except MlflowException as exc:
        if exc.error_code in {"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"}:
            raise ModelVersionError(f"model {model_name!r} has no version {requested!r}") from exc
        raise
    return requested


# --- what gets scored ---------------------------------------------------------------------------------


def list_partition_files(source: str, settings: Settings) -> list[str]:
    """URIs of the Parquet files of a partition (one file, or every Parquet file under a folder), sorted.

    Raises:
        ScoringInputError: Not an s3:// URI, no such bucket or file, or no Parquet file under the folder.
    """
    try:
        location = S3Location.parse(source)
    except ValueError as exc:
        raise ScoringInputError(f"source {source!r}: {exc}") from exc
    if source.endswith(PARQUET_SUFFIXES):
        client = s3_client(settings)
        try:
            client.head_object(Bucket=location.bucket, Key=location.key)
        except client.exceptions.NoSuchBucket as exc:
            raise ScoringInputError(f"source {source}: bucket {location.bucket!r} does not exist") from exc
        except client.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in {"404", "NoSuchKey", "NoSuchBucket"}:
                raise ScoringInputError(f"source {source}: no such file or bucket") from exc
            raise
        return [source]
    try:
        keys = list_keys(settings, location, PARQUET_SUFFIXES)
    except BucketNotFoundError as exc:
        raise ScoringInputError(f"source {source}: bucket {location.bucket!r} does not exist") from exc
    if not keys:
        raise ScoringInputError(f"source {source}: no Parquet files found under this prefix")
    return [f"s3://{location.bucket}/{key}" for key in keys]


def inspect_files(source: str, uris: list[str], config: DatasetConfig, filesystem: Any) -> Partition:
    """Read each file's footer (not its data): row counts, and every needed column present.

    Raises:
        ScoringInputError: A file is not Parquet, or lacks a column (named with the file).
    """
    files = []
    for uri in uris:
        try:
            with filesystem.open_input_file(fs_path(uri)) as handle:
                parquet = pq.ParquetFile(handle)
                names, rows = set(parquet.schema_arrow.names), parquet.metadata.num_rows
        except pa.ArrowInvalid as exc:
            raise ScoringInputError(f"{uri}: cannot be read as Parquet: {exc}") from exc
        missing = missing_columns(config, names)
        if missing:
            raise ScoringInputError(f"{uri}: missing column(s) {', '.join(map(repr, missing))} needed to score")
        files.append(PartitionFile(uri, rows))
    return Partition(source, tuple(files), tuple(required_columns(config)))


def inspect_partition_files(source: str, config: DatasetConfig, settings: Settings) -> Partition:
    """The partition's Parquet files (`list_partition_files`) with their footers checked (`inspect_files`)."""
    return inspect_files(source, list_partition_files(source, settings), config, s3_filesystem(settings))


# --- scoring into the staging prefix ------------------------------------------------------------------


def score_partition_files(
    model: Any,
    config: DatasetConfig,
    partition: Partition,
    plan: OutputPlan,
    chunk_rows: int,
    model_name: str,
    model_version: str,
    filesystem: Any,
    on_chunk: Callable[[int, int], None] | None = None,
) -> ScoringSummary:
    """Score every file chunk by chunk into the staging prefix; returns the summary (nothing is published).

    Args:
        model: The registered sklearn pipeline: a classifier (`predict_proba`, `classes_`) or a regressor.
        config: Dataset description (id, time and feature columns).
        partition: The files to score (from `inspect_files`).
        plan: Where the parts are staged and finally published.
        chunk_rows: Rows per chunk: bounds memory.
        model_name: Registered model name, recorded in the summary.
        model_version: Version used, recorded in each row and the summary.
        filesystem: pyarrow filesystem for reading and writing (`adapters.store.s3_filesystem`).
        on_chunk: Called after each chunk with (rows done, rows in total), for progress reporting.

    Raises:
        ScoringInputError: A chunk's values cannot be prepared for the model (names the file and rows).
    """
    scored_at = datetime.now(UTC)
    classes = model_classes(model)
    task = scoring_task(config, classes, model_name, model_version)
    summary = ScoringSummary(model_name, model_version, partition.source, plan.output, scored_at.isoformat(), task)
    tally = PredictionTally([str(c) for c in classes])
    started = time.perf_counter()
    for index, file in enumerate(partition.files):
        if file.rows == 0:
            log.warning("%s has no rows; nothing to score", file.uri)
            continue
        target = plan.staging + plan.part_name(index)
        first_row = 0
        with (
            filesystem.open_input_file(fs_path(file.uri)) as source,
            filesystem.open_output_stream(fs_path(target)) as sink,
        ):
            reader = pq.ParquetFile(source, buffer_size=READ_BUFFER_BYTES, pre_buffer=False)
            writer: pq.ParquetWriter | None = None
            try:
                for batch in reader.iter_batches(batch_size=chunk_rows, columns=list(partition.columns)):
                    try:
                        predictions = predict_chunk(model, batch, config, model_version, scored_at)
                    except (ValueError, TypeError) as exc:
                        rows = f"rows {first_row}-{first_row + batch.num_rows - 1}"
                        raise ScoringInputError(f"{file.uri} ({rows}): cannot be scored: {exc}") from exc
                    if writer is None:
                        writer = pq.ParquetWriter(sink, predictions.schema)
                    writer.write_batch(predictions)
                    first_row += batch.num_rows
                    summary.rows += batch.num_rows
                    summary.chunks += 1
                    tally.add(predictions)
                    log.info(
                        "chunk %d: %d rows of %s (%d/%d rows, %.0f rows/s)",
                        summary.chunks,
                        batch.num_rows,
                        file.uri,
                        summary.rows,
                        partition.rows,
                        summary.rows / max(time.perf_counter() - started, 1e-9),
                    )
                    if on_chunk is not None:
                        on_chunk(summary.rows, partition.rows)
            finally:
                if writer is not None:
                    writer.close()
        if first_row != file.rows:
            raise ScoringInputError(f"{file.uri}: read {first_row} rows, but its footer says {file.rows}")
        summary.files += 1
        summary.parts[file.uri] = plan.output + plan.part_name(index)
    summary.seconds = round(time.perf_counter() - started, 3)
    tally.fill(summary)
    log.info(
        "scored %d rows in %d chunks from %d file(s) with %s v%s in %.1fs",
        summary.rows,
        summary.chunks,
        summary.files,
        model_name,
        model_version,
        summary.seconds,
    )
    return summary


# --- publishing: staging -> output, summary last ------------------------------------------------------


def _delete_keys(client: Any, bucket: str, keys: list[str]) -> None:
    for start in range(0, len(keys), 1000):
        batch = [{"Key": key} for key in keys[start : start + 1000]]
        client.delete_objects(Bucket=bucket, Delete={"Objects": batch, "Quiet": True})


def publish_output(plan: OutputPlan, summary: ScoringSummary, settings: Settings) -> str:
    """Copy the staged parts to the output prefix, drop an earlier run's leftovers there, then the summary.

    The summary is written last, so a prefix with a `summary.json` always holds one complete run. If
    copying fails, what was copied is removed. Returns the summary's URI.
    """
    client, filesystem = s3_client(settings), s3_filesystem(settings)
    staging, final = S3Location.parse(plan.staging), S3Location.parse(plan.output)
    staged = list_keys(settings, staging, filesystem=filesystem)
    # Only this flow's own file names directly under the prefix are ever deleted, never anything else.
    earlier = [
        key
        for key in list_keys(settings, final, filesystem=filesystem, recursive=False)
        if is_own_output(key.removeprefix(final.key))
    ]
    if final.key + SUMMARY_NAME in earlier:
        client.delete_object(Bucket=final.bucket, Key=final.key + SUMMARY_NAME)
    copied: list[str] = []
    try:
        for key in staged:
            destination = final.key + key.removeprefix(staging.key)
            client.copy({"Bucket": staging.bucket, "Key": key}, final.bucket, destination)
            copied.append(destination)
    except BaseException:
        _delete_keys(client, final.bucket, copied)
        raise
    _delete_keys(client, final.bucket, [k for k in earlier if k not in copied and not k.endswith(SUMMARY_NAME)])
    put_bytes(settings, S3Location.parse(plan.summary_uri), summary.to_json().encode(), "application/json")
    _delete_keys(client, staging.bucket, staged)
    log.info("published %d prediction file(s) and %s", len(copied), plan.summary_uri)
    return plan.summary_uri


def discard_staging_prefix(plan: OutputPlan, settings: Settings) -> int:
    """Delete everything under the staging prefix; returns how many objects were deleted."""
    staging = S3Location.parse(plan.staging)
    keys = list_keys(settings, staging)
    _delete_keys(s3_client(settings), staging.bucket, keys)
    if keys:
        log.info("discarded %d staged object(s) under %s", len(keys), plan.staging)
    return len(keys)
