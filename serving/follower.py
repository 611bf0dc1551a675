"""Follow the registry alias: load the new champion in the background and swap it in atomically.

The served model is one reference, replaced in a single assignment once the new version is fully
loaded and has passed a test prediction; a request holds the reference it started with, so in-flight
requests finish on their model. A version that fails to load is logged and counted, the old model
keeps serving, and the failed version is retried only after a back-off (or when asked by /reload).
When the alias is gone (deleted, e.g. a reverted cold start, or the model deleted), nothing is presented
as champion any more: `current` becomes None, so /ready and /predict answer 503 saying why.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from adapters.alerts import emit_refused
from adapters.clients import mlflow_client, use_tracking_server
from adapters.registry import aliases_of
from adapters.rollout_store import read_rollout
from adapters.settings import Settings
from core.modeling.signature import ModelLoadError
from core.rollout import CHALLENGER, CutOff, RolloutState
from serving.model import LoadedModel, load_version

log = logging.getLogger(__name__)

RETRY_FAILED_AFTER = 60.0


class ChampionFollower:
    """Keeps `current` on the version the alias points at.

    Args:
        settings: Registry address, alias, poll interval and the default model name.
        name: The registered model to follow; None: the settings' `serving_model`.
        on_reload: Called with "success" or "failure" after each load attempt (metrics).
        on_swap: Called with the new model after a swap.
        on_unset: Called when the served model is dropped because the alias is gone.
        alias: The alias to follow; None: the settings' `serving_alias` (`champion`).
    """

    def __init__(
        self,
        settings: Settings,
        name: str | None = None,
        on_reload: Callable[[str], None] | None = None,
        on_swap: Callable[[LoadedModel], None] | None = None,
        on_unset: Callable[[], None] | None = None,
        alias: str | None = None,
    ) -> None:
        self.settings = settings
        self.name = name or settings.serving_model
        self.alias = alias or settings.serving_alias
        self.current: LoadedModel | None = None
        self.last_error: str | None = None
        self.on_reload = on_reload or (lambda result: None)
        self.on_swap = on_swap or (lambda model: None)
        self.on_unset = on_unset or (lambda: None)
        self._failed: tuple[str, float] | None = None
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self.checked = asyncio.Event()  # set after the first check (loaded, failed, or no alias)
        self._client: Any = None

    @property
    def following(self) -> str:
        """`<model>@<alias>`."""
        return f"{self.name}@{self.alias}"

    def _registry(self) -> Any:
        if self._client is None:
            use_tracking_server(self.settings)  # models are loaded with MLflow's fluent API (models:/ URIs)
            self._client = mlflow_client(self.settings)
        return self._client

    def _alias_version(self) -> str | None:
        return aliases_of(self._registry(), self.name).get(self.alias)

    async def check(self, force: bool = False) -> bool:
        """Look at the alias once and swap if it moved; returns True when the served model changed."""
        async with self._lock:
            try:
                version = await asyncio.to_thread(self._alias_version)
            except Exception as exc:  # registry down: keep serving what we have
                self.last_error = f"registry unreachable: {type(exc).__name__}: {exc}"
                log.warning("cannot read %s from the registry: %s", self.following, exc)
                return False
            if version is None:
                return self._alias_gone()
            if self.current is not None and version == self.current.version:
                return False
            failed = self._failed
            if not force and failed is not None and failed[0] == version and time.monotonic() < failed[1]:
                return False
            log.info("%s now points at v%s; loading it", self.following, version)
            try:
                model = await asyncio.to_thread(load_version, self._client, self.name, version, self.settings)
            except ModelLoadError as exc:
                alert = exc.refused and (self._failed is None or self._failed[0] != version)  # once a version
                self._failed = (version, time.monotonic() + RETRY_FAILED_AFTER)
                self.last_error = str(exc)
                self.on_reload("failure")
                served = f"v{self.current.version}" if self.current else "no model"
                log.error("not switching to v%s, still serving %s: %s", version, served, exc)
                if alert:  # after the state says why: emitting the event may take a moment
                    await asyncio.to_thread(emit_refused, self.name, version, str(exc), "serving")
                return False
            previous, self.current = self.current, model  # the swap: one reference assignment
            self._failed, self.last_error = None, None
            self.on_reload("success")
            self.on_swap(model)
            log.info("serving %s v%s (was %s)", self.name, model.version, previous.version if previous else "none")
            return True

    def _alias_gone(self) -> bool:
        """Stop presenting a model the alias no longer names; True when one was being served."""
        gone = f"{self.following} is not set in the registry (alias deleted or model deleted)"
        if self.current is None:
            self.last_error = f"{gone}: nothing to serve"
            return False
        self.last_error = f"{gone}: stopped serving v{self.current.version}, which is no longer the champion"
        log.error("%s", self.last_error)
        self.current = None
        self.on_unset()
        return True

    def wake(self) -> None:
        """Ask the poll loop to check now."""
        self._wake.set()

    async def run(self) -> None:
        """Poll forever (cancel to stop); `checked` is set once the first look at the alias is done."""
        while True:
            await self.check()
            self.checked.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self.settings.serving_poll_seconds)
            self._wake.clear()


class ChallengerFollower(ChampionFollower):
    """Follows the `challenger` alias and the rollout's state beside it (one registry read per poll).

    `current` is the loaded challenger (None when there is none: the usual case, not an error); `state` the
    rollout (`core.rollout.RolloutState`) and `cut_off` a cut-off any serving process recorded.
    """

    def __init__(self, settings: Settings, name: str, on_reload: Callable[[str], None] | None = None) -> None:
        super().__init__(settings, name, on_reload=on_reload, alias=CHALLENGER)
        self.state: RolloutState | None = None
        self.cut_off: CutOff | None = None

    def _alias_version(self) -> str | None:
        self.state, self.cut_off, aliases = read_rollout(self.settings, self.name, self._registry())
        return aliases.get(self.alias)

    def _alias_gone(self) -> bool:
        """No challenger: nothing to say (a rollout ended, or none started)."""
        self.last_error = None
        if self.current is None:
            return False
        log.info("%s: v%s is no longer the challenger", self.name, self.current.version)
        self.current = None
        return True
