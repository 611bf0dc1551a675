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
