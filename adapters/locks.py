"""Prefect global concurrency limits used as locks: one slot per model for decide-and-promote and rollback.

Also the test-only pause hook (`pause_at`) at the checkpoints of a champion change (before the lock, before
the promotion, after the champion alias moved), where fault-injection tests kill a server or release runs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from adapters.settings import get_settings

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


def pause_at(checkpoint: str) -> None:
    """Test-only fault hook: wait at `checkpoint` when `MLOPS_TEST_PAUSE_AT` names it.

    Creates `<MLOPS_TEST_PAUSE_FILE>.reached`, then waits (up to 10 minutes) for `MLOPS_TEST_PAUSE_FILE` to
    appear, so a fault-injection test can kill a server at an exact point of a real run. Unset: no effect.
    """
    settings = get_settings()
    if settings.test_pause_at != checkpoint or settings.test_pause_file is None:
        return
    release = Path(settings.test_pause_file)
    Path(f"{release}.reached").write_text(checkpoint)
    log.warning("test pause at %r: waiting for %s", checkpoint, release)
    deadline = time.monotonic() + 600
    while not release.exists() and time.monotonic() < deadline:
        time.sleep(0.2)


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

    pause_at("before-lock")
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
