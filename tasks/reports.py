"""Reports stored beside the data in S3 and shown in the Prefect UI."""

from __future__ import annotations

import logging
from dataclasses import replace

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from adapters.clients import S3Location, mlflow_client, put_bytes
from adapters.settings import get_settings
from core.monitoring.model_page import page_uri
from core.promotion.card import ModelCard
from core.promotion.card_render import render_html, render_markdown
from core.promotion.lineage import manifest_uri
from tasks.retrying import IO_ANY_ERROR

log = logging.getLogger(__name__)


def report_location(dataset: str, data_version: str, name: str) -> S3Location:
    """Where a report about one data version goes: s3://<bucket>/reports/<dataset>/<version>/<run>-<name>."""
    run = flow_run.get_id() or "local"
    return S3Location(get_settings().bucket, f"reports/{dataset}/{data_version}/{run}-{name}")


@task(
    name="store-validation-report",
    **IO_ANY_ERROR,
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


@task(name="publish-model-card", **IO_ANY_ERROR)
def publish_model_card(card: ModelCard, run_id: str) -> str:
    """Prefect task: store the model card where a person looks for it; returns the S3 URI of the HTML card.

    In S3 (HTML, Markdown, JSON), in the MLflow run, linked from the model version (tag `model_card`) and
    shown in the Prefect run (artifacts `model-card` and a link to the MLflow run).
    """
    from prefect.artifacts import create_link_artifact

    settings = get_settings()
    client = mlflow_client(settings)
    experiment_id = client.get_run(run_id).info.experiment_id
    flow_run_id = flow_run.get_id()
    card = replace(
        card,
        mlflow_run_url=f"{settings.mlflow_tracking_uri}/#/experiments/{experiment_id}/runs/{run_id}",
        prefect_flow_run_url=f"{settings.prefect_ui_url}/runs/flow-run/{flow_run_id}" if flow_run_id else None,
        data_manifest=manifest_uri(settings.bucket, card.model_name, card.data_version),
        monitoring_page=page_uri(settings.bucket, card.model_name),
    )
    markdown, html = render_markdown(card), render_html(card)
    folder = S3Location(settings.bucket, f"model-cards/{card.model_name}/{card.candidate_version or run_id}")
    uri = put_bytes(settings, folder.child("model_card.html"), html.encode(), "text/html; charset=utf-8")
    put_bytes(settings, folder.child("model_card.md"), markdown.encode(), "text/markdown; charset=utf-8")
    put_bytes(settings, folder.child("model_card.json"), card.to_json().encode(), "application/json")
    client.log_text(run_id, html, "model_card/model_card.html")
    client.log_text(run_id, markdown, "model_card/model_card.md")
    client.set_tag(run_id, "model_card", uri)
    if card.candidate_version is not None:
        client.set_model_version_tag(card.model_name, card.candidate_version, "model_card", uri)
    create_markdown_artifact(
        markdown=f"{markdown}\n\nStored at `{uri}` (and in the MLflow run, `model_card/`).\n",
        key="model-card",
        description=f"Model card of {card.model_name} {card.candidate_version or '(dry run)'}",
    )
    if card.mlflow_run_url:
        create_link_artifact(
            card.mlflow_run_url, link_text="MLflow run (model card under model_card/)", key="mlflow-run"
        )
    log.info("model card stored at %s", uri)
    return uri


@task(name="request-approval", cache_policy=NO_CACHE)
def publish_approval_request(markdown: str) -> None:
    """Prefect task: what the reviewer is asked to approve, as a markdown artifact of the paused run."""
    create_markdown_artifact(markdown=markdown, key="approval-request", description="Waiting for approval")
