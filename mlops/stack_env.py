"""Where the local stack's processes find their programs and each other: console scripts, addresses, variables.

`client_env` is the environment that points any process (the CLI's runs, a worker and its flows, the serving
API) at this stack; the servers' own environments are in `mlops.stack_servers`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from adapters.settings import Settings

PROJECT_ROOT = Path(__file__).resolve().parent.parent

# Client settings for every process that runs flows (set before Prefect and MLflow load): our
# standard-library loggers go to the Prefect UI; analytics, telemetry and progress bars are off.
CLIENT_DEFAULTS = {
    "PREFECT_LOGGING_EXTRA_LOGGERS": "mlops,core,adapters,dask_engine,services,tasks,flows",
    # The same loggers also run outside flows (`mlops rollback`, the serving API): log locally, no warning.
    "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    # Bound MLflow's own HTTP retries (7 with long backoff by default); Prefect's task retries come on top.
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "60",
    # The project loads models itself (`adapters.model_store.load_registered`: recorded digests, skops only);
    # MLflow's own loaders (e.g. `mlflow models serve`) are told never to unpickle either.
    "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false",
}


def console_script(name: str) -> str:
    """Path of a console script installed beside the running interpreter."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def s3_env(settings: Settings) -> dict[str, str]:
    """The S3 credentials and region, under the variables boto3 and SeaweedFS read."""
    return {
        "AWS_ACCESS_KEY_ID": settings.aws_access_key_id,
        "AWS_SECRET_ACCESS_KEY": settings.aws_secret_access_key.get_secret_value(),
        "AWS_DEFAULT_REGION": settings.aws_region,
    }


def auth_env(settings: Settings) -> dict[str, str]:
    """The credentials MLflow's and Prefect's clients send to a stack bound beyond loopback (none on loopback)."""
    if not settings.exposed or settings.stack_password is None:
        return {}
    password = settings.stack_password.get_secret_value()
    return {
        "MLFLOW_TRACKING_USERNAME": settings.stack_user,
        "MLFLOW_TRACKING_PASSWORD": password,
        "PREFECT_API_AUTH_STRING": f"{settings.stack_user}:{password}",
    }


def client_env(settings: Settings) -> dict[str, str]:
    """Environment that points a process (the CLI's runs, a worker and its flows) at this stack."""
    return (
        s3_env(settings)
        | auth_env(settings)
        | {
            "MLOPS_HOST": settings.host,
            "MLOPS_STATE_DIR": str(settings.state_dir.resolve()),
            "MLOPS_S3_PORT": str(settings.s3_port),
            "MLOPS_MLFLOW_PORT": str(settings.mlflow_port),
            "MLOPS_PREFECT_PORT": str(settings.prefect_port),
            "MLOPS_BUCKET": settings.bucket,
            "MLFLOW_TRACKING_URI": settings.mlflow_tracking_uri,
            "AWS_ENDPOINT_URL_S3": settings.s3_endpoint_url,
            "PREFECT_API_URL": settings.prefect_api_url,
            "MLOPS_SERVING_PORT": str(settings.serving_port),
            "MLOPS_SERVING_MODEL": settings.serving_model,
            # Training checks after a promotion that this serving API switched to the new champion.
            "MLOPS_SERVING_URL": settings.serving_url or settings.local_serving_url,
            # Flows find the local Dask scheduler on this port (adapters.cluster.cluster_address).
            "MLOPS_DASK_WORKERS": str(settings.dask_workers),
            "MLOPS_DASK_SCHEDULER_PORT": str(settings.dask_scheduler_port),
        }
        | CLIENT_DEFAULTS
    )


def worker_env(settings: Settings) -> dict[str, str]:
    """What a process worker of the project needs besides `client_env`.

    How often it asks for runs to start (`worker_query_seconds`), and this interpreter first on its PATH: the
    process pool's deployments start each run with `python -m prefect.engine` (`deployments.deploy`), which must
    be the interpreter the project is installed in.
    """
    return {
        "PREFECT_WORKER_QUERY_SECONDS": f"{settings.worker_query_seconds:g}",
        "PATH": os.pathsep.join(filter(None, [str(Path(sys.executable).parent), os.environ.get("PATH")])),
    }


def dask_host(settings: Settings) -> str:
    """Where the local Dask cluster listens: MLOPS_HOST, but loopback when that is beyond loopback.

    A Dask scheduler runs whatever its clients send (pickled functions) and has no password: it is never
    exposed. A cluster other machines use is configured on its own (MLOPS_DASK_ADDRESS, with Dask's TLS).
    """
    return "127.0.0.1" if settings.exposed else settings.host


def dask_address(settings: Settings) -> str:
    """The local Dask scheduler's address."""
    return f"tcp://{dask_host(settings)}:{settings.dask_scheduler_port}"


def dask_dashboard_url(settings: Settings) -> str:
    """The local Dask scheduler's dashboard (127.0.0.1 unless MLOPS_HOST says otherwise)."""
    return f"http://{dask_host(settings)}:{settings.dask_dashboard_port}/status"
