"""Prefect task: validate a snapshot with Great Expectations (`adapters.expectations`), cached in S3 by data version."""

from __future__ import annotations

import logging

import pandas as pd
from prefect import task

from adapters.clients import S3Location, put_bytes, s3_client
from adapters.expectations import cache_key, validate_rows
from adapters.settings import get_settings
from core.data.dataset import DatasetConfig
from core.data.feature_history import JoinReport, with_join
from core.data.validation import ValidationReport, report_from_json
from tasks.retrying import IO

log = logging.getLogger(__name__)


@task(name="validate", **IO)
def check_snapshot(
    df: pd.DataFrame,
    config: DatasetConfig,
    data_version: str,
    feature_join: JoinReport | None = None,
    seed: int = 0,
) -> ValidationReport:
    """Prefect task: validate (or reuse the stored result for this data version) and return the report.

    `adapters.expectations.validate_rows`: GX on every row, or above `validation_sample_rows` on a sample of that
    many (`seed`) with the full-data checks on every row.

    Results are cached in S3 under `cache/validation/`, keyed by `cache_key`, so a rerun on unchanged
    data skips Great Expectations. The flow stores the report, then fails on failure.

    With `feature_join` (the snapshot joined with a feature service), the frame is always validated (the
    store's data is not part of the data version) and the join's counts join the report: above the
    dataset's limit of rows without store features they are a failure like any expectation's.
    """
    settings = get_settings()
    if feature_join is not None:
        return with_join(validate_rows(df, config, seed), feature_join)
    location = S3Location(settings.bucket, f"cache/validation/{cache_key(config, data_version)}")
    client = s3_client(settings)
    try:
        cached = client.get_object(Bucket=location.bucket, Key=location.key)["Body"].read().decode()
    except client.exceptions.NoSuchKey:
        cached = None
    if cached is not None:
        report = report_from_json(cached)
        log.info("validation: reused the result for data version %s (%s)", data_version, report.summary())
        return report
    report = validate_rows(df, config, seed)
    put_bytes(settings, location, report.to_json().encode(), "application/json")
    return report
