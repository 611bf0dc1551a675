"""Prefect global concurrency limits as locks: a slot per model (promotion, rollback), one per scoring output.

A slot is held under a lease that a background thread renews (Prefect's own renewal, at 3/4 of the lease);
when renewal fails the holder's block is cancelled. Before a write the lock guards (the champion alias move),
the holder confirms its lease (`confirm_held`): renewed now, so it cannot expire during the write, or refused,
so a holder whose lease lapsed (another holder may have the lock now) stops instead of writing.

Also the test-only pause hook (`pause_at`) at the checkpoints of a champion change (before the lock, before
the promotion, before and after the champion alias moves), where fault-injection tests kill a server or
release runs.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from uuid import UUID

from adapters.settings import get_settings
from core.errors import PermanentError

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
    leases = {name: str(held.lease_id) for name, held in _HELD.get().items()}  # what a test may revoke
    Path(f"{release}.reached").write_text(json.dumps({"checkpoint": checkpoint, "leases": leases}))
    log.warning("test pause at %r: waiting for %s", checkpoint, release)
    deadline = time.monotonic() + 600
    while not release.exists() and time.monotonic() < deadline:
        time.sleep(0.2)


class LockLost(PermanentError):
    """The lock's lease could not be confirmed (it lapsed or was revoked): the guarded write was not made."""


@dataclass
class Held:
    """How a lock was held: how long it took to get, when it was taken and given back (UTC), under which lease."""

    name: str
    waited_seconds: float = 0.0
    acquired_at: datetime | None = None
    released_at: datetime | None = None
    lease_id: UUID | None = None
    lease_seconds: float = 0.0

    def tags(self) -> dict[str, str]:
        """The timing as run tags (`lock.wait_seconds`, `lock.acquired_at`, `lock.released_at`)."""
        stamps = {"acquired_at": self.acquired_at, "released_at": self.released_at}
        return {"lock.wait_seconds": f"{self.waited_seconds:.3f}"} | {
            f"lock.{key}": value.isoformat(timespec="microseconds") for key, value in stamps.items() if value
        }


_HELD: ContextVar[dict[str, Held]] = ContextVar("mlops_locks_held", default={})  # noqa: B039 - never mutated


@contextmanager
def hold(name: str, timeout_seconds: float) -> Iterator[Held]:
    """Hold the one slot of `name` for the block (waits up to `timeout_seconds`, then raises).

    The slot is leased for `lock_lease_seconds` (at least Prefect's 60 s) and the lease renewed in the
    background while the block runs; a renewal that fails cancels the block (Prefect's
    `raise_on_lease_renewal_failure`). Yields a `Held` that says how long the wait was (logged too), filled in
    with the release time on exit; `confirm_held(name)` inside the block renews the lease before a write.
    """
    from prefect.concurrency._events import emit_concurrency_acquisition_events, emit_concurrency_release_events
    from prefect.concurrency._leases import maintain_concurrency_lease
    from prefect.concurrency._sync import acquire_concurrency_slots_with_lease, release_concurrency_slots_with_lease

    pause_at("before-lock")
    lease = get_settings().lock_lease_seconds  # >= 60, the least Prefect's server accepts
    start = time.monotonic()
    acquired = acquire_concurrency_slots_with_lease(
        [name], 1, timeout_seconds=timeout_seconds, lease_duration=lease, strict=True
    )
    held = Held(name, time.monotonic() - start, datetime.now(UTC), lease_id=acquired.lease_id, lease_seconds=lease)
    log.info("lock %s acquired after waiting %.2f s (lease %s)", name, held.waited_seconds, held.lease_id)
    events = emit_concurrency_acquisition_events(acquired.limits, 1)
    token = _HELD.set(_HELD.get() | {name: held})
    try:
        with maintain_concurrency_lease(acquired.lease_id, lease, raise_on_lease_renewal_failure=True):
            yield held
    finally:
        _HELD.reset(token)
        held.released_at = datetime.now(UTC)
        try:
            release_concurrency_slots_with_lease(acquired.lease_id)
        except Exception as exc:  # the lease lapses by itself; the slot frees then
            log.warning("lock %s: lease %s not released (%s); it expires by itself", name, acquired.lease_id, exc)
        emit_concurrency_release_events(acquired.limits, 1, events)


def confirm_held(name: str) -> Held | None:
    """Renew the lease of lock `name` now, so it holds for a whole lease from here; None when not held here.

    Call it right before a write the lock guards: a lease that lapsed or was revoked (another holder may have
    the slot now) raises `LockLost`, and so does a server that cannot be asked. Not holding `name` in this
    context (a caller without the lock) returns None: the caller's own compare-and-set is all there is.
    """
    from prefect.client.orchestration import get_client

    held = _HELD.get().get(name)
    if held is None:
        return None
    try:
        with get_client(sync_client=True) as client:
            client.renew_concurrency_lease(lease_id=held.lease_id, lease_duration=held.lease_seconds)
    except Exception as exc:
        raise LockLost(
            f"lock {name}: its lease {held.lease_id} could not be renewed ({type(exc).__name__}: {exc}); "
            "another holder may have it now, so the guarded write is not made"
        ) from exc
    return held
