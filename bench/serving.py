"""Serving benchmark: our API against `mlflow models serve` for the same champion, same load client, one run.

Needs the stack running with a champion (`make demo` does both). Starts both servers on free loopback
ports (one worker process each), then drives each with the same asyncio + aiohttp client: N concurrent
clients, each sending its next request as soon as the previous answered, for a fixed time after a
warm-up. Scenarios: 1 and 100 records per request, 1 and 8 clients. Also times the pipeline's own
`predict_proba` (a regressor's `predict`) in-process, the floor for any server. Writes
bench/results/serving.{json,md}.

    python -m bench.serving [--seconds 10] [--model credit-risk] [--dataset credit-risk]

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
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd

from adapters.clients import S3Location, mlflow_client, s3_client
from adapters.settings import get_settings
from core.dataset import load_local_dataset_config
from mlops.stack import client_env, running
from tests.ports import free_port

RESULTS = Path(__file__).parent / "results"
SCENARIOS = [(1, 1), (1, 8), (100, 1), (100, 8)]  # (records per request, concurrent clients)


def _records(settings, n: int, dataset: str = "credit-risk") -> list[dict]:
    config = load_local_dataset_config(dataset)
    if dataset == "credit-risk":  # one month's file, as in the published runs
        location = S3Location.parse(config.source).child("month=2025-01/part-0.parquet")
        body = s3_client(settings).get_object(Bucket=location.bucket, Key=location.key)["Body"].read()
        frame = pd.read_parquet(io.BytesIO(body))
    else:
        from adapters.snapshots import read_snapshot

        frame = read_snapshot(config.source, config.format, settings).frame
    return json.loads(frame[config.feature_names].head(n).to_json(orient="records"))


class _Predict:
    """A regressor seen through `predict_proba`, which `predict_times_ms` times: its served call is `predict`."""

    def __init__(self, model: object) -> None:
        self.predict_proba = model.predict


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


def _in_process(model_name: str, records: list[dict], repeats: int = 300) -> dict:
    import mlflow.pyfunc

    from core.review import predict_times_ms

    model = mlflow.pyfunc.load_model(f"models:/{model_name}@champion").get_raw_model()
    if getattr(model, "classes_", None) is None:
        model = _Predict(model)
    out = {}
    for n in (1, 100):
        times = predict_times_ms(model, pd.DataFrame.from_records(records[:n]), repeats)
        out[f"{n}_records"] = {"p50_ms": float(np.percentile(times, 50)), "p99_ms": float(np.percentile(times, 99))}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="measured time per scenario")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--model", default="credit-risk")
    parser.add_argument("--dataset", default="credit-risk", help="bundled name or YAML path: the records sent")
    args = parser.parse_args()

    settings = get_settings()
    env = os.environ | client_env(settings)
    os.environ.update(client_env(settings))
    version = mlflow_client(settings).get_model_version_by_alias(args.model, "champion").version
    records = _records(settings, 100, args.dataset)
    bin_dir = Path(sys.executable).parent
    ours_port, mlflow_port = free_port(), free_port()
    logs = RESULTS / "logs"
    servers = {
        "ours": (
            [str(bin_dir / "mlops"), "serve", "--port", str(ours_port), "--model", args.model],
            f"http://127.0.0.1:{ours_port}",
            "/ready",
            "/predict",
            "records",
        ),
        "mlflow": (
            [str(bin_dir / "mlflow"), "models", "serve", "-m", f"models:/{args.model}@champion",
             "--env-manager", "local", "-h", "127.0.0.1", "-p", str(mlflow_port)],
            f"http://127.0.0.1:{mlflow_port}",
            "/ping",
            "/invocations",
            "dataframe_records",
        ),
    }  # fmt: skip
    results: dict = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "model": f"{args.model} v{version}",
        "cpus": os.cpu_count(),
        "seconds_per_scenario": args.seconds,
        "in_process_predict_proba": _in_process(args.model, records),
        "scenarios": [],
    }
    print(f"in-process predict_proba: {results['in_process_predict_proba']}", flush=True)
    measured: dict[tuple[str, int, int], dict] = {}
    for name, (command, base, health, path, key) in servers.items():
        server_env = env | {"PATH": f"{bin_dir}:{env.get('PATH', '')}"}  # mlflow starts `uvicorn` from PATH
        with running(command, base + health, server_env, logs / f"{name}.log", timeout=180):
            for size, clients in SCENARIOS:
                body = json.dumps({key: records[:size]}).encode()
                result = asyncio.run(_load(base + path, body, clients, args.seconds, args.warmup))
                measured[(name, size, clients)] = result
                print(f"{name:6s} {size:3d} records x {clients} clients: {result}", flush=True)
    for size, clients in SCENARIOS:
        ours, theirs = measured[("ours", size, clients)], measured[("mlflow", size, clients)]
        results["scenarios"].append(
            {
                "records_per_request": size,
                "clients": clients,
                "ours": ours,
                "mlflow": theirs,
                "throughput_ratio": ours["throughput_rps"] / theirs["throughput_rps"],
                "p99_ratio": ours["p99_ms"] / theirs["p99_ms"],
            }
        )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "serving.json").write_text(json.dumps(results, indent=2))
    (RESULTS / "serving.md").write_text(_markdown(results))
    print(_markdown(results))


def _markdown(results: dict) -> str:
    floor = results["in_process_predict_proba"]
    lines = [
        f"# Serving benchmark ({results['date']}, {results['cpus']} CPUs, {results['model']})",
        "",
        f"In-process `predict_proba`: 1 record p50 {floor['1_records']['p50_ms']:.1f} ms / p99 "
        f"{floor['1_records']['p99_ms']:.1f} ms; 100 records p50 {floor['100_records']['p50_ms']:.1f} ms.",
        "",
        "| records/request | clients | ours req/s | mlflow req/s | ratio | ours p50 / p99 ms | mlflow p50 / p99 ms |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in results["scenarios"]:
        o, m = s["ours"], s["mlflow"]
        lines.append(
            f"| {s['records_per_request']} | {s['clients']} | {o['throughput_rps']:.0f} | {m['throughput_rps']:.0f} "
            f"| {s['throughput_ratio']:.1f}x | {o['p50_ms']:.1f} / {o['p99_ms']:.1f} | {m['p50_ms']:.1f} / "
            f"{m['p99_ms']:.1f} |"
        )
    failures = sum(s["ours"]["failures"] + s["mlflow"]["failures"] for s in results["scenarios"])
    lines += ["", f"Failed requests: {failures}."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
