"""The serving API's FastAPI routes: predictions, health and readiness, what is served, metrics, /reload.

The prediction routes are answered ahead of the router by `serving.app.PredictPath`; they stay here for the
OpenAPI schema and answer the same (`Runtime.predict`). /reload needs the serving token when one is set,
else a loopback client (`refused`).
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
from contextlib import suppress

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST

from serving.request_io import ClientGone, json_response, token_problem
from serving.runtime import Runtime, worker_count
from serving.served import workers_of

router = APIRouter()


def _runtime(request: Request) -> Runtime:
    return request.app.state.runtime


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
        return json_response({"detail": detail}, 403)
    if (detail := token_problem(token, request.headers.get("authorization"), what)) is None:
        return None
    response = json_response({"detail": detail}, 401)
    response.headers["www-authenticate"] = "Bearer"
    return response


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
    return json_response(
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
        return json_response({"ready": False, "detail": detail, "processes": processes}, 503)
    if len(served) < expected:
        detail = f"{len(served)} of {expected} worker processes serve a model so far"
        version = follower.current.version
        return json_response({"ready": False, "detail": detail, "version": version, "processes": processes}, 503)
    return json_response({"ready": True, "version": follower.current.version, "processes": processes})


@router.get("/model")
async def model_info(request: Request) -> Response:
    """Name, version, task (binary, multiclass or regression), run id, metrics and promotion time."""
    follower = _runtime(request).follower
    model = follower.current
    if model is None:
        return json_response(
            {"detail": f"no model loaded yet for {follower.following}", "error": follower.last_error}, 503
        )
    runtime = _runtime(request)
    served = await asyncio.to_thread(runtime.metrics.served_by_process, runtime.default.name)
    workers = [{"pid": pid, "version": version} for pid, version in sorted(served.items())]
    challenger = await asyncio.to_thread(runtime.default.rollout_summary)
    return json_response(
        model.describe()
        | {"alias": follower.alias, "last_error": follower.last_error, "pid": os.getpid(), "workers": workers}
        | {"challenger": challenger}
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
        return json_response(runtime.not_served(name) | {"catalog_error": runtime.models.catalog_error}, 404)
    try:
        timeout = float(request.query_params.get("timeout", 10))
    except ValueError:
        timeout = 10.0
    names = runtime.models.names() if name is None else [name]
    answers = dict(zip(names, await asyncio.gather(*(runtime.reload_model(n, timeout) for n in names)), strict=True))
    main = answers[name or runtime.default.name]
    content = main | {"models": answers, "catalog_error": runtime.models.catalog_error}
    return json_response(content, 200 if main["version"] is not None else 503)


@router.get("/models")
async def models(request: Request) -> Response:
    """Every model served here, the default (/predict's) first.

    Per model: name, alias, version (None until loaded), task, inference form, last error, the version
    each worker process serves, and its `challenger`: the rollout under way (version, mode, share, since, status,
    cut-off, volume so far by role), None when there is none.
    """
    runtime = _runtime(request)
    live, served = await asyncio.to_thread(runtime.metrics.snapshot)
    listed = await asyncio.to_thread(
        lambda: [m.summary(live, served.get(m.name, {})) for m in list(runtime.models.models.values())]
    )
    return json_response(
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
        return json_response(runtime.not_served(name), 404)
    follower = served.follower
    model = follower.current
    if model is None:
        return json_response(
            {"detail": f"no model loaded yet for {follower.following}", "error": follower.last_error}, 503
        )
    live, by_model = await asyncio.to_thread(runtime.metrics.snapshot)
    workers = workers_of(live, by_model.get(name, {}))
    challenger = await asyncio.to_thread(served.rollout_summary)
    return json_response(
        model.describe()
        | {"alias": follower.alias, "last_error": follower.last_error, "pid": os.getpid(), "workers": workers}
        | {"challenger": challenger}
    )


@router.post("/models/{name}/predict", summary="Predict a batch of records with model `name`")
async def predict_model(name: str, request: Request) -> Response:
    """The same as /predict, for the served model `name` (404 naming it when it is not served here)."""
    return await _predict_route(request)


@router.post("/models/{name}/invocations", summary="MLflow scoring-server path for /models/{name}/predict")
async def invocations_model(name: str, request: Request) -> Response:
    """The same as /models/{name}/predict, at MLflow's path."""
    return await _predict_route(request)
