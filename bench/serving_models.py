"""Serving several models: the same API with 1 and with 5 models loaded, in one run.

Starts a private S3 and MLflow on free loopback ports in a temporary state folder (`--stack`: use the
configured stack instead), registers five small champions of different tasks as training logs them (the
test suite's `_register`), then runs `mlops serve` twice with the same worker processes (`--workers`):

- **1 model**: only the default model (`bm-ridge`, a regressor); the catalog serves none of the others;
- **5 models**: the four others put in the catalog (`adapters.catalog`), served at `/models/<name>/`.

Each is driven by bench.serving's client (`_load`: closed-loop aiohttp clients, one record per request):
every model at 1 and 8 clients, one model at a time (the default at `/predict` too), and with 5 models all of
them at once (2 clients each). RSS is read from /proc for each serving worker process once its models are
loaded and again after the load (the spool's converter process, one per worker whatever the number of
models, is counted apart); RSS per model = (RSS with 5 models - RSS with 1) / 4, per worker process.
Writes bench/results/serving_models.{json,md}.

    python -m bench.serving_models [--seconds 5] [--workers 2] [--stack]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psutil
import yaml

from adapters.settings import Settings, get_settings
from bench.serving import Load, _load, drive
from mlops.stack import client_env, running
from tests.ports import free_port, free_port_block

RESULTS = Path(__file__).parent / "results"
CLIENTS = (1, 8)
DEFAULT = "bm-ridge"
MODELS = (DEFAULT, "bm-levels", "bm-flag", "bm-hgb-levels", "bm-forest")


@contextmanager
def private_stack() -> Any:
    """S3 and MLflow (on PostgreSQL) on free ports in a temp folder (no Prefect, serving, Dask); yields settings."""
    from mlops import stack as local_stack

    with tempfile.TemporaryDirectory(prefix="bench-serving-models-") as state:
        env = {
            "MLOPS_STATE_DIR": state,
            "MLOPS_S3_PORT": str(free_port()),
            "MLOPS_MLFLOW_PORT": str(free_port()),
            "MLOPS_POSTGRES_PORT": str(free_port()),
            "MLOPS_WEED_PORT_BASE": str(free_port_block(16)),
            "MLOPS_DASK_WORKERS": "0",
        }
        for var in ("MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL_S3", "MLFLOW_S3_ENDPOINT_URL", "MLOPS_SERVING_URL"):
            os.environ.pop(var, None)
        os.environ.update(env)
        settings = Settings()
        started = [s for s in local_stack.services(settings) if s.name in ("postgres", "s3", "mlflow")]
        try:
            for service in started:
                local_stack._start(service, settings, 180.0)
            yield settings
        finally:
            for service in reversed(started):
                if (pid := local_stack._read_pid(service)) is not None:
                    local_stack._stop_pid(pid)


def register_models(settings: Settings) -> dict[str, dict]:
    """The five champions (a regressor, a multiclass and a binary logistic regression, a multiclass gradient
    boosting, a random forest regressor): per name its config, records to send and version."""
    from sklearn.ensemble import HistGradientBoostingClassifier, RandomForestRegressor
    from sklearn.linear_model import LogisticRegression, Ridge

    from adapters.clients import use_tracking_server
    from core.data.dataset import DatasetConfig
    from tests.task_types import diabetes_config, diabetes_frame, fit, multiclass_config, multiclass_frame
    from tests.test_task_types import _records, _register

    use_tracking_server(settings)
    diabetes, levels = diabetes_frame(), multiclass_frame(3000)
    flags = levels.assign(flag=(levels["level"] == "high").astype("int64")).drop(columns=["level"])
    flag_raw = multiclass_config("bm-flag").model_dump(mode="json")
    specs = {
        DEFAULT: (diabetes_config(DEFAULT), diabetes, Ridge(alpha=0.1), 300),
        "bm-levels": (multiclass_config("bm-levels"), levels, LogisticRegression(max_iter=500), 2400),
        "bm-flag": (
            DatasetConfig.model_validate(flag_raw | {"target": "flag", "task": "binary", "classes": [0, 1]}),
            flags,
            LogisticRegression(max_iter=500),
            2400,
        ),
        "bm-hgb-levels": (multiclass_config("bm-hgb-levels"), levels, HistGradientBoostingClassifier(), 2400),
        "bm-forest": (diabetes_config("bm-forest"), diabetes, RandomForestRegressor(random_state=0), 300),
    }
    made = {}
    for name, (config, frame, estimator, split) in specs.items():
        train, holdout = frame.iloc[:split], frame.iloc[split:]
        model = fit(config, train, estimator)
        version = _register(settings, config, model, train, holdout)
        made[name] = {"config": config, "records": _records(config, holdout.head(1)), "version": version}
    return made


def catalog(settings: Settings, made: dict[str, dict], names: list[str]) -> None:
    """Put `names` in the catalog (the default model is served without an entry)."""
    from adapters.catalog import put_entry

    for name in names:
        config = made[name]["config"]
        put_entry(settings, config, yaml.safe_dump(config.model_dump(mode="json")), replace=True)


def serve(settings: Settings, workers: int, log_name: str) -> tuple[str, Any]:
    """`mlops serve` of the default model on a free port (a context manager yielding its process)."""
    port = free_port()
    command = [str(Path(sys.executable).parent / "mlops"), "serve", "--port", str(port), "--model", DEFAULT]
    command += ["--workers", str(workers)]
    env = os.environ | client_env(settings) | {"MLOPS_SERVING_CATALOG_POLL_SECONDS": "1"}
    url = f"http://127.0.0.1:{port}"
    return url, running(command, f"{url}/health", env, RESULTS / "logs" / f"{log_name}.log", 300)


def wait_served(url: str, made: dict[str, dict], names: list[str], workers: int, timeout: float = 300) -> None:
    """Until every worker process serves every one of `names` at its registered version."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with httpx.Client(timeout=10) as http:
            listed = {m["name"]: m for m in http.get(f"{url}/models").json()["models"]}
        if all(
            n in listed and [w["version"] for w in listed[n]["workers"]] == [made[n]["version"]] * workers
            for n in names
        ):
            return
        time.sleep(0.5)
    raise TimeoutError(f"{names} not served by {workers} processes within {timeout:.0f}s")


def rss(url: str) -> dict[str, Any]:
    """RSS (MiB) of each serving worker process (the pids `/models` lists) and of their converter processes."""
    with httpx.Client(timeout=10) as http:
        pids = [w["pid"] for w in http.get(f"{url}/models").json()["models"][0]["workers"]]
    workers = [psutil.Process(pid) for pid in pids]
    converters = [c for w in workers for c in w.children() if "spawn_main" in " ".join(c.cmdline())]
    mib = 2**20
    return {
        "workers_mib": [round(w.memory_info().rss / mib, 1) for w in workers],
        "converters_mib": [round(c.memory_info().rss / mib, 1) for c in converters],
    }


def measure(url: str, paths: dict[str, str], records: dict[str, list], seconds: float, warmup: float) -> list[dict]:
    """Each path alone at 1 and 8 clients: throughput, p50, p99."""
    loads = (
        Load(
            url + path,
            json.dumps({"records": records[label]}).encode(),
            clients,
            f"  {label:14s} {path:28s} x{clients}",
            {"model": label, "path": path, "clients": clients},
        )
        for label, path in paths.items()
        for clients in CLIENTS
    )
    return [load.tag | result for load, result in drive(loads, seconds, warmup)]


async def _all_at_once(url: str, made: dict[str, dict], seconds: float, warmup: float) -> list[dict]:
    jobs = {
        name: _load(f"{url}/models/{name}/predict", json.dumps({"records": m["records"]}).encode(), 2, seconds, warmup)
        for name, m in made.items()
    }
    results = await asyncio.gather(*jobs.values())
    return [{"model": name, "clients": 2} | result for name, result in zip(jobs, results, strict=True)]


def scenario(settings: Settings, made: dict, names: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """One server with `names` served: RSS loaded, the load, RSS after."""
    url, context = serve(settings, args.workers, f"serving-models-{len(names)}")
    with ExitStack() as stack:
        stack.enter_context(context)
        wait_served(url, made, names, args.workers)
        loaded = rss(url)
        print(f"{len(names)} model(s) loaded: {loaded}", flush=True)
        paths = {name: f"/models/{name}/predict" for name in names}
        records = {name: made[name]["records"] for name in names} | {"default /predict": made[DEFAULT]["records"]}
        runs = measure(url, {"default /predict": "/predict"} | paths, records, args.seconds, args.warmup)
        together = None
        if len(names) > 1:
            together = asyncio.run(_all_at_once(url, {n: made[n] for n in names}, args.seconds, args.warmup))
            print(f"  all at once: {together}", flush=True)
        after = rss(url)
        print(f"{len(names)} model(s) after the load: {after}", flush=True)
    return {"models": names, "rss_loaded": loaded, "rss_after_load": after, "runs": runs, "all_at_once": together}


def per_model_rss(one: dict, five: dict) -> dict[str, float]:
    """(RSS with 5 models - RSS with 1) / 4 per worker process, loaded and after the load (MiB, mean of workers)."""

    def mean(values: list[float]) -> float:
        return sum(values) / len(values)

    out = {}
    for when in ("rss_loaded", "rss_after_load"):
        delta = mean(five[when]["workers_mib"]) - mean(one[when]["workers_mib"])
        out[f"{when}_per_model_mib"] = round(delta / 4, 1)
        out[f"{when}_worker_1_model_mib"] = round(mean(one[when]["workers_mib"]), 1)
        out[f"{when}_worker_5_models_mib"] = round(mean(five[when]["workers_mib"]), 1)
    return out


def main() -> None:
    """Register the five models, measure the API with 1 and with 5 of them, write the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="measured time per scenario")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--workers", type=int, default=2, help="serving worker processes")
    parser.add_argument("--stack", action="store_true", help="use the configured stack, not a private one")
    args = parser.parse_args()
    with ExitStack() as stack:
        settings = get_settings() if args.stack else stack.enter_context(private_stack())
        os.environ.update(client_env(settings))
        made = register_models(settings)
        load_before = os.getloadavg()
        one = scenario(settings, made, [DEFAULT], args)
        catalog(settings, made, [n for n in MODELS if n != DEFAULT])
        five = scenario(settings, made, list(MODELS), args)
    results = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "workers": args.workers,
        "seconds_per_scenario": args.seconds,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "models": {name: {"task": m["config"].task, "version": m["version"]} for name, m in made.items()},
        "one_model": one,
        "five_models": five,
        "rss_per_model": per_model_rss(one, five),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "serving_models.json").write_text(json.dumps(results, indent=2, default=str))
    (RESULTS / "serving_models.md").write_text(markdown(results))
    print(markdown(results))


def markdown(results: dict) -> str:
    """The results as a Markdown page."""
    rss = results["rss_per_model"]
    lines = [
        f"# Serving 1 vs 5 models ({results['date']}, {results['cpus']} CPUs, {results['workers']} worker processes)",
        "",
        f"Load average before: {', '.join(f'{x:.2f}' for x in results['load_average_before'])}; after: "
        f"{', '.join(f'{x:.2f}' for x in results['load_average_after'])}. {results['seconds_per_scenario']:.0f} s "
        "per scenario, one record per request, bench.serving's closed-loop client in the benchmark's process.",
        "",
        "Models: " + ", ".join(f"`{n}` ({m['task']})" for n, m in results["models"].items()) + ".",
        "",
        "| served | model | path | clients | rps | p50 ms | p99 ms | failures |",
        "|---:|---|---|---:|---:|---:|---:|---:|",
    ]
    for key, served in (("one_model", 1), ("five_models", 5)):
        for run in results[key]["runs"]:
            lines.append(
                f"| {served} | {run['model']} | `{run['path']}` | {run['clients']} | {run['throughput_rps']:.0f} "
                f"| {run['p50_ms']:.2f} | {run['p99_ms']:.2f} | {run['failures']} |"
            )
    lines += ["", "All five models at once (2 clients each, 10 in all):", ""]
    lines += ["| model | rps | p50 ms | p99 ms | failures |", "|---|---:|---:|---:|---:|"]
    for run in results["five_models"]["all_at_once"] or []:
        lines.append(
            f"| {run['model']} | {run['throughput_rps']:.0f} | {run['p50_ms']:.2f} | {run['p99_ms']:.2f} "
            f"| {run['failures']} |"
        )
    one, five = results["one_model"], results["five_models"]
    lines += [
        "",
        "RSS per serving worker process (MiB, mean of the workers):",
        "",
        "| when | 1 model | 5 models | per added model |",
        "|---|---:|---:|---:|",
        f"| models loaded | {rss['rss_loaded_worker_1_model_mib']} | {rss['rss_loaded_worker_5_models_mib']} "
        f"| {rss['rss_loaded_per_model_mib']} |",
        f"| after the load | {rss['rss_after_load_worker_1_model_mib']} | {rss['rss_after_load_worker_5_models_mib']} "
        f"| {rss['rss_after_load_per_model_mib']} |",
        "",
        "Converter processes (one per worker, shared by its models; started at the first upload), MiB: "
        f"1 model {one['rss_after_load']['converters_mib']}, 5 models {five['rss_after_load']['converters_mib']}.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
