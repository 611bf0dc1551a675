"""Retry policy for tasks that touch the network: retry transient I/O, never a verdict on the data."""

from __future__ import annotations

from typing import Any

from prefect.cache_policies import NO_CACHE

from adapters.settings import get_settings
from core.errors import PermanentError

# Backoff for network-facing tasks (Prefect's own examples use the same shape): `MLOPS_IO_RETRY_DELAYS`,
# 2, 5 and 15 s by default.
IO_RETRY_DELAYS = list(get_settings().io_retry_delays)
IO_RETRIES = len(IO_RETRY_DELAYS)


def retry_unless_permanent(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect `retry_condition_fn`: retry unless the failure is a `PermanentError`."""
    try:
        state.result()
    except PermanentError:
        return False
    except Exception:
        return True
    return False


# The one policy of tasks that touch the network (S3, MLflow, Prefect's API): retry transient failures
# with backoff, never a `PermanentError`, and cache nothing (results are written to MLflow and S3).
IO: dict[str, Any] = {
    "retries": IO_RETRIES,
    "retry_delay_seconds": IO_RETRY_DELAYS,
    "retry_condition_fn": retry_unless_permanent,
    "cache_policy": NO_CACHE,
}

# The same backoff for tasks that retry whatever failed (their errors are all transient I/O; none raises a
# `PermanentError`).
IO_ANY_ERROR: dict[str, Any] = {key: value for key, value in IO.items() if key != "retry_condition_fn"}
