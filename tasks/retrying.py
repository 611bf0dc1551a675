"""Retry policy for tasks that touch the network: retry transient I/O, never a verdict on the data."""

from __future__ import annotations

from typing import Any

from core.errors import PermanentError

# Backoff for network-facing tasks (Prefect's own examples use the same shape).
IO_RETRIES = 3
IO_RETRY_DELAYS = [2, 5, 15]


def retry_unless_permanent(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect `retry_condition_fn`: retry unless the failure is a `PermanentError`."""
    try:
        state.result()
    except PermanentError:
        return False
    except Exception:
        return True
    return False
