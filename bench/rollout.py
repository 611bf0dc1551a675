"""Serving cost of a progressive-delivery rollout: champion only, shadow and canary, same server, one run.

Starts a private S3 and MLflow on free loopback ports in a temporary state folder (bench.serving_models'
`private_stack`), registers two versions of one binary model as training logs them (the test suite's
`_register`): a logistic regression champion and a challenger (`--challenger`: a HistGradientBoosting, the
default, or a second logistic regression), both with the project's pipeline and an id column (`row_id`). Then
one `mlops serve` of that model (`--workers` processes, `--poll-seconds` registry poll) is measured in each mode:

- **champion**: no rollout, the champion answers every record; measured before, between and after the others;
- **shadow**: `start_rollout` of the challenger in shadow: the champion answers, the challenger scores every
  request in the background into the shadow log;
- **canary 10%** and **canary 50%** (`--canary-shares`): the challenger answers the records whose id hashes
  below the share (sticky per id); the champion scores the whole request in one call (its copies of the
  challenger's records go to the shadow log).

Each rollout is started as training does (`adapters.rollout_store.start_rollout`, a new rollout id per mode) with
a generous latency budget (`--latency-budget-ms`), and measured only once every serving process says it is
`active` (`GET /models/<name>`); it is ended (`end_rollout`) and the next mode waits until no process shows a
challenger. A mode is driven by a closed-loop asyncio + aiohttp client as bench.serving's (`--concurrency`
clients, each sending its next request as soon as the previous answered, `--warmup` then `--seconds` measured)
for each request size (`--records-per-request`), at `/models/<name>/predict`. Every record carries a fresh id
(the canary is sticky per id), so each request's records are split between the two versions as live traffic's
would be. Per mode and size: throughput (requests/s and records/s), the requests' client-side p50 and p99
latency, and each against the champion-only runs just before and after it (the machine's speed drifts); the
server processes' CPU time (all of `mlops serve`'s
process tree) per 1000 measured records; the rollout's record counts by role (`GET /models/<name>` volume,
over warm-up and measurement: records the challenger answered, scored in shadow, background scorings skipped
because too many waited, fallbacks to the champion) and whether a process cut the challenger off.
The client runs in this process, on the same cores as the server. Writes bench/results/rollout.{json,md}.

    python -m bench.rollout [--seconds 10] [--concurrency 8] [--records-per-request 1 100] [--workers 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil

from adapters.settings import Settings
from bench.serving_models import private_stack
from mlops.stack import client_env, running
from tests.ports import free_port

RESULTS = Path(__file__).parent / "results"
MODEL = "br-flag"
ID_FIELD = "row_id"
TRAIN_ROWS = 2400
SENTINEL = "__bench_record_id__"


@dataclass(frozen=True)
class Mode:
    """One way the model is served: no rollout (`policy` None), or a rollout in shadow or canary."""

    label: str
    policy: Any = None  # core.rollout.RolloutPolicy


@dataclass(frozen=True)
class Registered:
    """The model's two registered versions and the records sent (feature values and the id field)."""

    champion: str
    challenger: str
    records: list[dict[str, Any]]
    estimators: dict[str, str]


# ------------------------------------------------------------------------------------------------ model


def register(settings: Settings, challenger: str) -> Registered:
    """A binary logistic regression champion and its challenger, registered as training does (the champion keeps
    the `champion` alias)."""
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.linear_model import LogisticRegression

    from adapters.clients import mlflow_client, use_tracking_server
    from core.data.dataset import DatasetConfig
    from tests.task_types import fit, multiclass_config, multiclass_frame
    from tests.test_task_types import _records, _register

    use_tracking_server(settings)
    levels = multiclass_frame(3000)
    frame = levels.assign(flag=(levels["level"] == "high").astype("int64")).drop(columns=["level"])
    raw = multiclass_config(MODEL).model_dump(mode="json")
    config = DatasetConfig.model_validate(raw | {"target": "flag", "task": "binary", "classes": [0, 1]})
    train, holdout = frame.iloc[:TRAIN_ROWS], frame.iloc[TRAIN_ROWS:]
    estimators = {
        "champion": LogisticRegression(max_iter=500),
        "challenger": HistGradientBoostingClassifier(random_state=0)
        if challenger == "hgb"
        else LogisticRegression(C=0.1, max_iter=500),
    }
    versions = {
        role: _register(settings, config, fit(config, train, e), train, holdout) for role, e in estimators.items()
    }
    mlflow_client(settings).set_registered_model_alias(MODEL, "champion", versions["champion"])
    records = _records(config, holdout)
    return Registered(
        versions["champion"],
        versions["challenger"],
        [r | {ID_FIELD: 0} for r in records],
        {role: type(e).__name__ for role, e in estimators.items()},
    )


# ------------------------------------------------------------------------------------------------ load


class Bodies:
    """Request bodies of `records` whose records each carry a fresh id (the canary is sticky per record id)."""

    def __init__(self, records: list[dict[str, Any]], first_id: int) -> None:
        text = json.dumps({"records": [r | {ID_FIELD: SENTINEL} for r in records]})
        self.pieces = [piece.encode() for piece in text.split(f'"{SENTINEL}"')]
        self.next_id = first_id

    def __call__(self) -> bytes:
        parts = [self.pieces[0]]
        for piece in self.pieces[1:]:
            parts += (str(self.next_id).encode(), piece)
            self.next_id += 1
        return b"".join(parts)


def process_cpu(root: psutil.Process) -> dict[int, float]:
    """CPU seconds (user + system) of `root` and every process under it, by pid."""
    out = {}
    for proc in [root, *root.children(recursive=True)]:
        try:
            times = proc.cpu_times()
        except psutil.Error:
            continue
        out[proc.pid] = times.user + times.system
    return out


def cpu_delta(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds spent between two `process_cpu` samples (a process started in between counts whole)."""
    return sum(seconds - before.get(pid, 0.0) for pid, seconds in after.items())


@dataclass
class Load:
    """One closed-loop load: `clients` clients posting `bodies()` to `url`; the server's process tree `server`."""

    url: str
    bodies: Bodies
    clients: int
    server: psutil.Process
    cpu: dict[str, float] = field(default_factory=dict)


async def _load(load: Load, seconds: float, warmup: float) -> dict[str, Any]:
    """bench.serving's client, with a fresh body per request and the CPU used in the measured window."""
    import aiohttp

    latencies: list[float] = []
    failures = sent_total = 0
    connector = aiohttp.TCPConnector(limit=load.clients)
    async with aiohttp.ClientSession(connector=connector, headers={"content-type": "application/json"}) as session:
        start = time.perf_counter()
        measure_from, stop_at = start + warmup, start + warmup + seconds

        async def client() -> None:
            nonlocal failures, sent_total
            while True:
                body = load.bodies()
                sent = time.perf_counter()
                if sent >= stop_at:
                    return
                sent_total += 1
                async with session.post(load.url, data=body) as response:
                    await response.read()
                    ok = response.status == 200
                done = time.perf_counter()
                if sent >= measure_from:
                    latencies.append(done - sent)
                    failures += not ok

        async def sample_cpu() -> None:  # the measured window only
            await asyncio.sleep(max(0.0, measure_from - time.perf_counter()))
            server, client_cpu = process_cpu(load.server), time.process_time()
            await asyncio.sleep(max(0.0, stop_at - time.perf_counter()))
            load.cpu["server_cpu_s"] = cpu_delta(server, process_cpu(load.server))
            load.cpu["client_cpu_s"] = time.process_time() - client_cpu

        await asyncio.gather(sample_cpu(), *(client() for _ in range(load.clients)))
    lat = np.array(latencies) * 1e3
    return {
        "requests": len(lat),
        "requests_sent_with_warmup": sent_total,
        "failures": failures,
        "throughput_rps": len(lat) / seconds,
        "p50_ms": float(np.percentile(lat, 50)),
        "p99_ms": float(np.percentile(lat, 99)),
    } | load.cpu


# ------------------------------------------------------------------------------------------------ server


def serve(settings: Settings, args: argparse.Namespace) -> tuple[str, Any]:
    """`mlops serve` of the model on a free port (a context manager yielding its process)."""
    port = free_port()
    command = [str(Path(sys.executable).parent / "mlops"), "serve", "--port", str(port), "--model", MODEL]
    command += ["--workers", str(args.workers), "--poll-seconds", str(args.poll_seconds)]
    env = {k: v for k, v in (os.environ | client_env(settings)).items() if k != "PREFECT_API_URL"}
    url = f"http://127.0.0.1:{port}"
    return url, running(command, f"{url}/health", env, RESULTS / "logs" / "rollout-serve.log", 300)


def summaries(url: str, workers: int, until: Callable[[dict | None], bool], timeout: float) -> dict[int, dict | None]:
    """Each serving process's `challenger` summary (`GET /models/<name>`), once every one of them satisfies
    `until` (a new connection per call, so each process gets asked)."""
    seen: dict[int, dict | None] = {}
    deadline = time.monotonic() + timeout
    while True:
        answer = httpx.get(f"{url}/models/{MODEL}", timeout=10)
        if answer.status_code == 200:
            body = answer.json()
            seen[body["pid"]] = body["challenger"]
            pids = {w["pid"] for w in body["workers"]}
            if len(pids) >= workers and all(p in seen and until(seen[p]) for p in pids):
                return {p: seen[p] for p in pids}
        if time.monotonic() > deadline:
            raise TimeoutError(f"serving processes not there within {timeout:.0f}s: {seen}")
        time.sleep(0.2)


def wait_ready(url: str, timeout: float) -> None:
    """Until `/ready` says every serving process serves a model."""
    deadline = time.monotonic() + timeout
    while httpx.get(f"{url}/ready", timeout=10).status_code != 200:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} not ready within {timeout:.0f}s")
        time.sleep(0.3)


def volume(url: str) -> dict[str, int]:
    """The rollout's records so far by role, summed over the serving processes ({} without a rollout)."""
    challenger = httpx.get(f"{url}/models/{MODEL}", timeout=10).json()["challenger"]
    return dict(challenger["volume"]) if challenger else {}


@contextmanager
def rollout(settings: Settings, url: str, made: Registered, mode: Mode, args: argparse.Namespace) -> Iterator[Any]:
    """The mode's rollout started and applied by every serving process (yields its state; None: no rollout),
    ended afterwards, also on error; afterwards no process shows a challenger."""
    from adapters.rollout_store import end_rollout, start_rollout
    from core.rollout import RolloutEvent, RolloutState

    if mode.policy is None:
        yield None
        return
    state = RolloutState.start(MODEL, made.challenger, made.champion, mode.policy)
    start_rollout(settings, state, reason=f"bench.rollout: {mode.label}")

    def applied(c: dict | None) -> bool:
        return c is not None and c["status"] in ("active", "cut off") and c["version"] == made.challenger

    try:
        started = time.monotonic()
        summaries(url, args.workers, applied, 120)
        print(f"{mode.label}: applied by every process in {time.monotonic() - started:.1f} s", flush=True)
        yield state
    finally:
        event = RolloutEvent(MODEL, state.id, "rolled_back", state.version, state.champion, "bench over", "bench")
        end_rollout(settings, state, event)
    summaries(url, args.workers, lambda c: c is None, 120)


def measure_mode(settings: Settings, url: str, made: Registered, mode: Mode, ctx: dict[str, Any]) -> list[dict]:
    """Every request size in `mode`: the load's figures, the rollout's volume and state."""
    from adapters.rollout_store import read_rollout

    args, server = ctx["args"], ctx["server"]
    out = []
    with rollout(settings, url, made, mode, args) as state:
        for size in args.records_per_request:
            bodies = Bodies((made.records * (size // len(made.records) + 1))[:size], ctx["next_id"])
            before = volume(url)
            result = asyncio.run(_load(Load(f"{url}/models/{MODEL}/predict", bodies, args.concurrency, server),
                                       args.seconds, args.warmup))  # fmt: skip
            ctx["next_id"] = bodies.next_id
            time.sleep(0.5)  # the last shadow scorings land
            after = volume(url)
            result |= {
                "mode": mode.label,
                "share": state.share if state else None,
                "records_per_request": size,
                "clients": args.concurrency,
                "records_per_s": result["throughput_rps"] * size,
                "server_cpu_ms_per_1k_records": 1e6 * result["server_cpu_s"] / max(1, result["requests"] * size),
                "volume": {role: after.get(role, 0) - before.get(role, 0) for role in after},
            }
            if state is not None:
                sent = result["requests_sent_with_warmup"] * size
                result["challenger_answered_share"] = result["volume"].get("answered", 0) / sent
                _, cut, _ = read_rollout(settings, MODEL)
                result["cut_off"] = cut.reason if cut is not None and cut.rollout == state.id else None
                by_pid = summaries(url, args.workers, lambda c: c is not None, 30)
                result["status_by_process"] = {str(p): c["status"] if c else None for p, c in by_pid.items()}
            print(f"{mode.label:18s} {size:4d} records x {args.concurrency} clients: {_short(result)}", flush=True)
            out.append(result)
    return out


def _short(result: dict[str, Any]) -> str:
    keys = ("throughput_rps", "records_per_s", "p50_ms", "p99_ms", "failures", "server_cpu_s", "client_cpu_s")
    text = ", ".join(f"{k} {result[k]:.4g}" for k in keys)
    if result.get("volume"):
        text += f", volume {result['volume']}, cut off: {result.get('cut_off')}"
    return text


RATIOS = {
    "rps_vs_champion": "throughput_rps",
    "records_per_s_vs_champion": "records_per_s",
    "p50_vs_champion": "p50_ms",
    "p99_vs_champion": "p99_ms",
    "cpu_per_record_vs_champion": "server_cpu_ms_per_1k_records",
}


def with_ratios(runs: list[dict]) -> list[dict]:
    """Each rollout run over the champion-only runs measured just before and after it (their mean), same size.

    The machine's speed drifts during a run (a shared VM: champion only varied by 1.6x between the start and the
    end of one run), so each mode is compared with its neighbours in time, not with one run at the start.
    Champion-only runs are given over the first one, which shows the drift.
    """
    for size in {run["records_per_request"] for run in runs}:
        same = [run for run in runs if run["records_per_request"] == size]
        champions = [i for i, run in enumerate(same) if run["mode"].startswith("champion")]
        for i, run in enumerate(same):
            if i in champions:
                neighbours = [same[champions[0]]]
            else:
                before = [c for c in champions if c < i][-1:]
                after = [c for c in champions if c > i][:1]
                neighbours = [same[c] for c in before + after]
            for ratio, key in RATIOS.items():
                run[ratio] = run[key] / (sum(n[key] for n in neighbours) / len(neighbours))
    return runs


def modes(args: argparse.Namespace) -> list[Mode]:
    """Champion only between each rollout mode (shadow, each canary share): every mode has a champion run on each
    side to be compared with."""
    from core.rollout import RolloutPolicy

    budget = {"latency_budget_ms": args.latency_budget_ms}
    rollouts = [Mode("shadow", RolloutPolicy(mode="shadow", **budget))]
    rollouts += [
        Mode(f"canary {share:.0%}", RolloutPolicy(mode="canary", canary_share=share, **budget))
        for share in args.canary_shares
    ]
    out = [Mode("champion")]
    for mode in rollouts:
        out += [mode, Mode("champion")]
    return out


def main() -> None:
    """Register the two versions, serve the model, measure each mode, write the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="measured time per mode and request size")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--concurrency", type=int, default=8, help="closed-loop clients")
    parser.add_argument("--records-per-request", type=int, nargs="+", default=[1, 100])
    parser.add_argument("--workers", type=int, default=2, help="serving worker processes")
    parser.add_argument("--poll-seconds", type=float, default=1.0, help="serving's registry poll interval")
    parser.add_argument("--canary-shares", type=float, nargs="+", default=[0.1, 0.5])
    parser.add_argument("--challenger", choices=("hgb", "logistic"), default="hgb")
    parser.add_argument("--latency-budget-ms", type=float, default=10_000.0, help="the challenger's (generous)")
    args = parser.parse_args()
    started = time.monotonic()
    # No default port: the serving port and Prefect's (this stack has no Prefect) point at free ones, and without
    # PREFECT_API_URL (unset before Prefect is first imported) the rollout's events are not emitted, only stored.
    os.environ |= {"MLOPS_PREFECT_PORT": str(free_port()), "MLOPS_SERVING_PORT": str(free_port())}
    with ExitStack() as stack:
        settings = stack.enter_context(private_stack())
        os.environ.update(client_env(settings))
        os.environ.pop("PREFECT_API_URL", None)
        made = register(settings, args.challenger)
        print(f"registered {MODEL}: champion v{made.champion}, challenger v{made.challenger}", flush=True)
        url, context = serve(settings, args)
        proc = stack.enter_context(context)
        wait_ready(url, 300)
        load_before = os.getloadavg()
        ctx = {"args": args, "server": psutil.Process(proc.pid), "next_id": 1}
        runs = [run for mode in modes(args) for run in measure_mode(settings, url, made, mode, ctx)]
    results = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "workers": args.workers,
        "concurrency": args.concurrency,
        "records_per_request": args.records_per_request,
        "seconds_per_load": args.seconds,
        "warmup_seconds": args.warmup,
        "poll_seconds": args.poll_seconds,
        "latency_budget_ms": args.latency_budget_ms,
        "model": {
            "name": MODEL,
            "task": "binary",
            "champion": {"version": made.champion, "estimator": made.estimators["champion"]},
            "challenger": {"version": made.challenger, "estimator": made.estimators["challenger"]},
        },
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "bench_seconds": round(time.monotonic() - started, 1),
        "runs": with_ratios(runs),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "rollout.json").write_text(json.dumps(results, indent=2))
    (RESULTS / "rollout.md").write_text(markdown(results))
    print(markdown(results))


def markdown(results: dict) -> str:
    """The results as a Markdown page."""
    model = results["model"]
    champion, challenger = model["champion"], model["challenger"]
    lines = [
        f"# Serving cost of a rollout ({results['date']}, {results['cpus']} cores, {results['workers']} serving "
        "worker processes)",
        "",
        f"Model `{model['name']}` ({model['task']}, the project's pipeline): champion v{champion['version']} "
        f"{champion['estimator']}, challenger v{challenger['version']} {challenger['estimator']}; latency budget "
        f"{results['latency_budget_ms']:g} ms. {results['concurrency']} closed-loop clients (bench.serving's aiohttp "
        f"client, in the benchmark's process, on the same cores), "
        f"{', '.join(str(n) for n in results['records_per_request'])} records per request, every record a fresh "
        f"id, at `/models/{model['name']}/predict`; {results['warmup_seconds']:g} s warm-up then "
        f"{results['seconds_per_load']:g} s measured per row. Load average (1, 5, 15 min) before: "
        f"{', '.join(f'{x:.2f}' for x in results['load_average_before'])}; after: "
        f"{', '.join(f'{x:.2f}' for x in results['load_average_after'])}. The whole bench took "
        f"{results['bench_seconds']:.0f} s.",
        "",
        "Ratios (x) are over the mean of the champion-only runs just before and after (champion-only rows: over "
        "the first, which shows the machine's drift), same request size. Server CPU: every process of "
        "`mlops serve` in the measured window. Challenger answered / shadow / champion shadow / skipped: records "
        "by role over warm-up and measurement (`GET /models/<name>` volume); skipped: background scorings dropped "
        "because too many waited.",
        "",
        "| mode | records / request | req/s | records/s | p50 ms | p99 ms | req/s x | p50 x | p99 x "
        "| server CPU ms / 1k records | CPU x | challenger answered | challenger shadow | champion shadow "
        "| skipped | cut off | failures |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in results["runs"]:
        v = r.get("volume", {})
        skipped = sum(n for role, n in v.items() if role.endswith("_skipped"))
        rollout = r["share"] is not None
        answered = f"{v.get('answered', 0)} ({r['challenger_answered_share']:.0%})" if rollout else "-"
        lines.append(
            f"| {r['mode']} | {r['records_per_request']} | {r['throughput_rps']:.0f} | {r['records_per_s']:.0f} "
            f"| {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['rps_vs_champion']:.2f} | {r['p50_vs_champion']:.2f} "
            f"| {r['p99_vs_champion']:.2f} | {r['server_cpu_ms_per_1k_records']:.1f} "
            f"| {r['cpu_per_record_vs_champion']:.2f} | {answered} "
            f"| {v.get('shadow', 0) if rollout else '-'} | {v.get('champion_shadow', 0) if rollout else '-'} "
            f"| {skipped if rollout else '-'} | {(r['cut_off'] or 'no') if rollout else '-'} | {r['failures']} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
