"""Hostile-traffic benchmark: a client's valid requests while 8 others send worst-case invalid bodies.

Needs the stack running with a champion (`make demo`). Starts `mlops serve` (one worker process) on a free
loopback port, then measures one closed-loop client sending valid one-record requests, with `/health` asked
every 20 ms alongside:

- **quiet**: nothing else;
- **attack**: meanwhile 8 clients (another process) post, without pause, a body of `--records` records
  (10,000) with 50 wrong fields each (every input of the wrong type, the rest junk; about 8 MB).

Reports the valid requests' p50/p99/max in both phases, their ratio, `/health`'s slowest answer under attack,
and what the hostile requests got (422 naming at most 50 errors, or 503 with Retry-After when the checking
thread is full). Goals (issue "production hardening"): attack p99 < 5x quiet p99, `/health` within 100 ms.
Writes bench/results/hostile.{json,md}.

    python -m bench.hostile [--seconds 10] [--records 10000] [--hostile 8] [--model credit-risk]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from adapters.clients import mlflow_client
from adapters.settings import get_settings
from bench.serving import _records
from mlops.stack import client_env, running
from tests.ports import free_port

RESULTS = Path(__file__).parent / "results"
HEALTH_EVERY = 0.02


def hostile_body(record: dict[str, Any], records: int, fields: int = 50) -> bytes:
    """`records` copies of `record` with every input of the wrong type and junk fields up to `fields` in all."""
    bad = {k: ("x" if isinstance(v, int | float) else 7) for k, v in record.items()}
    bad |= {f"junk{i}": [i, "x"] for i in range(max(fields - len(bad), 0))}
    return json.dumps({"records": [bad] * records}).encode()


def _ms(times: list[float]) -> dict[str, float]:
    """p50, p99 and max of `times` (seconds) in milliseconds."""
    import numpy as np

    return {
        "p50": round(1000 * float(np.percentile(times, 50)), 2),
        "p99": round(1000 * float(np.percentile(times, 99)), 2),
        "max": round(1000 * max(times), 2),
    }


async def _hostile_clients(url: str, body: bytes, clients: int, stop: Any, counts: Any) -> None:
    import aiohttp

    async with aiohttp.ClientSession(headers={"content-type": "application/json"}) as session:

        async def client() -> None:
            while not stop.is_set():
                try:
                    async with session.post(url, data=body) as answer:
                        payload = await answer.read()
                        key = str(answer.status)
                        if answer.status == 422:
                            errors = len(json.loads(payload)["detail"])
                            counts["most_errors"] = max(counts.get("most_errors", 0), errors)
                        elif answer.status == 503 and "retry-after" not in answer.headers:
                            key = "503 without Retry-After"
                except aiohttp.ClientError as exc:
                    key = type(exc).__name__
                counts[key] = counts.get(key, 0) + 1

        await asyncio.gather(*(client() for _ in range(clients)))


def _hostile_process(url: str, body: bytes, clients: int, stop: Any, counts: Any) -> None:
    asyncio.run(_hostile_clients(url, body, clients, stop, counts))


async def _probe(base: str, body: bytes, seconds: float) -> dict[str, Any]:
    """One closed-loop client of valid requests, and /health every HEALTH_EVERY s, for `seconds`."""
    import aiohttp

    predict: list[float] = []
    health: list[float] = []
    failed: dict[str, int] = {}
    async with aiohttp.ClientSession(headers={"content-type": "application/json"}) as session:
        stop_at = time.perf_counter() + seconds

        async def client() -> None:
            while time.perf_counter() < stop_at:
                started = time.perf_counter()
                async with session.post(f"{base}/predict", data=body) as answer:
                    await answer.read()
                if answer.status == 200:
                    predict.append(time.perf_counter() - started)
                else:
                    failed[str(answer.status)] = failed.get(str(answer.status), 0) + 1

        async def health_check() -> None:
            while time.perf_counter() < stop_at:
                started = time.perf_counter()
                async with session.get(f"{base}/health") as answer:
                    await answer.read()
                health.append(time.perf_counter() - started)
                await asyncio.sleep(HEALTH_EVERY)

        await asyncio.gather(client(), health_check())
    return {
        "requests": len(predict),
        "failed": failed,
        "predict_ms": _ms(predict),
        "health_ms": _ms(health),
    }


def main() -> None:
    """Measure the quiet and the attack phase, write and print the table and the goals."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="measured time per phase")
    parser.add_argument("--records", type=int, default=10_000, help="records per hostile body")
    parser.add_argument("--hostile", type=int, default=8, help="hostile clients")
    parser.add_argument("--model", default="credit-risk")
    args = parser.parse_args()

    settings = get_settings()
    os.environ.update(client_env(settings))
    version = mlflow_client(settings).get_model_version_by_alias(args.model, "champion").version
    [record] = _records(settings, 1)
    good, bad = json.dumps({"records": [record]}).encode(), hostile_body(record, args.records)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    command = [str(Path(sys.executable).parent / "mlops"), "serve", "--port", str(port), "--model", args.model]
    env = os.environ | {"MLOPS_SERVING_WORKERS": "1"}
    with running(command, f"{base}/ready", env, RESULTS / "logs" / "hostile.log", 600):
        asyncio.run(_probe(base, good, 2))  # warm-up
        quiet = asyncio.run(_probe(base, good, args.seconds))
        print(f"quiet:  {json.dumps(quiet)}", flush=True)
        with multiprocessing.Manager() as manager:
            stop, counts = manager.Event(), manager.dict()
            attackers = multiprocessing.Process(
                target=_hostile_process, args=(f"{base}/predict", bad, args.hostile, stop, counts)
            )
            attackers.start()
            time.sleep(2)  # the attack under way
            attack = asyncio.run(_probe(base, good, args.seconds))
            stop.set()
            attackers.join(60)
            hostile = dict(counts)
        print(f"attack: {json.dumps(attack)}", flush=True)
    ratio = attack["predict_ms"]["p99"] / quiet["predict_ms"]["p99"]
    results = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "model": f"{args.model} v{version}",
        "cpus": os.cpu_count(),
        "hostile_clients": args.hostile,
        "hostile_body_bytes": len(bad),
        "hostile_records": args.records,
        "seconds_per_phase": args.seconds,
        "quiet": quiet,
        "attack": attack,
        "hostile_answers": hostile,
        "p99_ratio": round(ratio, 2),
        "goals": {
            "attack p99 < 5x quiet p99": ratio < 5,
            "/health within 100 ms under attack": attack["health_ms"]["max"] < 100,
            "hostile bodies name at most 50 errors": hostile.get("most_errors", 0) <= 50,
            "no valid request failed": not quiet["failed"] and not attack["failed"],
        },
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "hostile.json").write_text(json.dumps(results, indent=2))
    (RESULTS / "hostile.md").write_text(markdown(results))
    print(markdown(results))


def markdown(results: dict[str, Any]) -> str:
    """The result table and the goals."""
    quiet, attack = results["quiet"], results["attack"]
    rows = [
        "| phase | valid requests | p50 ms | p99 ms | max ms | /health p99 ms | /health max ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, phase in (("quiet", quiet), (f"{results['hostile_clients']} hostile clients", attack)):
        p, h = phase["predict_ms"], phase["health_ms"]
        rows.append(
            f"| {name} | {phase['requests']} | {p['p50']} | {p['p99']} | {p['max']} | {h['p99']} | {h['max']} |"
        )
    answers = ", ".join(f"{k}: {v}" for k, v in sorted(results["hostile_answers"].items()))
    goals = "\n".join(f"- {'met' if ok else 'NOT met'}: {goal}" for goal, ok in results["goals"].items())
    return (
        f"# Serving under hostile traffic ({results['date']}, {results['cpus']} CPUs, {results['model']})\n\n"
        f"Hostile body: {results['hostile_records']} records with 50 wrong fields each, "
        f"{results['hostile_body_bytes']:,} bytes; {results['seconds_per_phase']:g} s per phase.\n\n"
        + "\n".join(rows)
        + f"\n\nValid p99 under attack / quiet: **{results['p99_ratio']}x**. Hostile answers: {answers}.\n\n{goals}\n"
    )


if __name__ == "__main__":
    main()
