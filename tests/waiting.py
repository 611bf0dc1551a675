"""Polling helpers shared by the integration tests."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def wait_for(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> None:
    """Poll `condition` until it is truthy; AssertionError naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def wait_for_runs(flow_run_ids: Sequence[Any], timeout: float = 600) -> list:
    """The flow runs, once all of them are in a terminal state; TimeoutError listing their states otherwise."""
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            runs = [client.read_flow_run(i) for i in flow_run_ids]
            if all(r.state and r.state.type.value in TERMINAL for r in runs):
                return runs
            if time.monotonic() > deadline:
                raise TimeoutError(f"runs not finished: {[(str(r.id), r.state_name) for r in runs]}")
            time.sleep(0.5)
