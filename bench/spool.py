"""What the prediction-log spool costs per request: our API with the spool on, against the in-memory log.

Needs the stack running with a champion (`make demo` does both). Starts three serving APIs for the same
champion on free loopback ports: the spool with `MLOPS_SERVING_SPOOL_SYNC=batch` (the default: written
before the answer, fdatasynced every 20 ms by a background thread), the spool with `always` (each
micro-batch fdatasynced before its answers) and `MLOPS_SERVING_SPOOL=false` (the previous in-memory
buffer, lost on a crash). Drives each with the same closed-loop client as `bench.serving` (each client
sends its next request as soon as the previous answered): single-record requests, 1 and 8 clients.
Rounds alternate between the servers so that a busy spell of the machine hits all. Also times the log's
own `record()` call in-process (serialisation + write [+ fdatasync], against appending to a list).
Writes bench/results/spool.{json,md}.

    python -m bench.spool [--seconds 10] [--rounds 2] [--model credit-risk]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd

from adapters.clients import mlflow_client
from adapters.settings import Settings, get_settings
from bench.serving import Load, _records, drive
from mlops.stack import client_env, running
from tests.ports import free_port

RESULTS = Path(__file__).parent / "results"
CLIENTS = (1, 8)
VARIANTS = {  # name -> server environment
    "batch": {"MLOPS_SERVING_SPOOL": "true", "MLOPS_SERVING_SPOOL_SYNC": "batch"},
    "always": {"MLOPS_SERVING_SPOOL": "true", "MLOPS_SERVING_SPOOL_SYNC": "always"},
    "memory": {"MLOPS_SERVING_SPOOL": "false"},
}


def _record_cost(records: list[dict], calls: int = 2000) -> dict:
    """Per-call time of `record()` for one scored record: the spool (temp folder; both syncs), the memory log."""
    from serving.prediction_log import MemoryPredictionLog, ScoredBatch, SpooledPredictionLog

    frame = pd.DataFrame.from_records(records[:1])
    scores, request_ids, index = np.array([[0.3, 0.7]]), np.array(["r"], dtype=object), np.zeros(1, dtype="int64")
    batch = ScoredBatch(frame, scores, [0, 1], request_ids, "1", None, index)
    out = {}
    with tempfile.TemporaryDirectory() as folder:
        settings = Settings(state_dir=Path(folder))
        logs = {
            "batch": SpooledPredictionLog(settings.model_copy(update={"serving_spool_sync": "batch"}), "bench"),
            "always": SpooledPredictionLog(settings.model_copy(update={"serving_spool_sync": "always"}), "bench"),
            "memory": MemoryPredictionLog(settings, "bench"),
        }
        for name in ("batch", "always"):
            logs[name].spool.open()  # no uploader nor sync thread: only the request path's cost is timed
        for name, log in logs.items():
            times = []
            for _ in range(calls):
                started = time.perf_counter()
                log.record(batch)
                times.append(time.perf_counter() - started)
            lat = np.array(times) * 1e3
            out[name] = {"p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99))}
        for name in ("batch", "always"):
            logs[name].spool.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="measured time per scenario and round")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds per server and scenario")
    parser.add_argument("--model", default="credit-risk")
    parser.add_argument("--dataset", default="credit-risk", help="bundled name or YAML path: the records sent")
    args = parser.parse_args()

    settings = get_settings()
    env = os.environ | client_env(settings)
    os.environ.update(client_env(settings))
    version = mlflow_client(settings).get_model_version_by_alias(args.model, "champion").version
    records = _records(settings, 1, args.dataset)
    body = json.dumps({"records": records[:1]}).encode()
    results: dict = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "model": f"{args.model} v{version}",
        "cpus": os.cpu_count(),
        "seconds_per_scenario": args.seconds,
        "rounds": args.rounds,
        "record_call": _record_cost(records),
        "scenarios": [],
    }
    print(f"record() per call: {results['record_call']}", flush=True)
    bin_dir = Path(sys.executable).parent
    latencies: dict[tuple[str, int], list[dict]] = {}
    with ExitStack() as servers:
        urls = {}
        for name, variant in VARIANTS.items():
            port = free_port()
            command = [str(bin_dir / "mlops"), "serve", "--port", str(port), "--model", args.model]
            server_env = env | variant
            servers.enter_context(
                running(command, f"http://127.0.0.1:{port}/ready", server_env, RESULTS / "logs" / f"spool-{name}.log")
            )
            urls[name] = f"http://127.0.0.1:{port}/predict"
        for _ in range(args.rounds):
            loads = (
                Load(url, body, clients, f"{name:6s} 1 record x {clients} clients", (name, clients))
                for clients in CLIENTS
                for name, url in urls.items()
            )
            for load, result in drive(loads, args.seconds, args.warmup):
                latencies.setdefault(load.tag, []).append(result)
    results["scenarios"] = [_scenario(clients, latencies) for clients in CLIENTS]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "spool.json").write_text(json.dumps(results, indent=2))
    (RESULTS / "spool.md").write_text(_markdown(results))
    print(_markdown(results))


def _scenario(clients: int, latencies: dict[tuple[str, int], list[dict]]) -> dict:
    """One client count over the rounds, per server (requests, failures, mean rps, median percentiles) and
    each spool mode against the in-memory log."""
    row: dict = {"clients": clients}
    for name in VARIANTS:
        runs = latencies[(name, clients)]
        row[name] = {
            "requests": sum(r["requests"] for r in runs),
            "failures": sum(r["failures"] for r in runs),
            "throughput_rps": float(np.mean([r["throughput_rps"] for r in runs])),
            "p50_ms": float(np.median([r["p50_ms"] for r in runs])),
            "p99_ms": float(np.median([r["p99_ms"] for r in runs])),
        }
    for name in ("batch", "always"):
        row[f"{name}_p50_ratio"] = row[name]["p50_ms"] / row["memory"]["p50_ms"]
        row[f"{name}_p99_ratio"] = row[name]["p99_ms"] / row["memory"]["p99_ms"]
        row[f"{name}_throughput_ratio"] = row[name]["throughput_rps"] / row["memory"]["throughput_rps"]
    return row


def _markdown(results: dict) -> str:
    call = results["record_call"]
    lines = [
        f"# Prediction-log spool benchmark ({results['date']}, {results['cpus']} CPUs, {results['model']})",
        "",
        "`record()` of one record, in-process, p50 / p99 ms: "
        + "; ".join(f"{name} {call[name]['p50_ms']:.3f} / {call[name]['p99_ms']:.3f}" for name in VARIANTS)
        + " (batch: serialise + write; always: + fdatasync; memory: append to a list).",
        "",
        f"Single-record requests, closed loop, {results['rounds']} alternating round(s) of "
        f"{results['seconds_per_scenario']:.0f} s per server (median of the rounds' percentiles); ratios against "
        "the in-memory log:",
        "",
        "| clients | log | req/s | p50 / p99 ms | req/s ratio | p50 ratio | p99 ratio |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for s in results["scenarios"]:
        for name in VARIANTS:
            o = s[name]
            ratios = (
                "| 1 | 1 | 1 "
                if name == "memory"
                else "".join(f"| {s[f'{name}_{kind}_ratio']:.2f} " for kind in ("throughput", "p50", "p99"))
            )
            timing = f"{o['throughput_rps']:.0f} | {o['p50_ms']:.2f} / {o['p99_ms']:.2f}"
            lines.append(f"| {s['clients']} | {name} | {timing} {ratios}|")
    failures = sum(s[name]["failures"] for s in results["scenarios"] for name in VARIANTS)
    lines += ["", f"Failed requests: {failures}."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
