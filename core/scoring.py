"""Batch scoring, the pure part: output naming, chunk predictions, the running summary.

What each row gets: a classifier's `predicted` class and `proba_<class>` for every class (binary and
multiclass alike); a regressor's `predicted` value (float64). The summary has class counts and mean
probabilities for a classifier, and prediction statistics (mean, standard deviation, min, max) for a
regressor.

Where the predictions go: one prediction file per input file, `<output>/part-00000.parquet`, ... in the
sorted order of the input files, and `summary.json` beside them (the summary maps each input file to its
output file). Every part is first written under a staging prefix in the output bucket,
`s3://<output bucket>/_staging/scoring/<token>/`. Reading, staging and publishing are
`adapters.scoring_store`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from core.dataset import DatasetConfig
from core.errors import PermanentError
from core.features import prepare_inputs
from core.locations import S3Location
from core.metrics import model_classes, model_scores

PARQUET_SUFFIXES = (".parquet", ".pq")
SUMMARY_NAME = "summary.json"
STAGING_PREFIX = "_staging/scoring"


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


def plan_output(output: str | None, bucket: str, model_name: str, source: str, version: str, token: str) -> OutputPlan:
    """The output prefix (given or default) and a fresh staging prefix in the same bucket.

    Raises:
        ScoringInputError: The output would land inside the source partition (or contain it).
    """
    final = folder(output) if output else default_output(bucket, model_name, source, version)
    output_bucket = S3Location.parse(final).bucket
    source_folder = folder(source.rsplit("/", 1)[0] if source.endswith(PARQUET_SUFFIXES) else source)
    if final.startswith(source_folder) or source_folder.startswith(final):
        raise ScoringInputError(f"output {final} overlaps the source {source}: predictions would mix with the data")
    return OutputPlan(final, f"s3://{output_bucket}/{STAGING_PREFIX}/{token}/")


def is_own_output(name: str) -> bool:
    """A name (relative to an output prefix) this flow writes there: `summary.json` or `part-*.parquet`."""
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


# --- the summary, accumulated chunk by chunk ----------------------------------------------------------


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
