"""Reports stored beside the data in S3 and shown in the Prefect UI."""

from __future__ import annotations

import logging

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from mlops.clients import S3Location, put_bytes
from mlops.settings import get_settings
from tasks.retrying import IO_RETRIES, IO_RETRY_DELAYS

log = logging.getLogger(__name__)


def report_location(dataset: str, data_version: str, name: str) -> S3Location:
    """Where a report about one data version goes: s3://<bucket>/reports/<dataset>/<version>/<run>-<name>."""
    run = flow_run.get_id() or "local"
    return S3Location(get_settings().bucket, f"reports/{dataset}/{data_version}/{run}-{name}")


@task(
    name="store-validation-report",
    retries=IO_RETRIES,
    retry_delay_seconds=IO_RETRY_DELAYS,
    cache_policy=NO_CACHE,
)
def store_validation_report(dataset: str, data_version: str, report_json: str, markdown: str) -> str:
    """Prefect task: the validation result (no copy of the data) to S3, and a markdown artifact linking it."""
    location = report_location(dataset, data_version, "validation.json")
    uri = put_bytes(get_settings(), location, report_json.encode(), "application/json")
    create_markdown_artifact(
        markdown=f"{markdown}\n\nFull result: `{uri}`\n",
        key="data-validation",
        description=f"Great Expectations result for {dataset} data version {data_version}",
    )
    log.info("validation report stored at %s", uri)
    return uri


@task(name="publish-decision", cache_policy=NO_CACHE)
def publish_decision(markdown: str) -> None:
    """Prefect task: the promotion decision as a markdown artifact of the flow run."""
    create_markdown_artifact(markdown=markdown, key="promotion-decision", description="Promotion decision")
