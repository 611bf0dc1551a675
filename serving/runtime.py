"""What one serving app runs: its served models, the micro-batcher they share, metrics, and its answers.

`Runtime.predict` answers a prediction request from its ASGI scope (for `serving.app.PredictPath`, ahead of
FastAPI's routing, and for the routes alike); `/reload` and the other worker processes reach each other
through signal files in the metrics folder, watched by every process.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from adapters.settings import Settings
from serving.batching import Job, MicroBatcher, Overloaded
from serving.checks import CheckingProcess
from serving.follower import ChampionFollower
from serving.forms import (
    BadRequest,
    answer,
    decode_records,
    explain_records,
    parse_records,
    parsed,
    record_ids,
    validate_records,
)
from serving.metrics import ServingMetrics, forget_dead_processes
from serving.model import LoadedModel
from serving.online_features import FeatureLookupError, OnlineFeatures
from serving.prediction_log import PredictionLog, PredictionNotLogged, ScoredBatch
from serving.request_io import (
    JSON_HEADERS,
    ClientGone,
    encoded_answer,
    explain_asked,
    predict_headers,
    receive_body,
    token_problem,
)
from serving.rollout import RolloutPath
from serving.served import ModelSet, ServedModel, ShadowTarget

log = logging.getLogger(__name__)

RELOAD_SIGNAL = "reload"  # a file in the metrics folder: touched by /reload, watched by every worker process
CATALOG_SIGNAL = "catalog"  # the same, for re-reading the model catalog
RELOAD_WATCH_SECONDS = 0.2
SPOOL_FULL_RETRY_AFTER = 5  # seconds a client is told to wait when the spool refuses (`serving_spool_full=refuse`)
OVERLOADED_RETRY_AFTER = 1  # ... when too many requests wait for the model or for their checks
# A body up to this size is checked on the event loop (well under a millisecond). A larger one is checked by
# the checking process first (`serving.checks`: its parsing never holds this process's interpreter lock), then,
# accepted, decoded in the checking thread; a flood of big or invalid bodies queues there (up to
# `serving_max_pending_checks`) while small valid requests and /health go on.
CHECK_ON_LOOP_BYTES = 64 * 1024
PREDICT_PATHS = frozenset({"/predict", "/invocations"})  # the default model's prediction paths


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
            max_queued=settings.serving_max_queued_requests,
        )
        self.rollouts = RolloutPath(self.batcher)
        self._tasks: list[asyncio.Task] = []
        self.online = OnlineFeatures(settings, self.metrics.registry)  # feature store lookups
        self._checks = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checks")
        self._checks_pending = 0
        self.checking: CheckingProcess | None = None  # started with the first large body

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
        """Every served model's followers (champion and challenger) check the registry now."""
        for served in list(self.models.models.values()):
            served.follower.wake()
            served.challenger.wake()

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

    def _scored(self, jobs: list[Job], columns: dict[str, np.ndarray], scores: np.ndarray, seconds: float) -> None:
        """After a batch call: count it for its model and log it (a rollout's shadow copy: in its shadow log)."""
        target: ServedModel | ShadowTarget = jobs[0].context or self.default
        rows = len(scores)
        if isinstance(target, ServedModel):
            target.batch_rows.observe(rows)
        if not any(job.shadow for job in jobs):  # the usual case
            if isinstance(target, ServedModel):
                target.records.inc(rows)
            self._log_predictions(target.log, jobs, columns, scores, seconds)
            return
        assert isinstance(target, ServedModel)  # a canary's champion call: its answers and its shadow copies
        answered, copies = split_shadow(jobs)
        target.records.inc(len(answered[1]))
        for log_of, (parts, at) in ((target.log, answered), (target.shadow.log, copies)):
            if at.size:
                self._log_predictions(log_of, parts, {k: v[at] for k, v in columns.items()}, scores[at], seconds)

    @staticmethod
    def _log_predictions(
        prediction_log: PredictionLog,
        jobs: list[Job],
        columns: dict[str, np.ndarray],
        scores: np.ndarray,
        seconds: float,
    ) -> None:
        request_seq = None  # one request: every row's is 0
        if len(jobs) == 1:  # the usual case: plain lists, no numpy call per request
            job = jobs[0]
            size = len(job.records)
            request_ids: list[str] = [job.request_id] * size
            record_ids = job.ids
            record_index: Any = range(size) if job.index is None else job.index
        else:
            request_ids = [job.request_id for job in jobs for _ in job.records]
            record_ids = None
            if any(job.ids is not None for job in jobs):
                record_ids = [i for job in jobs for i in (job.ids or [None] * len(job.records))]
            record_index = [i for job in jobs for i in (range(len(job.records)) if job.index is None else job.index)]
            # each request's place in the batch: two sent at once with one x-request-id stay two rows
            request_seq = [seq for seq, job in enumerate(jobs) for _ in job.records]
        model = jobs[0].model
        prediction_log.record(
            ScoredBatch(
                columns,
                scores,
                model.classes,
                request_ids,
                model.version,
                record_ids,
                record_index,
                request_seq,
                round(1e3 * seconds, 3),
            )
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
        await self.rollouts.stop()
        await self.batcher.stop()
        self._checks.shutdown(wait=True)
        if self.checking is not None:
            self.checking.stop()
        await self.models.stop()

    async def reload_model(self, name: str, timeout: float) -> dict[str, Any]:
        """Check model `name`'s alias now; then wait (up to `timeout`) until every process serves what this one does."""
        served = self.models.get(name)
        if served is None:  # it left the catalog meanwhile
            return {"changed": False, "version": None, "error": "not served any more", "workers": []}
        follower = served.follower
        # The challenger too: a rollout that ended (promoted or rolled back) leaves no challenger behind the new
        # champion until the next poll. Its failure is logged; the answer is the champion's.
        changed, challenged = await asyncio.gather(
            follower.check(force=True), served.challenger.check(force=True), return_exceptions=True
        )
        if isinstance(changed, BaseException):
            raise changed
        if isinstance(challenged, BaseException):
            log.error("%s: the challenger's check failed: %s", name, challenged)
        version = follower.current.version if follower.current else None
        if self.reload_signal is not None:
            by_pid = await self.all_serve(name, version, timeout)
        else:
            by_pid = {os.getpid(): version}
        workers = [{"pid": pid, "version": v} for pid, v in sorted(by_pid.items())]
        return {"changed": changed, "version": version, "error": follower.last_error, "workers": workers}

    def resolve(self, path: str) -> ServedModel | None:
        """The served model a prediction path is for: /predict and /invocations the default; None if not served."""
        if path in PREDICT_PATHS:
            return self.default
        return self.models.get(path.split("/", 3)[2])

    def not_served(self, name: str) -> dict[str, Any]:
        """The 404 answer's content for a model name this API does not serve."""
        served = self.models.names()
        return {"detail": f"model {name!r} is not served here; served models: {served}", "served": served}

    async def _checked(self, size: int, check: Callable[..., Any], *args: Any) -> Any:
        """`check(*args)`: on the event loop for a body of up to CHECK_ON_LOOP_BYTES, else in the checking thread.

        Raises Overloaded (a 503) when `serving_max_pending_checks` checks wait already.
        """
        if size <= CHECK_ON_LOOP_BYTES:
            return check(*args)
        with self._pending_check():
            return await asyncio.get_running_loop().run_in_executor(self._checks, check, *args)

    async def _checked_elsewhere(self, model: LoadedModel, body: bytes) -> None:
        """Raise the BadRequest the checking process finds in a large body (Overloaded when too many wait)."""
        with self._pending_check():
            if self.checking is None:
                self.checking = CheckingProcess()
                self.checking.start()
            await self.checking.check(model, body, self.settings.serving_max_records)

    @contextmanager
    def _pending_check(self) -> Iterator[None]:
        if self._checks_pending >= self.settings.serving_max_pending_checks:
            raise Overloaded(f"{self._checks_pending} large or invalid bodies wait for their checks: retry shortly")
        self._checks_pending += 1
        try:
            yield
        finally:
            self._checks_pending -= 1

    async def read_records(
        self, body: bytes, model: LoadedModel
    ) -> tuple[list[dict[str, Any]], list[str | None] | None]:
        """The body's records, validated against `model`, and their ids; raises BadRequest."""
        limit, size = self.settings.serving_max_records, len(body)
        if not model.feature_service:
            if size > CHECK_ON_LOOP_BYTES:
                await self._checked_elsewhere(model, body)  # refused there: never parsed in this process
            return await self._checked(size, decode_records, model, body, limit)
        key, raw = await self._checked(size, parse_records, body, limit)
        values = await self._checked(size, parsed, key, raw)
        # store features the records leave out come from the online store, by id
        try:
            values = await self.online.enrich(model.feature_service, model.id_field, key, values)
        except FeatureLookupError as exc:
            raise BadRequest(422, exc.errors) from exc
        records = await self._checked(size, validate_records, model, key, values)
        return records, record_ids(model, key, values)

    async def predict(self, scope: dict[str, Any], receive: Any) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
        """Answer one /predict (or /invocations, or /models/<name>/...) request from its ASGI scope.

        Returns status, JSON body, headers: 404 naming a model not served here, 503 for one not loaded. Used
        by `PredictPath` (ahead of FastAPI's routing) and by the FastAPI routes alike. Raises ClientGone when
        the client left before its body was read.
        """
        given_id, authorization, declared = predict_headers(scope)
        path = scope["path"]
        token = self.settings.serving_token
        if token is not None and (detail := token_problem(token, authorization, path[1:])) is not None:
            return 401, orjson.dumps({"detail": detail}), [*JSON_HEADERS, (b"www-authenticate", b"Bearer")]
        request_id = given_id or uuid.uuid4().hex
        served = self.resolve(path)
        if served is None:
            return encoded_answer(404, self.not_served(path.split("/", 3)[2]) | {"request_id": request_id}, request_id)
        follower = served.follower
        model = follower.current  # this request finishes on this model, whatever is swapped meanwhile
        if model is None:
            error = follower.last_error
            detail = f"not serving: {error}" if error else f"no model loaded yet for {follower.following}"
            return encoded_answer(503, {"detail": detail, "request_id": request_id}, request_id)
        explain = bool(scope.get("query_string")) and explain_asked(scope["query_string"])
        try:
            if explain and model.baseline is None:
                why = "no baseline was stored with it"
                raise BadRequest.at(422, ["query", "explain"], f"v{model.version} cannot explain: {why}", "explain")
            body = await self._receive(receive, declared)
            records, ids = await self.read_records(body, model)
            if explain and len(records) > (most := self.settings.serving_max_explain_records):
                msg = f"explaining {len(records)} records is over the limit of {most}: send fewer, or no explain"
                raise BadRequest.at(413, ["query", "explain"], msg, "too_large")
            rollout = None if explain else served.rollout(model)  # an explained request: the champion answers
            if rollout is not None:
                return encoded_answer(
                    200, await self.rollouts.answer(served, rollout, model, records, ids, request_id), request_id
                )
            scored = await self.batcher.score(model, records, request_id, ids, served)
            explained = await asyncio.to_thread(explain_records, model, records, scored.scores) if explain else None
        except ClientGone:
            raise
        except Exception as exc:
            return _failed(exc, request_id)
        answered = answer(model, scored.scores, request_id)
        if explained is not None:
            for prediction, extra in zip(answered["predictions"], explained, strict=True):
                prediction.update(extra)
        return encoded_answer(200, answered, request_id)

    async def _receive(self, receive: Any, declared: int) -> bytes:
        """The request body (413 over the size limit), or a 408 when it does not arrive in time."""
        seconds = self.settings.serving_body_timeout_seconds
        try:
            async with asyncio.timeout(seconds):
                return await receive_body(receive, declared, self.settings.serving_max_body_bytes)
        except TimeoutError as exc:
            msg = f"not received within {seconds:g} s (serving_body_timeout_seconds)"
            raise BadRequest.at(408, ["body"], msg, "timeout") from exc


def split_shadow(jobs: list[Job]) -> tuple[tuple[list[Job], np.ndarray], tuple[list[Job], np.ndarray]]:
    """The jobs' answered records and their shadow copies, each as jobs of those records and their rows in the batch."""
    answered: list[Job] = []
    copies: list[Job] = []
    answered_rows: list[int] = []
    copy_rows: list[int] = []
    start = 0
    for job in jobs:
        places = job.index if job.index is not None else list(range(len(job.records)))
        shadow = job.shadow or frozenset()
        for into, rows, keep in ((answered, answered_rows, False), (copies, copy_rows, True)):
            at = [i for i in range(len(job.records)) if (i in shadow) == keep]
            if at:
                ids = None if job.ids is None else [job.ids[i] for i in at]
                records = [job.records[i] for i in at]
                into.append(replace(job, records=records, ids=ids, index=[places[i] for i in at], shadow=None))
                rows.extend(start + i for i in at)
        start += len(job.records)
    return (answered, np.asarray(answered_rows, dtype=np.int64)), (copies, np.asarray(copy_rows, dtype=np.int64))


def _failed(exc: Exception, request_id: str) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
    """The answer to a request that raised: its 4xx, 503 (the spool's `refuse` policy) or 500 (logged)."""
    if isinstance(exc, BadRequest):
        return encoded_answer(exc.status, {"detail": exc.errors, "request_id": request_id}, request_id)
    if isinstance(exc, PredictionNotLogged | Overloaded):
        wait = SPOOL_FULL_RETRY_AFTER if isinstance(exc, PredictionNotLogged) else OVERLOADED_RETRY_AFTER
        status, body, headers = encoded_answer(503, {"detail": str(exc), "request_id": request_id}, request_id)
        return status, body, [*headers, (b"retry-after", str(wait).encode())]
    log.error("request %s failed", request_id, exc_info=exc)
    detail = f"prediction failed: {type(exc).__name__}"
    return encoded_answer(500, {"detail": detail, "request_id": request_id}, request_id)


def worker_count(settings: Settings) -> int:
    """Serving processes to run: `serving_workers`, or one per CPU core when it is 0."""
    return settings.serving_workers or os.cpu_count() or 1


def _mtime(path: os.PathLike | None) -> float | None:
    try:
        return os.stat(path).st_mtime_ns if path is not None else None
    except FileNotFoundError:
        return None
