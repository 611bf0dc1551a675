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
from collections.abc import Callable
from typing import Any

from adapters.catalog import served_models
from adapters.settings import Settings
from serving.follower import ChampionFollower
from serving.metrics import ServingMetrics
from serving.model import LoadedModel
from serving.prediction_log import MemoryPredictionLog, PredictionLog, SpooledPredictionLog

log = logging.getLogger(__name__)

DEFAULT_FIRST_SECONDS = 60.0


def prediction_log_for(settings: Settings, name: str, metrics: ServingMetrics) -> PredictionLog:
    """Model `name`'s prediction log (the spool, or the in-memory buffer), counting into its metrics."""

    def on_event(kind: str, rows: int) -> None:
        metrics.prediction_log.labels(name, kind).inc(rows)

    if settings.serving_spool:
        return SpooledPredictionLog(
            settings,
            name,
            flush_seconds=settings.serving_log_flush_seconds,
            on_event=on_event,
            on_spool_bytes=metrics.spool_bytes.labels(name).set,
        )
    return MemoryPredictionLog(
        settings,
        name,
        flush_seconds=settings.serving_log_flush_seconds,
        max_rows=settings.serving_log_max_rows,
        on_event=on_event,
    )


class ServedModel:
    """One served model in this process: its champion follower, prediction log and metric series.

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
        self.metrics = metrics
        self.records = metrics.records.labels(name)
        self.batch_rows = metrics.batch_rows.labels(name)
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        """Open its log and start following its alias."""
        await asyncio.to_thread(self.log.start)
        self._task = asyncio.create_task(self.follower.run(), name=f"follower-{self.name}")

    async def stop(self) -> None:
        """Stop following, then upload what its log holds and release its spool folder."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await asyncio.to_thread(self.log.stop)

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
        }


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
