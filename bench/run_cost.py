"""What a run costs, in one run on one machine: the training flow against a bare scikit-learn script at each size,
batch scoring in rows/s, and the idle CPU of the whole stack (issue 29, item 3).

The bench starts its own stack (`mlops stack up`, state in /tmp/mlops-bench-run-cost, loopback ports 21xxx, so
nothing of the default stack on 4200/5000/5433/8000/8786/9000 is touched) with the stack's own Dask cluster
(a scheduler and two workers of `MLOPS_DASK_WORKER_MEMORY`), as `mlops train` finds it, and stops it at the end.

1. For each `--rows`: the synthetic credit-risk data as 12 monthly Parquet files (one month in memory at a time),
   then `mlops train --config` on the bundled credit-risk config pointed at them (its default search and engine:
   nothing is overridden; a new model name per bench run, so each is a cold start with no champion), then the bare
   script (bench/run_cost_bare.py: read, same split, same search, evaluate). Each in its own process and session,
   stopped past its time limit or memory cap (SIGKILL); every process of the stack is sampled beside it every
   0.5 s (bench/run_cost_sampler.py). Per run: wall time, seconds per task from the Prefect API, the fixed cost
   (wall time minus the training work: bench/run_cost_runs.py's `WORK_TASKS`), the engine and rows the run
   records, and the peak RSS and CPU seconds of every role.
2. Batch scoring of `--scoring-rows` rows with bench/scoring_scale.py's registered model and configurations
   (`local` by default), each configuration in its own process.
3. The stack idle: after `--idle-settle` s with nothing running, the CPU seconds of every stack process over
   `--idle-seconds` s, as % of one core, per role.

Usage: `python -m bench.run_cost [--rows 100000 1000000 10000000] [--scoring-rows 10000000] [--idle-seconds 60]`
(the full run, hours on 2 cores); a smoke run: `--rows 20000 50000 --scoring-rows 200000 --idle-seconds 10`.
Results: bench/results/run_cost.json and bench/results/run_cost.md (written again after each phase).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.run_cost_report import markdown
from bench.run_cost_sampler import ChildRun, Limits, Sampler, machine, run_child, stack_sessions

RESULTS = Path(__file__).parent / "results"
STATE = Path("/tmp/mlops-bench-run-cost")
LOGS = STATE / "logs"
ENV = {
    "MLOPS_STATE_DIR": str(STATE),
    "MLOPS_S3_PORT": "21900",
    "MLOPS_MLFLOW_PORT": "21500",
    "MLOPS_PREFECT_PORT": "21420",
    "MLOPS_WORKER_PORT": "21421",
    "MLOPS_POSTGRES_PORT": "21543",
    "MLOPS_SERVING_PORT": "21800",
    "MLOPS_WEED_PORT_BASE": "21600",  # 21600-21614
    "MLOPS_DASK_SCHEDULER_PORT": "21786",
    "MLOPS_DASK_DASHBOARD_PORT": "21787",
}
# The stack's own knobs a caller may set for the bench (the Dask workers' memory, the database); the rest is ENV's.
KEEP = {"MLOPS_DASK_WORKER_MEMORY", "MLOPS_DASK_WORKERS", "MLOPS_DATABASE", "MLOPS_SERVING_WORKERS"}
BIN = Path(sys.executable).parent
MONTHS = 12


def stack_env() -> dict[str, str]:
    """This process's environment pointed at the bench stack (set here too, before any setting is read)."""
    for key in [k for k in os.environ if k.startswith(("MLOPS_", "MLFLOW_", "PREFECT_", "AWS_")) and k not in KEEP]:
        del os.environ[key]  # whatever points at another stack
    os.environ.update(ENV)
    env = dict(os.environ)
    from adapters.settings import Settings
    from mlops.stack import client_env

    env |= client_env(Settings())
    os.environ.update(env)
    return env


def _tail(log: Path, lines: int = 8) -> list[str]:
    try:
        return log.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return []


def generate(rows: int) -> dict[str, Any]:
    """`rows` synthetic rows as 12 monthly Parquet files under s3://<bucket>/datasets/run-cost-<rows>/ (kept)."""
    from adapters.clients import S3Location
    from adapters.settings import get_settings
    from adapters.store import list_keys
    from mlops.datagen import write_months

    settings = get_settings()
    source = f"s3://{settings.bucket}/datasets/run-cost-{rows}/"
    if len(list_keys(settings, S3Location.parse(source), (".parquet",))) == MONTHS:
        return {"source": source, "generated": False}
    started = time.perf_counter()
    for month in range(MONTHS):  # one month in memory at a time
        write_months(settings, source, 1, rows // MONTHS + (month < rows % MONTHS), seed=42, first_month=month)
    return {"source": source, "generated": True, "seconds": round(time.perf_counter() - started, 1)}


def dataset_config(rows: int, source: str, stamp: str) -> tuple[Path, str]:
    """The bundled credit-risk config pointed at the generated rows, under a model name new to this bench run."""
    import yaml

    from core.data.dataset import bundled_config_text

    name = f"run-cost-{rows}-{stamp}"
    raw = yaml.safe_load(bundled_config_text("credit-risk")) | {"name": name, "model_name": name, "source": source}
    path = STATE / "configs" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path, name


def _child_json(run: ChildRun, log: Path) -> dict[str, Any]:
    return {
        "outcome": run.outcome(),
        "exit_code": run.exit_code,
        "wall_s": run.wall_seconds,
        "cpu_s": run.cpu_seconds,
        "kernel_max_rss_mb": run.max_rss_mb,
        "phase": run.phase,
        "log": str(log),
        "log_tail": [] if run.outcome() == "completed" else _tail(log),
    }


def train(rows: int, config: Path, name: str, env: dict[str, str], options: argparse.Namespace) -> dict[str, Any]:
    """`mlops train` on the config, measured; then what it did, from Prefect and MLflow."""
    from bench.run_cost_runs import breakdown, flow_run_of, mark_crashed, mlflow_what_ran

    log = LOGS / f"flow-{name}.log"
    command = [str(BIN / "mlops"), "train", "--config", str(config), *(["--dry-run"] if options.dry_run else [])]
    run = run_child(
        command, env, log, "flow", _stack(), Limits(options.flow_timeout, options.max_flow_gb, options.min_available_gb)
    )
    out = {"command": " ".join(command[1:])} | _child_json(run, log)
    if run.outcome().startswith("stopped"):
        _restart_dask_workers()  # what a killed flow left running on the cluster stops with it
    try:  # what the run did, from the servers; a failure to read it is reported, the bench goes on
        found = flow_run_of(f"model:{name}")
        out["breakdown"] = breakdown(found, run.wall_seconds) if found else None
        if found and run.outcome().startswith("stopped"):
            mark_crashed(str(found["run"].id), run.outcome())
        out["mlflow"] = mlflow_what_ran(name)
    except Exception as exc:
        out["read_error"] = f"{type(exc).__name__}: {exc}"
    return out


def bare(config: Path, name: str, env: dict[str, str], options: argparse.Namespace) -> dict[str, Any]:
    """The bare scikit-learn script on the same config and data, measured."""
    log = LOGS / f"bare-{name}.log"
    command = [sys.executable, "-m", "bench.run_cost_bare", str(config)]
    run = run_child(
        command, env, log, "bare", _stack(), Limits(options.bare_timeout, options.max_bare_gb, options.min_available_gb)
    )
    found = [line for line in _tail(log, 50) if line.startswith("RESULT ")]
    return _child_json(run, log) | {"result": json.loads(found[-1][7:]) if found else None}


def _restart_dask_workers() -> None:
    from adapters.settings import get_settings
    from mlops.stack_env import dask_address

    try:
        from distributed import Client

        with Client(dask_address(get_settings()), timeout=30) as client:
            client.restart(timeout=120)
    except Exception as exc:  # reported, the bench goes on
        print(f"could not restart the Dask workers: {exc}", flush=True)


def prepare_scoring(rows: int) -> None:
    """(In a child process) bench/scoring_scale.py's data and registered model; prints them."""
    from bench.scoring_scale import prepare

    started = time.perf_counter()
    source, dataset, version = prepare(rows)
    print("PREPARED " + json.dumps([source, dataset, version, round(time.perf_counter() - started, 1)]), flush=True)


def scoring(env: dict[str, str], options: argparse.Namespace) -> dict[str, Any]:
    """Batch scoring of `--scoring-rows` rows, each configuration in its own process."""
    log = LOGS / f"scoring-prepare-{options.scoring_rows}.log"
    with open(log, "wb") as out:
        subprocess.run(
            [sys.executable, "-m", "bench.run_cost", "--prepare-scoring", str(options.scoring_rows)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            check=False,
        )
    prepared = [line for line in _tail(log, 50) if line.startswith("PREPARED ")]
    if not prepared:
        return {"rows": options.scoring_rows, "error": _tail(log)}
    source, dataset, version, seconds = json.loads(prepared[-1][9:])
    out: dict[str, Any] = {"rows": options.scoring_rows, "prepare_s": seconds, "version": version, "results": []}
    for config in options.scoring_configs:
        log = LOGS / f"scoring-{config}-{options.scoring_rows}.log"
        command = [sys.executable, "-m", "bench.scoring_scale", "--one", config, source, dataset, version]
        run = run_child(
            command, env, log, "scoring", _stack(), Limits(options.scoring_timeout, 64, options.min_available_gb)
        )
        found = [line for line in _tail(log, 50) if line.startswith("RESULT ")]
        result = json.loads(found[-1][7:]) if found else None
        out["results"].append({"config": config, "result": result} | _child_json(run, log))
    return out


def idle(options: argparse.Namespace) -> dict[str, Any]:
    """CPU of every stack process over `--idle-seconds` with nothing running (after `--idle-settle` s)."""
    time.sleep(options.idle_settle)
    sampler = Sampler(_stack())
    sampler.start()
    time.sleep(options.idle_seconds)
    phase = sampler.finish()
    cpu = sum(role["cpu_seconds"] for role in phase["roles"].values())
    window = phase["seconds"]
    return phase | {
        "settle_s": options.idle_settle,
        "cpu_seconds": round(cpu, 2),
        "pct_of_one_core": round(100 * cpu / window, 1),
        "pct_by_role": {r: round(100 * v["cpu_seconds"] / window, 2) for r, v in phase["roles"].items()},
    }


def _stack_settings() -> dict[str, Any]:
    from adapters.settings import get_settings
    from mlops import stack_postgres

    settings = get_settings()
    return {
        "database": stack_postgres.backend(settings),
        "dask_workers": settings.dask_workers,
        "dask_worker_memory": settings.dask_worker_memory,
        "serving_workers": settings.serving_workers,
        "state_dir": str(STATE),
    }


def _stack() -> dict[int, str]:
    return stack_sessions(STATE)


def _write(results: dict[str, Any]) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "run_cost.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    (RESULTS / "run_cost.md").write_text(markdown(results))


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="*", default=[100_000, 1_000_000, 10_000_000])
    parser.add_argument("--flow-timeout", type=float, default=5400, help="seconds before a flow run is stopped")
    parser.add_argument(
        "--max-flow-gb", type=float, default=24, help="the flow's process tree stopped past this RSS (GiB)"
    )
    parser.add_argument("--bare-timeout", type=float, default=3600, help="seconds before the bare script is stopped")
    parser.add_argument("--max-bare-gb", type=float, default=16, help="the bare script stopped past this RSS")
    parser.add_argument(
        "--min-available-gb", type=float, default=1.0, help="a measured run stopped when the machine has less free"
    )
    parser.add_argument("--dry-run", action="store_true", help="mlops train --dry-run (no registry, no promotion)")
    parser.add_argument("--scoring-rows", type=int, default=10_000_000, help="0: no scoring")
    parser.add_argument("--scoring-configs", nargs="+", default=["local"], help="bench.scoring_scale configs")
    parser.add_argument("--scoring-timeout", type=float, default=3600)
    parser.add_argument("--idle-seconds", type=float, default=60, help="0: no idle measurement")
    parser.add_argument("--idle-settle", type=float, default=30, help="seconds of quiet before the idle window")
    parser.add_argument("--keep-stack", action="store_true", help="leave the bench stack running at the end")
    parser.add_argument("--prepare-scoring", type=int, help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    options = _arguments()
    env = stack_env()
    if options.prepare_scoring:
        prepare_scoring(options.prepare_scoring)
        return
    LOGS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%m%d%H%M%S")
    results: dict[str, Any] = {
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": machine(),
        "command": "python -m bench.run_cost " + " ".join(sys.argv[1:]),
        "options": vars(options),
        "training": [],
    }
    started = time.perf_counter()
    try:
        subprocess.run([BIN / "mlops", "stack", "up"], env=env, check=True, stdout=subprocess.DEVNULL)
        results["stack"] = {"up_s": round(time.perf_counter() - started, 1), "roles": sorted(set(_stack().values()))}
        results["stack"]["settings"] = _stack_settings()
        for rows in options.rows:
            data = generate(rows)
            print(f"{rows:,} rows: {data}", flush=True)
            config, name = dataset_config(rows, data["source"], stamp)
            entry: dict[str, Any] = {"rows": rows, "model": name, "data": data}
            entry["flow"] = train(rows, config, name, env, options)
            print(f"{rows:,} rows: flow {entry['flow']['outcome']} in {entry['flow']['wall_s']} s", flush=True)
            entry["bare"] = bare(config, name, env, options)
            print(f"{rows:,} rows: bare {entry['bare']['outcome']} in {entry['bare']['wall_s']} s", flush=True)
            results["training"].append(entry)
            _write(results)
        if options.scoring_rows:
            results["scoring"] = scoring(env, options)
            _write(results)
        if options.idle_seconds:
            results["idle"] = idle(options)
        results["total_s"] = round(time.perf_counter() - started, 1)
        _write(results)
    finally:
        if not options.keep_stack:
            subprocess.run([BIN / "mlops", "stack", "down"], env=env, check=False, stdout=subprocess.DEVNULL)
    print((RESULTS / "run_cost.md").read_text())


if __name__ == "__main__":
    main()
