"""The serving API: predictions from the registry's champion, which it follows without a restart.

- `POST /predict` (and `/invocations`, MLflow's path): `{"records": [...]}` or MLflow's
  `{"dataframe_records": [...]}`; answers per record the class and the probability of every class (a
  classifier, binary or multiclass) or the predicted value (a regressor), with the model version and
  a request id. Bad input is a 422 naming the record and the field; a batch over the limit is a 413.
- `GET /health` (the process answers), `GET /ready` (a model is loaded), `GET /model` (what is served),
  `GET /metrics` (Prometheus), `POST /reload` (check the registry now; what a promotion calls).

Run it with `mlops serve` (or `mlops stack up`, which starts it on port 8000).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from typing import Any

import numpy as np
import orjson
from fastapi import APIRouter, FastAPI, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError

from adapters.settings import Settings, get_settings
from serving.batching import Job, MicroBatcher
from serving.follower import ChampionFollower
from serving.metrics import MetricsMiddleware, ServingMetrics
from serving.model import LoadedModel
from serving.online_features import FeatureLookupError, OnlineFeatures
from serving.prediction_log import PredictionLog

log = logging.getLogger(__name__)

BODY_KEYS = ("records", "dataframe_records")


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
        predictions = [
            {"class": classes[row.argmax()], "probabilities": dict(zip(labels, row.tolist(), strict=True))}
            for row in scores
        ]
    return {
        "request_id": request_id,
        "model": {"name": model.name, "version": model.version},
        "predictions": predictions,
    }


class Runtime:
    """Everything one app instance runs: the champion follower, the micro-batcher, the prediction log, metrics."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = ServingMetrics()
        self.prediction_log = PredictionLog(
            settings,
            settings.serving_model,
            flush_seconds=settings.serving_log_flush_seconds,
            max_rows=settings.serving_log_max_rows,
            on_event=lambda kind, rows: self.metrics.prediction_log.labels(kind).inc(rows),
        )
        self.batcher = MicroBatcher(
            max_rows=max(settings.serving_max_records, 1),
            on_scored=self._log_predictions,
            on_batch=self._count_batch,
            threads=settings.serving_threads,
        )
        self.follower = ChampionFollower(
            settings,
            on_reload=lambda result: self.metrics.reloads.labels(result).inc(),
            on_swap=lambda model: self.metrics.served(model.name, model.version),
        )
        self._poller: asyncio.Task | None = None
        self.online = OnlineFeatures(settings, self.metrics.registry)  # feature store lookups (issue 17)

    def _log_predictions(self, jobs: list[Job], frame: Any, scores: np.ndarray) -> None:
        sizes = [len(job.records) for job in jobs]
        request_ids = np.repeat([job.request_id for job in jobs], sizes)
        record_ids = None
        if any(job.ids is not None for job in jobs):
            record_ids = np.array([i for job in jobs for i in (job.ids or [None] * len(job.records))], dtype=object)
        self.prediction_log.record(frame, scores, jobs[0].model.classes, request_ids, jobs[0].model.version, record_ids)

    def _count_batch(self, rows: int) -> None:
        self.metrics.batch_rows.observe(rows)
        self.metrics.records.inc(rows)

    async def start(self) -> None:
        """Start batching, prediction logging and following the alias."""
        self.batcher.start()
        self.prediction_log.start()
        self._poller = asyncio.create_task(self.follower.run(), name="champion-follower")
        log.info("serving %s; registry %s", self.follower.following, self.settings.mlflow_tracking_uri)

    async def stop(self) -> None:
        """Stop polling, finish batching, write the last predictions."""
        if self._poller is not None:
            self._poller.cancel()
            with suppress(asyncio.CancelledError):
                await self._poller
        await self.batcher.stop()
        await asyncio.to_thread(self.prediction_log.stop)

    async def read_records(
        self, request: Request, model: LoadedModel
    ) -> tuple[list[dict[str, Any]], list[str | None] | None]:
        """The request's records, size-checked and validated against `model`, and their ids; raises BadRequest."""
        limit = self.settings.serving_max_body_bytes
        length = int(request.headers.get("content-length") or 0)
        body = b"" if length > limit else await request.body()
        size = max(length, len(body))
        if size > limit:
            raise BadRequest.at(413, ["body"], f"{size} bytes is over the limit of {limit}", "too_large")
        key, raw = parse_records(body, self.settings.serving_max_records)
        if model.feature_service:  # store features the records leave out come from the online store, by id
            try:
                raw = await self.online.enrich(model.feature_service, model.id_field, key, raw)
            except FeatureLookupError as exc:
                raise BadRequest(422, exc.errors) from exc
        records = validate_records(model, key, raw)
        return records, record_ids(model, key, raw)

    async def predict(self, request: Request) -> Response:
        """Answer one /predict request."""
        request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
        model = self.follower.current  # this request finishes on this model, whatever is swapped meanwhile
        if model is None:
            error = self.follower.last_error
            detail = f"no model loaded yet for {self.follower.following}" + (f" ({error})" if error else "")
            return _json({"detail": detail, "request_id": request_id}, 503, request_id)
        explain = request.query_params.get("explain", "").lower() in {"1", "true", "yes"}
        try:
            if explain and model.baseline is None:
                why = "no baseline was stored with it"
                raise BadRequest.at(422, ["query", "explain"], f"v{model.version} cannot explain: {why}", "explain")
            records, ids = await self.read_records(request, model)
            scored = await self.batcher.score(model, records, request_id, ids)
            explained = await asyncio.to_thread(explain_records, model, records, scored.scores) if explain else None
        except BadRequest as exc:
            return _json({"detail": exc.errors, "request_id": request_id}, exc.status, request_id)
        except Exception as exc:
            log.exception("request %s failed", request_id)
            detail = f"prediction failed: {type(exc).__name__}"
            return _json({"detail": detail, "request_id": request_id}, 500, request_id)
        body = answer(model, scored.scores, request_id)
        if explained is not None:
            for prediction, extra in zip(body["predictions"], explained, strict=True):
                prediction.update(extra)
        return _json(body, 200, request_id)


router = APIRouter()


def _runtime(request: Request) -> Runtime:
    return request.app.state.runtime


@router.post("/predict", summary="Predict a batch of records")
async def predict(request: Request) -> Response:
    """`{"records": [...]}` or `{"dataframe_records": [...]}` in; per record a class and probabilities, or a value."""
    return await _runtime(request).predict(request)


@router.post("/invocations", summary="MLflow scoring-server path for /predict")
async def invocations(request: Request) -> Response:
    """The same as /predict, at the path clients of `mlflow models serve` call."""
    return await _runtime(request).predict(request)


@router.get("/health")
async def health(request: Request) -> Response:
    """The process answers; says what it follows, the version it serves and its last load error."""
    follower = _runtime(request).follower
    model = follower.current
    version = model.version if model else None
    return _json({"status": "ok", "following": follower.following, "version": version, "error": follower.last_error})


@router.get("/ready")
async def ready(request: Request) -> Response:
    """200 only when a model is loaded."""
    follower = _runtime(request).follower
    if follower.current is None:
        return _json({"ready": False, "detail": follower.last_error or "no model loaded yet"}, 503)
    return _json({"ready": True, "version": follower.current.version})


@router.get("/model")
async def model_info(request: Request) -> Response:
    """Name, version, task (binary, multiclass or regression), run id, metrics and promotion time."""
    follower = _runtime(request).follower
    model = follower.current
    if model is None:
        return _json({"detail": f"no model loaded yet for {follower.following}", "error": follower.last_error}, 503)
    return _json(model.describe() | {"alias": follower.alias, "last_error": follower.last_error})


@router.get("/metrics")
async def prometheus(request: Request) -> Response:
    """Prometheus text format."""
    return Response(generate_latest(_runtime(request).metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.post("/reload")
async def reload(request: Request) -> Response:
    """Check the registry now (a promotion calls this); answers what is served afterwards."""
    follower = _runtime(request).follower
    changed = await follower.check(force=True)
    model = follower.current
    return _json(
        {"changed": changed, "version": model.version if model else None, "error": follower.last_error},
        200 if model else 503,
    )


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
    app.add_middleware(MetricsMiddleware, metrics=runtime.metrics)
    return app


def run(host: str, port: int, settings: Settings | None = None, log_level: str = "info") -> None:
    """Serve with uvicorn until interrupted (no access log: it costs latency; /metrics counts requests)."""
    import uvicorn

    uvicorn.run(create_app(settings), host=host, port=port, log_level=log_level, access_log=False)
