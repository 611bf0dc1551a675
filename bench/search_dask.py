"""The model search on Dask: wall time on 1 vs 2 workers, same trials, same seed, same choice, in one run.

No stack needed: a temporary Prefect server (`prefect_test_harness`) records the task runs, and two
loopback `LocalCluster`s (nanny worker processes, one thread each, as `mlops stack up` starts them) run
the trials through `tasks.search_trials.run_search_on` (Prefect's `DaskTaskRunner`), exactly as the
training flow does. The bundled credit-risk generator's rows (100k by default), the frozen holdout split,
the default families (logistic_regression, hist_gradient_boosting), 4 trials each in batches of 2, 3 folds.
The trials tables and the choices of the two runs must be equal (asserted); the figure is the ratio.

Usage: `python -m bench.search_dask [--rows 100000] [--trials 4]`. Results: bench/results/search_dask.{md,json}.
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
from tasks.search_trials import dask_runner, run_search_on

RESULTS = Path(__file__).parent / "results"
SEED = 42
STATE: dict = {}  # the rows stay out of the flow's parameters (Prefect would try to JSON-encode a frame)


def _inputs() -> tuple:
    # A module function pickles by reference; the flow's own function pickles by value with the globals it
    # names (Prefect sends the flow in every task's context), so it must not name STATE itself.
    return STATE["train"], STATE["config"], STATE["spec"]


@flow(name="bench-search-dask", persist_result=False)
def search_on(address: str) -> SearchResult:
    return run_search_on(dask_runner(address), *_inputs(), SEED)


def timed_search(workers: int) -> tuple[float, SearchResult]:
    with LocalCluster(
        n_workers=workers,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address="127.0.0.1:0",
        memory_limit="3GiB",
    ) as cluster:
        started = time.perf_counter()
        result = search_on(cluster.scheduler_address)
        return time.perf_counter() - started, result


def table(result: SearchResult) -> list[tuple]:
    return [(t.family, t.params, t.cv_mean, t.state, t.folds) for t in result.trials]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--batch", type=int, default=2)
    args = parser.parse_args()
    config = load_local_dataset_config("credit-risk")
    STATE.update(
        train=split_frame(generate_frame(args.rows, seed=SEED), config).train,
        config=config,
        spec=SearchSpec(trials_per_family=args.trials, trials_per_batch=args.batch, cv_folds=3),
    )
    with prefect_test_harness(server_startup_timeout=120):
        one_s, one = timed_search(1)
        two_s, two = timed_search(2)
    assert table(one) == table(two), "1 and 2 workers ran different trials"
    assert (one.family, one.params) == (two.family, two.params), "1 and 2 workers chose different models"
    states = [t.state for t in one.trials]
    figures = {
        "rows": args.rows,
        "training_rows": len(STATE["train"]),
        "trials": len(one.trials),
        "pruned": states.count("pruned"),
        "trials_per_batch": args.batch,
        "one_worker_s": round(one_s, 1),
        "two_workers_s": round(two_s, 1),
        "speedup": round(one_s / two_s, 2),
        "chosen": f"{one.family} {one.params}",
        "chosen_cv": round(one.cv_metric, 5),
        "cpu_count": os.cpu_count(),
        "load_average_1m": round(os.getloadavg()[0], 1),
    }
    markdown = "\n".join(
        [
            "| workers | search wall time (s) | trials (pruned) | chosen | CV ROC AUC |",
            "|---|---|---|---|---|",
            f"| 1 | {figures['one_worker_s']} | {figures['trials']} ({figures['pruned']}) | {figures['chosen']} | "
            f"{figures['chosen_cv']} |",
            f"| 2 | {figures['two_workers_s']} | {figures['trials']} ({figures['pruned']}) | the same | the same |",
            "",
            f"1 worker / 2 workers: **{figures['speedup']}x**, {args.rows} rows ({figures['training_rows']} training "
            f"rows), batches of {args.batch}, {figures['cpu_count']} cores, 1-min load average at the end "
            f"{figures['load_average_1m']}.",
        ]
    )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "search_dask.json").write_text(json.dumps(figures, indent=2))
    (RESULTS / "search_dask.md").write_text(markdown + "\n")
    print(markdown)


if __name__ == "__main__":
    # Run as `bench.search_dask`, not `__main__`: the flow then pickles by reference (the workers import it),
    # not by value with the module's globals (the rows) inside every task's context.
    from bench.search_dask import main as imported_main

    imported_main()
