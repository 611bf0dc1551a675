"""Batch scoring: predict a Parquet partition in S3 chunk by chunk, write the predictions beside a summary.

Memory stays bounded by the chunk size, not the partition size: each file is read with pyarrow's
`ParquetFile.iter_batches` (only the id, time and feature columns; buffered reads instead of
pre-buffering whole row groups), and each chunk's predictions go at once to a `ParquetWriter` that
streams to S3. One prediction file per input file: `<output>/part-00000.parquet`, ... in the sorted
order of the input files (the summary maps each input file to its output file).

What each row gets: a classifier's `predicted` class and `proba_<class>` for every class (binary and
multiclass alike); a regressor's `predicted` value (float64). The summary has class counts and mean
probabilities for a classifier, and prediction statistics (mean, standard deviation, min, max) for a
regressor.

Nothing half-written (S3 has no rename):
- every part is first written under a staging prefix, `s3://<output bucket>/_staging/scoring/<token>/`;
- only once every file is scored are the parts copied to the output prefix; parts of an earlier run
  there that this run does not overwrite are deleted, and `summary.json` is written last: it is the
  completion marker, present only when the prefix holds one complete run;
- the staging prefix is deleted on success and on failure (`discard_staging`), and a failure while
  copying removes what was copied. Only a killed process can leave objects, and then only under
  `_staging/` (a lifecycle rule on that prefix cleans them).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from prefect import task
from prefect.cache_policies import NO_CACHE

from adapters import registry
from adapters.clients import S3Location, mlflow_client, put_bytes, s3_client
from adapters.registry import CHAMPION, champion_version
from adapters.settings import Settings, get_settings
from core.dataset import DatasetConfig
from core.errors import PermanentError
from core.features import prepare_inputs
from core.metrics import model_classes, model_scores
from tasks.retrying import IO_RETRIES, IO_RETRY_DELAYS, retry_unless_permanent

log = logging.getLogger(__name__)

PARQUET_SUFFIXES = (".parquet", ".pq")
SUMMARY_NAME = "summary.json"
STAGING_PREFIX = "_staging/scoring"
# Read each column through a 2 MiB buffer rather than whole column chunks, so a file written with one
# huge row group does not have to fit in memory.
READ_BUFFER_BYTES = 2 << 20
IO = {
    "retries": IO_RETRIES,
    "retry_delay_seconds": IO_RETRY_DELAYS,
    "retry_condition_fn": retry_unless_permanent,
    "cache_policy": NO_CACHE,
}


class ScoringInputError(PermanentError):
    """The partition cannot be scored as asked (no files, a missing column, bad values). Names the place."""


class ModelVersionError(PermanentError):
    """No model to score with: no champion and no version given, or the given version does not exist."""


# --- what gets scored, where the predictions go -----------------------------------------------------


@dataclass(frozen=True)
class PartitionFile:
    """One Parquet file of the partition and its row count (from the footer)."""

    uri: str
    rows: int


@dataclass(frozen=True)
class Partition:
    """The files to score and the columns to read from each."""

    source: str
    files: tuple[PartitionFile, ...]
    columns: tuple[str, ...]

    @property
    def rows(self) -> int:
        """Rows over all files."""
        return sum(f.rows for f in self.files)


@dataclass(frozen=True)
class OutputPlan:
    """Final output prefix and the staging prefix the parts are written to first (both end with `/`)."""

    output: str
    staging: str

    @staticmethod
    def part_name(index: int) -> str:
        """Name of the prediction file of the `index`-th input file."""
        return f"part-{index:05d}.parquet"

    @property
    def summary_uri(self) -> str:
        """Where the summary goes."""
        return self.output + SUMMARY_NAME


def _folder(uri: str) -> str:
    return uri if uri.endswith("/") else uri + "/"


def partition_name(source: str) -> str:
    """Name of a partition in output paths: its folder's name, or `<folder>/<stem>` for a single file.

    `s3://b/datasets/x/month=2025-06/` gives `month=2025-06`; `s3://b/x/month=2025-06/part-0.parquet`
    gives `month=2025-06/part-0`.
    """
    location = S3Location.parse(source)
    parts = [p for p in location.key.split("/") if p]
    if not parts:
        return location.bucket
    if source.endswith(PARQUET_SUFFIXES):
        stem = parts[-1].rsplit(".", 1)[0]
        return f"{parts[-2]}/{stem}" if len(parts) > 1 else stem
    return parts[-1]


def default_output(bucket: str, model_name: str, source: str, version: str) -> str:
    """`s3://<bucket>/predictions/batch/<model_name>/<partition name>/v<version>/`."""
    return f"s3://{bucket}/predictions/batch/{model_name}/{partition_name(source)}/v{version}/"


def plan_output(output: str | None, bucket: str, model_name: str, source: str, version: str, token: str) -> OutputPlan:
    """The output prefix (given or default) and a fresh staging prefix in the same bucket.

    Raises:
        ScoringInputError: The output would land inside the source partition (or contain it).
    """
    final = _folder(output) if output else default_output(bucket, model_name, source, version)
    location = S3Location.parse(final)
    source_folder = _folder(source.rsplit("/", 1)[0] if source.endswith(PARQUET_SUFFIXES) else source)
    if final.startswith(source_folder) or source_folder.startswith(final):
        raise ScoringInputError(f"output {final} overlaps the source {source}: predictions would mix with the data")
    return OutputPlan(final, f"s3://{location.bucket}/{STAGING_PREFIX}/{token}/")


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


def s3_filesystem(settings: Settings) -> Any:
    """A pyarrow S3 filesystem for the configured endpoint and credentials (path-style addressing)."""
    from pyarrow import fs

    endpoint = urlsplit(settings.s3_endpoint_url)
    return fs.S3FileSystem(
        access_key=settings.aws_access_key_id,
        secret_key=settings.aws_secret_access_key.get_secret_value(),
        region=settings.aws_region,
        scheme=endpoint.scheme or "https",
        endpoint_override=endpoint.netloc or None,
        connect_timeout=5,
        request_timeout=60,
    )


def _fs_path(uri: str) -> str:
    return uri.removeprefix("s3://")


def _list_keys(client: Any, location: S3Location, recursive: bool = True) -> list[str]:
    keys: list[str] = []
    extra = {} if recursive else {"Delimiter": "/"}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=location.bucket, Prefix=location.key, **extra):
        keys += [obj["Key"] for obj in page.get("Contents", [])]
    return keys


def list_partition_files(source: str, settings: Settings) -> list[str]:
    """URIs of the Parquet files of a partition (one file, or every Parquet file under a folder), sorted.

    Raises:
        ScoringInputError: Not an s3:// URI, no such bucket or file, or no Parquet file under the folder.
    """
    try:
        location = S3Location.parse(source)
    except ValueError as exc:
        raise ScoringInputError(f"source {source!r}: {exc}") from exc
    client = s3_client(settings)
    try:
        if source.endswith(PARQUET_SUFFIXES):
            client.head_object(Bucket=location.bucket, Key=location.key)
            return [source]
        folder = S3Location(location.bucket, _folder(location.key) if location.key else "")
        keys = [k for k in _list_keys(client, folder) if k.endswith(PARQUET_SUFFIXES)]
    except client.exceptions.NoSuchBucket as exc:
        raise ScoringInputError(f"source {source}: bucket {location.bucket!r} does not exist") from exc
    except client.exceptions.ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in {"404", "NoSuchKey", "NoSuchBucket"}:
            raise ScoringInputError(f"source {source}: no such file or bucket") from exc
        raise
    if not keys:
        raise ScoringInputError(f"source {source}: no Parquet files found under this prefix")
    return [f"s3://{location.bucket}/{key}" for key in sorted(keys)]


def required_columns(config: DatasetConfig) -> list[str]:
    """Columns read from each file: the id, the time column if configured, then the features."""
    return [config.id_column, *([config.time_column] if config.time_column else []), *config.feature_names]


def inspect_files(source: str, uris: list[str], config: DatasetConfig, filesystem: Any) -> Partition:
    """Read each file's footer (not its data): row counts, and every needed column present.

    Raises:
        ScoringInputError: A file is not Parquet, or lacks a column (named with the file).
    """
    columns = required_columns(config)
    files = []
    for uri in uris:
        try:
            with filesystem.open_input_file(_fs_path(uri)) as handle:
                parquet = pq.ParquetFile(handle)
                names, rows = set(parquet.schema_arrow.names), parquet.metadata.num_rows
        except pa.ArrowInvalid as exc:
            raise ScoringInputError(f"{uri}: cannot be read as Parquet: {exc}") from exc
        missing = [c for c in columns if c not in names]
        if missing:
            raise ScoringInputError(f"{uri}: missing column(s) {', '.join(map(repr, missing))} needed to score")
        files.append(PartitionFile(uri, rows))
    return Partition(source, tuple(files), tuple(columns))


# --- the pure core: one chunk in, its predictions out ------------------------------------------------


def predict_chunk(
    model: Any, batch: pa.RecordBatch, config: DatasetConfig, model_version: str, scored_at: datetime
) -> pa.RecordBatch:
    """Predictions of one chunk: id, time (if configured), `predicted`, `proba_<class>`, version, time scored.

    For a classifier `predicted` is the class with the highest probability, which is what the model's
    `predict` returns for the project's classifiers (the tests check it against the registered model's own
    `predict`), and there is one `proba_<class>` column per class. For a regressor `predicted` is its
    predicted value (float64) and there are no probability columns.
    """
    scores = model_scores(model, prepare_inputs(batch.select(config.feature_names).to_pandas(), config))
    classes = np.asarray(model_classes(model))
    n = batch.num_rows
    columns = {config.id_column: batch.column(config.id_column)}
    if config.time_column:
        columns[config.time_column] = batch.column(config.time_column)
    if classes.size == 0:
        columns["predicted"] = pa.array(scores, pa.float64())
    else:
        columns["predicted"] = pa.array(classes[scores.argmax(axis=1)])
    for index, label in enumerate(classes):
        columns[f"proba_{label}"] = pa.array(scores[:, index], pa.float64())
    columns["model_version"] = pa.repeat(pa.scalar(model_version, pa.string()), n)
    columns["scored_at"] = pa.repeat(pa.scalar(scored_at, pa.timestamp("us", tz="UTC")), n)
    return pa.RecordBatch.from_pydict(columns)


@dataclass
class PredictionStats:
    """Running count, mean, spread and range of predicted values, merged chunk by chunk.

    Chan et al.'s pairwise update of the mean and the sum of squared deviations: exact up to rounding,
    without keeping the values and without the cancellation of a sum-of-squares formula.
    """

    count: int = 0
    mean: float = 0.0
    m2: float = 0.0
    min: float = float("inf")
    max: float = float("-inf")

    def add(self, values: np.ndarray) -> None:
        """Merge a chunk's values."""
        values = np.asarray(values, dtype="float64")
        if values.size == 0:
            return
        n, mean = values.size, float(values.mean())
        m2 = float(np.sum((values - mean) ** 2))
        total = self.count + n
        delta = mean - self.mean
        self.mean += delta * n / total
        self.m2 += m2 + delta**2 * self.count * n / total
        self.count = total
        self.min, self.max = min(self.min, float(values.min())), max(self.max, float(values.max()))

    def as_dict(self) -> dict[str, float]:
        """`mean`, `std` (population), `min`, `max`; empty when nothing was added."""
        if self.count == 0:
            return {}
        return {"mean": self.mean, "std": (self.m2 / self.count) ** 0.5, "min": self.min, "max": self.max}


@dataclass
class PredictionTally:
    """What the summary says about the predictions, accumulated chunk by chunk.

    Per class (a classifier): predicted rows and the sum of each probability; for a regressor, the running
    statistics of the predicted values.
    """

    labels: list[str]  # the classes as text, in probability-column order; empty for a regressor
    rows: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    sums: dict[str, float] = field(default_factory=dict)
    values: PredictionStats = field(default_factory=PredictionStats)

    def add(self, predictions: pa.RecordBatch) -> None:
        """Count one chunk of `predict_chunk`'s output."""
        self.rows += predictions.num_rows
        predicted = predictions.column("predicted").to_numpy(zero_copy_only=False)
        if not self.labels:
            self.values.add(predicted)
            return
        for label in self.labels:
            self.sums[label] = self.sums.get(label, 0.0) + pc.sum(predictions.column(f"proba_{label}")).as_py()
        for label, count in zip(*np.unique(predicted, return_counts=True), strict=True):
            self.counts[str(label)] = self.counts.get(str(label), 0) + int(count)

    def fill(self, summary: ScoringSummary) -> None:
        """Set the summary's class counts and mean probabilities, or its prediction statistics."""
        if self.rows == 0:
            return
        summary.predicted_counts = {label: self.counts.get(label, 0) for label in self.labels}
        summary.mean_probability = {label: float(self.sums[label] / self.rows) for label in self.labels}
        summary.prediction_stats = self.values.as_dict()


@dataclass
class ScoringSummary:
    """What a scoring run read, wrote and predicted (written as summary.json beside the predictions).

    A classifier's summary has `predicted_counts` and `mean_probability` per class; a regressor's has
    `prediction_stats` (mean, std, min, max of the predicted values) instead.
    """

    model_name: str
    model_version: str
    source: str
    output: str
    scored_at: str
    task: str = "binary"  # binary, multiclass or regression (from the model's classes)
    rows: int = 0
    chunks: int = 0
    files: int = 0
    seconds: float = 0.0
    predicted_counts: dict[str, int] = field(default_factory=dict)
    mean_probability: dict[str, float] = field(default_factory=dict)
    prediction_stats: dict[str, float] = field(default_factory=dict)
    parts: dict[str, str] = field(default_factory=dict)

    @property
    def rows_per_second(self) -> float:
        """Throughput of the scoring itself (reading, predicting and writing)."""
        return self.rows / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> str:
        """The summary as JSON (`parts` maps input file -> prediction file); only the task's own statistics."""
        data = asdict(self) | {"rows_per_second": round(self.rows_per_second, 1)}
        unused = ("predicted_counts", "mean_probability") if self.task == "regression" else ("prediction_stats",)
        return json.dumps({k: v for k, v in data.items() if k not in unused}, indent=2)

    def to_markdown(self) -> str:
        """The summary as tables, for the Prefect UI."""
        lines = [
            f"# Batch scoring: {self.model_name} v{self.model_version}",
            "",
            "| | |",
            "|---|---|",
            f"| model | `{self.model_name}` v{self.model_version} |",
            f"| source | `{self.source}` |",
            f"| output | `{self.output}` |",
            f"| rows | {self.rows:,} |",
            f"| files | {self.files} |",
            f"| chunks | {self.chunks} |",
            f"| seconds | {self.seconds:.1f} ({self.rows_per_second:,.0f} rows/s) |",
            f"| task | {self.task} |",
            f"| scored at | {self.scored_at} |",
            "",
        ]
        if self.task == "regression":
            lines += ["| predicted value | |", "|---|---:|"]
            lines += [f"| {name} | {value:,.6g} |" for name, value in self.prediction_stats.items()]
            return "\n".join(lines) + "\n"
        lines += ["| class | predicted rows | share | mean probability |", "|---|---:|---:|---:|"]
        for label, mean in self.mean_probability.items():
            count = self.predicted_counts.get(label, 0)
            share = count / self.rows if self.rows else 0.0
            lines.append(f"| {label} | {count:,} | {share:.1%} | {mean:.4f} |")
        return "\n".join(lines) + "\n"


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
        filesystem: pyarrow filesystem for reading and writing (`s3_filesystem`).
        on_chunk: Called after each chunk with (rows done, rows in total), for progress reporting.

    Raises:
        ScoringInputError: A chunk's values cannot be prepared for the model (names the file and rows).
    """
    scored_at = datetime.now(UTC)
    classes = model_classes(model)
    if config.task.is_classification != bool(classes):
        kind = f"a classifier of {classes}" if classes else "a regressor"
        raise ScoringInputError(f"{model_name} v{model_version} is {kind}, but the dataset's task is {config.task}")
    task = "regression" if not classes else ("binary" if len(classes) == 2 else "multiclass")
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
            filesystem.open_input_file(_fs_path(file.uri)) as source,
            filesystem.open_output_stream(_fs_path(target)) as sink,
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
    client = s3_client(settings)
    staging, final = S3Location.parse(plan.staging), S3Location.parse(plan.output)
    staged = sorted(_list_keys(client, staging))
    # Only this flow's own file names directly under the prefix are ever deleted, never anything else.
    earlier = [
        key
        for key in _list_keys(client, final, recursive=False)
        if (name := key.removeprefix(final.key)) == SUMMARY_NAME
        or (name.startswith("part-") and name.endswith(".parquet"))
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
    client = s3_client(settings)
    staging = S3Location.parse(plan.staging)
    keys = _list_keys(client, staging)
    _delete_keys(client, staging.bucket, keys)
    if keys:
        log.info("discarded %d staged object(s) under %s", len(keys), plan.staging)
    return len(keys)


# --- Prefect tasks ------------------------------------------------------------------------------------


@task(name="resolve-model-version", **IO)
def resolve_model_version(model_name: str, requested: str | None) -> str:
    """Prefect task: the given version (checked), or the champion's (see `resolve_version`)."""
    version = resolve_version(model_name, requested)
    log.info("scoring with %s v%s%s", model_name, version, "" if requested else f" (the {CHAMPION})")
    return version


@task(name="load-model", **IO)
def load_model(model_name: str, version: str) -> Any:
    """Prefect task: a registered version's fitted pipeline (sklearn flavour: a classifier or a regressor)."""
    return registry.load_model(model_name, version)


@task(name="inspect-partition", **IO)
def inspect_partition(source: str, config: DatasetConfig) -> Partition:
    """Prefect task: list the partition's Parquet files and check their footers (rows, columns)."""
    settings = get_settings()
    partition = inspect_files(source, list_partition_files(source, settings), config, s3_filesystem(settings))
    log.info("partition %s: %d file(s), %d rows", source, len(partition.files), partition.rows)
    return partition


@task(name="plan-output", cache_policy=NO_CACHE)
def make_output_plan(output: str | None, model_name: str, source: str, version: str) -> OutputPlan:
    """Prefect task: the output prefix (given or default) and this run's staging prefix."""
    from prefect.runtime import flow_run

    token = f"{flow_run.get_id() or 'local'}-{uuid.uuid4().hex[:8]}"
    plan = plan_output(output, get_settings().bucket, model_name, source, version, token)
    log.info("predictions go to %s (staged under %s)", plan.output, plan.staging)
    return plan


@task(name="score-partition", **IO, timeout_seconds=6 * 3600)
def score_partition(
    model: Any,
    config: DatasetConfig,
    partition: Partition,
    plan: OutputPlan,
    chunk_rows: int,
    model_name: str,
    model_version: str,
) -> ScoringSummary:
    """Prefect task: score into the staging prefix; progress shows as a Prefect progress artifact."""
    from prefect.artifacts import create_progress_artifact, update_progress_artifact

    progress_id = create_progress_artifact(
        progress=0.0, key="scoring-progress", description="Batch scoring: share of rows scored"
    )

    def report(done: int, total: int) -> None:
        update_progress_artifact(progress_id, progress=100.0 * done / max(total, 1))

    settings = get_settings()
    return score_partition_files(
        model, config, partition, plan, chunk_rows, model_name, model_version, s3_filesystem(settings), report
    )


@task(name="publish-predictions", **IO)
def publish_predictions(plan: OutputPlan, summary: ScoringSummary) -> str:
    """Prefect task: staged parts to the output prefix, summary.json last (see `publish_output`)."""
    return publish_output(plan, summary, get_settings())


@task(name="discard-staging", retries=IO_RETRIES, retry_delay_seconds=IO_RETRY_DELAYS, cache_policy=NO_CACHE)
def discard_staging(plan: OutputPlan) -> int:
    """Prefect task: delete this run's staged parts (after a failure, so nothing half-written remains)."""
    return discard_staging_prefix(plan, get_settings())


@task(name="publish-scoring-summary", cache_policy=NO_CACHE)
def publish_scoring_summary(summary: ScoringSummary, summary_uri: str) -> None:
    """Prefect task: the summary as a markdown artifact (key `batch-scoring`) of the flow run."""
    from prefect.artifacts import create_markdown_artifact

    create_markdown_artifact(
        markdown=f"{summary.to_markdown()}\nSummary file: `{summary_uri}`\n",
        key="batch-scoring",
        description=f"Batch scoring of {summary.source} with {summary.model_name} v{summary.model_version}",
    )
