"""The model search (`core.modeling.search`), each trial a task run (on the Dask cluster when there is one)."""

from __future__ import annotations

import logging
from collections.abc import Callable

import pandas as pd

from adapters.cluster import cluster_address
from adapters.settings import Settings, get_settings
from core.data.dataset import DatasetConfig
from core.modeling.search import SearchResult, SearchSpec, Trial
from core.modeling.training_record import DASK_CLUSTER, FLOW_PROCESS
from tasks.search_trials import dask_runner, local_runner, run_search_on

log = logging.getLogger(__name__)


def train_candidate(
    train: pd.DataFrame,
    config: DatasetConfig,
    spec: SearchSpec,
    seed: int,
    check: Callable[[], None] | None = None,
    fit_rows: pd.DataFrame | None = None,
) -> tuple[SearchResult, str]:
    """Search and refit, each trial a task run of the calling flow; progress shows as a Prefect progress artifact.

    Returns the result and where its trials and refit ran (`FLOW_PROCESS` or `DASK_CLUSTER`), for its record.
    With `fit_rows` (`train` is a sample of them) the chosen configuration is fitted on them, in this process.

    The trials run on the Dask cluster `adapters.cluster.cluster_address` names (MLOPS_DASK_ADDRESS, else
    the local stack's scheduler) when the table is big enough to be worth shipping there
    (`Settings.search_cluster_min_cells`), else one after another in this process. Not a task itself: Prefect sends
    the caller's run context with every task run it submits, and a task's context holds its parameters,
    so every trial would carry the whole training frame to the cluster (the flow's context holds the small
    `TrainingParams` only).
    """
    from prefect.artifacts import create_progress_artifact, update_progress_artifact

    progress_id = create_progress_artifact(
        progress=0.0, key="search-progress", description="Model search: share of trials done"
    )

    def report(done: int, total: int, trial: Trial) -> None:
        update_progress_artifact(progress_id, progress=100.0 * done / total)
        if check is not None:  # e.g. the validation beside the search has failed: stop here
            check()

    settings = get_settings()
    address = search_address(cluster_address(settings), len(train), len(config.input_columns), settings)
    runner = dask_runner(address) if address else local_runner()
    result = run_search_on(runner, train, config, spec, seed, on_trial=report, fit_rows=fit_rows)
    return result, DASK_CLUSTER if address else FLOW_PROCESS


def search_address(address: str | None, rows: int, columns: int, settings: Settings) -> str | None:
    """The cluster to search on, or None for this process: a table under `search_cluster_min_cells` stays here."""
    if address is None:
        log.info("search trials run in this process, one at a time (no Dask cluster)")
        return None
    if rows * columns < settings.search_cluster_min_cells:
        log.info(
            "search trials run in this process: %d training rows x %d columns is under the %d cells worth "
            "shipping to the cluster (MLOPS_SEARCH_CLUSTER_MIN_CELLS)",
            rows,
            columns,
            settings.search_cluster_min_cells,
        )
        return None
    log.info("search trials run on the Dask cluster: %d training rows x %d columns", rows, columns)
    return address
