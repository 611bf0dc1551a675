"""Data validation with Great Expectations 1.x: the expectations a snapshot must meet before training.

Expectations come from the dataset config (columns, types, ranges, categories, null tolerance, id
uniqueness, target classes, row count). A failure names each failed expectation and its column.
"""

from __future__ import annotations

import hashlib
import logging
import os
from typing import Any

import pandas as pd

from core.dask_engine.checks import Stats, combined_report, full_data_failures, partition_stats
from core.data.dataset import DatasetConfig, FeatureType
from core.data.leakage import Candidate, Leak, find_leaks
from core.data.validation import ExpectationFailure, ValidationReport, with_leaks

log = logging.getLogger(__name__)

NUMERIC_TYPES = ["int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "float32", "float64",
                 "Int8", "Int16", "Int32", "Int64", "Float32", "Float64"]  # fmt: skip
_MAX_SAMPLE = 20
# Bump when `build_expectations` changes, so cached results of the old expectations are not reused.
_EXPECTATIONS_VERSION = "2"  # 2: the leak checks joined the report


def build_expectations(config: DatasetConfig, dtypes: dict[str, str]) -> list[Any]:
    """GX expectations for a frame whose columns have `dtypes` (name -> pandas dtype).

    A configured column that is missing gets only its "exists" expectation (which fails), so the
    report says "column is missing" instead of a cascade of errors about the same column; likewise a
    numeric feature whose dtype is not numeric gets the type failure, not a range-check error.
    """
    import great_expectations.expectations as gxe

    present = set(dtypes)
    expectations: list[Any] = [gxe.ExpectTableRowCountToBeBetween(min_value=config.min_rows)]
    required = [config.id_column, config.target, *config.feature_names]
    if config.time_column and (config.split_strategy == "time" or config.time_features):
        required.append(config.time_column)
    expectations += [gxe.ExpectColumnToExist(column=c) for c in required]
    if config.id_column in present:
        expectations += [
            gxe.ExpectColumnValuesToNotBeNull(column=config.id_column),
            gxe.ExpectColumnValuesToBeUnique(column=config.id_column),
        ]
    if config.target in present:
        expectations += [
            gxe.ExpectColumnValuesToNotBeNull(column=config.target),
            gxe.ExpectColumnUniqueValueCountToBeBetween(column=config.target, min_value=2),
        ]
        if config.classes is not None:
            expectations.append(gxe.ExpectColumnValuesToBeInSet(column=config.target, value_set=config.classes))
    for feature in config.features:
        if feature.name not in present:
            continue
        tolerance = feature.max_null_fraction if feature.max_null_fraction is not None else config.max_null_fraction
        expectations.append(gxe.ExpectColumnValuesToNotBeNull(column=feature.name, mostly=max(1 - tolerance, 1e-9)))
        if feature.type is FeatureType.numeric:
            expectations.append(gxe.ExpectColumnValuesToBeInTypeList(column=feature.name, type_list=NUMERIC_TYPES))
            if dtypes[feature.name] in NUMERIC_TYPES and (feature.min is not None or feature.max is not None):
                expectations.append(
                    gxe.ExpectColumnValuesToBeBetween(column=feature.name, min_value=feature.min, max_value=feature.max)
                )
        elif feature.categories is not None:
            expectations.append(gxe.ExpectColumnValuesToBeInSet(column=feature.name, value_set=feature.categories))
    return expectations


def _detail(result: Any, dtypes: dict[str, str]) -> str:  # noqa: PLR0911 - one answer per expectation kind
    if result.exception_info and result.exception_info.get("raised_exception"):
        return f"error: {result.exception_info.get('exception_message')}"
    if isinstance(result.exception_info, dict):
        for info in result.exception_info.values():
            if isinstance(info, dict) and info.get("raised_exception"):
                return f"error: {info.get('exception_message')}"
    config, res = result.expectation_config, result.result or {}
    kwargs = config.kwargs
    if config.type == "expect_column_to_exist":
        return "column is missing"
    if config.type == "expect_table_row_count_to_be_between":
        return f"{res.get('observed_value')} rows, need at least {kwargs.get('min_value')}"
    if config.type == "expect_column_unique_value_count_to_be_between":
        return f"{res.get('observed_value')} distinct value(s), need at least {kwargs.get('min_value')}"
    if "unexpected_count" in res:
        sample = list(dict.fromkeys(str(v) for v in res.get("partial_unexpected_list") or []))[:5]
        what = {
            "expect_column_values_to_not_be_null": "null",
            "expect_column_values_to_be_in_type_list": (
                f"not numeric (column dtype {dtypes.get(kwargs.get('column'), '?')})"
            ),
            "expect_column_values_to_be_between": f"outside [{kwargs.get('min_value')}, {kwargs.get('max_value')}]",
            "expect_column_values_to_be_in_set": "not in the allowed values",
            "expect_column_values_to_be_unique": "duplicated",
        }.get(config.type, "unexpected")
        mostly = kwargs.get("mostly")
        allowed = f" (at most {100 * (1 - mostly):.1f} % allowed)" if mostly and mostly < 1 else ""
        pct = res.get("unexpected_percent") or 0.0
        return f"{res['unexpected_count']} value(s) ({pct:.1f} %) {what}{allowed}; e.g. {sample}"
    return f"observed {res.get('observed_value')}"


def leak_checks(df: pd.DataFrame, config: DatasetConfig, present: set[str]) -> list[Leak]:
    """The leak checks (`core.data.leakage`) on the config's features that are in the frame."""
    if config.target not in present or df[config.target].nunique() < 2:
        return []
    time_column = config.time_column if config.time_column in present else None
    candidates = [Candidate(f.name, f.type.value) for f in config.features if f.name in present]
    return find_leaks(df, config.target, config.task.is_classification, candidates, time_column)


def allowed_leaks(config: DatasetConfig) -> dict[str, str]:
    """Features the config trains on although the leak checks flag them: name -> the reason given."""
    return {f.name: f.allow_leak_reason or "" for f in config.features if f.allow_leak}


def validate_frame(df: pd.DataFrame, config: DatasetConfig) -> ValidationReport:
    """Validate a frame against the config's expectations; never raises for data problems."""
    # GX reads this when it loads; it has no network here and its analytics are not wanted anyway.
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    dtypes = {str(column): str(dtype) for column, dtype in df.dtypes.items()}
    expectations = build_expectations(config, dtypes)
    if df.shape[1] == 0:
        failures = [ExpectationFailure("expect_table_columns", None, "the snapshot has no columns")]
        return ValidationReport(False, len(expectations), failures)
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    batch = (
        context.data_sources.add_pandas("snapshot")
        .add_dataframe_asset("frame")
        .add_batch_definition_whole_dataframe("all")
        .get_batch(batch_parameters={"dataframe": df})
    )
    suite = gx.ExpectationSuite(name=f"{config.name}-snapshot", expectations=expectations)
    result = batch.validate(suite, result_format={"result_format": "SUMMARY", "partial_unexpected_count": _MAX_SAMPLE})
    failures = [
        ExpectationFailure(r.expectation_config.type, r.expectation_config.kwargs.get("column"), _detail(r, dtypes))
        for r in result.results
        if not r.success
    ]
    report = ValidationReport(
        success=bool(result.success),
        n_expectations=len(result.results),
        failures=failures,
        statistics=dict(result.statistics),
        result=result.to_json_dict(),
    )
    report = with_leaks(report, leak_checks(df, config, set(dtypes)), allowed_leaks(config))
    log.info("validation: %s", report.summary())
    return report


def validate_with_full_data(
    sample: pd.DataFrame, config: DatasetConfig, stats: Stats, columns: list[str], duplicated_ids: int
) -> ValidationReport:
    """GX on `sample` plus the full-data checks of every row's summary (`core.dask_engine.checks`): one report."""
    checks, failures = full_data_failures(stats, config, columns, duplicated_ids)
    sample_report = validate_frame(sample, config.model_copy(update={"min_rows": min(config.min_rows, len(sample))}))
    report = combined_report(sample_report, len(sample), stats, checks, failures)
    log.info(
        "validation (GX on %d sampled rows, full-data checks on %d rows): %s",
        len(sample),
        stats["rows"],
        report.summary(),
    )
    return report


def validate_rows(df: pd.DataFrame, config: DatasetConfig, seed: int = 0) -> ValidationReport:
    """Validate a snapshot in memory: GX on every row up to `validation_sample_rows`, else as the Dask engine does.

    Above that many rows GX checks a seeded sample of them, and the full-data checks (counts, ranges, allowed
    values, duplicated ids: the same expectations, computed with pandas) see every row, so a bad row outside the
    sample still fails the snapshot. At 1M rows the validation beside the search took 10.0 s this way, 24.1 s
    with GX on every row (docs/benchmarks.md).
    """
    if len(df) <= config.validation_sample_rows or df.shape[1] == 0:
        return validate_frame(df, config)
    columns = [str(c) for c in df.columns]
    duplicated = int(df[config.id_column].dropna().duplicated().sum()) if config.id_column in columns else 0
    sample = df.sample(n=config.validation_sample_rows, random_state=seed).reset_index(drop=True)
    return validate_with_full_data(sample, config, partition_stats(df, config), columns, duplicated)


def cache_key(config: DatasetConfig, data_version: str) -> str:
    """Key of a validation result: the data version plus a fingerprint of what the expectations depend on.

    A new data version, a changed config or a new GX version each give a new key; the frame itself is
    never hashed (its content hash is the data version).
    """
    from importlib.metadata import version

    inputs = config.model_dump_json() + version("great-expectations") + _EXPECTATIONS_VERSION
    return f"{config.name}/{data_version}-{hashlib.sha256(inputs.encode()).hexdigest()[:12]}.json"
