"""Small adapters around S3 and MLflow, built from settings (nothing is configured at import)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

import httpx

from adapters.settings import Settings
from core.data.locations import S3Location

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


# S3 requests one caller sends side by side (reading or storing a snapshot's files); within the client's
# connection pool (botocore's default: 10).
S3_REQUESTS_AT_ONCE = 8


def map_s3_requests(call: Callable[[T], R], items: Sequence[T]) -> list[R]:
    """`call` on every item, `S3_REQUESTS_AT_ONCE` at a time, the results in the items' order.

    For one request (or two) per file of a snapshot: one after the other, 12 monthly files took seconds. The
    first failure is raised, as from a loop.
    """
    with ThreadPoolExecutor(max_workers=max(1, min(S3_REQUESTS_AT_ONCE, len(items)))) as pool:
        return list(pool.map(call, items))


def s3_client(settings: Settings) -> Any:
    """A boto3 S3 client for the configured endpoint, with bounded timeouts and standard retries."""
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=settings.s3_endpoint_url,
        aws_access_key_id=settings.aws_access_key_id,
        aws_secret_access_key=settings.aws_secret_access_key.get_secret_value(),
        region_name=settings.aws_region,
        config=Config(
            connect_timeout=5,
            read_timeout=60,
            retries={"max_attempts": 3, "mode": "standard"},
            s3={"addressing_style": "path"},
        ),
    )


def put_bytes(settings: Settings, location: S3Location, body: bytes, content_type: str) -> str:
    """Write one object; returns its URI."""
    s3_client(settings).put_object(Bucket=location.bucket, Key=location.key, Body=body, ContentType=content_type)
    return location.uri


# MLflow loads every installed package's `mlflow.request_header_provider` entry point at its first request.
# Feast registers one: loading it imports all of feast (about 8 s of CPU in every process that talks to MLflow,
# most of it typeguard recompiling feast's decorated functions), and it would send a Kubernetes
# service-account token it finds as a bearer token to whichever tracking server is configured. MLflow's own
# providers are kept; these are left out.
SKIPPED_HEADER_PROVIDERS = frozenset({"feast"})
HEADER_PROVIDER_GROUP = "mlflow.request_header_provider"


def _mlflow() -> Any:
    """`mlflow`, its plugin lookup without the skipped request-header providers (read at its first request)."""
    import mlflow
    from mlflow.utils import plugins

    if not getattr(plugins.get_entry_points, "skips_foreign_header_providers", False):
        original = plugins.get_entry_points

        def get_entry_points(group: str) -> list:
            points = original(group)
            if group == HEADER_PROVIDER_GROUP:
                return [point for point in points if point.name not in SKIPPED_HEADER_PROVIDERS]
            return points

        get_entry_points.skips_foreign_header_providers = True  # type: ignore[attr-defined]
        plugins.get_entry_points = get_entry_points
    return mlflow


def mlflow_client(settings: Settings) -> MlflowClient:
    """A client of the configured tracking server (and its registry); changes no global state."""
    return _mlflow().MlflowClient(tracking_uri=settings.mlflow_tracking_uri, registry_uri=settings.mlflow_tracking_uri)


def use_tracking_server(settings: Settings) -> None:
    """Point MLflow's fluent API (`mlflow.start_run`, `log_model`, `load_model`, ...) at the configured server.

    The one place that sets MLflow's process-wide tracking URI; callers that only need a client use
    `mlflow_client`, which leaves it alone.
    """
    _mlflow().set_tracking_uri(settings.mlflow_tracking_uri)


class StackNotRunningError(RuntimeError):
    """The stack the settings point at does not answer."""


def check_stack(settings: Settings, services: tuple[str, ...] = ("S3", "MLflow", "Prefect")) -> None:
    """Fail fast, with the way out, when S3, MLflow or Prefect does not answer."""
    probes = {
        "S3": f"{settings.s3_endpoint_url}/healthz" if settings.s3_endpoint_url_override is None else None,
        "MLflow": f"{settings.mlflow_tracking_uri}/health",
        "Prefect": f"{settings.prefect_api_url}/health",
    }
    down = []
    for name, url in probes.items():
        if url is None or name not in services:
            continue
        try:
            httpx.get(url, timeout=3).raise_for_status()
        except httpx.HTTPError as exc:
            down.append(f"{name} at {url.rsplit('/', 1)[0]} ({type(exc).__name__})")
    if down:
        raise StackNotRunningError(
            "the stack is not reachable: " + ", ".join(down) + ". Start it with `mlops stack up` "
            "(or point AWS_ENDPOINT_URL_S3 / MLFLOW_TRACKING_URI / PREFECT_API_URL at running servers)."
        )
    if {"MLflow", "Prefect"} & set(services) and (outage := database_outage(settings)):
        raise StackNotRunningError(outage)


def database_outage(settings: Settings) -> str | None:
    """Why MLflow or Prefect fail while they answer their health checks: their database is unavailable.

    Prefect's `/ready` checks its database; MLflow's `/health` does not, so an API call that reads its backend
    store is tried. None when both read their databases (or a server does not answer at all: `check_stack`).
    """
    auth = (settings.stack_user, settings.stack_password.get_secret_value()) if settings.stack_password else None
    probes = {
        "Prefect": (f"{settings.prefect_api_url}/ready", f"{settings.prefect_api_url}/health"),
        "MLflow": (
            f"{settings.mlflow_tracking_uri}/api/2.0/mlflow/experiments/search?max_results=1",
            f"{settings.mlflow_tracking_uri}/health",
        ),
    }
    failing = []
    for name, (deep, shallow) in probes.items():
        try:
            if httpx.get(shallow, timeout=3, auth=auth).status_code >= 500:
                continue
            status = httpx.get(deep, timeout=5, auth=auth).status_code
        except httpx.HTTPError:
            continue
        if status >= 500:
            failing.append(
                f"{name} at {shallow.rsplit('/', 1)[0]} answers, but cannot read its database (HTTP {status})"
            )
    if not failing:
        return None
    return (
        "; ".join(failing) + ". The database under the stack is unavailable: `mlops stack status` shows it, "
        "`mlops stack up` restarts the stack's PostgreSQL."
    )


def log_database_outage(settings: Settings) -> None:
    """After a failure: say so when the cause is the stack's database (`database_outage`); never raises."""
    try:
        outage = database_outage(settings)
    except Exception:  # a diagnosis must not hide the failure it explains
        return
    if outage:
        log.error("%s", outage)
