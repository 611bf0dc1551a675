"""Where the model search should run: in the flow's process vs on a two-worker Dask cluster, by table size.

The training flow searches in its own process below `Settings.search_cluster_min_cells` training cells (rows x
input columns) and ships the search to the cluster from there; this bench measures the crossover that sets it.
At each size the same search (the default families, `--trials` trials each in batches of 2, 3 folds, one
seed) runs through `tasks.search_trials.run_search_on` twice: with the in-process runner, and on a loopback
`LocalCluster` of 2 worker processes of one thread each (as `mlops stack up` starts them; the rows scattered to
both once). Both must choose the same model (asserted). A temporary Prefect server records the task runs.

Usage: `python -m bench.search_place [--rows 10000 30000 100000 300000] [--trials 2]`.
Results: bench/results/search_place.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

from distributed import LocalCluster
from prefect import flow
from prefect.testing.utilities import prefect_test_harness

from core.data.dataset import load_local_dataset_config
from core.data.split import split_frame
from core.data.synthetic import generate_frame
from core.modeling.search import SearchResult, SearchSpec
from tasks.search_trials import dask_runner, local_runner, run_search_on

RESULTS = Path(__file__).parent / "results"
SEED = 42
STATE: dict = {}  # the rows stay out of the flow's parameters (see bench/search_dask.py)


def _inputs() -> tuple:
    return STATE["train"], STATE["config"], STATE["spec"]


@flow(name="bench-search-place", persist_result=False)
def search_on(address: str | None) -> SearchResult:
    return run_search_on(dask_runner(address) if address else local_runner(), *_inputs(), SEED)


def timed(address: str | None) -> tuple[float, SearchResult]:
    started = time.perf_counter()
    result = search_on(address)
    return time.perf_counter() - started, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 30_000, 100_000, 300_000])
    parser.add_argument("--trials", type=int, default=2)
    args = parser.parse_args()
    config = load_local_dataset_config("credit-risk")
    columns = len(config.input_columns)
    spec = SearchSpec(trials_per_family=args.trials, trials_per_batch=2, cv_folds=3)
    results = []
    with (
        prefect_test_harness(server_startup_timeout=120),
        LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address="127.0.0.1:0",
            memory_limit="4GiB",
        ) as cluster,
    ):
        for rows in args.rows:
            train = split_frame(generate_frame(rows, seed=SEED), config).train
            STATE.update(train=train, config=config, spec=spec)
            here_s, here = timed(None)
            there_s, there = timed(cluster.scheduler_address)
            assert (here.family, here.params) == (there.family, there.params), "different choices"
            result = {
                "rows": rows,
                "training_rows": len(train),
                "cells": len(train) * columns,
                "in_process_s": round(here_s, 2),
                "cluster_s": round(there_s, 2),
                "cluster_speedup": round(here_s / there_s, 2),
            }
            print(json.dumps(result), flush=True)
            results.append(result)
    figures = {
        "results": results,
        "trials": len(here.trials),
        "cpu_count": os.cpu_count(),
        "load_average_1m": round(os.getloadavg()[0], 1),
    }
    lines = [
        "| rows | training cells | in the flow's process (s) | 2-worker cluster (s) | cluster speed-up |",
        "|---:|---:|---:|---:|---:|",
        *[
            f"| {r['rows']:,} | {r['cells']:,} | {r['in_process_s']} | {r['cluster_s']} | {r['cluster_speedup']}x |"
            for r in results
        ],
        "",
        f"{figures['trials']} trials (default families, batches of 2, 3 folds), {figures['cpu_count']} cores, "
        f"1-min load average at the end {figures['load_average_1m']}.",
    ]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "search_place.json").write_text(json.dumps(figures, indent=2))
    (RESULTS / "search_place.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    # Imported as `bench.search_place`, so the flow pickles by reference (see bench/search_dask.py).
    from bench.search_place import main as imported_main

    imported_main()
