"""The models one serving process serves: the default model and every served catalog model, each on its own.

The default model (`serving_model`) is always served. The catalog (`adapters.catalog`) adds every model whose
config says `operations.served: true`; it is re-read every `serving_catalog_poll_seconds` and when asked
(`/reload`). A model that joins gets its follower (`ChampionFollower`, its own poll and hot swap) and its own
prediction log (spool folder `<state>/spool/<model>/`, S3 prefix `predictions/serving/<model>/`); one that
leaves the catalog (and is not the default) is dropped at once from the routes, then its follower stops and
its log uploads what it holds. A catalog that cannot be read keeps the current set (a warning), never drops
a model.

What one served model costs a process: its loaded champion (the pipeline, its compiled form if any, the
explanation baseline, the record schema), an MLflow client, and its log's two threads and spool folder. The
prediction thread, the micro-batcher and the spool's converter process are shared by all models.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from adapters.catalog import served_models
from adapters.rollout_store import record_cut_off
from adapters.settings import Settings
from core.monitoring.prediction_log import SERVING, SHADOW
from core.rollout import CutOff, RolloutState
from serving.follower import ChallengerFollower, ChampionFollower
from serving.metrics import ServingMetrics
from serving.model import LoadedModel
from serving.prediction_log import MemoryPredictionLog, PredictionLog, SpooledPredictionLog
from serving.rollout import ActiveRollout

log = logging.getLogger(__name__)

DEFAULT_FIRST_SECONDS = 60.0


def prediction_log_for(settings: Settings, name: str, metrics: ServingMetrics, stream: str = SERVING) -> PredictionLog:
    """Model `name`'s prediction log (the spool, or the in-memory buffer), counting into its metrics.

    `stream` shadow: the log of its rollout's outputs that answered nobody (counted under `<model>:shadow`).
    """
    label = name if stream == SERVING else f"{name}:{stream}"

    def on_event(kind: str, rows: int) -> None:
        metrics.prediction_log.labels(label, kind).inc(rows)

    if settings.serving_spool:
        return SpooledPredictionLog(
            settings,
            name,
            flush_seconds=settings.serving_log_flush_seconds,
            on_event=on_event,
            on_spool_bytes=metrics.spool_bytes.labels(label).set,
            stream=stream,
        )
    return MemoryPredictionLog(
        settings,
        name,
        flush_seconds=settings.serving_log_flush_seconds,
        max_rows=settings.serving_log_max_rows,
        on_event=on_event,
        stream=stream,
    )


@dataclass(frozen=True)
class ShadowTarget:
    """Where a rollout's shadow copies are logged (the micro-batcher's context for them): the shadow log."""

    log: PredictionLog


class ServedModel:
    """One served model in this process: its champion follower, prediction log and metric series.

    And for rollouts (`serving.rollout`): its challenger follower and its shadow log.

    Args:
        settings: The serving settings (alias, poll interval, the log's).
        name: The registered model.
        metrics: The process's metrics.
        on_swap: Called with the new model after each swap.
    """

    def __init__(
        self, settings: Settings, name: str, metrics: ServingMetrics, on_swap: Callable[[LoadedModel], None]
    ) -> None:
        self.name = name
        self.log = prediction_log_for(settings, name, metrics)
        self.follower = ChampionFollower(
            settings,
            name=name,
            on_reload=lambda result: metrics.reloads.labels(name, result).inc(),
            on_swap=on_swap,
            on_unset=lambda: metrics.not_served(name),
        )
        self.challenger = ChallengerFollower(
            settings, name, on_reload=lambda result: metrics.reloads.labels(f"{name}:challenger", result).inc()
        )
        self.shadow = ShadowTarget(prediction_log_for(settings, name, metrics, SHADOW))
        self.settings = settings
        self.metrics = metrics
        self.records = metrics.records.labels(name)
        self.batch_rows = metrics.batch_rows.labels(name)
        self._tasks: list[asyncio.Task] = []
        self._active: ActiveRollout | None = None
        self._cut: dict[str, str] = {}  # rollout id -> why this process cut its challenger off

    async def start(self) -> None:
        """Open its logs and start following its aliases."""
        await asyncio.gather(asyncio.to_thread(self.log.start), asyncio.to_thread(self.shadow.log.start))
        self._tasks = [
            asyncio.create_task(self.follower.run(), name=f"follower-{self.name}"),
            asyncio.create_task(self.challenger.run(), name=f"challenger-{self.name}"),
        ]

    async def stop(self) -> None:
        """Stop following, then upload what its logs hold and release their spool folders."""
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await asyncio.gather(asyncio.to_thread(self.log.stop), asyncio.to_thread(self.shadow.log.stop))

    def rollout(self, champion: LoadedModel) -> ActiveRollout | None:
        """The rollout this process applies to a request answered by `champion` now; None: the champion alone.

        Applied while the loaded challenger is the rollout's version, the champion the one it is compared with, and
        no process cut it off.
        """
        challenger, state = self.challenger.current, self.challenger.state
        if challenger is None or state is None or state.mode == "direct":
            return None
        if state.version != challenger.version or state.champion != champion.version or state.id in self._cut:
            return None
        cut = self.challenger.cut_off
        if cut is not None and cut.rollout == state.id:
            return None
        active = self._active
        if active is None or active.state.id != state.id or active.challenger is not challenger:
            budget = state.rules.latency_budget_ms / 1e3  # validated once per rollout, not per request
            active = self._active = ActiveRollout(state, challenger, budget)
        return active

    def cut_off(self, state: RolloutState, reason: str) -> None:
        """Stop using the challenger in this process for the rest of rollout `state`, and record why (once)."""
        if state.id in self._cut:
            return
        self._cut[state.id] = reason
        self.metrics.cut_offs.labels(self.name).inc()
        log.error("%s: challenger v%s cut off for the rest of its rollout: %s", self.name, state.version, reason)
        cut = CutOff(state.id, reason, pid=os.getpid())
        task = asyncio.get_running_loop().run_in_executor(None, record_cut_off, self.settings, state, cut)
        task.add_done_callback(_log_failure)

    def count_rollout(self, version: str, role: str, records: int) -> None:
        """Count records of a rollout by role (`GET /models` shows the sums)."""
        self.metrics.rollout_records.labels(self.name, version, role).inc(records)

    def rollout_summary(self) -> dict[str, Any] | None:
        """What `GET /models` and `/model` say about its challenger and rollout; None when there is none."""
        state, challenger = self.challenger.state, self.challenger.current
        if state is None and challenger is None:
            return None
        cut = self.challenger.cut_off
        cut_reason = cut.reason if cut is not None and state is not None and cut.rollout == state.id else None
        cut_reason = cut_reason or (self._cut.get(state.id) if state is not None else None)
        champion = self.follower.current
        if state is None:
            status = "no rollout state: not applied"
        elif cut_reason is not None:
            status = "cut off"
        elif challenger is None or challenger.version != state.version:
            status = "loading the challenger" if self.challenger.last_error is None else "challenger not loadable"
        elif champion is None or champion.version != state.champion:
            status = "stale: the champion moved since it started"
        else:
            status = "active"
        version = state.version if state is not None else challenger.version if challenger else None
        return {
            "version": version,
            "loaded": challenger.version if challenger else None,
            "mode": state.mode if state else None,
            "share": state.share if state else None,
            "since": state.since if state else None,
            "champion": state.champion if state else None,
            "status": status,
            "cut_off": cut_reason,
            "last_error": self.challenger.last_error,
            "volume": self.metrics.rollout_volume(self.name, version) if version else {},
        }

    async def retire(self) -> None:
        """Stop serving it for good (it left the catalog): `stop`, and its gauges say it is not served."""
        await self.stop()
        self.metrics.forget(self.name)

    def summary(self, live: set[int], served: dict[int, str]) -> dict[str, Any]:
        """What `GET /models` lists about it; `served`: pid -> version of the processes serving it."""
        model = self.follower.current
        return {
            "name": self.name,
            "alias": self.follower.alias,
            "version": model.version if model else None,
            "task": model.task if model else None,
            "inference": model.form if model else None,
            "last_error": self.follower.last_error,
            "workers": workers_of(live, served),
            "challenger": self.rollout_summary(),
        }


def _log_failure(done: asyncio.Future) -> None:
    if (exc := done.exception()) is not None:
        log.warning("recording a cut-off in the registry failed: %s", exc)


def workers_of(live: set[int], served: dict[int, str]) -> list[dict[str, Any]]:
    """Every live process with the version of one model it serves (None: not loaded there)."""
    return [{"pid": pid, "version": served.get(pid)} for pid in sorted(live | set(served))]


class ModelSet:
    """The models this process serves, by name (the default first), kept in step with the catalog.

    Args:
        settings: The default model, the catalog's bucket and its poll interval.
        make: Builds a (not yet started) served model for a name.
        read_catalog: The served catalog model names (`adapters.catalog.served_models`).
    """

    def __init__(
        self,
        settings: Settings,
        make: Callable[[str], ServedModel],
        read_catalog: Callable[[Settings], list[str]] = served_models,
    ) -> None:
        self.settings = settings
        self.default = make(settings.serving_model)
        self.models: dict[str, ServedModel] = {self.default.name: self.default}
        self.catalog_error: str | None = None
        self._make = make
        self._read_catalog = read_catalog
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()

    def get(self, name: str) -> ServedModel | None:
        """The served model `name`, None when it is not served here."""
        return self.models.get(name)

    def names(self) -> list[str]:
        """The served model names, the default first."""
        return list(self.models)

    async def refresh(self) -> bool:
        """Read the catalog and serve what it says now; False (nothing changed) when it cannot be read."""
        async with self._lock:
            try:
                names = await asyncio.to_thread(self._read_catalog, self.settings)
            except Exception as exc:  # S3 down: keep serving every model we have
                self.catalog_error = f"catalog unreadable: {type(exc).__name__}: {exc}"[:500]
                log.warning("cannot read the model catalog, keeping %s: %s", self.names(), exc)
                return False
            self.catalog_error = None
            wanted = [self.default.name, *(n for n in names if n != self.default.name)]
            gone = [self.models.pop(name) for name in list(self.models) if name not in wanted]  # 404 from now on
            for name in wanted:
                if name not in self.models:
                    await self._add(name)
        for served in gone:
            log.info("%s left the catalog: no longer served", served.name)
            await served.retire()
        return True

    async def _add(self, name: str) -> None:
        served = self._make(name)
        await served.start()
        self.models[name] = served
        log.info("serving %s at /models/%s/ (from the catalog)", served.follower.following, name)

    def wake(self) -> None:
        """Ask the poll loop to read the catalog now."""
        self._wake.set()

    async def run(self) -> None:
        """Read the catalog every `serving_catalog_poll_seconds` (or when woken) forever (cancel to stop).

        The first read waits (up to `DEFAULT_FIRST_SECONDS`) until the default model's first load is done, so a
        long catalog does not hold back what /predict and /ready answer with.
        """
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.default.follower.checked.wait(), timeout=DEFAULT_FIRST_SECONDS)
        while True:
            await self.refresh()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self.settings.serving_catalog_poll_seconds)
            self._wake.clear()

    async def start(self) -> None:
        """Start serving the default model (the catalog's models come with `run`)."""
        await self.default.start()

    async def stop(self) -> None:
        """Stop every served model (their logs upload what they hold)."""
        async with self._lock:
            await asyncio.gather(*(served.stop() for served in self.models.values()))
