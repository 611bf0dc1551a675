"""Batch scoring's outside world: the model version, the partition's files in S3, writing and publishing.

Memory stays bounded by the chunk size, not the partition size: each file is read with pyarrow's
`ParquetFile.iter_batches` (only the id, time and feature columns; buffered reads instead of
pre-buffering whole row groups), and each chunk's predictions go at once to a `ParquetWriter` that
streams to S3. What a chunk's predictions and the summary hold is `core.inference.scoring`.

Published atomically (S3 has no rename; the layout is in `core.inference.scoring`):
- each run writes its parts under a version of its own, `<output>/versions/<version>/`, then its
  `summary.json` there;
- the parts are checked to be there, then `<output>/manifest.json` is replaced in one PUT (the flip): a
  reader of the manifest (`current_output`, `read_current_predictions`) sees the previous complete run
  until then, and the new complete run after;
- a run never replaces a manifest that names a later-started run's version (runs of one output are
  serialised by a lock in the flow; this holds without it too);
- only after the flip are versions older than the manifest's `previous` deleted (and the files of the
  layout before manifests, directly under the output), and only those whose run started longer ago than
  the longest run (`scoring_max_run_seconds`): the previous good output stays readable, and a version still
  being written is never touched;
- a failure before the flip deletes the run's version (`discard_version`), never a version the manifest
  names. A killed run leaves an unreferenced version, deleted by a later publish once it is old enough
  (`core.inference.scoring.expired_versions`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from adapters.clients import S3Location, mlflow_client, put_bytes, s3_client
from adapters.registry import CHAMPION, champion_version
from adapters.settings import Settings, get_settings
from adapters.store import BucketNotFoundError, fs_path, list_keys, s3_filesystem
from core.data.dataset import DatasetConfig
from core.inference.scoring import (
    MANIFEST_NAME,
    PARQUET_SUFFIXES,
    VERSIONS_FOLDER,
    Manifest,
    ModelVersionError,
    OutputPlan,
    Partition,
    PartitionFile,
    PredictionTally,
    ScoringInputError,
    ScoringOutputError,
    ScoringRequest,
    ScoringSummary,
    expired_versions,
    folder,
    is_legacy_output,
    manifest_for,
    missing_columns,
    predict_chunk,
    required_columns,
    scoring_task,
)
from core.modeling.metrics import model_classes

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


@dataclass(frozen=True)
class ChunkScorer:
    """Predicts one chunk of rows: the model, its dataset config, its version and the run's scoring time."""

    model: Any
    config: DatasetConfig
    model_version: str
    scored_at: datetime

    def predict(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        """The chunk's predictions (`core.inference.scoring.predict_chunk`)."""
        return predict_chunk(self.model, batch, self.config, self.model_version, self.scored_at)


def write_predictions(
    batches: Iterable[pa.RecordBatch],
    sink: Any,
    scorer: ChunkScorer,
    uri: str,
    tally: PredictionTally,
    chunk_done: Callable[[int], None] | None = None,
) -> tuple[int, int]:
    """Predict each batch of one input file and write the predictions to `sink` as one Parquet file.

    Shared by the single-process path and the cluster's workers; returns (rows, chunks).

    Raises:
        ScoringInputError: A chunk cannot be scored (names the file and its rows).
    """
    rows = chunks = 0
    writer: pq.ParquetWriter | None = None
    try:
        for batch in batches:
            try:
                predictions = scorer.predict(batch)
            except (ValueError, TypeError) as exc:
                where = f"rows {rows}-{rows + batch.num_rows - 1}"
                raise ScoringInputError(f"{uri} ({where}): cannot be scored: {exc}") from exc
            if writer is None:
                writer = pq.ParquetWriter(sink, predictions.schema)
            writer.write_batch(predictions)
            tally.add(predictions)
            rows += batch.num_rows
            chunks += 1
            if chunk_done is not None:
                chunk_done(batch.num_rows)
    finally:
        if writer is not None:
            writer.close()
    return rows, chunks


# --- scoring into the run's version --------------------------------------------------------------------


def _progress(
    summary: ScoringSummary,
    uri: str,
    total: int,
    started: float,
    on_chunk: Callable[[int, int], None] | None,
) -> Callable[[int], None]:
    """What runs after each chunk of `uri`: count it in the summary, log the rate, report the progress."""

    def chunk_done(rows: int) -> None:
        summary.rows += rows
        summary.chunks += 1
        rate = summary.rows / max(time.perf_counter() - started, 1e-9)
        log.info(
            "chunk %d: %d rows of %s (%d/%d rows, %.0f rows/s)", summary.chunks, rows, uri, summary.rows, total, rate
        )
        if on_chunk is not None:
            on_chunk(summary.rows, total)

    return chunk_done


def score_partition_files(
    model: Any,
    request: ScoringRequest,
    filesystem: Any,
    on_chunk: Callable[[int, int], None] | None = None,
) -> ScoringSummary:
    """Score every file chunk by chunk into the run's version; returns the summary (nothing is published yet).

    Args:
        model: The registered sklearn pipeline: a classifier (`predict_proba`, `classes_`) or a regressor.
        request: The dataset config, the files to score (from `inspect_files`), the output plan (where this
            run's version is written), rows per chunk (bounds memory), and the model's name and version
            (recorded in each row and the summary).
        filesystem: pyarrow filesystem for reading and writing (`adapters.store.s3_filesystem`).
        on_chunk: Called after each chunk with (rows done, rows in total), for progress reporting.

    Raises:
        ScoringInputError: A chunk's values cannot be prepared for the model (names the file and rows).
    """
    config, partition, plan = request.config, request.partition, request.plan
    model_name, model_version = request.model_name, request.model_version
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
        target = plan.prefix + plan.part_name(index)
        with (
            filesystem.open_input_file(fs_path(file.uri)) as source,
            filesystem.open_output_stream(fs_path(target)) as sink,
        ):
            reader = pq.ParquetFile(source, buffer_size=READ_BUFFER_BYTES, pre_buffer=False)
            chunk_done = _progress(summary, file.uri, partition.rows, started, on_chunk)
            batches = reader.iter_batches(batch_size=request.chunk_rows, columns=list(partition.columns))
            scorer = ChunkScorer(model, config, model_version, scored_at)
            first_row, _ = write_predictions(batches, sink, scorer, file.uri, tally, chunk_done)
        if first_row != file.rows:
            raise ScoringInputError(f"{file.uri}: read {first_row} rows, but its footer says {file.rows}")
        summary.files += 1
        summary.parts[file.uri] = target
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


# --- publishing: summary, check, flip the manifest, then clean up --------------------------------------


def _delete_keys(client: Any, bucket: str, keys: list[str]) -> None:
    for start in range(0, len(keys), 1000):
        batch = [{"Key": key} for key in keys[start : start + 1000]]
        client.delete_objects(Bucket=bucket, Delete={"Objects": batch, "Quiet": True})


def read_manifest(output: str, settings: Settings) -> Manifest | None:
    """The output's manifest, or None when nothing was published there yet.

    Raises:
        ScoringOutputError: The manifest exists but is not a valid one (names it).
    """
    location = S3Location.parse(folder(output)).child(MANIFEST_NAME)
    client = s3_client(settings)
    try:
        body = client.get_object(Bucket=location.bucket, Key=location.key)["Body"].read()
    except client.exceptions.NoSuchKey:
        return None
    except client.exceptions.ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in {"404", "NoSuchKey"}:
            return None
        raise
    return Manifest.from_json(body, f"s3://{location.bucket}/{location.key}")


def current_output(output: str, settings: Settings | None = None) -> Manifest:
    """The complete scoring output readers should use: the manifest's current version (files, summary).

    Raises:
        ScoringOutputError: Nothing was published at `output` (no manifest), or the manifest is invalid.
    """
    manifest = read_manifest(output, settings or get_settings())
    if manifest is None:
        raise ScoringOutputError(f"{folder(output)}: no {MANIFEST_NAME}, so no complete scoring output there yet")
    return manifest


def read_current_predictions(output: str, settings: Settings | None = None) -> pa.Table:
    """Every prediction of the output's current version (through the manifest), in input-file order."""
    settings = settings or get_settings()
    return read_predictions(current_output(output, settings), settings)


def read_predictions(manifest: Manifest, settings: Settings | None = None) -> pa.Table:
    """Every prediction of the version a manifest names, in input-file order."""
    settings = settings or get_settings()
    filesystem = s3_filesystem(settings)
    tables = []
    for uri in manifest.files:
        with filesystem.open_input_file(fs_path(uri)) as handle:
            tables.append(pq.read_table(handle))
    return pa.concat_tables(tables) if tables else pa.table({})


def _version_names(settings: Settings, output: str, filesystem: Any) -> list[str]:
    """The versions that have objects under `<output>/versions/`."""
    root = S3Location.parse(folder(output) + VERSIONS_FOLDER)
    names = {key.removeprefix(root.key).split("/", 1)[0] for key in list_keys(settings, root, filesystem=filesystem)}
    return sorted(n for n in names if n)


def publish_output(plan: OutputPlan, summary: ScoringSummary, settings: Settings) -> Manifest:
    """Write the run's summary, check its parts, flip the manifest to it (one PUT), then delete expired versions.

    Until the flip the manifest names the previous complete run, which stays readable; after it, the new
    one. The run's own parts are checked to be in S3 first, so the manifest never names a missing file.
    Clean-up after the flip is best effort: a failure there is logged, the publication stands.

    Raises:
        ScoringOutputError: A part the summary lists is not in S3 (nothing is flipped).
    """
    filesystem = s3_filesystem(settings)
    put_bytes(settings, S3Location.parse(plan.summary_uri), summary.to_json().encode(), "application/json")
    prefix = S3Location.parse(plan.prefix)
    written = {f"s3://{prefix.bucket}/{key}" for key in list_keys(settings, prefix, filesystem=filesystem)}
    missing = [uri for uri in summary.parts.values() if uri not in written]
    if missing:
        raise ScoringOutputError(f"{plan.prefix}: parts not found after writing them: {missing}; nothing published")
    before = read_manifest(plan.output, settings)
    if before is not None and before.version > plan.version:  # names sort by start time
        raise ScoringOutputError(
            f"{plan.output}: a run that started later ({before.version}) has published already; not replacing it "
            f"with this run's older version {plan.version}"
        )
    # A retry after a flip that did happen finds its own version: keep the previous one it named then.
    previous = (before.previous if before.version == plan.version else before.version) if before else None
    manifest = manifest_for(plan, summary, datetime.now(UTC), previous)
    put_bytes(settings, S3Location.parse(plan.manifest_uri), manifest.to_json().encode(), "application/json")
    log.info(
        "published %s: %d prediction file(s), %d rows (previous version: %s)",
        plan.prefix,
        len(manifest.files),
        manifest.rows,
        manifest.previous or "none",
    )
    try:
        removed = remove_expired_versions(plan.output, manifest, settings, filesystem)
    except Exception:  # the flip is done: a failed clean-up must not fail the run
        log.exception("published %s, but deleting expired versions failed; a later run retries", plan.prefix)
    else:
        if removed:
            log.info("deleted %d expired object(s) under %s", removed, plan.output)
    return manifest


def remove_expired_versions(output: str, manifest: Manifest, settings: Settings, filesystem: Any = None) -> int:
    """Delete versions older than the manifest's `previous` (and than the longest run) and pre-manifest files.

    Returns how many objects were deleted.
    """
    filesystem = filesystem or s3_filesystem(settings)
    client, root = s3_client(settings), S3Location.parse(folder(output))
    doomed: list[str] = []
    versions = _version_names(settings, output, filesystem)
    now, longest = datetime.now(UTC), settings.scoring_max_run_seconds
    for version in expired_versions(versions, manifest.version, manifest.previous, now, longest):
        doomed += list_keys(settings, root.child(f"{VERSIONS_FOLDER}{version}/"), filesystem=filesystem)
    # files of the layout before manifests (parts and summary directly under the output): never read now
    doomed += [
        key
        for key in list_keys(settings, root, filesystem=filesystem, recursive=False)
        if is_legacy_output(key.removeprefix(root.key))
    ]
    _delete_keys(client, root.bucket, doomed)
    return len(doomed)


def discard_version(plan: OutputPlan, settings: Settings) -> int:
    """Delete a failed run's version (never the one the manifest names); returns how many objects were deleted."""
    manifest = read_manifest(plan.output, settings)
    if manifest is not None and manifest.version == plan.version:
        log.warning("not discarding %s: the manifest names it (it was published)", plan.prefix)
        return 0
    location = S3Location.parse(plan.prefix)
    keys = list_keys(settings, location)
    _delete_keys(s3_client(settings), location.bucket, keys)
    if keys:
        log.info("discarded %d object(s) of the failed run under %s", len(keys), plan.prefix)
    return len(keys)
