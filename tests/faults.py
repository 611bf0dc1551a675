"""Fault injection shared by the integration tests: stop a server of the test stack for real."""

from __future__ import annotations

import os
import signal

from tests.waiting import wait_for


def kill_server(stack, name: str, sig: signal.Signals = signal.SIGKILL, timeout: float = 30) -> int:
    """Send `sig` to the stack server `name`'s process group (the server and its workers); wait until its
    port is closed. Returns the pid it had; `mlops stack up` (`mlops.stack.up`) starts it again."""
    from mlops import stack as local_stack

    [service] = [s for s in local_stack.services(stack) if s.name == name]
    pid = int(service.pid_file.read_text())
    os.killpg(pid, sig)
    wait_for(lambda: not local_stack.port_in_use(stack.host, service.port), timeout, f"{name}'s port to close")
    return pid


# What a restarted SeaweedFS answers for a moment: it lists objects (and is healthy) before its volume serves them.
S3_RESTARTING_CODES = {"InternalError", "ServiceUnavailable", "SlowDown"}


def s3_restarting(exc: Exception) -> bool:
    """Whether `exc` is S3's answer while it is still coming back (a botocore ClientError with such a code)."""
    response = getattr(exc, "response", None) or {}
    return response.get("Error", {}).get("Code") in S3_RESTARTING_CODES
