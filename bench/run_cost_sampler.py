"""Process sampling for bench/run_cost.py: peak RSS and CPU seconds of every process, by role, every 0.5 s.

A role is a process session: every server of the stack is started in its own session (`mlops.stack` starts
each with `start_new_session`, so its session id is the pid in its pid file), and so is each child the bench
measures (the flow's process, the bare script's). Every process of the machine in a watched session belongs to
that role, whatever its parent (MLflow's and the serving API's worker processes, each Dask worker under its
nanny), and so does every descendant of one (PostgreSQL's backends and background processes start sessions of
their own).

Per role and sample: the sum of its processes' RSS (a role's peak is the largest sum at one instant; shared
pages, e.g. PostgreSQL's shared buffers, count in every process that touched them) and its CPU seconds: each
live process's user + system time plus what its reaped children used (a short-lived PostgreSQL backend, gone
between two samples, is counted by the postmaster that waited for it), so the sum only grows while the role's
processes live. A role over its memory limit is stopped (SIGKILL to its session).
"""

from __future__ import annotations

import contextlib
import os
import platform
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

MB = 2**20


@dataclass
class ProcessPeak:
    """One process seen in a role: what it runs and its largest RSS."""

    label: str
    peak_rss: int = 0
    samples: int = 0


@dataclass
class RoleStats:
    """What a role's processes used during one measured phase."""

    peak_rss: int = 0  # the largest sum of its processes' RSS at one sample
    peak_processes: int = 0
    cpu_first: float | None = None  # CPU seconds (own + reaped children) at the first sample it was seen
    cpu_max: float = 0.0
    processes: dict[int, ProcessPeak] = field(default_factory=dict)
    killed_for_memory: str | None = None

    def to_json(self) -> dict[str, Any]:
        """Megabytes and seconds, each process by pid with its label."""
        return {
            "peak_rss_mb": round(self.peak_rss / MB),
            "peak_processes": self.peak_processes,
            "cpu_seconds": round(self.cpu_max - (self.cpu_first or 0.0), 2),
            "largest_process_mb": round(max((p.peak_rss for p in self.processes.values()), default=0) / MB),
            "processes": {
                str(pid): {"label": p.label, "peak_rss_mb": round(p.peak_rss / MB), "samples": p.samples}
                for pid, p in sorted(self.processes.items())
            },
        } | ({"killed_for_memory": self.killed_for_memory} if self.killed_for_memory else {})


def _label(process: psutil.Process) -> str:
    try:
        words = process.cmdline()
    except (psutil.Error, OSError):
        return "?"
    code = " ".join(words[words.index("-c") + 1 :]) if "-c" in words else ""
    for marker, label in (("spawn_main", "worker process"), ("resource_tracker", "resource tracker")):
        if marker in code:
            return label
    if len(words) == 1:  # PostgreSQL's processes name themselves ("postgres: checkpointer")
        return " ".join(words[0].split())[:80]
    # the program's name and its first few arguments: "dask worker", "mlflow server", "postgres -D"
    shown = [Path(words[0]).name] if words else []
    shown += [w for w in words[1:4] if not w.startswith("/") and len(w) < 40]
    return " ".join(shown)[:80] or process.name()


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine spent not idle since boot (every core)."""
    times = psutil.cpu_times()
    return sum(times) - times.idle - getattr(times, "iowait", 0.0)


class Sampler(threading.Thread):
    """Samples the watched sessions every `interval` seconds until stopped; kills a role past its limit."""

    def __init__(
        self,
        sessions: dict[int, str],
        interval: float = 0.5,
        limits: dict[str, float] | None = None,
        min_available: float = 0.0,
    ):
        super().__init__(daemon=True)
        self.sessions, self.interval, self.limits = dict(sessions), interval, limits or {}
        self.min_available = min_available  # bytes: below, every limited role is stopped (the machine is shared)
        self.roles: dict[str, RoleStats] = {role: RoleStats() for role in self.sessions.values()}
        self.samples = 0
        self.sample_seconds = 0.0  # the sampler's own time spent reading /proc
        self._stop_event = threading.Event()
        self._labels: dict[int, str] = {}
        self._t0 = time.perf_counter()
        self._busy_start = machine_busy_seconds()
        self._load_start = os.getloadavg()[0]

    def watch(self, session: int, role: str) -> None:
        """Watch one more session (a child started after the sampler)."""
        self.roles.setdefault(role, RoleStats())
        self.sessions[session] = role

    def run(self) -> None:
        while not self._stop_event.is_set():
            started = time.perf_counter()
            self.sample()
            self.sample_seconds += time.perf_counter() - started
            self._stop_event.wait(self.interval)

    def _members(self) -> dict[int, str]:
        """Every process of a watched role: in a watched session, or a descendant of a process that is."""
        parents: dict[int, int] = {}
        roles: dict[int, str] = {}
        for process in psutil.process_iter(["ppid"]):
            parents[process.pid] = process.info["ppid"] or 0
            with contextlib.suppress(OSError):
                role = self.sessions.get(os.getsid(process.pid))
                if role is not None:
                    roles[process.pid] = role
        for pid in parents:
            chain, parent = [], pid
            while parent and parent not in roles and parent in parents and len(chain) < 64:
                chain.append(parent)
                parent = parents[parent]
            role = roles.get(parent)
            for member in chain:
                roles[member] = role  # type: ignore[assignment] - None: not watched
        return {pid: role for pid, role in roles.items() if role is not None}

    def sample(self) -> None:
        """One pass over every process of the machine."""
        rss: dict[str, int] = {}
        cpu: dict[str, float] = {}
        count: dict[str, int] = {}
        for pid, role in self._members().items():
            try:
                process = psutil.Process(pid)
                with process.oneshot():
                    memory, times = process.memory_info().rss, process.cpu_times()
                if pid not in self._labels:
                    self._labels[pid] = _label(process)
            except (psutil.Error, OSError):
                continue
            stats = self.roles[role]
            peak = stats.processes.setdefault(pid, ProcessPeak(self._labels[pid]))
            peak.peak_rss, peak.samples = max(peak.peak_rss, memory), peak.samples + 1
            rss[role] = rss.get(role, 0) + memory
            cpu[role] = cpu.get(role, 0.0) + times.user + times.system + times.children_user + times.children_system
            count[role] = count.get(role, 0) + 1
        self.samples += 1
        available = psutil.virtual_memory().available if self.limits and self.min_available else None
        for role, total in rss.items():
            stats = self.roles[role]
            stats.peak_rss, stats.peak_processes = max(stats.peak_rss, total), max(stats.peak_processes, count[role])
            stats.cpu_first = cpu[role] if stats.cpu_first is None else stats.cpu_first
            stats.cpu_max = max(stats.cpu_max, cpu[role])
            limit = self.limits.get(role)
            if limit is None or stats.killed_for_memory is not None:
                continue
            if total > limit:
                self._kill(role, f"RSS {total / 2**30:.1f} GiB > {limit / 2**30:.1f} GiB")
            elif available is not None and available < self.min_available:
                self._kill(role, f"RSS {total / 2**30:.1f} GiB, machine down to {available / 2**30:.1f} GiB available")

    def _kill(self, role: str, why: str) -> None:
        self.roles[role].killed_for_memory = why
        for session, name in self.sessions.items():
            if name == role:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(session, signal.SIGKILL)

    def finish(self) -> dict[str, Any]:
        """Stop sampling (one last sample) and return the phase's figures."""
        self._stop_event.set()
        if self.is_alive():
            self.join()
        seconds = time.perf_counter() - self._t0
        busy = machine_busy_seconds() - self._busy_start
        pss = self._pss()  # once, at the end: reading every process's smaps takes ~2.5 ms a process
        return {
            "seconds": round(seconds, 1),
            "samples": self.samples,
            "sampler_seconds": round(self.sample_seconds, 2),
            "machine_busy_cores": round(busy / seconds, 2) if seconds else None,
            "load_average_1min": [round(self._load_start, 2), round(os.getloadavg()[0], 2)],
            "roles": {
                role: stats.to_json() | {"pss_at_end_mb": round(pss[role] / MB) if role in pss else None}
                for role, stats in self.roles.items()
            },
        }

    def _pss(self) -> dict[str, int]:
        """Each role's proportional set size now (shared pages split between the processes sharing them)."""
        totals: dict[str, int] = {}
        for pid, role in self._members().items():
            with contextlib.suppress(psutil.Error, OSError):
                totals[role] = totals.get(role, 0) + psutil.Process(pid).memory_full_info().pss
        return totals


@dataclass(frozen=True)
class ChildRun:
    """How a measured child process ended."""

    exit_code: int | None
    wall_seconds: float
    timed_out: bool
    killed_for_memory: str | None
    cpu_seconds: float  # user + system of the child and its reaped children (the kernel's count)
    max_rss_mb: float  # the kernel's peak RSS of its largest process
    phase: dict[str, Any]  # the sampler's figures for every role during the run

    def outcome(self) -> str:
        """completed, failed (code), or why it was stopped."""
        if self.timed_out:
            return "stopped: time limit"
        if self.killed_for_memory:
            return f"stopped: memory ({self.killed_for_memory})"
        return "completed" if self.exit_code == 0 else f"failed (exit {self.exit_code})"


@dataclass(frozen=True)
class Limits:
    """When a measured child is stopped: after `timeout` seconds, or when its RSS passes `max_gb` GiB or the
    machine's available memory falls below `min_available_gb` GiB (only with `max_gb`: the other processes of a
    shared machine, and the stack, are not the OOM killer's to choose from)."""

    timeout: float
    max_gb: float | None = None
    min_available_gb: float = 1.0  # and when the machine's available memory falls below this (GiB)


def run_child(
    command: list[str], env: dict[str, str], log: Path, role: str, stack: dict[int, str], limits: Limits
) -> ChildRun:
    """Run `command` in its own session with the stack's sessions sampled beside it; stop it at a limit."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    memory = {role: limits.max_gb * 2**30} if limits.max_gb else {}
    sampler = Sampler(stack | {process.pid: role}, limits=memory, min_available=limits.min_available_gb * 2**30)
    sampler.start()
    started = time.perf_counter()
    timed_out = False
    while True:
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            break
        if not timed_out and time.perf_counter() - started > limits.timeout:
            timed_out = True
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
        time.sleep(0.1)
    wall = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
    with contextlib.suppress(ProcessLookupError, PermissionError):  # anything it left in its session
        os.killpg(process.pid, signal.SIGKILL)
    phase = sampler.finish()
    cpu = round(usage.ru_utime + usage.ru_stime, 2)
    if role in phase["roles"]:  # the kernel's count of the child's CPU, not the samples' (which miss its last 0.5 s)
        phase["roles"][role] |= {"cpu_seconds": cpu, "cpu_from": "wait4"}
    return ChildRun(
        exit_code=process.returncode,
        wall_seconds=round(wall, 2),
        timed_out=timed_out,
        killed_for_memory=sampler.roles[role].killed_for_memory,
        cpu_seconds=cpu,
        max_rss_mb=round(usage.ru_maxrss / 1024),
        phase=phase,
    )


def stack_sessions(state: Path) -> dict[int, str]:
    """The stack's running servers: session id (its pid) -> role, from the pid files under `state`/run."""
    sessions = {}
    for pid_file in sorted((state / "run").glob("*.pid")):
        try:
            pid = int(pid_file.read_text().strip())
            if os.getsid(pid) == pid:
                sessions[pid] = pid_file.stem
        except (ValueError, OSError):
            continue
    return sessions


def machine() -> dict[str, Any]:
    """Cores, memory, CPU model, system: what the figures were measured on."""
    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cores": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "cpu": model,
        "system": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "unset"),
    }
