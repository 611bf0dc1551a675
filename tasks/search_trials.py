"""Prefect tasks of the model search: each trial is its own task run, on the Dask cluster when there is one.

`run_search_on` drives `core.modeling.search.run_search` with a Prefect task runner: on a cluster the training
rows and folds are scattered to every worker once (`share_search_data`), outside any task graph, and each
trial names them by their Dask future; each batch of trials is submitted as task runs (`trial <family>-<n>`,
with their own logs in the UI) and the chosen configuration is refitted as a task run (`refit`). The runner
is `prefect_dask.DaskTaskRunner` on the configured cluster (`adapters.cluster.cluster_address`), else a
one-thread `ThreadPoolTaskRunner`: without a cluster the trials run one after another in this process, as
before, because each already uses every core (OpenMP/BLAS threads) and running several at once would only
oversubscribe the cores and multiply the memory held.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import pandas as pd
from prefect import Task, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import PrefectFuture
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner
from sklearn.pipeline import Pipeline

from adapters.cluster import ClusterError, require_workers
from core.data.dataset import DatasetConfig
from core.modeling.search import (
    SearchData,
    SearchResult,
    SearchSpec,
    Trial,
    TrialJob,
    TrialOutcome,
    evaluate_trial,
    prepare_search,
    refit,
    refit_rows,
    run_search,
)


def share_search_data(runner: TaskRunner, data: SearchData) -> Any:
    """The training rows and folds where every trial reads them: once on each Dask worker, or this object.

    Scattered, they go to the workers directly, once, and never travel inside a task graph: as a task's
    parameter the frame was pickled into the graph the scheduler receives ("Sending large graph of size
    540.94 MiB" at 1M rows) and the workers then fetched it from one another while running trials.
    """
    dask = sys.modules.get("prefect_dask")  # not imported: not a Dask runner (and no import to pay for)
    if dask is not None and isinstance(runner, dask.DaskTaskRunner):
        return runner.client.scatter(data, broadcast=True, hash=False)
    return data


@task(name="trial", cache_policy=NO_CACHE)
def run_trial(data: SearchData, job: TrialJob) -> TrialOutcome:
    """Prefect task: cross-validate one configuration (`core.modeling.search.evaluate_trial`); logs its outcome."""
    outcome = evaluate_trial(data, job)
    state = "pruned" if outcome.pruned else ("degenerate" if outcome.degenerate else "complete")
    get_run_logger().info(
        "%s %s: cv %s %.4f after %d of %d folds (%.1fs) [%s]",
        job.name,
        job.params,
        data.scoring.metric,
        data.scoring.sign * outcome.running_means[-1],
        len(outcome.scores),
        len(data.folds),
        outcome.seconds,
        state,
    )
    return outcome


@task(name="refit", cache_policy=NO_CACHE)
def refit_chosen(data: SearchData, family: str, params: dict[str, Any]) -> Pipeline:
    """Prefect task: fit the chosen configuration on all training rows."""
    return refit(data, family, params)


@task(name="refit", cache_policy=NO_CACHE)
def refit_on_rows(
    train: pd.DataFrame, config: DatasetConfig, family: str, params: dict[str, Any], seed: int
) -> Pipeline:
    """Prefect task: fit the chosen configuration on `train`, every training row when the search saw a sample."""
    return refit_rows(train, config, family, params, seed)


def local_runner() -> TaskRunner:
    """The runner without a cluster: one trial at a time in this process (each uses every core already)."""
    return ThreadPoolTaskRunner(max_workers=1)


def dask_runner(address: str) -> TaskRunner:
    """Prefect's Dask integration on an existing scheduler (a clear error when it has no worker)."""
    from prefect_dask import DaskTaskRunner

    workers = require_workers(address)
    get_run_logger().info("search trials run on the Dask cluster at %s (%d workers)", address, workers)
    return DaskTaskRunner(address=address)


def _submit(runner: TaskRunner, step: Task, name: str | None = None, **parameters: Any) -> PrefectFuture:
    # What `Task.submit` does with the flow's runner (`task_runner.submit(task, parameters)`), with ours.
    return runner.submit(step.with_options(task_run_name=name) if name else step, parameters)


def run_search_on(  # noqa: PLR0913 - the search's inputs, each named
    runner: TaskRunner,
    train: pd.DataFrame,
    config: DatasetConfig,
    spec: SearchSpec,
    seed: int,
    on_trial: Callable[[int, int, Trial], None] | None = None,
    fit_rows: pd.DataFrame | None = None,
) -> SearchResult:
    """The model search with every trial and the refit as task runs of `runner` (started here).

    With `fit_rows` (every training row, when `train` is a sample of them) the chosen configuration is fitted
    on those in this process: they never travel to a cluster.
    """
    with runner:
        data = prepare_search(train, config, spec, seed)
        shared = share_search_data(runner, data)

        def run_batch(jobs: list[TrialJob]) -> list[TrialOutcome]:
            futures = [_submit(runner, run_trial, f"trial {job.name}", data=shared, job=job) for job in jobs]
            return [future.result() for future in futures]  # in trial order, whichever finished first

        def fit(_: SearchData, family: str, params: dict[str, Any]) -> Pipeline:
            if fit_rows is not None:
                return refit_on_rows(fit_rows, config, family, params, seed)
            return _submit(runner, refit_chosen, data=shared, family=family, params=params).result()

        try:
            return run_search(data, spec, run_batch, fit, on_trial)
        except Exception as exc:
            from distributed.scheduler import KilledWorker

            if not isinstance(exc, KilledWorker):
                raise
            raise ClusterError(lost_workers_message(len(data.X), data.X.memory_usage(deep=True).sum(), exc)) from exc


def lost_workers_message(rows: int, frame_bytes: int, exc: BaseException) -> str:
    """Why a search on the cluster stopped when its workers kept dying (most often: out of memory)."""
    return (
        f"the model search stopped: Dask workers kept dying while running a trial on {rows:,} training rows "
        f"({frame_bytes / 2**30:.1f} GiB as a frame, copied into each worker that runs a trial); a worker past "
        "its memory limit is restarted by its nanny, so give the workers more memory "
        "(MLOPS_DASK_WORKER_MEMORY, or the cluster's own limit) or train this snapshot with `engine: dask` "
        f"in the dataset config, which keeps the rows partitioned across the workers. Dask said: {exc}"
    )
