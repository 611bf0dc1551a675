"""Prefect global concurrency limits used as locks: one slot per model for decide-and-promote and rollback."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


def promotion_lock_name(model_name: str) -> str:
    """Name of the Prefect global concurrency limit that serialises decide-and-promote per model."""
    return f"promotion-{model_name}"


def ensure_lock(name: str) -> str:
    """Create the one-slot limit `name` if missing (idempotent); returns the name."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(name, limit=1)
    return name


@contextmanager
def hold(name: str, timeout_seconds: float) -> Iterator[None]:
    """Hold the one slot of `name` for the block (waits up to `timeout_seconds`, then raises)."""
    from prefect.concurrency.sync import concurrency

    with concurrency(name, occupy=1, strict=True, timeout_seconds=timeout_seconds):
        yield
