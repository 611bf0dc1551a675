"""Batch scoring, the pure part: output naming, chunk predictions, the running summary.

What each row gets: a classifier's `predicted` class and `proba_<class>` for every class (binary and
multiclass alike); a regressor's `predicted` value (float64). The summary has class counts and mean
probabilities for a classifier, and prediction statistics (mean, standard deviation, min, max) for a
regressor.

Where the predictions go (published atomically: the previous good output stays readable until the new
one is complete):

    <output>/manifest.json                          which version is current (and the one before it)
    <output>/versions/<version>/part-00000.parquet  one prediction file per input file, sorted input order
    <output>/versions/<version>/summary.json        the run's summary (maps each input file to its part)

Each run writes a new `<version>` (its start time in UTC, then a token: versions sort by start time).
Only once every part and the summary are written is `manifest.json` replaced, in one PUT: that is the
flip. Readers resolve the output through the manifest (`adapters.scoring_store.current_output`), never by
listing the prefix, so they see the previous complete run or the new complete run, never a mix. Versions
older than the manifest's `previous` are deleted after the flip. Reading, writing and publishing are
`adapters.scoring_store`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from core.data.dataset import DatasetConfig
from core.data.features import prepare_inputs
from core.data.locations import S3Location
from core.errors import PermanentError
from core.inference.prediction_stats import PredictionStats
from core.modeling.metrics import model_classes, model_scores

PARQUET_SUFFIXES = (".parquet", ".pq")
SUMMARY_NAME = "summary.json"
MANIFEST_NAME = "manifest.json"
VERSIONS_FOLDER = "versions/"
MANIFEST_FORMAT = 1


class ScoringInputError(PermanentError):
    """The partition cannot be scored as asked (no files, a missing column, bad values). Names the place."""


class ModelVersionError(PermanentError):
    """No model to score with: no champion and no version given, or the given version does not exist."""


class ScoringOutputError(PermanentError):
    """A scoring output cannot be read: no manifest (nothing published yet) or an unreadable one. Names it."""


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
    """The output prefix (what readers name) and this run's version under it (prefixes end with `/`)."""

    output: str
    version: str

    @staticmethod
    def part_name(index: int) -> str:
        """Name of the prediction file of the `index`-th input file."""
        return f"part-{index:05d}.parquet"

    @property
    def prefix(self) -> str:
        """Where this run writes its parts and summary: `<output>/versions/<version>/`."""
        return version_prefix(self.output, self.version)

    @property
    def summary_uri(self) -> str:
        """Where this run's summary goes."""
        return self.prefix + SUMMARY_NAME

    @property
    def manifest_uri(self) -> str:
        """The output's manifest, replaced last (the flip)."""
        return self.output + MANIFEST_NAME


@dataclass(frozen=True)
class ScoringRequest:
    """One run's scoring, whatever the engine: which model version scores which partition into which plan."""

    config: DatasetConfig
    partition: Partition
    plan: OutputPlan
    chunk_rows: int  # rows read, predicted and written at a time
    model_name: str
    model_version: str


def version_prefix(output: str, version: str) -> str:
    """`<output>/versions/<version>/`."""
    return f"{folder(output)}{VERSIONS_FOLDER}{version}/"


def new_version(now: datetime, token: str) -> str:
    """A run's version name: its UTC start time (microseconds) then a token, so versions sort by start time."""
    safe = "".join(c if c.isalnum() or c in "-_" else "-" for c in token)[:48]
    return f"{now.astimezone(UTC):%Y%m%dT%H%M%S%fZ}-{safe}"


@dataclass(frozen=True)
class Manifest:
    """`<output>/manifest.json`: the current complete version of an output, and the one it replaced.

    `files` are the current version's prediction files (full URIs, input order) and `summary` its summary;
    a reader needs nothing else. `previous` is kept readable until the next flip.
    """

    output: str
    version: str
    files: tuple[str, ...]
    summary: str
    rows: int
    model_name: str
    model_version: str
    source: str
    published_at: str
    previous: str | None = None

    @property
    def prefix(self) -> str:
        """The current version's prefix."""
        return version_prefix(self.output, self.version)

    def to_json(self) -> str:
        """The manifest as JSON (with its format number)."""
        return json.dumps({"format": MANIFEST_FORMAT} | asdict(self) | {"files": list(self.files)}, indent=2)

    @classmethod
    def from_json(cls, text: str | bytes, where: str) -> Manifest:
        """Parse a manifest; ScoringOutputError naming `where` and what is wrong.

        Raises:
            ScoringOutputError: Not JSON, another format, or a missing or mistyped field.
        """
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ScoringOutputError(f"{where}: not a scoring manifest (invalid JSON: {exc})") from exc
        if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
            found = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise ScoringOutputError(f"{where}: manifest format {found!r}, expected {MANIFEST_FORMAT}")
        try:
            manifest = cls(**{k: v for k, v in data.items() if k != "format"} | {"files": tuple(data["files"])})
        except (KeyError, TypeError) as exc:
            raise ScoringOutputError(f"{where}: incomplete manifest ({exc})") from exc
        if not all(f.startswith(manifest.prefix) for f in manifest.files) or not manifest.summary.startswith(
            manifest.prefix
        ):
            raise ScoringOutputError(f"{where}: manifest lists files outside its version {manifest.prefix}")
        return manifest


def manifest_for(plan: OutputPlan, summary: ScoringSummary, published_at: datetime, previous: str | None) -> Manifest:
    """The manifest that makes `plan`'s version current (its parts in input order, its summary)."""
    return Manifest(
        output=plan.output,
        version=plan.version,
        files=tuple(summary.parts.values()),
        summary=plan.summary_uri,
        rows=summary.rows,
        model_name=summary.model_name,
        model_version=summary.model_version,
        source=summary.source,
        published_at=published_at.isoformat(),
        previous=previous,
    )


def version_started(version: str) -> datetime | None:
    """When the run that wrote `version` started (its name's UTC time, see `new_version`); None if not one of ours."""
    try:
        return datetime.strptime(version.split("-", 1)[0], "%Y%m%dT%H%M%S%fZ").replace(tzinfo=UTC)
    except ValueError:
        return None


def expired_versions(
    versions: list[str], current: str, previous: str | None, now: datetime, max_run_seconds: float
) -> list[str]:
    """Versions to delete after a flip: older than the oldest kept and than the longest run.

    Every version older than the oldest kept (`previous`, else `current`) whose run started at least
    `max_run_seconds` (the longest a run may take) before `now`.
    Newer versions that are not current are left alone, and so is any version whose run may still be going:
    another run may still be writing it. A run killed mid-write leaves an unreferenced version, deleted once
    it is older than the kept ones and than the longest run.
    """
    oldest_kept = min(v for v in (current, previous) if v is not None)
    cutoff = now - timedelta(seconds=max_run_seconds)

    def finished(version: str) -> bool:
        started = version_started(version)
        return started is None or started <= cutoff

    return sorted(v for v in versions if v < oldest_kept and v not in {current, previous} and finished(v))


def output_folder(output: str | None, bucket: str, model_name: str, source: str, version: str) -> str:
    """The output folder a run writes under: `output`, else the default for the model, partition and version."""
    return folder(output) if output else default_output(bucket, model_name, source, version)


def folder(uri: str) -> str:
    """The URI (or key) as a folder: with one trailing `/`."""
    return uri if uri.endswith("/") else uri + "/"


def partition_name(source: str) -> str:
    """Name of a partition in output paths: its folder's name, or `<folder>/<stem>` for a single file.

    `s3://b/datasets/x/month=2025-06/` gives `month=2025-06`; `s3://b/x/month=2025-06/part-0.parquet`
    gives `month=2025-06/part-0`.
    """
    location = S3Location.parse(source)
    bucket, key = location.bucket, location.key
    parts = [p for p in key.split("/") if p]
    if not parts:
        return bucket
    if source.endswith(PARQUET_SUFFIXES):
        stem = parts[-1].rsplit(".", 1)[0]
        return f"{parts[-2]}/{stem}" if len(parts) > 1 else stem
    return parts[-1]


def default_output(bucket: str, model_name: str, source: str, version: str) -> str:
    """`s3://<bucket>/predictions/batch/<model_name>/<partition name>/v<version>/`."""
    return f"s3://{bucket}/predictions/batch/{model_name}/{partition_name(source)}/v{version}/"


def plan_output(output: str | None, bucket: str, model_name: str, source: str, version: str, run: str) -> OutputPlan:
    """The output prefix (given or default) and this run's version under it (`run`: the run's version name).

    Raises:
        ScoringInputError: The output would land inside the source partition (or contain it).
    """
    final = output_folder(output, bucket, model_name, source, version)
    source_folder = folder(source.rsplit("/", 1)[0] if source.endswith(PARQUET_SUFFIXES) else source)
    if final.startswith(source_folder) or source_folder.startswith(final):
        raise ScoringInputError(f"output {final} overlaps the source {source}: predictions would mix with the data")
    return OutputPlan(final, run)


def is_legacy_output(name: str) -> bool:
    """A file of the layout before manifests, directly under an output: `summary.json` or `part-*.parquet`."""
    return name == SUMMARY_NAME or (name.startswith("part-") and name.endswith(".parquet"))


def required_columns(config: DatasetConfig) -> list[str]:
    """Columns read from each file: the id, the time column if configured, then the features."""
    return [config.id_column, *([config.time_column] if config.time_column else []), *config.feature_names]


def missing_columns(config: DatasetConfig, names: set[str]) -> list[str]:
    """The needed columns (`required_columns`) a file with columns `names` lacks."""
    return [c for c in required_columns(config) if c not in names]


def scoring_task(config: DatasetConfig, classes: list[Any], model_name: str, model_version: str) -> str:
    """`binary`, `multiclass` or `regression`, from the model's classes, checked against the dataset's task.

    Raises:
        ScoringInputError: A classifier for a regression dataset, or the other way round.
    """
    if config.task.is_classification != bool(classes):
        kind = f"a classifier of {classes}" if classes else "a regressor"
        raise ScoringInputError(f"{model_name} v{model_version} is {kind}, but the dataset's task is {config.task}")
    return "regression" if not classes else ("binary" if len(classes) == 2 else "multiclass")


# --- where it runs: this process, or partitions on a Dask cluster ----------------------------------------

CLUSTER_MIN_ROWS = 1_000_000  # `engine="auto"` scores a partition this big on the cluster when there is one
ENGINES = ("auto", "local", "dask")


def use_cluster(engine: str, rows: int, address: str | None) -> bool:
    """Whether to score on the Dask cluster at `address` (None: no cluster).

    `local`: never; `dask`: always (an error without a cluster); `auto`: when there is a cluster and the
    partition has at least `CLUSTER_MIN_ROWS` rows (below that, starting tasks costs more than it saves).

    Raises:
        ScoringInputError: `dask` asked for with no cluster, or an unknown engine.
    """
    if engine not in ENGINES:
        raise ScoringInputError(f"engine {engine!r}: expected one of {', '.join(ENGINES)}")
    if engine == "dask" and address is None:
        raise ScoringInputError(
            "engine 'dask' asked for, but there is no Dask cluster: set MLOPS_DASK_ADDRESS or start the local "
            "stack's scheduler (mlops stack up)"
        )
    return engine == "dask" or (engine == "auto" and address is not None and rows >= CLUSTER_MIN_ROWS)


# --- one chunk in, its predictions out ---------------------------------------------------------------


def predict_chunk(
    model: Any, batch: pa.RecordBatch, config: DatasetConfig, model_version: str, scored_at: datetime
) -> pa.RecordBatch:
    """Predictions of one chunk: id, time (if configured), `predicted`, `proba_<class>`, version, time scored.

    For a classifier `predicted` is the class with the highest probability, which is what the model's
    `predict` returns for the project's classifiers (the tests check it against the registered model's own
    `predict`), and there is one `proba_<class>` column per class. For a regressor `predicted` is its
    predicted value (float64) and there are no probability columns.
    """
    scores = model_scores(model, prepare_inputs(batch.select(config.input_columns).to_pandas(), config))
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


# --- the summary, accumulated chunk by chunk ----------------------------------------------------------


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

    def merge(self, other: PredictionTally) -> None:
        """Merge the tally of other rows (another partition's), as if its chunks had been added here."""
        self.rows += other.rows
        for label, value in other.sums.items():
            self.sums[label] = self.sums.get(label, 0.0) + value
        for label, count in other.counts.items():
            self.counts[label] = self.counts.get(label, 0) + count
        self.values.merge(other.values)

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
    # How it ran: `local` (chunks in the flow's process) or `dask` (partitions on a cluster); for `dask`, the
    # workers used, each worker's memory limit and its peak resident memory (MB, since the worker started).
    engine: str = "local"
    workers: int = 0
    worker_memory_limit_mb: dict[str, float] = field(default_factory=dict)
    worker_peak_rss_mb: dict[str, float] = field(default_factory=dict)

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
            f"| engine | {self.engine}{f' ({self.workers} workers)' if self.engine == 'dask' else ''} |",
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
