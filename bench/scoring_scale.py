"""Batch scoring at scale: rows/s and peak memory, single-process path vs the Dask cluster path, in one run.

The same input (`--rows` rows of the synthetic credit-risk data as 12 monthly Parquet files in S3), the same
model (a histogram gradient boosting pipeline registered as `scoring-scale`), the same `scoring` flow;
only `engine` changes:
- `local`: the flow's process reads, predicts and writes `chunk_rows` rows at a time;
- `dask-1`, `dask-2`: a fresh loopback `LocalCluster` of 1 or 2 worker processes (one thread each, memory
  limit `MLOPS_DASK_WORKER_MEMORY`); one task per file, the model loaded once per worker.
Each configuration runs in its own child process (so its peak RSS is its own): the flow's wall time,
rows/s over it, the scoring step's own seconds, the client's peak RSS and each worker's peak RSS.

Needs a running stack (`mlops stack up`, any ports via the usual settings). Usage:
`python -m bench.scoring_scale [--rows 10000000] [--configs local dask-1 dask-2]`.
Results: bench/results/scoring_scale.md and .json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from mlops.stack import CLIENT_DEFAULTS

os.environ.update(CLIENT_DEFAULTS)  # before Prefect and MLflow load

RESULTS = Path(__file__).parent / "results"
MODEL = "scoring-scale"
MONTHS = 12
CHUNK_ROWS = 50_000


def _source(rows: int, bucket: str) -> str:
    return f"s3://{bucket}/datasets/scoring-scale-{rows}/"


def _dataset_yaml(source: str) -> Path:
    import yaml

    from core.data.dataset import bundled_config_text

    raw = yaml.safe_load(bundled_config_text("credit-risk")) | {"name": MODEL, "model_name": MODEL, "source": source}
    path = Path(os.environ.get("MLOPS_STATE_DIR", ".mlops")) / f"{MODEL}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def prepare(rows: int) -> tuple[str, str, str]:
    """The data (written once per row count, one file per month) and the registered model; (source, yaml, version)."""
    import pandas as pd
    from sklearn.ensemble import HistGradientBoostingClassifier

    from adapters.clients import S3Location
    from adapters.settings import get_settings
    from adapters.store import list_keys
    from core.data.dataset import load_local_dataset_config
    from core.data.features import prepare_inputs, prepare_target
    from core.data.synthetic import generate_month
    from core.modeling.search import make_pipeline
    from mlops.datagen import write_months
    from tasks.tracking import log_model, register_model, start_run

    settings = get_settings()
    source = _source(rows, settings.bucket)
    if len(list_keys(settings, S3Location.parse(source), (".parquet",))) != MONTHS:
        started = time.perf_counter()
        for month in range(MONTHS):  # one month at a time: the generator holds one month in memory
            write_months(settings, source, 1, rows // MONTHS + (month < rows % MONTHS), seed=21, first_month=month)
        print(f"wrote {rows:,} rows in {MONTHS} files in {time.perf_counter() - started:.0f}s", flush=True)
    config = load_local_dataset_config("credit-risk")
    train = pd.concat([generate_month(i, 5000, 5) for i in range(3)], ignore_index=True)
    model = make_pipeline(config, HistGradientBoostingClassifier(random_state=0))
    model.fit(prepare_inputs(train, config), prepare_target(train, config))
    # logged and registered as training does (the version carries its artifact digests, which loaders check)
    run_id = start_run.fn(config.model_copy(update={"name": MODEL}), {"bench": "scoring_scale"}, {"run_name": MODEL})
    uri, digests = log_model.fn(run_id, model, train, config)
    version = register_model.fn(uri, MODEL, run_id, digests.tags())
    return source, str(_dataset_yaml(source)), version


def _peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def run_one(name: str, source: str, dataset: str, version: str) -> dict:
    """One configuration, in this (child) process: the scoring flow's wall time and memory."""
    from adapters.settings import get_settings

    cluster = None
    if name.startswith("dask-"):
        from distributed import LocalCluster

        cluster = LocalCluster(
            n_workers=int(name.split("-")[1]),
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address="127.0.0.1:0",
            memory_limit=get_settings().dask_worker_memory,
        )
        os.environ["MLOPS_DASK_ADDRESS"] = cluster.scheduler_address
    from flows.scoring import ScoringParams, scoring

    params = ScoringParams(
        dataset=dataset,
        source=source,
        model_version=version,
        chunk_rows=CHUNK_ROWS,
        output=f"s3://{get_settings().bucket}/predictions/scoring-scale/{name}/",
        engine="local" if cluster is None else "dask",
    )
    try:
        started = time.perf_counter()
        state = scoring(params, return_state=True)
        wall = time.perf_counter() - started
    finally:
        if cluster is not None:
            cluster.close()
    if not state.is_completed():
        return {"config": name, "error": state.message}
    outcome = state.result()
    from adapters.clients import S3Location, s3_client
    from adapters.scoring_store import current_output

    summary_at = S3Location.parse(current_output(outcome.output).summary)
    summary = json.loads(
        s3_client(get_settings()).get_object(Bucket=summary_at.bucket, Key=summary_at.key)["Body"].read()
    )
    return {
        "config": name,
        "rows": outcome.rows,
        "files": outcome.files,
        "flow_seconds": round(wall, 1),
        "rows_per_second": round(outcome.rows / wall),
        "scoring_seconds": summary["seconds"],
        "scoring_rows_per_second": round(outcome.rows / summary["seconds"]),
        "client_peak_rss_mb": _peak_rss_mb(),
        "worker_peak_rss_mb": sorted(summary.get("worker_peak_rss_mb", {}).values()),
        "worker_memory_limit_mb": sorted(set(summary.get("worker_memory_limit_mb", {}).values())),
        "predicted_counts": summary.get("predicted_counts"),
    }


def markdown(rows: int, results: list[dict]) -> str:
    lines = [
        f"# Batch scoring of {rows:,} rows ({MONTHS} Parquet files, chunk_rows {CHUNK_ROWS:,})",
        "",
        "| engine | flow wall s | rows/s (flow) | scoring s | rows/s (scoring) | client peak RSS MB "
        "| worker peak RSS MB | worker limit MB |",
        "|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['config']} | failed: {r['error']} | | | | | | |")
            continue
        lines.append(
            f"| {r['config']} | {r['flow_seconds']} | {r['rows_per_second']:,} | {r['scoring_seconds']} "
            f"| {r['scoring_rows_per_second']:,} | {r['client_peak_rss_mb']} "
            f"| {', '.join(map(str, r['worker_peak_rss_mb'])) or '-'} "
            f"| {', '.join(map(str, r['worker_memory_limit_mb'])) or '-'} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--configs", nargs="+", default=["local", "dask-1", "dask-2"])
    parser.add_argument("--one", nargs=4, metavar=("CONFIG", "SOURCE", "DATASET", "VERSION"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print("RESULT " + json.dumps(run_one(*args.one)), flush=True)
        return
    from adapters.clients import check_stack
    from adapters.settings import get_settings
    from mlops.stack import client_env

    check_stack(get_settings())
    os.environ.update(client_env(get_settings()))  # the children's flows report to this stack's Prefect server
    source, dataset, version = prepare(args.rows)
    results = []
    for name in args.configs:  # each in its own process, so each peak RSS is its own
        done = subprocess.run(
            [sys.executable, "-m", "bench.scoring_scale", "--one", name, source, dataset, version],
            capture_output=True,
            text=True,
            check=False,
        )
        found = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        result = json.loads(found[-1][7:]) if found else {"config": name, "error": done.stderr[-2000:]}
        print(json.dumps(result), flush=True)
        results.append(result)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "scoring_scale.json").write_text(json.dumps({"rows": args.rows, "results": results}, indent=2))
    (RESULTS / "scoring_scale.md").write_text(markdown(args.rows, results))
    print(markdown(args.rows, results))


if __name__ == "__main__":
    main()
