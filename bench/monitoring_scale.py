"""Monitoring at scale on the Dask engine: per-feature drift alone, against drift + estimated performance +
multivariate drift, at 1M and 10M rows (issue 27, item 5).

The bench starts its own stack (`mlops stack up`, state in /tmp/mlops-bench-monitoring-scale, loopback ports
23xxx, SQLite unless `MLOPS_DATABASE` says otherwise, no Dask cluster of the stack's), so nothing of the default
stack or of the other benches (21xxx, 24xxx-29xxx) is touched, and stops it at the end (`--keep-stack` leaves it).

1. Per `--rows`: the synthetic credit-risk data as 12 monthly Parquet files in the bench's S3 (one month in memory
   at a time; months 6-11 shifted, `DriftSpec(6, 1.0)`), and a histogram gradient boosting classifier fitted on
   15,000 rows of other months, registered as `monitoring-scale` (the workers load it from the registry); its
   reference: 5,000 rows of an unseen month, with their labels (what the estimator is fitted on).
2. Per row count and mode, in a child process of its own with a fresh loopback `LocalCluster` (2 worker processes,
   one thread each, `MLOPS_DASK_WORKER_MEMORY` each), so each peak RSS is that run's: the model is loaded on each
   worker first (not timed: a long-lived cluster keeps it), then `dask_engine.drift.analyse_on_cluster`'s steps,
   each timed:
   - `drift`: today's per-feature drift only: thresholds `multivariate=False, estimate_triggers=False` and a
     reference without labels, so no estimator is fitted (what `with_estimator` does for a reference stored before
     estimation) and the tasks return only their counts;
   - `full`: the default thresholds: the estimator fitted on the reference (`fit_s`), the tasks add their sums for
     the estimates and a sample of the rows, the client judges the estimates and runs the domain classifier;
   - `full-one-thread`: the same with the client's OpenMP threads limited to one while judging (`threadpoolctl`):
     on a busy 2-core machine the domain classifier's gradient boosting spins its two OpenMP threads against the
     load (the same verdict, many times the seconds).
   Per run: wall seconds (estimator + cluster pass + judging), rows/s over it, the cluster pass's seconds
   (`drift_on_cluster`), the judging's (`window_result`: merged figures, estimates, domain classifier), the domain
   classifier alone (timed again on the same sample), each worker's peak RSS, the client's peak RSS, and what was
   found. The ratio of each mode's wall seconds to drift alone's per row count.

Usage: `python -m bench.monitoring_scale [--rows 1000000 10000000] [--modes drift full full-one-thread]
[--keep-stack]`.
Results: bench/results/monitoring_scale.json and .md (written again after each run).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"
STATE = Path("/tmp/mlops-bench-monitoring-scale")
ENV = {
    "MLOPS_STATE_DIR": str(STATE),
    "MLOPS_S3_PORT": "23900",
    "MLOPS_MLFLOW_PORT": "23500",
    "MLOPS_PREFECT_PORT": "23420",
    "MLOPS_WORKER_PORT": "23421",
    "MLOPS_POSTGRES_PORT": "23543",
    "MLOPS_SERVING_PORT": "23800",
    "MLOPS_WEED_PORT_BASE": "23600",  # 23600-23615
    "MLOPS_DASK_SCHEDULER_PORT": "23786",
    "MLOPS_DASK_DASHBOARD_PORT": "23787",
    "MLOPS_DASK_WORKERS": "0",  # each run starts its own cluster (fresh workers: their peak RSS is the run's)
    "MLOPS_SERVING_WORKERS": "1",
}
KEEP = {"MLOPS_DASK_WORKER_MEMORY", "MLOPS_DATABASE"}  # a caller may set these; the rest is ENV's
BIN = Path(sys.executable).parent
MODEL = "monitoring-scale"
MONTHS = 12
SHIFT = (6, 1.0)  # months from 6 on shifted, strongly (`core.data.synthetic.DriftSpec`)
WORKERS = 2
MODES = ("drift", "full", "full-one-thread")
ONE_THREAD = "full-one-thread"  # `full` with the client's OpenMP/BLAS threads limited to one while judging


def stack_env() -> dict[str, str]:
    """This process's environment pointed at the bench stack (set here too, before any setting is read)."""
    for key in [k for k in os.environ if k.startswith(("MLOPS_", "MLFLOW_", "PREFECT_", "AWS_")) and k not in KEEP]:
        del os.environ[key]  # whatever points at another stack
    os.environ.update(ENV)
    os.environ.setdefault("MLOPS_DATABASE", "sqlite")
    env = dict(os.environ)
    from adapters.settings import Settings
    from mlops.stack import CLIENT_DEFAULTS, client_env

    env |= CLIENT_DEFAULTS | client_env(Settings())
    os.environ.update(env)
    return env


def _source(rows: int, bucket: str) -> str:
    return f"s3://{bucket}/datasets/monitoring-scale-{rows}-shift-{SHIFT[0]}-{SHIFT[1]}/"


def prepare(rows: int) -> dict[str, Any]:
    """(In a child process) the data, written once per row count, and the registered model; printed as PREPARED."""
    from sklearn.ensemble import HistGradientBoostingClassifier

    from adapters.clients import S3Location
    from adapters.settings import get_settings
    from adapters.store import list_keys
    from core.data.dataset import load_local_dataset_config
    from core.data.features import prepare_inputs, prepare_target
    from core.data.synthetic import DriftSpec, generate_month
    from core.modeling.search import make_pipeline
    from mlops.datagen import write_months
    from tasks.tracking import log_model, register_model, start_run

    settings = get_settings()
    source = _source(rows, settings.bucket)
    out: dict[str, Any] = {"rows": rows, "source": source, "generated_s": None}
    if len(list_keys(settings, S3Location.parse(source), (".parquet",))) != MONTHS:
        started = time.perf_counter()
        for month in range(MONTHS):  # one month at a time: the generator holds one month in memory
            write_months(
                settings, source, 1, rows // MONTHS + (month < rows % MONTHS), seed=21,
                first_month=month, drift=DriftSpec(*SHIFT),
            )  # fmt: skip
        out["generated_s"] = round(time.perf_counter() - started, 1)
    config = load_local_dataset_config("credit-risk")
    import pandas as pd

    train = pd.concat([generate_month(i, 5000, 5) for i in range(3)], ignore_index=True)
    model = make_pipeline(config, HistGradientBoostingClassifier(random_state=0))
    model.fit(prepare_inputs(train, config), prepare_target(train, config))
    run_id = start_run.fn(config.model_copy(update={"name": MODEL}), {"bench": "monitoring_scale"}, {"run_name": MODEL})
    uri, digests = log_model.fn(run_id, model, train, config)
    out |= {"version": register_model.fn(uri, MODEL, run_id, digests.tags()), "run_id": run_id}
    print("PREPARED " + json.dumps(out), flush=True)
    return out


def _champion(version: str, run_id: str, mode: str) -> tuple[Any, Any]:
    """The champion as monitoring loads it (the registered model, a labelled reference of an unseen month)."""
    from adapters import registry
    from adapters.settings import get_settings
    from core.data.dataset import load_local_dataset_config
    from core.data.synthetic import generate_month
    from core.modeling.metrics import evaluate_on
    from core.monitoring.drift_analysis import Champion, reference_sample
    from core.monitoring.estimation import REFERENCE_TARGET

    config = load_local_dataset_config("credit-risk")
    model = registry.load_model(MODEL, version, get_settings(), where="bench")
    holdout = generate_month(3, 5000, 5)
    reference = reference_sample(holdout, model, config, 5000, 0)
    if mode == "drift":  # a reference stored before estimation existed: nothing to fit an estimator on
        reference = reference.drop(columns=REFERENCE_TARGET)
    return Champion(MODEL, version, run_id, model, evaluate_on(model, holdout, config), reference), config


def _load_model(version: str, settings: Any) -> None:
    """On a worker: the registered model into its cache (`dask_engine.workers.worker_model`)."""
    from dask_engine.workers import worker_model

    worker_model(MODEL, version, settings)


def _peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def run_one(rows: int, mode: str, source: str, version: str, run_id: str) -> dict[str, Any]:
    """One row count and mode, in this (child) process, on a fresh cluster (see the module)."""
    from distributed import Client, LocalCluster
    from threadpoolctl import threadpool_limits

    from adapters.scoring_store import list_partition_files
    from adapters.settings import get_settings
    from core.monitoring.drift import DriftThresholds, window_reference
    from core.monitoring.drift_analysis import with_estimator
    from core.monitoring.multivariate import MAX_ROWS, domain_classifier_drift
    from dask_engine.drift import DriftJob, drift_on_cluster, window_result
    from dask_engine.snapshots import read_files

    settings = get_settings()
    load_before = [round(x, 2) for x in os.getloadavg()]
    champion, config = _champion(version, run_id, mode)
    thresholds = DriftThresholds(multivariate=False, estimate_triggers=False) if mode == "drift" else DriftThresholds()
    files = list_partition_files(source, settings)
    needed = list(dict.fromkeys([*config.feature_names, config.id_column]))  # the columns `drift_on_cluster` reads
    partitions = read_files(files, None, settings)[needed].npartitions  # dask may read small files as one
    with LocalCluster(
        n_workers=WORKERS,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address="127.0.0.1:0",
        memory_limit=settings.dask_worker_memory,
    ) as cluster:
        with Client(cluster, set_as_default=False) as client:  # the model on each worker first (not timed)
            client.run(_load_model, version, settings)
        started = time.perf_counter()
        # `analyse_on_cluster`'s steps, each timed
        champion = champion if champion.estimator is not None else with_estimator(champion, config)
        fitted = time.perf_counter()
        reference = window_reference(champion.reference, config, champion.classes)
        job = DriftJob(MODEL, version, config, reference, config.id_column, settings)
        sample_rows = MAX_ROWS if thresholds.multivariate else 0
        counts = drift_on_cluster(cluster.scheduler_address, files, job, None, champion.estimator, sample_rows)
        counted = time.perf_counter()
        with threadpool_limits(1) if mode == ONE_THREAD else contextlib.nullcontext():
            result = window_result("partition", source, counts, reference, champion, thresholds)
        wall = time.perf_counter() - started
    domain_s = domain_one_thread_s = None
    if counts.sample is not None:  # the domain classifier alone, again on the same sample: as is, and on one thread
        columns = [r.name for r in reference.features]
        args = (champion.reference, counts.sample, columns, thresholds.domain_permutations, thresholds.domain_min_auc)
        again = time.perf_counter()
        domain_classifier_drift(*args)
        domain_s = round(time.perf_counter() - again, 2)
        with threadpool_limits(1):
            again = time.perf_counter()
            domain_classifier_drift(*args)
            domain_one_thread_s = round(time.perf_counter() - again, 2)
    estimated = None
    if result.estimated is not None:
        estimated = {
            m.metric: [round(m.estimate, 4), round(m.lower, 4), round(m.upper, 4)] for m in result.estimated.metrics
        }
    return {
        "rows": result.rows,
        "mode": mode,
        "files": len(files),
        "partitions": partitions,
        "wall_s": round(wall, 2),
        "rows_per_s": round(result.rows / wall),
        "fit_s": round(fitted - started, 2),
        "cluster_s": round(counted - fitted, 2),
        "judge_s": round(started + wall - counted, 2),
        "domain_classifier_s": domain_s,
        "domain_classifier_one_thread_s": domain_one_thread_s,
        "load_average_before": load_before,
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "worker_peak_rss_mb": sorted(m["peak_rss_mb"] for m in counts.worker_memory.values()),
        "worker_limit_mb": sorted({m["limit_mb"] for m in counts.worker_memory.values()}),
        "client_peak_rss_mb": _peak_rss_mb(),
        "drifted_features": len(result.drifted_features),
        "features": len(result.features),
        "estimated": estimated,
        "estimation_note": result.estimation_note,
        "multivariate": None if result.multivariate is None else result.multivariate.describe(),
        "multivariate_rows": None if result.multivariate is None else list(result.multivariate.rows),
        "reasons": result.reasons,
    }


def _child(args: list[str], env: dict[str, str], log: Path, tag: str) -> dict[str, Any] | None:
    with open(log, "wb") as out:
        subprocess.run(
            [sys.executable, "-m", "bench.monitoring_scale", *args], env=env, stdout=out, stderr=out, check=False
        )
    found = [line for line in log.read_text(errors="replace").splitlines() if line.startswith(tag + " ")]
    return json.loads(found[-1][len(tag) + 1 :]) if found else None


def _tail(log: Path, lines: int = 15) -> list[str]:
    return log.read_text(errors="replace").splitlines()[-lines:]


def markdown(results: dict[str, Any]) -> str:
    """The table of runs and the ratio per row count."""
    done = [r for r in results["runs"] if "error" not in r]
    partitions = ", ".join(dict.fromkeys(f"{r['rows']:,} rows: {r.get('partitions', '?')}" for r in done))
    lines = [
        f"# Monitoring at scale on the Dask engine ({results['when']})",
        "",
        f"{results['machine']['cores']} cores, {results['machine']['memory_gib']} GiB, {WORKERS} Dask workers of one "
        f"thread each (limit {results['worker_memory']} each), {MONTHS} Parquet files per row count "
        f"(dask partitions: {partitions}); "
        f"`{results['command']}`.",
        "",
        "| rows | mode | wall s | rows/s | estimator fit s | cluster pass s | judging s | domain classifier s "
        "(1 thread) | worker peak RSS MB | client peak RSS MB | load avg before, after | found |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---|---:|---|---|",
    ]
    for r in results["runs"]:
        if "error" in r:
            lines.append(f"| {r['rows_asked']:,} | {r['mode']} | failed: {' '.join(r['error'])[-300:]} ||||||||||")
            continue
        found = f"{r['drifted_features']}/{r['features']} features drifted"
        if r["estimated"]:
            found += f"; est. ROC AUC {r['estimated']['roc_auc'][0]}"
        if r["multivariate"]:
            found += f"; {r['multivariate'].split(';')[0]}"
        domain = "-"
        if r["domain_classifier_s"] is not None:
            domain = f"{r['domain_classifier_s']} ({r['domain_classifier_one_thread_s']})"
        lines.append(
            f"| {r['rows']:,} | {r['mode']} | {r['wall_s']} | {r['rows_per_s']:,} | {r['fit_s']} | {r['cluster_s']} "
            f"| {r['judge_s']} | {domain} | {', '.join(map(str, r['worker_peak_rss_mb']))} | {r['client_peak_rss_mb']} "
            f"| {r['load_average_before'][0]}, {r['load_average_after'][0]} | {found} |"
        )
    lines += [
        "",
        "Wall s = estimator fit + cluster pass (`drift_on_cluster`: read, score, count, sum, sample) + judging "
        "(`window_result`: merged figures, estimates, domain classifier). The domain classifier is timed again "
        "alone on the same sample, outside the wall time: as the flow runs it, and in brackets with its OpenMP "
        "threads limited to one (`threadpoolctl`); `full-one-thread` judges with them limited to one. Load "
        "average: the machine's 1-minute figure (2 cores), at the run's start and end.",
    ]
    if results.get("ratios"):
        lines += ["", "Wall seconds over drift alone's at the same row count:", ""]
        for key, ratio in results["ratios"].items():
            rows, mode = key.split(" ")
            lines.append(f"- {int(rows):,} rows, {mode}: **{ratio}x**")
    return "\n".join(lines) + "\n"


def _write(results: dict[str, Any]) -> None:
    done = {(r.get("rows_asked"), r["mode"]): r for r in results["runs"] if "error" not in r}
    results["ratios"] = {
        f"{rows} {mode}": round(done[(rows, mode)]["wall_s"] / done[(rows, "drift")]["wall_s"], 2)
        for rows, mode in done
        if mode != "drift" and (rows, "drift") in done
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "monitoring_scale.json").write_text(json.dumps(results, indent=2) + "\n")
    (RESULTS / "monitoring_scale.md").write_text(markdown(results))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--keep-stack", action="store_true", help="leave the bench stack running at the end")
    parser.add_argument("--prepare", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--one", nargs=5, metavar=("ROWS", "MODE", "SOURCE", "VERSION", "RUN"), help=argparse.SUPPRESS)
    options = parser.parse_args()
    env = stack_env()
    if options.prepare:
        prepare(options.prepare)
        return
    if options.one:
        import logging

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        rows, mode, source, version, run_id = options.one
        print("RESULT " + json.dumps(run_one(int(rows), mode, source, version, run_id)), flush=True)
        return
    from adapters.settings import get_settings
    from bench.run_cost_sampler import machine

    logs = STATE / "logs"
    results: dict[str, Any] = {
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": machine(),
        "command": "python -m bench.monitoring_scale " + " ".join(sys.argv[1:]),
        "worker_memory": get_settings().dask_worker_memory,
        "database": os.environ["MLOPS_DATABASE"],
        "shift": {"from_month": SHIFT[0], "strength": SHIFT[1]},
        "prepared": [],
        "runs": [],
    }
    try:
        subprocess.run([BIN / "mlops", "stack", "up"], env=env, check=True, stdout=subprocess.DEVNULL)
        logs.mkdir(parents=True, exist_ok=True)
        for rows in options.rows:
            log = logs / f"prepare-{rows}.log"
            prepared = _child(["--prepare", str(rows)], env, log, "PREPARED")
            if prepared is None:
                results["prepared"].append({"rows": rows, "error": _tail(log)})
                _write(results)
                continue
            print(json.dumps(prepared), flush=True)
            results["prepared"].append(prepared)
            for mode in options.modes:
                log = logs / f"run-{rows}-{mode}.log"
                args = ["--one", str(rows), mode, prepared["source"], prepared["version"], prepared["run_id"]]
                run = _child(args, env, log, "RESULT")
                entry = {"rows_asked": rows, "mode": mode} | (run or {"error": _tail(log)})
                print(json.dumps(entry), flush=True)
                results["runs"].append(entry)
                _write(results)
    finally:
        if not options.keep_stack:
            subprocess.run([BIN / "mlops", "stack", "down"], env=env, check=False, stdout=subprocess.DEVNULL)
    print((RESULTS / "monitoring_scale.md").read_text())


if __name__ == "__main__":
    main()
