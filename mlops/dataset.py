"""Dataset description: where a snapshot lives and what it must look like.

A dataset config is a small YAML file validated by pydantic. It says where the data is (an S3 URI or a
local path, one file or a folder of partitions), which column is the target, the id and the time, the
feature columns with their types, and the expectations that cannot be inferred from the data (ranges,
allowed categories, the tolerated fraction of nulls).
"""

from __future__ import annotations

from enum import StrEnum
from importlib import resources
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

BUNDLED_DATASETS = ("credit-risk",)


class TaskType(StrEnum):
    """Supervised task the dataset is for."""

    binary = "binary"
    multiclass = "multiclass"


class FeatureType(StrEnum):
    """Type of a feature column."""

    numeric = "numeric"
    categorical = "categorical"


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

    @model_validator(mode="after")
    def _check_kind(self) -> Feature:
        if self.type is FeatureType.categorical and (self.min is not None or self.max is not None):
            raise ValueError(f"feature {self.name!r}: min/max only apply to numeric features")
        if self.type is FeatureType.numeric and self.categories is not None:
            raise ValueError(f"feature {self.name!r}: categories only apply to categorical features")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"feature {self.name!r}: min {self.min} is greater than max {self.max}")
        return self


class DatasetConfig(BaseModel):
    """Where a dataset lives and what a valid snapshot of it looks like."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1, description="Dataset name; also the MLflow experiment name.")
    model_name: str = Field(min_length=1, description="Registered model name in MLflow.")
    source: str = Field(
        min_length=1,
        description="s3://bucket/prefix or a local path; one file or a folder of partitions.",
    )
    format: Literal["parquet", "csv"] = "parquet"
    target: str
    task: TaskType = TaskType.binary
    id_column: str
    time_column: str | None = None
    features: list[Feature] = Field(min_length=1)
    classes: list[str | int] | None = Field(None, description="Expected target values, when known.")
    min_rows: int = Field(100, ge=1, description="A snapshot with fewer rows is rejected.")
    max_null_fraction: float = Field(0.2, ge=0, le=1, description="Default null tolerance per feature.")
    holdout_fraction: float = Field(
        0.2, gt=0, lt=1, description="Share of ids kept out of training, frozen by hashing the id."
    )
    holdout_salt: str = Field("holdout-v1", description="Changing it draws a new holdout.")

    @model_validator(mode="after")
    def _check_columns(self) -> DatasetConfig:
        names = [f.name for f in self.features]
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise ValueError(f"features listed more than once: {duplicated}")
        for role, column in (("target", self.target), ("id_column", self.id_column)):
            if column in names:
                raise ValueError(f"{role} {column!r} must not also be a feature")
        return self

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
    return resources.files("mlops.configs").joinpath(f"{name}.yaml").read_text()


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
