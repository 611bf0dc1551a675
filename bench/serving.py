"""Serving benchmark: our API against `mlflow models serve` and the HTTP floor, same client, one run.

Needs the stack running with a champion (`make demo` does both). Starts three servers on free loopback
ports, each with the same number of worker processes (`--workers`, default: ours, one per core):

- **ours**: `mlops serve`;
- **mlflow**: `mlflow models serve` of the same champion;
- **floor**: a no-op endpoint on the same stack as ours (FastAPI + uvicorn, same workers): it reads the
  body and answers a constant JSON, so it is the fastest any FastAPI server on this machine can answer.

Each is driven by the same asyncio + aiohttp client: N concurrent clients, each sending its next request as
soon as the previous answered, for a fixed time after a warm-up, with 1 and 100 records per request and
1, 8 and 32 clients. The three servers run side by side and each scenario measures them one after the
other (ours, mlflow, floor), so a change in the machine's load during the run hits all three alike
rather than whichever server happened to be measured then. The client runs in this process, on the same
cores as the servers: at high client counts it is part of what is measured. Also times each inference
path in-process (the pipeline's own `predict_proba`, a regressor's `predict`; `LoadedModel.scores` on a
frame, whatever the served model uses; and what a request runs: its body decoded into column arrays and
scored), then checks the serving goals.
Writes bench/results/serving.{json,md}.

    python -m bench.serving [--seconds 10] [--workers 0] [--model credit-risk] [--dataset credit-risk]

`--dataset` (a bundled name or a local YAML path) gives the records sent; it must be the model's dataset.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from fastapi import FastAPI, Request, Response

from adapters.clients import S3Location, mlflow_client, s3_client, use_tracking_server
from adapters.settings import get_settings
from core.data.dataset import load_local_dataset_config
from mlops.stack import client_env, running
from tests.ports import free_port

RESULTS = Path(__file__).parent / "results"
SIZES = (1, 100)  # records per request
CLIENTS = (1, 8, 32)  # concurrent closed-loop clients
SERVERS = ("ours", "mlflow", "floor")


def floor_app() -> FastAPI:
    """The HTTP floor: a FastAPI app whose POST /predict reads the body and answers a constant JSON."""
    app = FastAPI()
    answer = b'{"predictions": []}'

    @app.get("/health")
    async def health() -> Response:
        return Response(b'{"status": "ok"}', media_type="application/json")

    @app.post("/predict")
    async def predict(request: Request) -> Response:
        await request.body()
        return Response(answer, media_type="application/json")

    return app


def _records(settings: Any, n: int, dataset: str = "credit-risk") -> list[dict]:
    config = load_local_dataset_config(dataset)
    if dataset == "credit-risk":  # one month's file, as in the published runs
        location = S3Location.parse(config.source).child("month=2025-01/part-0.parquet")
        body = s3_client(settings).get_object(Bucket=location.bucket, Key=location.key)["Body"].read()
        frame = pd.read_parquet(io.BytesIO(body))
    else:
        from adapters.snapshots import read_snapshot

        frame = read_snapshot(config.source, config.format, settings).frame
    return json.loads(frame[config.feature_names].head(n).to_json(orient="records"))


async def _load(url: str, body: bytes, clients: int, seconds: float, warmup: float) -> dict:
    import aiohttp

    latencies: list[float] = []
    failures = 0
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector, headers={"content-type": "application/json"}) as session:
        start = time.perf_counter()
        measure_from, stop_at = start + warmup, start + warmup + seconds

        async def client() -> None:
            nonlocal failures
            while True:
                sent = time.perf_counter()
                if sent >= stop_at:
                    return
                async with session.post(url, data=body) as response:
                    await response.read()
                    ok = response.status == 200
                done = time.perf_counter()
                if sent >= measure_from:
                    latencies.append(done - sent)
                    failures += not ok

        await asyncio.gather(*(client() for _ in range(clients)))
    lat = np.array(latencies) * 1e3
    return {
        "requests": len(lat),
        "failures": failures,
        "throughput_rps": len(lat) / seconds,
        "p50_ms": float(np.percentile(lat, 50)),
        "p99_ms": float(np.percentile(lat, 99)),
    }


@dataclass(frozen=True)
class Load:
    """One closed-loop load: `clients` clients posting `body` to `url`; `label` starts its printed line."""

    url: str
    body: bytes
    clients: int
    label: str
    tag: Any = None  # what the caller files the result under


def drive(loads: Iterable[Load], seconds: float, warmup: float) -> Iterator[tuple[Load, dict]]:
    """Each load in turn (`_load`: `warmup`, then `seconds` measured), printed as it ends; yields it and its result."""
    for load in loads:
        result = asyncio.run(_load(load.url, load.body, load.clients, seconds, warmup))
        print(f"{load.label}: {result}", flush=True)
        yield load, result


def _percentiles(times: list[float]) -> dict[str, float]:
    return {"p50_ms": float(np.percentile(times, 50)), "p99_ms": float(np.percentile(times, 99))}


def _in_process(settings: Any, model_name: str, version: str, records: list[dict], repeats: int = 300) -> dict:
    """Per-call times of each inference path, in this process (one OpenMP/BLAS thread, as the server)."""
    from threadpoolctl import threadpool_limits

    from core.evaluation.review import predict_times_ms
    from serving.forms import decode_records
    from serving.model import load_version

    use_tracking_server(settings)
    loaded = load_version(mlflow_client(settings), model_name, version)
    described = loaded.describe()
    out: dict[str, Any] = {
        # What the served model says about how it scores (the compiled form or the pipeline), when it says.
        "served_path": {k: v for k, v in described.items() if k not in {"inputs", "metrics", "classes"}},
    }
    with threadpool_limits(settings.serving_threads):
        for n in SIZES:
            frame = loaded.frame(records[:n])
            body = json.dumps({"records": records[:n]}).encode()
            scores_times, body_to_scores = [], []
            loaded.scores(frame)
            for _ in range(repeats):
                started = time.perf_counter()
                loaded.scores(frame)
                middle = time.perf_counter()
                # what a request runs: body -> msgspec structs -> column arrays -> scores (no DataFrame
                # for the compiled form)
                loaded.scores(loaded.columns_of(decode_records(loaded, body, n)[0]))
                body_to_scores.append((time.perf_counter() - middle) * 1e3)
                scores_times.append((middle - started) * 1e3)
            out[f"{n}_records"] = {
                "pipeline_predict": _percentiles(predict_times_ms(loaded.pipeline, frame, repeats)),
                "loaded_model_scores": _percentiles(scores_times),
                "body_to_scores": _percentiles(body_to_scores),
            }
    return out


def _commands(args: argparse.Namespace, workers: int, ports: dict[str, int]) -> dict[str, tuple]:
    bin_dir = Path(sys.executable).parent
    base = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
    return {
        "ours": (
            [str(bin_dir / "mlops"), "serve", "--port", str(ports["ours"]), "--model", args.model,
             "--workers", str(workers)],
            base["ours"], "/ready", "/predict", "records",
        ),
        "mlflow": (
            [str(bin_dir / "mlflow"), "models", "serve", "-m", f"models:/{args.model}@champion",
             "--env-manager", "local", "-h", "127.0.0.1", "-p", str(ports["mlflow"]), "--workers", str(workers)],
            base["mlflow"], "/ping", "/invocations", "dataframe_records",
        ),
        "floor": (
            [sys.executable, "-m", "uvicorn", "bench.serving:floor_app", "--factory", "--host", "127.0.0.1",
             "--port", str(ports["floor"]), "--workers", str(workers), "--no-access-log", "--log-level", "warning"],
            base["floor"], "/health", "/predict", "records",
        ),
    }  # fmt: skip


def main() -> None:
    """Run every scenario against the three servers, then write and print the table and the goals."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="measured time per scenario")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--workers", type=int, default=0, help="processes per server; 0: one per core")
    parser.add_argument("--model", default="credit-risk")
    parser.add_argument("--dataset", default="credit-risk", help="bundled name or YAML path: the records sent")
    args = parser.parse_args()

    settings = get_settings()
    workers = args.workers or os.cpu_count() or 1
    env = os.environ | client_env(settings)
    os.environ.update(client_env(settings))
    version = mlflow_client(settings).get_model_version_by_alias(args.model, "champion").version
    records = _records(settings, max(SIZES), args.dataset)
    load_before = os.getloadavg()
    results: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "model": f"{args.model} v{version}",
        "cpus": os.cpu_count(),
        "workers": workers,
        "seconds_per_scenario": args.seconds,
        "load_average_before": load_before,
        "in_process": _in_process(settings, args.model, version, records),
        "scenarios": [],
    }
    print(f"in-process: {json.dumps(results['in_process'])}", flush=True)
    ports = {name: free_port() for name in SERVERS}
    bin_dir = Path(sys.executable).parent
    server_env = env | {"PATH": f"{bin_dir}:{env.get('PATH', '')}"}  # mlflow starts `uvicorn` from PATH
    server_env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)  # the floor app: bench.serving
    commands = _commands(args, workers, ports)
    with ExitStack() as servers:  # all three up at once; each scenario measures them back to back
        for name, (command, base, health, _, _) in commands.items():
            servers.enter_context(running(command, base + health, server_env, RESULTS / "logs" / f"{name}.log", 600))
        loads = (
            Load(
                base + path,
                json.dumps({key: records[:size]}).encode(),
                clients,
                f"{name:6s} {size:3d} records x {clients:2d} clients",
                (name, size, clients),
            )
            for size in SIZES
            for clients in CLIENTS
            for name, (_, base, _, path, key) in commands.items()
        )
        measured = {load.tag: result for load, result in drive(loads, args.seconds, args.warmup)}
    results["load_average_after"] = os.getloadavg()
    results["scenarios"] = scenarios(measured)
    results["goals"] = goals(measured)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "serving.json").write_text(json.dumps(results, indent=2))
    (RESULTS / "serving.md").write_text(_markdown(results))
    print(_markdown(results))


def scenarios(measured: dict[tuple[str, int, int], dict]) -> list[dict[str, Any]]:
    """Per request size and client count, the three servers' figures side by side and ours against theirs."""
    out = []
    for size in SIZES:
        for clients in CLIENTS:
            ours, theirs, floor = (measured[(name, size, clients)] for name in SERVERS)
            out.append(
                {
                    "records_per_request": size,
                    "clients": clients,
                    "ours": ours,
                    "mlflow": theirs,
                    "floor": floor,
                    "rps_vs_mlflow": ours["throughput_rps"] / theirs["throughput_rps"],
                    "rps_vs_floor": ours["throughput_rps"] / floor["throughput_rps"],
                    "p50_vs_floor": ours["p50_ms"] / floor["p50_ms"],
                }
            )
    return out


def goals(measured: dict[tuple[str, int, int], dict]) -> list[dict[str, Any]]:
    """The serving goals (against mlflow and the floor), each with the figures it compares and whether it passed."""

    def get(name: str, size: int, clients: int, what: str) -> float:
        return measured[(name, size, clients)][what]

    def check(goal: str, value: float, bound: float, passed: bool) -> dict[str, Any]:
        return {"goal": goal, "value": value, "bound": bound, "passed": passed}

    rps, ours_rps = "throughput_rps", get("ours", 1, 8, "throughput_rps")
    ours_p50, floor_p50 = get("ours", 1, 1, "p50_ms"), get("floor", 1, 1, "p50_ms")
    out = [
        check("single-record rps at 8 clients >= 20x mlflow's", ours_rps, 20 * get("mlflow", 1, 8, rps),
              ours_rps >= 20 * get("mlflow", 1, 8, rps)),
        check("single-record rps at 8 clients >= 25% of the floor's", ours_rps, 0.25 * get("floor", 1, 8, rps),
              ours_rps >= 0.25 * get("floor", 1, 8, rps)),
        check("single-record p50 at 1 client <= 2x the floor's (ms)", ours_p50, 2 * floor_p50,
              ours_p50 <= 2 * floor_p50),
    ]  # fmt: skip
    for size in SIZES:
        ours, theirs = get("ours", size, 8, "p99_ms"), get("mlflow", size, 8, "p50_ms")
        out.append(check(f"{size}-record p99 at 8 clients < mlflow's p50 (ms)", ours, theirs, ours < theirs))
    return out


def _markdown(results: dict) -> str:
    lines = [
        f"# Serving benchmark ({results['date']}, {results['cpus']} CPUs, {results['model']}, "
        f"{results['workers']} worker processes per server)",
        "",
        f"Load average (1, 5, 15 min) before: {', '.join(f'{x:.2f}' for x in results['load_average_before'])}; "
        f"after: {', '.join(f'{x:.2f}' for x in results['load_average_after'])}. "
        f"{results['seconds_per_scenario']:.0f} s per scenario, one closed-loop aiohttp client in the benchmark's "
        "process.",
        "",
        "In-process per call, ms (p50 / p99):",
        "",
        "| records | pipeline `predict_proba` | `LoadedModel.scores` (a frame) | request body -> columns -> scores |",
        "|---:|---:|---:|---:|",
    ]
    for size in SIZES:
        row = results["in_process"][f"{size}_records"]
        cells = [
            f"{row[k]['p50_ms']:.3f} / {row[k]['p99_ms']:.3f}"
            for k in ("pipeline_predict", "loaded_model_scores", "body_to_scores")
        ]
        lines.append(f"| {size} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Served model: `{json.dumps(results['in_process']['served_path'])}`",
        "",
        "| records | clients | ours rps | mlflow rps | floor rps | ours / mlflow | ours / floor "
        "| ours p50 / p99 ms | mlflow p50 / p99 ms | floor p50 / p99 ms |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in results["scenarios"]:
        o, m, f = s["ours"], s["mlflow"], s["floor"]
        lines.append(
            f"| {s['records_per_request']} | {s['clients']} | {o['throughput_rps']:.0f} | {m['throughput_rps']:.0f} "
            f"| {f['throughput_rps']:.0f} | {s['rps_vs_mlflow']:.1f}x | {s['rps_vs_floor']:.0%} "
            f"| {o['p50_ms']:.2f} / {o['p99_ms']:.2f} | {m['p50_ms']:.2f} / {m['p99_ms']:.2f} "
            f"| {f['p50_ms']:.2f} / {f['p99_ms']:.2f} |"
        )
    failures = sum(s[name]["failures"] for s in results["scenarios"] for name in SERVERS)
    lines += ["", f"Failed requests: {failures}.", "", "Goals:", ""]
    for g in results["goals"]:
        lines.append(f"- {'PASS' if g['passed'] else 'FAIL'}: {g['goal']} ({g['value']:.2f} vs {g['bound']:.2f})")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
