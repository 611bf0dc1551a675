"""The training flow at 1M and 10M rows, on the pandas engine and on the Dask engine: wall time and peak RSS.

Its own stack (state in /tmp/mlops-bench-scale; S3 29000, MLflow 25000, Prefect 24200, worker 24201, serving
28000, weed ports from 26300) and its own Dask cluster (scheduler 28786, dashboard 28787, two workers of
one thread each, `--worker-memory` each), all on 127.0.0.1; nothing of the default stack is touched.

- `python -m bench.scale up`: stack, Dask scheduler and workers.
- `python -m bench.scale data --rows 1000000`: `mlops data generate` with 12 months (one month in memory at
  a time), to s3://mlops/datasets/scale-<rows>/.
- `python -m bench.scale run --rows 1000000 --engine dask`: `mlops train --dry-run` (a subprocess, the
  flow's process) with one trial of histogram gradient boosting on the pandas engine, or LightGBM (100
  trees) on the Dask engine. A sampler reads every 0.5 s the RSS of the flow's process and of each Dask
  worker process; a run is stopped (SIGKILL) after `--timeout` seconds or when the flow's process passes
  `--max-flow-gb` (the machine is shared). Per-task durations come from the Prefect API.
- `python -m bench.scale down`.
Results append to bench/results/scale.jsonl; `python -m bench.scale table` writes bench/results/scale.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"
STATE = Path("/tmp/mlops-bench-scale")
ENV = {
    "MLOPS_STATE_DIR": str(STATE),
    "MLOPS_S3_PORT": "29000",
    "MLOPS_MLFLOW_PORT": "25000",
    "MLOPS_PREFECT_PORT": "24200",
    "MLOPS_WORKER_PORT": "24201",
    "MLOPS_POSTGRES_PORT": "25433",
    "MLOPS_SERVING_PORT": "28000",
    "MLOPS_WEED_PORT_BASE": "26300",
    "MLOPS_DASK_SCHEDULER_PORT": "28786",
    "MLOPS_DASK_DASHBOARD_PORT": "28787",
    "MLOPS_DASK_ADDRESS": "tcp://127.0.0.1:28786",
    # The bench starts its own scheduler and two workers (`up`); the stack starts none, so the figures are those
    # of exactly these two workers (the 03:29-03:39 runs of 2026-11-25 also had the stack's two, see README).
    "MLOPS_DASK_WORKERS": "0",
}
SCHEDULER = "tcp://127.0.0.1:28786"
BIN = Path(sys.executable).parent


def _env() -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL_S3", "PREFECT_API_URL")
    }
    env |= ENV
    from adapters.settings import Settings
    from mlops.stack import CLIENT_DEFAULTS

    os.environ.update(ENV)
    settings = Settings()
    env |= CLIENT_DEFAULTS | {
        "PREFECT_API_URL": settings.prefect_api_url,
        "MLFLOW_TRACKING_URI": settings.mlflow_tracking_uri,
    }
    return env


def up(worker_memory: str) -> None:
    """The bench's stack and its Dask cluster."""
    env = _env()
    subprocess.run([BIN / "mlops", "stack", "up"], env=env, check=True)
    logs = STATE / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    run = STATE / "run"
    run.mkdir(parents=True, exist_ok=True)
    # The dashboards on loopback (a bare `dask scheduler` binds 0.0.0.0)
    scheduler = subprocess.Popen(
        [BIN / "dask", "scheduler", "--host", "127.0.0.1", "--port", "28786", "--dashboard-address", "127.0.0.1:28787"],
        stdout=open(logs / "dask-scheduler.log", "ab"),  # noqa: SIM115 - the server owns it
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    (run / "dask-scheduler.pid").write_text(str(scheduler.pid))
    time.sleep(3)
    for number in range(2):
        worker = subprocess.Popen(
            [BIN / "dask", "worker", SCHEDULER, "--host", "127.0.0.1", "--nthreads", "1", "--nworkers", "1",
             "--memory-limit", worker_memory, "--dashboard-address", "127.0.0.1:0", "--name", f"bench-{number}"],
            stdout=open(logs / f"dask-worker-{number}.log", "ab"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
            env=env | {"PYTHONPATH": str(Path(__file__).resolve().parents[1])},
            start_new_session=True,
        )  # fmt: skip
        (run / f"dask-worker-{number}.pid").write_text(str(worker.pid))
    from distributed import Client

    with Client(SCHEDULER, timeout=60) as client:
        client.wait_for_workers(2, timeout=120)
        print("dask workers:", list(client.scheduler_info()["workers"]))


def down() -> None:
    """Stop the Dask processes this bench started, then the stack."""
    for pid_file in sorted((STATE / "run").glob("dask-*.pid")):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(int(pid_file.read_text()), signal.SIGTERM)
        pid_file.unlink()
    subprocess.run([BIN / "mlops", "stack", "down"], env=_env(), check=False)


def data(rows: int) -> None:
    """12 monthly partitions of the synthetic data, `rows` in total, written month by month."""
    started = time.perf_counter()
    subprocess.run(
        [BIN / "mlops", "data", "generate", "--months", "12", "--rows-per-month", str(-(-rows // 12)),
         "--dest", f"s3://mlops/datasets/scale-{rows}/", "--no-history"],
        env=_env(),
        check=True,
    )  # fmt: skip
    print(f"generated {rows} rows in {time.perf_counter() - started:.0f} s")


def _config(rows: int, engine: str) -> Path:
    import yaml

    from core.data.dataset import bundled_config_text

    raw = yaml.safe_load(bundled_config_text("credit-risk")) | {
        "name": f"scale-{rows}-{engine}",
        "model_name": f"scale-{rows}-{engine}",
        "source": f"s3://mlops/datasets/scale-{rows}/",
        "engine": engine,
        "lightgbm": {"n_estimators": 100},
    }
    path = STATE / f"scale-{rows}-{engine}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _worker_pids() -> list[int]:
    import psutil

    pids = []
    for pid_file in sorted((STATE / "run").glob("dask-worker-*.pid")):
        try:
            nanny = psutil.Process(int(pid_file.read_text()))
            pids += [c.pid for c in nanny.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
    return pids


class Sampler(threading.Thread):
    """Peak RSS of the flow's process tree and of each Dask worker process, every 0.5 s."""

    def __init__(self, flow_pid: int, max_flow_bytes: float) -> None:
        super().__init__(daemon=True)
        self.flow_pid, self.max_flow_bytes = flow_pid, max_flow_bytes
        self.flow_peak = 0
        self.workers: dict[int, int] = {}
        self.killed_for_memory = False
        self.stop = threading.Event()

    def run(self) -> None:
        import psutil

        while not self.stop.is_set():
            try:
                flow = psutil.Process(self.flow_pid)
                rss = sum(p.memory_info().rss for p in [flow, *flow.children(recursive=True)])
                self.flow_peak = max(self.flow_peak, rss)
                if rss > self.max_flow_bytes:
                    self.killed_for_memory = True
                    os.killpg(self.flow_pid, signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
            for pid in _worker_pids():
                try:
                    self.workers[pid] = max(self.workers.get(pid, 0), psutil.Process(pid).memory_info().rss)
                except psutil.NoSuchProcess:
                    continue
            time.sleep(0.5)


def _task_durations(config: Path) -> dict[str, float]:
    """Seconds per task of the newest training flow run on `config` (from the Prefect API)."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import FlowRunSort

    async def read() -> dict[str, float]:
        async with get_client() as client:
            runs = await client.read_flow_runs(sort=FlowRunSort.START_TIME_DESC, limit=20)
            # Runs of other benches may overlap: the one whose parameters name this config
            runs = [r for r in runs if str(config) in json.dumps(r.parameters, default=str)]
            if not runs:
                return {}
            tasks = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[runs[0].id])))
            out: dict[str, float] = {}
            for t in tasks:
                if t.start_time and t.end_time:
                    name = t.name.rsplit("-", 1)[0]
                    out[name] = round(out.get(name, 0) + (t.end_time - t.start_time).total_seconds(), 1)
            return out

    return asyncio.run(read())


def retime() -> None:
    """Read every result's task durations again from the Prefect API (by its config)."""
    os.environ.update({"PREFECT_API_URL": _env()["PREFECT_API_URL"]})
    lines = []
    for raw in (RESULTS / "scale.jsonl").read_text().splitlines():
        result = json.loads(raw)
        result["tasks_seconds"] = _task_durations(STATE / f"scale-{result['rows']}-{result['engine']}.yaml")
        lines.append(json.dumps(result))
    (RESULTS / "scale.jsonl").write_text("\n".join(lines) + "\n")


def run(rows: int, engine: str, timeout: float, max_flow_gb: float) -> dict[str, Any]:
    """One flow run, measured.

    The pandas engine is the single-machine engine: its run gets no Dask cluster (no MLOPS_DASK_ADDRESS,
    MLOPS_DASK_WORKERS=0), so the search's trials and refit run in the flow's process, as on a machine without
    one. The Dask engine's run uses the bench's cluster.
    """
    env = _env()
    if engine == "pandas":
        env.pop("MLOPS_DASK_ADDRESS", None)
        env["MLOPS_DASK_WORKERS"] = "0"
    command = [BIN / "mlops", "train", "--config", str(_config(rows, engine)), "--dry-run", "--trials", "1",
               "--family", "hist_gradient_boosting"]  # fmt: skip
    log = STATE / "logs" / f"bench-{rows}-{engine}.log"
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    with open(log, "wb") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        sampler = Sampler(process.pid, max_flow_gb * 2**30)
        sampler.start()
        try:
            code = process.wait(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            code, timed_out = process.wait(), True
        sampler.stop.set()
        sampler.join()
    wall = time.perf_counter() - started
    config = _config(rows, engine)
    os.environ.update({"PREFECT_API_URL": env["PREFECT_API_URL"]})
    result = {
        "rows": rows,
        "engine": engine,
        "exit_code": code,
        "timed_out": timed_out,
        "killed_for_memory": sampler.killed_for_memory,
        "cluster": env.get("MLOPS_DASK_ADDRESS"),  # None: every step in the flow's process
        "wall_seconds": round(wall, 1),
        "flow_peak_rss_mb": round(sampler.flow_peak / 2**20),
        "worker_peak_rss_mb": {str(pid): round(v / 2**20) for pid, v in sampler.workers.items()},
        "tasks_seconds": _task_durations(config),
        "log_tail": log.read_text(errors="replace").splitlines()[-5:],
        "machine": f"{os.cpu_count()} cores",
        "load_average_1min": [round(load_before, 1), round(os.getloadavg()[0], 1)],  # before, after
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    RESULTS.mkdir(exist_ok=True)
    with open(RESULTS / "scale.jsonl", "a") as handle:
        handle.write(json.dumps(result) + "\n")
    print(json.dumps(result, indent=2))
    return result


def table() -> None:
    """bench/results/scale.md from scale.jsonl."""
    lines = [
        "| when | rows | engine | search/training on | outcome | wall (s) | flow process peak RSS (MB) "
        "| Dask workers peak RSS (MB) | slowest tasks (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for raw in (RESULTS / "scale.jsonl").read_text().splitlines():
        r = json.loads(raw)
        outcome = (
            "stopped: time limit" if r["timed_out"] else "stopped: flow RSS limit" if r["killed_for_memory"]
            else "completed" if r["exit_code"] == 0 else f"failed ({r['exit_code']})"
        )  # fmt: skip
        # the two worker processes (the nannies' ~12 MB helper processes left out)
        peaks = sorted(r["worker_peak_rss_mb"].values(), reverse=True)[:2]
        workers = ", ".join(str(v) for v in peaks) if r["engine"] == "dask" else "-"
        slow = ", ".join(f"{k} {v}" for k, v in sorted(r["tasks_seconds"].items(), key=lambda kv: -kv[1])[:4])
        # (runs before the `cluster` field existed all had the bench's cluster, the pandas engine's trials too)
        where = "flow process" if "cluster" in r and not r["cluster"] else "Dask cluster"
        cells = [
            r.get("when", "-"), f"{r['rows']:,}", r["engine"], where, outcome, r["wall_seconds"],
            r["flow_peak_rss_mb"], workers, slow,
        ]  # fmt: skip
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    (RESULTS / "scale.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    """Command line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["up", "down", "data", "run", "table", "retime"])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--engine", choices=["pandas", "dask"], default="dask")
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--max-flow-gb", type=float, default=8)
    parser.add_argument("--worker-memory", default="3GiB")
    args = parser.parse_args()
    if args.command == "up":
        up(args.worker_memory)
    elif args.command == "down":
        down()
    elif args.command == "data":
        data(args.rows)
    elif args.command == "retime":
        retime()
    elif args.command == "run":
        run(args.rows, args.engine, args.timeout, args.max_flow_gb)
    else:
        table()


if __name__ == "__main__":
    main()
