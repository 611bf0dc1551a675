"""Adaptive micro-batching: requests that arrive while a prediction runs are scored together next.

A pipeline's `predict_proba` (or a regressor's `predict`) costs about the same for 1 row as for 1,000
(the cost is per call), so scoring concurrent requests in one call multiplies throughput. Nothing waits
on a timer: when the queue is empty a request is scored at once (single-client latency stays that of one
call); while a call runs, newcomers queue up and are taken together. Each request keeps the model it started with,
so a batch only ever mixes requests of the same model.

A fast model (a compiled one: well under a millisecond per call) is scored inline on the event loop when
nothing is queued or running: handing it to the worker thread and back would cost more than the call.
Whether a model is fast is measured, per model, on its previous calls; a slow one always goes to the thread.
Never inline when logging a batch waits for the disk (`inline=False`: the spool's `always` sync mode): an
fdatasync on the event loop would stall every request, one at a time, instead of the thread syncing the
requests that queued meanwhile together (group commit).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from serving.model import LoadedModel
from serving.prediction_log import PredictionNotLogged

log = logging.getLogger(__name__)

# Estimated cost below which an idle batcher scores on the event loop itself. A thread hand-off costs
# about 0.05-0.1 ms; blocking the loop for up to this long delays other requests by no more than that.
INLINE_BELOW_SECONDS = 0.001
# A model's cost is the fastest of its recent calls, allowed to creep up by this factor per call: a call
# slowed down by a busy machine (pre-empted, a GC pause) does not send the next ones through the thread,
# while a model that really got slower is noticed within a few dozen calls.
COST_CREEP = 1.05
# Measured costs kept (a model has one per size class it was called with, ~15 at most): enough for dozens of
# served models; beyond it (models swapped out since) they are all forgotten and measured again.
COSTS_KEPT = 1024


class Overloaded(Exception):
    """More work waits than the server takes: answered 503 with `Retry-After` (nothing was scored or logged)."""


@dataclass
class Job:
    """One request's records waiting to be scored."""

    model: LoadedModel
    records: list[dict[str, Any]]
    request_id: str
    future: asyncio.Future | None = field(repr=False)  # None when scored inline (nobody waits)
    ids: list[str | None] | None = None  # each record's id, when the model has an id field
    # What the caller scores for (e.g. the served model's prediction log), handed back to `on_scored`
    context: Any = field(default=None, repr=False)
    index: list[int] | None = None  # each record's place in its request, when these are part of one
    shadow: frozenset[int] | None = None  # positions (in `records`) scored as a rollout's shadow copy, not answered


@dataclass(frozen=True)
class Scored:
    """What a batch call returns for one request: its rows of the model's scores (see `LoadedModel.scores`)."""

    scores: np.ndarray
    batch_rows: int
    seconds: float = 0.0  # the model call that scored it (its whole batch), queueing left out


class MicroBatcher:
    """Queue of jobs scored by one worker thread, batching whatever is waiting.

    Args:
        max_rows: Largest batch one call scores (a larger single request is still scored alone).
        on_scored: Called in the worker thread after each successful batch with the jobs, their columns
            (`LoadedModel.columns_of`), scores (probabilities, or a regressor's values) and the call's seconds
            for prediction logging; its errors are logged and never fail a request.
        inline: Whether a model measured fast may be scored (and `on_scored` called) on the event loop;
            False when `on_scored` waits for the disk.
        max_queued: Requests that may wait at once; one more raises `Overloaded` (nothing queued, a 503).
    """

    def __init__(
        self,
        max_rows: int = 20_000,
        on_scored: Callable[[list[Job], Any, np.ndarray, float], None] | None = None,
        on_batch: Callable[[int], None] | None = None,
        threads: int = 1,
        inline: bool = True,
        max_queued: int = 1024,
    ) -> None:
        self.max_rows = max_rows
        self.max_queued = max_queued
        self.inline = inline
        self.on_scored = on_scored
        self.on_batch = on_batch
        self._queue: asyncio.Queue[Job] | None = None
        self._executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="predict", initializer=_limit_threads, initargs=(threads,)
        )
        self._task: asyncio.Task | None = None
        self._threads = threads
        self._busy = False  # a batch is being scored in the worker thread
        # (model.serial, rows.bit_length()) -> estimated seconds of a call: per model and size class (1, 2-3,
        # 4-7, ... rows), as a call costs about the same for a few rows and more for hundreds. Keyed by the
        # serial, never reused, not id(): a model loaded later may get a freed model's id, not its rating.
        self._cost: dict[tuple[int, int], float] = {}

    def start(self) -> None:
        """Start the worker on the running event loop."""
        _limit_threads(self._threads)  # inline calls run on the loop's thread: the same OpenMP cap there
        self._queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="micro-batcher")

    async def stop(self) -> None:
        """Stop the worker; jobs still queued fail with a clear error."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        while self._queue is not None and not self._queue.empty():
            job = self._queue.get_nowait()
            if not job.future.done():
                job.future.set_exception(RuntimeError("the server is shutting down"))
        self._executor.shutdown(wait=True)

    async def score(  # noqa: PLR0913 - a job's parts, each named
        self,
        model: LoadedModel,
        records: list[dict[str, Any]],
        request_id: str,
        ids: list[str | None] | None = None,
        context: Any = None,
        *,
        index: list[int] | None = None,
        shadow: frozenset[int] | None = None,
    ) -> Scored:
        """Queue `records` (with their ids, if any) for `model` and wait for their scores.

        `context` comes back with the job to `on_scored`: requests of one model with the same context are scored
        together (a model's answers and its rollout's shadow copies are not). `index`: the records' places in
        their request, when they are part of one (a canary's split); `shadow`: positions whose rows are a rollout's
        shadow copy (logged apart, never answered).
        """
        assert self._queue is not None, "start() first"
        if self.inline and not self._busy and self._queue.empty() and self._cheap(model, len(records)):
            scores, seconds = self._predict([Job(model, records, request_id, None, ids, context, index, shadow)])
            return Scored(scores, len(scores), seconds)
        if self._queue.qsize() >= self.max_queued:
            raise Overloaded(f"{self._queue.qsize()} requests wait for the model already (the limit): retry shortly")
        future = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(Job(model, records, request_id, future, ids, context, index, shadow))
        return await future

    async def _run(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            first = await self._queue.get()
            pending = [first]
            rows = len(first.records)
            while not self._queue.empty() and rows < self.max_rows:
                job = self._queue.get_nowait()
                pending.append(job)
                rows += len(job.records)
            # Group by model: requests keep the model they started with, even across a swap; and by context (a
            # model's answers and a rollout's shadow copies go to different logs). A job nobody waits for any
            # more (its caller gave up: a challenger past its time) is not scored.
            groups: dict[tuple[int, int], list[Job]] = {}
            for job in pending:
                if job.future is not None and job.future.done():
                    continue
                groups.setdefault((id(job.model), id(job.context)), []).append(job)
            self._busy = True
            try:
                for jobs in groups.values():
                    await self._score_group(loop, jobs)
            finally:
                self._busy = False

    def _cheap(self, model: LoadedModel, rows: int) -> bool:
        """True when `model`'s estimated cost of a call with about `rows` rows is below INLINE_BELOW_SECONDS."""
        return self._cost.get((model.serial, rows.bit_length()), float("inf")) < INLINE_BELOW_SECONDS

    async def _score_group(self, loop: asyncio.AbstractEventLoop, jobs: list[Job]) -> None:
        try:
            scores, seconds = await loop.run_in_executor(self._executor, self._predict, jobs)
        except Exception as exc:
            if len(jobs) == 1 or isinstance(exc, PredictionNotLogged):  # one by one would not be logged either
                for job in jobs:
                    _fail(job, exc)
                return
            # One bad request must not fail its neighbours: score each on its own.
            log.warning("batch of %d requests failed (%s); scoring them one by one", len(jobs), exc)
            for job in jobs:
                await self._score_group(loop, [job])
            return
        start = 0
        for job in jobs:
            end = start + len(job.records)
            if not job.future.done():
                job.future.set_result(Scored(scores[start:end], len(scores), seconds))
            start = end

    def _predict(self, jobs: list[Job]) -> tuple[np.ndarray, float]:
        """Score the jobs in one call; their scores and the call's seconds (after `on_scored` logged them)."""
        model = jobs[0].model
        records = jobs[0].records if len(jobs) == 1 else [r for job in jobs for r in job.records]
        started = time.perf_counter()
        columns = model.columns_of(records)
        scores = model.scores(columns)
        elapsed = time.perf_counter() - started
        rows = len(records)
        key = (model.serial, rows.bit_length())
        previous = self._cost.get(key)
        if previous is None and len(self._cost) > COSTS_KEPT:  # models served before a swap: forget them
            self._cost.clear()
        self._cost[key] = elapsed if previous is None else min(elapsed, previous * COST_CREEP)
        if self.on_batch is not None:
            self.on_batch(rows)
        log.debug("scored %d rows for %d requests in %.2f ms", rows, len(jobs), 1e3 * elapsed)
        if self.on_scored is not None:
            try:
                self.on_scored(jobs, columns, scores, elapsed)
            except PredictionNotLogged:  # the spool's `refuse` policy: these requests are not answered
                raise
            except Exception:  # otherwise logging predictions never fails a request
                log.exception("recording predictions failed")
        return scores, elapsed


def _limit_threads(threads: int) -> None:
    """Cap OpenMP/BLAS threads of model calls made from this thread.

    Measured here (2 cores, a busy machine): a gradient-boosting pipeline's 1-row `predict_proba` took
    29 ms with OpenMP's default threads and 7 ms with one; the server's own threads need the other core.
    OpenMP's limit is per calling thread, so it is set in the prediction thread itself.
    """
    from threadpoolctl import threadpool_limits

    threadpool_limits(threads)


def _fail(job: Job, exc: Exception) -> None:
    if not job.future.done():
        job.future.set_exception(exc)
