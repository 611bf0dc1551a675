"""Dataset description: where a snapshot lives and what it must look like.

A dataset config is a small YAML file validated by pydantic. It says where the data is (an S3 URI or a
local path, one file or a folder of partitions), which column is the target, the id and the time, the
feature columns with their types, and the expectations that cannot be inferred from the data (ranges,
allowed categories, the tolerated fraction of nulls). It may also name the slices (sub-populations) a
candidate must not get worse on and the sensitive features its fairness is measured on.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from importlib import resources
from itertools import pairwise
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from core.data.operations import Operations

BUNDLED_DATASETS = ("credit-risk", "credit-risk-history")
# A model name is a catalog key, an S3 key part, a Prefect deployment name and a URL path segment.
MODEL_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"


class TaskType(StrEnum):
    """Supervised task the dataset is for."""

    binary = "binary"
    multiclass = "multiclass"
    regression = "regression"

    @property
    def is_classification(self) -> bool:
        """Binary or multiclass: the model gives class probabilities."""
        return self is not TaskType.regression


class FeatureType(StrEnum):
    """Type of a feature column."""

    numeric = "numeric"
    categorical = "categorical"
    datetime = "datetime"  # date/time values (or ISO text): their calendar parts are the model's features


class CategoricalEncoding(StrEnum):
    """How a categorical feature becomes numbers."""

    one_hot = "one_hot"
    target = "target"


# Above this many listed categories a categorical feature without an `encoding` is target-encoded.
MAX_ONE_HOT_CATEGORIES = 50


class CalendarPart(StrEnum):
    """A calendar part of a date/time value, encoded cyclically (sine and cosine) as two model features."""

    hour = "hour"
    weekday = "weekday"
    month = "month"
    day_of_year = "day_of_year"


class Feature(BaseModel):
    """One feature column and its expectations."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1)
    type: FeatureType
    min: float | None = Field(None, description="Smallest valid value (numeric features).")
    max: float | None = Field(None, description="Largest valid value (numeric features).")
    categories: list[str] | None = Field(None, description="Allowed values (categorical features).")
    max_null_fraction: float | None = Field(
        None, ge=0, le=1, description="Overrides the dataset's default null tolerance for this column."
    )
    encoding: CategoricalEncoding | None = Field(
        None,
        description="Categorical features: one_hot, or target (scikit-learn's TargetEncoder, cross-fitted; for "
        f"many distinct values, unseen ones get the target's mean); none: one_hot up to {MAX_ONE_HOT_CATEGORIES} "
        "listed categories, target above.",
    )
    allow_leak: bool = Field(
        False,
        description="Train with this feature although the leakage checks flag it (the reason is required and "
        "shown on the model card).",
    )
    allow_leak_reason: str | None = Field(
        None, min_length=3, description="Why a flagged feature is known at prediction time (with allow_leak)."
    )

    @model_validator(mode="after")
    def _check_kind(self) -> Feature:
        if self.type is not FeatureType.numeric and (self.min is not None or self.max is not None):
            raise ValueError(f"feature {self.name!r}: min/max only apply to numeric features")
        if self.type is not FeatureType.categorical and self.categories is not None:
            raise ValueError(f"feature {self.name!r}: categories only apply to categorical features")
        if self.type is not FeatureType.categorical and self.encoding is not None:
            raise ValueError(f"feature {self.name!r}: encoding only applies to categorical features")
        if self.allow_leak != (self.allow_leak_reason is not None):
            raise ValueError(
                f"feature {self.name!r}: allow_leak: true and allow_leak_reason go together "
                "(say why the feature is known when the model predicts)"
            )
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"feature {self.name!r}: min {self.min} is greater than max {self.max}")
        return self


class SliceSpec(BaseModel):
    """A column to slice the holdout by: categories as they are, numbers banded by `bins`.

    With bins `[18, 30, 45]` the slices are labelled `[18, 30)` and `[30, 45]` (the last band is closed);
    values below or above the bins are `< 18` and `> 45`, nulls are `missing`.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    column: str = Field(min_length=1)
    bins: list[float] | None = Field(
        None, description="Increasing cut points for a numeric column; none for a categorical column."
    )

    @model_validator(mode="after")
    def _check_bins(self) -> SliceSpec:
        if self.bins is not None:
            if len(self.bins) < 2:
                raise ValueError(f"slice {self.column!r}: bins need at least two cut points")
            if any(a >= b for a, b in pairwise(self.bins)):
                raise ValueError(f"slice {self.column!r}: bins must be strictly increasing, got {self.bins}")
        return self


class SplitSpec(BaseModel):
    """How the holdout is drawn: the latest period (time) or ids by hash (random)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    strategy: Literal["auto", "time", "random"] = Field(
        "auto",
        description="time: the holdout is the latest period (rows at or after `cutoff`, else the latest "
        "holdout_fraction of the time column's span of rows) and the CV folds keep time order; random: ids by hash, "
        "shuffled folds; auto: time when there is a time_column, else random.",
    )
    cutoff: datetime | None = Field(
        None, description="time: rows at or after this date/time are the holdout (none: by holdout_fraction)."
    )


class LightGBMParams(BaseModel):
    """Formerly the Dask engine's fixed LightGBM parameters; the search's lightgbm family chooses them now."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    n_estimators: int = Field(200, ge=1, le=10_000)
    learning_rate: float = Field(0.1, gt=0, le=1)
    num_leaves: int = Field(31, ge=2, le=4096)
    min_child_samples: int = Field(20, ge=1)
    seed: int | None = Field(None, description="None: the run's seed.")


class DatasetConfig(BaseModel):
    """Where a dataset lives and what a valid snapshot of it looks like."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1, description="Dataset name; also the MLflow experiment name.")
    model_name: str = Field(
        min_length=1,
        max_length=100,
        pattern=MODEL_NAME,
        description="Registered model name in MLflow; also its catalog entry and deployment name (letters, digits, "
        "'.', '_', '-').",
    )
    source: str = Field(
        min_length=1,
        description="s3://bucket/prefix or a local path; one file or a folder of partitions; with format sql, an "
        "SQLAlchemy URL without a password (postgresql+psycopg://user@host:5432/database).",
    )
    format: Literal["parquet", "csv", "sql"] = "parquet"
    query: str | None = Field(
        None,
        min_length=1,
        description="format sql: the SELECT whose result is the snapshot (ORDER BY the id: a stable data version).",
    )
    password_env: str = Field(
        "PGPASSWORD",
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="format sql: the environment variable holding the database password (never in the config).",
    )
    target: str
    task: TaskType = TaskType.binary
    id_column: str
    time_column: str | None = None
    features: list[Feature] = Field(min_length=1)
    classes: list[str | int] | None = Field(
        None, description="Expected target values, when known (classification only)."
    )
    min_rows: int = Field(100, ge=1, description="A snapshot with fewer rows is rejected.")
    max_null_fraction: float = Field(0.2, ge=0, le=1, description="Default null tolerance per feature.")
    holdout_fraction: float = Field(
        0.2, gt=0, lt=1, description="Share of ids kept out of training, frozen by hashing the id."
    )
    holdout_salt: str = Field("holdout-v1", description="Changing it draws a new holdout.")
    split: SplitSpec = Field(default_factory=SplitSpec, description="Latest-period or random holdout.")
    time_features: bool = Field(
        False,
        description="The time column's calendar parts (`calendar_parts`) are model features too (then every "
        "prediction request carries the time column).",
    )
    calendar_parts: list[CalendarPart] = Field(
        default=[CalendarPart.hour, CalendarPart.weekday, CalendarPart.month, CalendarPart.day_of_year],
        min_length=1,
        description="The parts of each datetime feature (and of the time column with time_features) the model sees.",
    )
    slices: list[SliceSpec] = Field(
        default=[], description="Sub-populations of the holdout measured separately (slice gate, model card)."
    )
    sensitive_features: list[str] = Field(
        default=[],
        description="Columns fairness is measured on; each a feature or a slice column (numbers banded by the slice).",
    )
    min_slice_rows: int = Field(200, ge=1, description="A slice with fewer holdout rows is not measured.")
    min_group_rows: int = Field(
        30,
        ge=1,
        description="A sensitive group with fewer holdout rows is reported but left out of the fairness "
        "differences and the fairness gate (its rates are noise: one row's selection rate is 0 or 1).",
    )
    # Feature store: features joined point-in-time from a Feast feature service, by id and time.
    feature_service: str | None = Field(
        None, description="Feast feature service whose values are joined as of each row's time (none: no join)."
    )
    store_features: list[str] = Field(
        default=[], description="Features the service provides (each listed in `features` with its expectations)."
    )
    feature_repo: str | None = Field(
        None,
        description="Folder of a Feast repository in Feast's usual layout (Python files of entities, feature views "
        "and services) that defines `feature_service`; `mlops models add` applies it to the stack's registry.",
    )
    max_missing_feature_share: float = Field(
        0.05, ge=0, le=1, description="Largest share of rows the join may drop or leave without store features."
    )

    # Big snapshots: an out-of-core engine on a Dask cluster, the model search on a sample of the training rows.
    engine: Literal["pandas", "dask", "auto"] = Field(
        "auto",
        description="auto: dask from `dask_min_rows` rows (counted from the Parquet footers, no data read; CSV, SQL "
        "and a feature service stay on pandas); pandas: the whole snapshot in the flow's process (the search on "
        "`search_sample_rows` of its training rows when it has more); dask: partitions "
        "on the Dask cluster, the model search on `search_sample_rows` training rows, the chosen configuration "
        "fitted on every training row (LightGBM on the cluster, other families in the flow's process when they fit).",
    )
    dask_min_rows: int = Field(
        2_000_000,
        ge=1,
        description="With engine auto, snapshots with at least this many rows go to Dask. Measured "
        "(docs/scale-out.md): 1M rows on the pandas engine took 135 s at 1.8 GB, memory growing about 1 GB per "
        "million rows and the search's time with them; from 2M rows the 500,000-row search sample is under a third "
        "of the training rows, and the cluster's passes over the data pay for themselves.",
    )
    search_sample_rows: int = Field(
        500_000,
        ge=100,
        description="The model search cross-validates on about this many training rows, chosen by the same id hash "
        "as the holdout (the same rows every run, never holdout rows); the chosen configuration is then fitted on "
        "every training row. Pandas engine: only a table with more training rows is sampled (1M rows: 236.5 s against "
        "282.0 s for a bare script searching every row, same holdout ROC AUC, docs/benchmarks.md); Dask engine: the "
        "sample is collected into the flow's process.",
    )
    validation_sample_rows: int = Field(
        100_000,
        ge=1,
        description="Rows Great Expectations checks at most: a bigger snapshot's GX checks run on a seeded sample of "
        "this many, and full-data checks of the same expectations see every row (in the flow's process on the pandas "
        "engine, on the cluster on the Dask engine).",
    )
    max_holdout_rows: int = Field(
        200_000,
        ge=100,
        description="Dask engine: at most about this many holdout rows are collected for evaluation, a fixed "
        "subset of the frozen holdout chosen by the same id hash.",
    )
    lightgbm: LightGBMParams = Field(
        default_factory=LightGBMParams,
        description="Not used since the Dask engine runs the model search (its lightgbm family chooses these); "
        "accepted so that older configs still load.",
    )

    operations: Operations = Field(
        default_factory=Operations,
        description="How the model is run once in the catalog: schedules, monitoring, scoring, serving, gates.",
    )

    @model_validator(mode="after")
    def _check_columns(self) -> DatasetConfig:
        names = [f.name for f in self.features]
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise ValueError(f"features listed more than once: {duplicated}")
        for role, column in (("target", self.target), ("id_column", self.id_column)):
            if column in names:
                raise ValueError(f"{role} {column!r} must not also be a feature")
        if self.time_features and self.time_column is None:
            raise ValueError("time_features needs a time_column (its calendar parts are the features)")
        if self.split.strategy == "time" and self.time_column is None:
            raise ValueError("split strategy 'time' needs a time_column (the holdout is its latest period)")
        if self.split.cutoff is not None and self.split_strategy != "time":
            raise ValueError("split.cutoff applies to the time split only (strategy time, or auto with a time_column)")
        if self.task is TaskType.regression and self.classes is not None:
            raise ValueError("classes only apply to binary and multiclass tasks, not to regression")
        self._check_slices()
        self._check_store_features(names)
        self._check_sql_source()
        return self

    def _check_sql_source(self) -> None:
        if self.format != "sql":
            if is_sql_url(self.source):
                raise ValueError(f"source: {sql_place(self.source)} is a database URL: set format: sql and a query")
            if self.query is not None:
                raise ValueError("query: only a source of format sql takes a query (set format: sql)")
            return
        if not is_sql_url(self.source):
            raise ValueError(
                f"source: format sql needs a PostgreSQL URL ({', '.join(SQL_SCHEMES)}://user@host:port/database), "
                f"got {self.source!r}"
            )
        if urlsplit(self.source).password is not None:
            raise ValueError(
                f"source: the URL of {sql_place(self.source)} carries a password: remove it from the URL and put it "
                f"in the environment variable {self.password_env} (password_env)"
            )
        if self.query is None or not self.query.strip():
            raise ValueError("query: format sql needs a query (the SELECT whose result is the snapshot)")
        if self.engine == "dask":
            raise ValueError("engine: a query's result is read whole; format sql trains with engine pandas (or auto)")
        if self.operations.monitoring_partition is not None:
            raise ValueError(
                "operations.monitoring_partition: it is read in the dataset's format, and format sql has no partitions"
            )

    def _check_store_features(self, names: list[str]) -> None:
        if bool(self.feature_service) != bool(self.store_features):
            raise ValueError("feature_service and store_features go together: name both or neither")
        if self.feature_service and self.time_column is None:
            raise ValueError("a feature_service needs a time_column: features are joined as of each row's time")
        unknown = [f for f in self.store_features if f not in names]
        if unknown:
            raise ValueError(f"store_features {unknown} must also be listed in features (with their type)")

    def _check_slices(self) -> None:
        types = {f.name: f.type for f in self.features}
        columns = [s.column for s in self.slices]
        duplicated = sorted({c for c in columns if columns.count(c) > 1})
        if duplicated:
            raise ValueError(f"slices listed more than once: {duplicated}")
        binned = {s.column for s in self.slices if s.bins is not None}
        for spec in self.slices:
            if spec.column in (self.target, self.id_column):
                raise ValueError(f"slice {spec.column!r}: cannot slice by the target or the id column")
            if types.get(spec.column) is FeatureType.categorical and spec.bins is not None:
                raise ValueError(f"slice {spec.column!r}: bins only apply to numeric columns")
            if types.get(spec.column) is FeatureType.numeric and spec.bins is None:
                raise ValueError(f"slice {spec.column!r}: a numeric feature needs bins")
        for column in self.sensitive_features:
            if column not in types and column not in columns:
                raise ValueError(f"sensitive feature {column!r} is neither a feature nor a slice column")
            if types.get(column) is FeatureType.numeric and column not in binned:
                raise ValueError(
                    f"sensitive feature {column!r} is numeric: add a slice with bins for it, to band it into groups"
                )

    @property
    def feature_names(self) -> list[str]:
        """Feature column names in config order."""
        return [f.name for f in self.features]

    @property
    def numeric_features(self) -> list[str]:
        """Names of numeric features."""
        return [f.name for f in self.features if f.type is FeatureType.numeric]

    @property
    def categorical_features(self) -> list[str]:
        """Names of categorical features."""
        return [f.name for f in self.features if f.type is FeatureType.categorical]

    @property
    def datetime_features(self) -> list[str]:
        """Names of date/time features (the model sees their calendar parts)."""
        return [f.name for f in self.features if f.type is FeatureType.datetime]

    @property
    def calendar_columns(self) -> list[str]:
        """Columns whose calendar parts are model features: the time column (with time_features), datetime features."""
        own = [self.time_column] if self.time_features and self.time_column else []
        return [*own, *self.datetime_features]

    @property
    def input_columns(self) -> list[str]:
        """The model's input columns: the features, then the time column when its calendar parts are features."""
        return [*self.feature_names, *([self.time_column] if self.time_features and self.time_column else [])]

    def encoding_of(self, feature: Feature) -> CategoricalEncoding:
        """A categorical feature's encoding: its own, else one-hot up to MAX_ONE_HOT_CATEGORIES listed categories."""
        if feature.encoding is not None:
            return feature.encoding
        many = feature.categories is not None and len(feature.categories) > MAX_ONE_HOT_CATEGORIES
        return CategoricalEncoding.target if many else CategoricalEncoding.one_hot

    @property
    def split_strategy(self) -> Literal["time", "random"]:
        """The holdout's strategy once `auto` is resolved: time with a time column, else random."""
        if self.split.strategy == "auto":
            return "time" if self.time_column else "random"
        return self.split.strategy


SQL_SCHEMES = ("postgresql", "postgresql+psycopg")


def is_sql_url(source: str) -> bool:
    """Whether a source names a database (an SQLAlchemy URL of a supported dialect) rather than files."""
    return urlsplit(source).scheme.lower() in SQL_SCHEMES and "://" in source


def sql_place(source: str) -> str:
    """A database URL's place without credentials, for messages: `postgresql host:port/database`."""
    parts = urlsplit(source)
    try:
        port = f":{parts.port}" if parts.port else ""
    except ValueError:  # not a number: shown as written
        port = ":" + parts.netloc.rsplit(":", 1)[-1]
    return f"PostgreSQL at {parts.hostname or 'localhost'}{port}/{parts.path.lstrip('/') or '(default database)'}"


class DatasetConfigError(ValueError):
    """A dataset config could not be read or is invalid."""


def parse_dataset_config(text: str, origin: str) -> DatasetConfig:
    """Parse YAML text into a validated config; errors name `origin` and the offending field."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise DatasetConfigError(f"{origin}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise DatasetConfigError(f"{origin}: expected a mapping of settings, got {type(raw).__name__}")
    try:
        return DatasetConfig.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in exc.errors()
        )
        raise DatasetConfigError(f"{origin}: invalid dataset config: {problems}") from exc


def bundled_config_text(name: str) -> str:
    """Text of a bundled dataset config."""
    return resources.files("core.configs").joinpath(f"{name}.yaml").read_text()


def load_local_dataset_config(ref: str) -> DatasetConfig:
    """Load a bundled config by name or a YAML file from a local path."""
    if ref in BUNDLED_DATASETS:
        return parse_dataset_config(bundled_config_text(ref), f"bundled dataset {ref!r}")
    path = Path(ref)
    if not path.is_file():
        raise DatasetConfigError(
            f"dataset config {ref!r} not found: give a bundled name {list(BUNDLED_DATASETS)}, "
            "a YAML file path or an s3:// URI"
        )
    return parse_dataset_config(path.read_text(), str(path))
