"""The serving API: predictions from the registry's champions, which it follows without a restart.

- `POST /predict` (and `/invocations`, MLflow's path): `{"records": [...]}` or MLflow's
  `{"dataframe_records": [...]}`; answers per record the class and the probability of every class (a
  classifier, binary or multiclass) or the predicted value (a regressor), with the model version and
  a request id. Bad input is a 422 naming the record and the field; a batch over the limit is a 413.
- `GET /health` (the process answers), `GET /ready` (a model is loaded), `GET /model` (what is served),
  `GET /metrics` (Prometheus), `POST /reload` (re-read the catalog and check the registry now; what a
  promotion calls; `?model=<name>` checks that model only).
- Every model of the catalog whose config says `operations.served` (`serving/served.py`) is served too, each
  followed and hot-swapped on its own: `POST /models/<name>/predict` and `/models/<name>/invocations` (the
  same bodies and answers), `GET /models/<name>` (as `/model`), `GET /models` (every served model). The
  paths without a name serve the default model (`MLOPS_SERVING_MODEL`), which is always served. A name not
  served is a 404 listing the served ones; a model that cannot be loaded is a 503 for that model only.
- With `MLOPS_SERVING_TOKEN` set, the predict paths and /reload need `Authorization: Bearer <token>`
  (401); without it, /reload is accepted from loopback clients only (403). A body over
  `serving_max_body_bytes` is a 413, chunked or not. Every answered prediction is logged durably first
  (`serving/prediction_log.py`), in its model's own log.
- A model under rollout (`serving/rollout.py`) has its `challenger` scored in shadow or answering a canary
  share, cut off at once when it fails; `/models`, `/models/<name>` and `/model` show it under `challenger`.

Run it with `mlops serve` (or `mlops stack up`, which starts it on port 8000): as many worker processes
as cores by default (`MLOPS_SERVING_WORKERS`), sharing one socket (uvicorn's supervisor, which restarts a
worker that dies). Each process follows every champion and reads the catalog on its own; `/health` and
`/model` say which process answered (`pid`); `/metrics` sums over all of them (each series of a model
with its `model` label); `/reload` makes every process re-read the catalog and check the registry.

This module puts the app together and runs it: `serving/routes.py` has the routes, `serving/runtime.py` what
one app runs (its models, batching, metrics, the prediction path's answers), `serving/forms.py` the records in
and the answers out, `serving/request_io.py` the request's headers, body and token.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
from fastapi import FastAPI
from pydantic import SecretStr

from adapters.settings import Settings, get_settings, is_loopback
from serving.metrics import MODEL_ACTIONS, MULTIPROC_ENV, MetricsMiddleware, route_of
from serving.request_io import ClientGone
from serving.routes import router
from serving.runtime import PREDICT_PATHS, Runtime, worker_count

log = logging.getLogger(__name__)


class PredictPath:
    """Pure ASGI middleware answering prediction requests ahead of FastAPI's routing.

    `POST /predict` and `/invocations` (the default model), `/models/<name>/predict` and `/invocations`.

    The same answers as the FastAPI routes (which share `Runtime.predict` and stay in the OpenAPI schema),
    without what FastAPI does per request that this path does not need (route matching, a Request object,
    dependency solving, a Response object): the body in from `receive`, pre-encoded JSON out through
    `send`. Counts and times each request in the same metrics `MetricsMiddleware` keeps for other paths.
    """

    PATHS = PREDICT_PATHS

    def __init__(self, app: Any, runtime: Runtime) -> None:
        self.app = app
        self.runtime = runtime
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}  # as MetricsMiddleware's

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """Answer a prediction request; pass anything else on."""
        if scope["type"] != "http" or scope["method"] != "POST" or not is_predict_path(scope["path"]):
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        try:
            status, body, headers = await self.runtime.predict(scope, receive)
        except ClientGone:
            return
        headers.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        runtime = self.runtime
        model, path = route_of(scope["path"], runtime.default.name, runtime.models.models)
        runtime.metrics.count(model, path, status, time.perf_counter() - started, self._children)


def is_predict_path(path: str) -> bool:
    """`/predict`, `/invocations`, or `/models/<name>/predict` or `/invocations`."""
    if path in PredictPath.PATHS:
        return True
    if not path.startswith("/models/"):
        return False
    parts = path.split("/")
    return len(parts) == 4 and bool(parts[2]) and parts[3] in MODEL_ACTIONS


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the serving app for the settings' model and alias (nothing starts until the app does)."""
    runtime = Runtime(settings or get_settings())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await runtime.start()
        try:
            yield
        finally:
            await runtime.stop()

    app = FastAPI(
        title="prefect-mlops serving",
        description="Predictions from the MLflow registry's champion, followed without a restart.",
        lifespan=lifespan,
    )
    app.state.runtime = runtime
    app.include_router(router)
    app.add_middleware(
        MetricsMiddleware, metrics=runtime.metrics, default=runtime.default.name, served=runtime.models.models
    )
    app.add_middleware(PredictPath, runtime=runtime)  # outermost: predictions skip the routing
    return app


def worker_app() -> FastAPI:
    """The app of one worker process (uvicorn's factory): settings from the environment, our log lines kept.

    A spawned worker starts with logging unconfigured: without this its swaps and load errors would only
    show from warnings up.
    """
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.INFO,
            format=f"%(asctime)s %(levelname)s [{os.getpid()}] %(name)s: %(message)s",
            datefmt="%H:%M:%S",
        )
        for noisy in ("httpx", "botocore", "urllib3"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    return create_app()


def run(host: str, port: int, settings: Settings | None = None, log_level: str = "info") -> None:
    """Serve with uvicorn until interrupted (no access log: it costs latency; /metrics counts requests).

    One worker: the app runs in this process. Several: uvicorn's supervisor spawns them on one shared
    socket, each building its app from the environment (`create_app` as a factory), so the serving
    settings are exported first; metrics go through a freshly emptied multiprocess folder under the
    state dir, one per port.
    """
    import uvicorn

    settings = settings or get_settings()
    check_exposure(host, settings)
    workers = worker_count(settings)
    # Beyond `serving_max_connections` at once a process answers 503 without reading the request; an idle
    # keep-alive connection is closed after 5 s.
    limits = {"limit_concurrency": settings.serving_max_connections, "timeout_keep_alive": 5}
    if workers == 1:
        uvicorn.run(create_app(settings), host=host, port=port, log_level=log_level, access_log=False, **limits)
        return
    with socket.socket() as probe:  # before emptying the folder a server running on this port still uses
        probe.settimeout(0.5)
        if probe.connect_ex((host, port)) == 0:
            raise OSError(f"port {port} on {host} is busy: another server listens there")
    folder = (settings.state_dir / "run" / f"serving-metrics-{port}").resolve()
    shutil.rmtree(folder, ignore_errors=True)  # counters of an earlier run must not add to this one's
    folder.mkdir(parents=True)
    os.environ[MULTIPROC_ENV] = str(folder)
    os.environ.update(_serving_env(settings))
    log.info("starting %d serving worker processes on %s:%d", workers, host, port)
    uvicorn.run(
        "serving.app:worker_app",
        factory=True,
        workers=workers,
        host=host,
        port=port,
        log_level=log_level,
        access_log=False,
        **limits,
    )


class ExposedWithoutTokenError(RuntimeError):
    """Binding beyond loopback without a serving token, and without `--insecure`."""


def check_exposure(host: str, settings: Settings) -> None:
    """Refuse to bind beyond loopback without a token unless `serving_insecure` says so (then a warning)."""
    if is_loopback(host) or settings.serving_token is not None:
        return
    if not settings.serving_insecure:
        raise ExposedWithoutTokenError(
            f"refusing to serve on {host} without MLOPS_SERVING_TOKEN: anyone who reaches it could predict and "
            "reload. Set a token, bind 127.0.0.1, or pass --insecure (MLOPS_SERVING_INSECURE=true) to accept it"
        )
    log.warning("serving on %s WITHOUT a token (--insecure): /predict and /invocations are open to anyone", host)


def _serving_env(settings: Settings) -> dict[str, str]:
    """The serving settings as `MLOPS_SERVING_*` variables, for worker processes that read the environment."""
    return {
        f"MLOPS_{name.upper()}": _env_text(value)
        for name, value in settings.model_dump().items()
        if name.startswith("serving_") and name != "serving_url" and value is not None
    }


def _env_text(value: Any) -> str:
    """A setting's value as pydantic-settings reads it back from the environment."""
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, list | dict):  # complex values are read as JSON
        return orjson.dumps(value).decode()
    return str(value)
