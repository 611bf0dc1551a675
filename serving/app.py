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

Run it with `mlops serve` (or `mlops stack up`, which starts it on port 8000): as many worker processes
as cores by default (`MLOPS_SERVING_WORKERS`), sharing one socket (uvicorn's supervisor, which restarts a
worker that dies). Each process follows every champion and reads the catalog on its own; `/health` and
`/model` say which process answered (`pid`); `/metrics` sums over all of them (each series of a model
with its `model` label); `/reload` makes every process re-read the catalog and check the registry.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import os
import shutil
import socket
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import numpy as np
import orjson
from fastapi import APIRouter, FastAPI, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import SecretStr, ValidationError

from adapters.settings import Settings, get_settings
from serving.batching import Job, MicroBatcher
from serving.follower import ChampionFollower
from serving.metrics import (
    MODEL_ACTIONS,
    MULTIPROC_ENV,
    MetricsMiddleware,
    ServingMetrics,
    forget_dead_processes,
    route_of,
)
from serving.model import BODY_KEYS, LoadedModel
from serving.online_features import FeatureLookupError, OnlineFeatures
from serving.prediction_log import PredictionLog, ScoredBatch
from serving.served import ModelSet, ServedModel, workers_of

log = logging.getLogger(__name__)

RELOAD_SIGNAL = "reload"  # a file in the metrics folder: touched by /reload, watched by every worker process
CATALOG_SIGNAL = "catalog"  # the same, for re-reading the model catalog
RELOAD_WATCH_SECONDS = 0.2


def problem(loc: list[Any], msg: str, kind: str) -> dict[str, Any]:
    """One error entry: where (as a list and in the message, e.g. `records[3].age: ...`), what, and its type."""
    return {"loc": loc, "msg": f"{_where(loc)}: {msg}", "type": kind}


class BadRequest(Exception):
    """A request the API answers with a 4xx status and these details."""

    def __init__(self, status: int, errors: list[dict[str, Any]]) -> None:
        super().__init__(errors[0]["msg"])
        self.status = status
        self.errors = errors

    @classmethod
    def at(cls, status: int, loc: list[Any], msg: str, kind: str) -> BadRequest:
        """A single-problem answer."""
        return cls(status, [problem(loc, msg, kind)])


def _json(content: Any, status: int = 200, request_id: str | None = None) -> Response:
    headers = {"x-request-id": request_id} if request_id else None
    return Response(orjson.dumps(content), status_code=status, media_type="application/json", headers=headers)


def _where(loc: tuple | list) -> str:
    """`records[3].age` from a location tuple."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def parse_records(body: bytes, max_records: int) -> tuple[str, list[Any]]:
    """The records of a request body; raises BadRequest (422 or 413) naming what is wrong."""
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest.at(422, ["body"], f"not valid JSON: {exc}", "json") from exc
    if not isinstance(payload, dict) or not any(k in payload for k in BODY_KEYS):
        shape = 'expected an object {"records": [{...}, ...]} (or "dataframe_records")'
        raise BadRequest.at(422, ["body"], shape, "body_shape")
    key = next(k for k in BODY_KEYS if k in payload)
    records = payload[key]
    if not isinstance(records, list):
        raise BadRequest.at(422, [key], "must be a list of records", "list_type")
    if not records:
        raise BadRequest.at(422, [key], "empty batch: send at least one record", "empty")
    if len(records) > max_records:
        raise BadRequest.at(
            413, [key], f"batch of {len(records)} records is over the limit of {max_records}", "too_large"
        )
    return key, records


def validate_records(model: LoadedModel, key: str, records: list[Any]) -> list[dict[str, Any]]:
    """Records checked against the model's signature; raises a 422 naming each failing record and field."""
    try:
        return model.adapter.validate_python(records)
    except ValidationError as exc:
        errors = []
        for err in exc.errors(include_url=False)[:50]:
            msg = err["msg"]
            if err["type"] == "missing":
                msg = "field required (send null for a missing value)"
            elif "input" in err:
                msg = f"{msg}, got {err['input']!r}"[:300]
            errors.append(problem([key, *err["loc"]], msg, err["type"]))
        raise BadRequest(422, errors) from exc


def decode_records(model: LoadedModel, body: bytes, max_records: int) -> tuple[list[Any], list[str | None] | None]:
    """The body's records checked against the model's signature, and their ids; raises BadRequest (422, 413).

    A good body is decoded and checked in one pass (`RecordSchema.decode`, msgspec); any other is taken
    apart step by step by `parse_records`, `validate_records` and `record_ids`, whose errors name the
    record and field.
    """
    fast = model.adapter.decode(body, max_records)
    if fast is not None:
        return fast[1], fast[2]
    key, raw = parse_records(body, max_records)
    records = validate_records(model, key, raw)
    return records, record_ids(model, key, raw)


def record_ids(model: LoadedModel, key: str, records: list[dict[str, Any]]) -> list[str | None] | None:
    """Each record's id for the prediction log: the model's `id_field`, as text, None where absent.

    None when the model has no id field. Raises a 422 naming a record whose id is neither text nor an integer.
    """
    if model.id_field is None:
        return None
    ids: list[str | None] = []
    for index, record in enumerate(records):
        value = record.get(model.id_field)
        if value is not None and (isinstance(value, bool) or not isinstance(value, str | int)):
            msg = f"an id must be a string or an integer, got {value!r}"[:300]
            raise BadRequest.at(422, [key, index, model.id_field], msg, "id_type")
        ids.append(None if value is None else str(value))
    return ids


def explained_output(model: LoadedModel, scores: np.ndarray) -> tuple[int | np.ndarray | None, list[dict[str, Any]]]:
    """Which model output `?explain=true` explains for each record, as `contributions` wants it and as said.

    - binary: the probability of the positive class (the second class), for every record;
    - multiclass: the probability of the class predicted for that record;
    - regression: the predicted value.
    """
    if model.task == "regression":
        return None, [{"output": "prediction"}] * len(scores)
    classes = [_plain(c) for c in model.classes]
    index = np.full(len(scores), 1) if model.task == "binary" else scores.argmax(axis=1)
    return (1 if model.task == "binary" else index), [{"output": "probability", "class": classes[i]} for i in index]


def explain_records(model: LoadedModel, records: list[dict[str, Any]], scores: np.ndarray) -> list[dict[str, Any]]:
    """Per-record, per-feature contributions to the output `explained_output` names, and that output.

    By occlusion against the baseline record stored with the model (see `core.explain.contributions`).
    """
    from core.explain import contributions

    frame = model.frame(records)
    index, explained = explained_output(model, scores)
    table = contributions(model.pipeline, frame, model.baseline[frame.columns], positive_index=index)
    return [
        {"contributions": {k: float(v) for k, v in row.items()}, "explained": what}
        for row, what in zip(table.to_dict(orient="records"), explained, strict=True)
    ]


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def answer(model: LoadedModel, scores: np.ndarray, request_id: str) -> dict[str, Any]:
    """The JSON answer per record, model name and version, request id.

    A classifier's record gets its `class` and `probabilities` of every class keyed by the class label as
    text (binary and multiclass alike); a regressor's record gets its `prediction` (a number).
    """
    if not model.classes:
        predictions: list[dict[str, Any]] = [{"prediction": value} for value in scores.tolist()]
    else:
        classes = [_plain(c) for c in model.classes]
        labels = [str(c) for c in classes]
        predictions = [  # whole-array argmax and tolist: no numpy call per record
            {"class": classes[best], "probabilities": dict(zip(labels, row, strict=True))}
            for best, row in zip(scores.argmax(axis=1).tolist(), scores.tolist(), strict=True)
        ]
    return {
        "request_id": request_id,
        "model": {"name": model.name, "version": model.version},
        "predictions": predictions,
    }


class Runtime:
    """Everything one app instance runs: the served models, the micro-batcher they share, metrics.

    Each served model (`serving.served.ServedModel`) has its champion follower and its prediction log.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = ServingMetrics()
        self.models = ModelSet(settings, lambda name: ServedModel(settings, name, self.metrics, self._swapped))
        self.default = self.models.default
        self.batcher = MicroBatcher(
            max_rows=max(settings.serving_max_records, 1),
            on_scored=self._scored,
            threads=settings.serving_threads,
            # logging a batch that waits for the disk must not run on the event loop (nor one request at a time)
            inline=not self.default.log.syncs_each_write,
        )
        self._tasks: list[asyncio.Task] = []
        self.online = OnlineFeatures(settings, self.metrics.registry)  # feature store lookups

    @property
    def follower(self) -> ChampionFollower:
        """The default model's follower."""
        return self.default.follower

    @property
    def prediction_log(self) -> PredictionLog:
        """The default model's prediction log."""
        return self.default.log

    def _swapped(self, model: LoadedModel) -> None:
        """After a swap: metrics, and the other worker processes are asked to look now, not at their next poll."""
        self.metrics.served(model.name, model.version, model.form)
        self.signal_reload()

    def _signal(self, name: str) -> Path | None:
        folder = self.metrics.multiprocess_dir
        return None if folder is None else folder / name

    @property
    def reload_signal(self) -> Path | None:
        """The file whose change makes every worker process check the registry (None with one process)."""
        return self._signal(RELOAD_SIGNAL)

    def signal_reload(self, catalog: bool = False) -> None:
        """Ask every worker process to check the registry now (and re-read the catalog, with `catalog`)."""
        for name in (RELOAD_SIGNAL, CATALOG_SIGNAL) if catalog else (RELOAD_SIGNAL,):
            if (path := self._signal(name)) is not None:
                with open(path, "a"):
                    os.utime(path)

    def wake_all(self) -> None:
        """Every served model's follower checks the registry now."""
        for served in list(self.models.models.values()):
            served.follower.wake()

    async def _watch_reloads(self) -> None:
        """Wake the followers (or the catalog reader) when another process signals (a stat per interval: cheap)."""
        signals = {self._signal(RELOAD_SIGNAL): self.wake_all, self._signal(CATALOG_SIGNAL): self.models.wake}
        seen = {path: _mtime(path) for path in signals}
        while True:
            await asyncio.sleep(RELOAD_WATCH_SECONDS)
            for path, wake in signals.items():
                now = _mtime(path)
                if now != seen[path]:
                    seen[path] = now
                    wake()

    async def all_serve(self, name: str, version: str | None, timeout: float) -> dict[int, str | None]:
        """Wait (up to `timeout`) until every live worker process serves `version` of model `name`.

        Returns pid -> the version each live process serves (None: not loaded there).
        """
        deadline = time.monotonic() + timeout
        while True:
            live, served = await asyncio.to_thread(self.metrics.snapshot)
            by_pid = served.get(name, {})
            workers = {pid: by_pid.get(pid) for pid in sorted(live | set(by_pid))}
            if version is None or set(workers.values()) <= {version} or time.monotonic() >= deadline:
                return workers
            await asyncio.sleep(0.1)

    def _scored(self, jobs: list[Job], columns: dict[str, np.ndarray], scores: np.ndarray) -> None:
        """After a batch call: count it for its model and log its predictions in the model's log."""
        served: ServedModel = jobs[0].context or self.default
        rows = len(scores)
        served.batch_rows.observe(rows)
        served.records.inc(rows)
        self._log_predictions(served.log, jobs, columns, scores)

    @staticmethod
    def _log_predictions(
        prediction_log: PredictionLog, jobs: list[Job], columns: dict[str, np.ndarray], scores: np.ndarray
    ) -> None:
        if len(jobs) == 1:  # the usual case: plain lists, no numpy call per request
            job = jobs[0]
            size = len(job.records)
            request_ids: list[str] = [job.request_id] * size
            record_ids = job.ids
            record_index: Any = range(size)
        else:
            request_ids = [job.request_id for job in jobs for _ in job.records]
            record_ids = None
            if any(job.ids is not None for job in jobs):
                record_ids = [i for job in jobs for i in (job.ids or [None] * len(job.records))]
            record_index = [i for job in jobs for i in range(len(job.records))]
        model = jobs[0].model
        prediction_log.record(
            ScoredBatch(columns, scores, model.classes, request_ids, model.version, record_ids, record_index)
        )

    async def start(self) -> None:
        """Start batching, the default model, reading the catalog (its models start from there)."""
        self.batcher.start()
        folder = self.metrics.multiprocess_dir
        if folder is not None and (dead := forget_dead_processes(folder)):
            log.info("worker processes %s are gone: their gauges are dropped", dead)
        self.metrics.worker.set(1)
        await self.models.start()
        self._tasks.append(asyncio.create_task(self.models.run(), name="catalog-reader"))
        if self.metrics.multiprocess_dir is not None:
            self._tasks.append(asyncio.create_task(self._watch_reloads(), name="reload-watcher"))
        log.info("serving %s; registry %s", self.follower.following, self.settings.mlflow_tracking_uri)

    async def stop(self) -> None:
        """Stop reading the catalog, finish batching, stop every model (their logs write the last predictions)."""
        for task in self._tasks:
            task.cancel()
            with suppress(asyncio.CancelledError):
                await task
        await self.batcher.stop()
        await self.models.stop()

    async def reload_model(self, name: str, timeout: float) -> dict[str, Any]:
        """Check model `name`'s alias now; then wait (up to `timeout`) until every process serves what this one does."""
        served = self.models.get(name)
        if served is None:  # it left the catalog meanwhile
            return {"changed": False, "version": None, "error": "not served any more", "workers": []}
        follower = served.follower
        changed = await follower.check(force=True)
        version = follower.current.version if follower.current else None
        if self.reload_signal is not None:
            by_pid = await self.all_serve(name, version, timeout)
        else:
            by_pid = {os.getpid(): version}
        workers = [{"pid": pid, "version": v} for pid, v in sorted(by_pid.items())]
        return {"changed": changed, "version": version, "error": follower.last_error, "workers": workers}

    def resolve(self, path: str) -> ServedModel | None:
        """The served model a prediction path is for: /predict and /invocations the default; None if not served."""
        if path in PredictPath.PATHS:
            return self.default
        return self.models.get(path.split("/", 3)[2])

    def not_served(self, name: str) -> dict[str, Any]:
        """The 404 answer's content for a model name this API does not serve."""
        served = self.models.names()
        return {"detail": f"model {name!r} is not served here; served models: {served}", "served": served}

    async def read_records(
        self, body: bytes, model: LoadedModel
    ) -> tuple[list[dict[str, Any]], list[str | None] | None]:
        """The body's records, validated against `model`, and their ids; raises BadRequest."""
        if not model.feature_service:
            return decode_records(model, body, self.settings.serving_max_records)
        key, raw = parse_records(body, self.settings.serving_max_records)
        # store features the records leave out come from the online store, by id
        try:
            raw = await self.online.enrich(model.feature_service, model.id_field, key, raw)
        except FeatureLookupError as exc:
            raise BadRequest(422, exc.errors) from exc
        records = validate_records(model, key, raw)
        return records, record_ids(model, key, raw)

    async def predict(self, scope: dict[str, Any], receive: Any) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
        """Answer one /predict (or /invocations, or /models/<name>/...) request from its ASGI scope.

        Returns status, JSON body, headers: 404 naming a model not served here, 503 for one not loaded. Used
        by `PredictPath` (ahead of FastAPI's routing) and by the FastAPI routes alike. Raises ClientGone when
        the client left before its body was read.
        """
        given_id, authorization, declared = _predict_headers(scope)
        path = scope["path"]
        token = self.settings.serving_token
        if token is not None and (detail := token_problem(token, authorization, path[1:])) is not None:
            return 401, orjson.dumps({"detail": detail}), [*_JSON, (b"www-authenticate", b"Bearer")]
        request_id = given_id or uuid.uuid4().hex
        served = self.resolve(path)
        if served is None:
            return _raw(404, self.not_served(path.split("/", 3)[2]) | {"request_id": request_id}, request_id)
        follower = served.follower
        model = follower.current  # this request finishes on this model, whatever is swapped meanwhile
        if model is None:
            error = follower.last_error
            detail = f"not serving: {error}" if error else f"no model loaded yet for {follower.following}"
            return _raw(503, {"detail": detail, "request_id": request_id}, request_id)
        explain = bool(scope.get("query_string")) and _explain_asked(scope["query_string"])
        try:
            if explain and model.baseline is None:
                why = "no baseline was stored with it"
                raise BadRequest.at(422, ["query", "explain"], f"v{model.version} cannot explain: {why}", "explain")
            body = await receive_body(receive, declared, self.settings.serving_max_body_bytes)
            records, ids = await self.read_records(body, model)
            scored = await self.batcher.score(model, records, request_id, ids, served)
            explained = await asyncio.to_thread(explain_records, model, records, scored.scores) if explain else None
        except BadRequest as exc:
            return _raw(exc.status, {"detail": exc.errors, "request_id": request_id}, request_id)
        except ClientGone:
            raise
        except Exception as exc:
            log.exception("request %s failed", request_id)
            detail = f"prediction failed: {type(exc).__name__}"
            return _raw(500, {"detail": detail, "request_id": request_id}, request_id)
        answered = answer(model, scored.scores, request_id)
        if explained is not None:
            for prediction, extra in zip(answered["predictions"], explained, strict=True):
                prediction.update(extra)
        return _raw(200, answered, request_id)


_JSON = [(b"content-type", b"application/json")]


def _raw(status: int, content: Any, request_id: str) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
    return status, orjson.dumps(content), [*_JSON, (b"x-request-id", request_id.encode("latin-1"))]


def _predict_headers(scope: dict[str, Any]) -> tuple[str | None, str | None, int]:
    """x-request-id, authorization and the declared content-length of a request (one pass over its headers)."""
    request_id = authorization = None
    declared = 0
    for name, value in scope["headers"]:  # ASGI: names in lower case
        if name == b"x-request-id":
            request_id = value.decode("latin-1") or None
        elif name == b"authorization":
            authorization = value.decode("latin-1")
        elif name == b"content-length":
            with suppress(ValueError):
                declared = int(value)
    return request_id, authorization, declared


def _explain_asked(query: bytes) -> bool:
    values = parse_qs(query.decode("latin-1")).get("explain")
    return bool(values) and values[-1].lower() in {"1", "true", "yes"}


class ClientGone(Exception):
    """The client disconnected before its request body was read: nobody to answer."""


async def receive_body(receive: Any, declared: int, limit: int) -> bytes:
    """The request body, cut off with a 413 as soon as it passes `limit` bytes, whatever the transfer encoding.

    A declared content-length over the limit is refused before reading; a chunked body (no length) is
    counted while it streams, so a client cannot make the server hold more than `limit` bytes.
    """
    if declared > limit:
        raise BadRequest.at(413, ["body"], f"{declared} bytes is over the limit of {limit}", "too_large")
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BadRequest.at(413, ["body"], f"more than {limit} bytes: over the limit of {limit}", "too_large")
        if not message.get("more_body", False):
            return b"".join([*chunks, chunk]) if chunks else chunk
        chunks.append(chunk)


def token_problem(token: SecretStr, authorization: str | None, what: str) -> str | None:
    """Why a request to /`what` is refused under `MLOPS_SERVING_TOKEN` (the 401's detail); None when allowed.

    It needs `Authorization: Bearer <token>`, compared in constant time; the token is never logged.
    """
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.get_secret_value().encode()):
        return None
    detail = f"/{what} needs the header 'Authorization: Bearer <token>' with the serving token (MLOPS_SERVING_TOKEN)"
    return detail + ("; none was sent" if not given else "; the one sent is wrong")


def refused(request: Request, what: str) -> Response | None:
    """The 401/403 answer for a /reload request `MLOPS_SERVING_TOKEN` does not allow; None when it may go on.

    With a token set, it needs `Authorization: Bearer <token>` (as /predict and /invocations do). Without
    one, it is accepted only from a loopback client (anyone who can reach the port could otherwise make it
    hit the registry).
    """
    token = _runtime(request).settings.serving_token
    if token is None:
        client = request.client.host if request.client else ""
        with suppress(ValueError):
            if ipaddress.ip_address(client).is_loopback:
                return None
        detail = f"/{what} is accepted only from loopback without MLOPS_SERVING_TOKEN; {client or 'unknown'} is not"
        return _json({"detail": detail}, 403)
    if (detail := token_problem(token, request.headers.get("authorization"), what)) is None:
        return None
    response = _json({"detail": detail}, 401)
    response.headers["www-authenticate"] = "Bearer"
    return response


class PredictPath:
    """Pure ASGI middleware answering prediction requests ahead of FastAPI's routing.

    `POST /predict` and `/invocations` (the default model), `/models/<name>/predict` and `/invocations`.

    The same answers as the FastAPI routes (which share `Runtime.predict` and stay in the OpenAPI schema),
    without what FastAPI does per request that this path does not need (route matching, a Request object,
    dependency solving, a Response object): the body in from `receive`, pre-encoded JSON out through
    `send`. Counts and times each request in the same metrics `MetricsMiddleware` keeps for other paths.
    """

    PATHS = frozenset({"/predict", "/invocations"})

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


router = APIRouter()


def _runtime(request: Request) -> Runtime:
    return request.app.state.runtime


async def _predict_route(request: Request) -> Response:
    try:
        status, body, headers = await _runtime(request).predict(request.scope, request.receive)
    except ClientGone:
        return Response(status_code=499)  # nobody reads it
    return Response(body, status_code=status, headers={k.decode(): v.decode("latin-1") for k, v in headers})


@router.post("/predict", summary="Predict a batch of records")
async def predict(request: Request) -> Response:
    """`{"records": [...]}` or `{"dataframe_records": [...]}` in; per record a class and probabilities, or a value.

    Answered by `PredictPath` ahead of the router; this route documents it (OpenAPI) and answers the same.
    """
    return await _predict_route(request)


@router.post("/invocations", summary="MLflow scoring-server path for /predict")
async def invocations(request: Request) -> Response:
    """The same as /predict, at the path clients of `mlflow models serve` call."""
    return await _predict_route(request)


@router.get("/health")
async def health(request: Request) -> Response:
    """The process answers; says what it follows, the version it serves, its last load error and its pid."""
    follower = _runtime(request).follower
    model = follower.current
    version = model.version if model else None
    return _json(
        {
            "status": "ok",
            "following": follower.following,
            "version": version,
            "error": follower.last_error,
            "pid": os.getpid(),
        }
    )


@router.get("/ready")
async def ready(request: Request) -> Response:
    """200 only when a model is loaded, in every worker process (whichever process answers)."""
    runtime = _runtime(request)
    follower = runtime.follower
    served = await asyncio.to_thread(runtime.metrics.served_by_process, runtime.default.name)
    expected = worker_count(runtime.settings) if runtime.metrics.multiprocess_dir is not None else 1
    processes = {"serving": len(served), "expected": expected}
    if follower.current is None:
        detail = follower.last_error or "no model loaded yet"
        return _json({"ready": False, "detail": detail, "processes": processes}, 503)
    if len(served) < expected:
        detail = f"{len(served)} of {expected} worker processes serve a model so far"
        version = follower.current.version
        return _json({"ready": False, "detail": detail, "version": version, "processes": processes}, 503)
    return _json({"ready": True, "version": follower.current.version, "processes": processes})


@router.get("/model")
async def model_info(request: Request) -> Response:
    """Name, version, task (binary, multiclass or regression), run id, metrics and promotion time."""
    follower = _runtime(request).follower
    model = follower.current
    if model is None:
        return _json({"detail": f"no model loaded yet for {follower.following}", "error": follower.last_error}, 503)
    runtime = _runtime(request)
    served = await asyncio.to_thread(runtime.metrics.served_by_process, runtime.default.name)
    workers = [{"pid": pid, "version": version} for pid, version in sorted(served.items())]
    return _json(
        model.describe()
        | {"alias": follower.alias, "last_error": follower.last_error, "pid": os.getpid(), "workers": workers}
    )


@router.get("/metrics")
async def prometheus(request: Request) -> Response:
    """Prometheus text format."""
    metrics = _runtime(request).metrics
    text = await asyncio.to_thread(metrics.exposition) if metrics.multiprocess_dir else metrics.exposition()
    return Response(text, media_type=CONTENT_TYPE_LATEST)


@router.post("/reload")
async def reload(request: Request) -> Response:
    """Re-read the catalog and check the registry now (a promotion calls this); answers what is served afterwards.

    Every served model is checked, or only the one the `model` query parameter names (404 when it is not
    served, even after re-reading the catalog). With several worker processes, the others are asked to do
    the same, and the answer waits (up to the `timeout` query parameter, 10 s by default) until every one
    serves what this one does. The answer's `changed`, `version`, `error` and `workers` (pid and version of
    each process) are the named model's, else the default model's; `models` has them for each model checked.
    """
    if (refusal := refused(request, "reload")) is not None:
        return refusal
    runtime = _runtime(request)
    name = request.query_params.get("model")
    runtime.signal_reload(catalog=True)
    await runtime.models.refresh()
    if name is not None and runtime.models.get(name) is None:
        return _json(runtime.not_served(name) | {"catalog_error": runtime.models.catalog_error}, 404)
    try:
        timeout = float(request.query_params.get("timeout", 10))
    except ValueError:
        timeout = 10.0
    names = runtime.models.names() if name is None else [name]
    answers = dict(zip(names, await asyncio.gather(*(runtime.reload_model(n, timeout) for n in names)), strict=True))
    main = answers[name or runtime.default.name]
    content = main | {"models": answers, "catalog_error": runtime.models.catalog_error}
    return _json(content, 200 if main["version"] is not None else 503)


@router.get("/models")
async def models(request: Request) -> Response:
    """Every model served here, the default (/predict's) first.

    Per model: name, alias, version (None until loaded), task, inference form, last error, and the version
    each worker process serves.
    """
    runtime = _runtime(request)
    live, served = await asyncio.to_thread(runtime.metrics.snapshot)
    listed = [m.summary(live, served.get(m.name, {})) for m in list(runtime.models.models.values())]
    return _json(
        {
            "default": runtime.default.name,
            "models": listed,
            "catalog_error": runtime.models.catalog_error,
            "pid": os.getpid(),
        }
    )


@router.get("/models/{name}")
async def model_by_name(name: str, request: Request) -> Response:
    """What `GET /model` says, for model `name`; `workers` lists every live process (version None: not loaded)."""
    runtime = _runtime(request)
    served = runtime.models.get(name)
    if served is None:
        return _json(runtime.not_served(name), 404)
    follower = served.follower
    model = follower.current
    if model is None:
        return _json({"detail": f"no model loaded yet for {follower.following}", "error": follower.last_error}, 503)
    live, by_model = await asyncio.to_thread(runtime.metrics.snapshot)
    workers = workers_of(live, by_model.get(name, {}))
    return _json(
        model.describe()
        | {"alias": follower.alias, "last_error": follower.last_error, "pid": os.getpid(), "workers": workers}
    )


@router.post("/models/{name}/predict", summary="Predict a batch of records with model `name`")
async def predict_model(name: str, request: Request) -> Response:
    """The same as /predict, for the served model `name` (404 naming it when it is not served here)."""
    return await _predict_route(request)


@router.post("/models/{name}/invocations", summary="MLflow scoring-server path for /models/{name}/predict")
async def invocations_model(name: str, request: Request) -> Response:
    """The same as /models/{name}/predict, at MLflow's path."""
    return await _predict_route(request)


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


def worker_count(settings: Settings) -> int:
    """Serving processes to run: `serving_workers`, or one per CPU core when it is 0."""
    return settings.serving_workers or os.cpu_count() or 1


def run(host: str, port: int, settings: Settings | None = None, log_level: str = "info") -> None:
    """Serve with uvicorn until interrupted (no access log: it costs latency; /metrics counts requests).

    One worker: the app runs in this process. Several: uvicorn's supervisor spawns them on one shared
    socket, each building its app from the environment (`create_app` as a factory), so the serving
    settings are exported first; metrics go through a freshly emptied multiprocess folder under the
    state dir, one per port.
    """
    import uvicorn

    settings = settings or get_settings()
    workers = worker_count(settings)
    if workers == 1:
        uvicorn.run(create_app(settings), host=host, port=port, log_level=log_level, access_log=False)
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
    )


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


def _mtime(path: os.PathLike | None) -> float | None:
    try:
        return os.stat(path).st_mtime_ns if path is not None else None
    except FileNotFoundError:
        return None
