"""Prefect global concurrency limits used as locks: one slot per model for decide-and-promote and rollback."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime

log = logging.getLogger(__name__)


def promotion_lock_name(model_name: str) -> str:
    """Name of the Prefect global concurrency limit that serialises decide-and-promote per model."""
    return f"promotion-{model_name}"


def ensure_lock(name: str) -> str:
    """Create the one-slot limit `name` if missing (idempotent); returns the name."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(name, limit=1)
    return name


@dataclass
class Held:
    """How a lock was held: how long it took to get, when it was taken and given back (UTC)."""

    name: str
    waited_seconds: float = 0.0
    acquired_at: datetime | None = None
    released_at: datetime | None = None

    def tags(self) -> dict[str, str]:
        """The timing as run tags (`lock.wait_seconds`, `lock.acquired_at`, `lock.released_at`)."""
        stamps = {"acquired_at": self.acquired_at, "released_at": self.released_at}
        return {"lock.wait_seconds": f"{self.waited_seconds:.3f}"} | {
            f"lock.{key}": value.isoformat(timespec="microseconds") for key, value in stamps.items() if value
        }


@contextmanager
def hold(name: str, timeout_seconds: float) -> Iterator[Held]:
    """Hold the one slot of `name` for the block (waits up to `timeout_seconds`, then raises).

    Yields a `Held` that says how long the wait was (logged too), filled in with the release time on exit.
    """
    from prefect.concurrency.sync import concurrency

    held = Held(name)
    start = time.monotonic()
    with concurrency(name, occupy=1, strict=True, timeout_seconds=timeout_seconds):
        held.waited_seconds = time.monotonic() - start
        held.acquired_at = datetime.now(UTC)
        log.info("lock %s acquired after waiting %.2f s", name, held.waited_seconds)
        try:
            yield held
        finally:
            held.released_at = datetime.now(UTC)
