"""Prefect tasks of the review: the candidate's review (`core.evaluation.review`) and the champion's input schema."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.futures import PrefectFuture
from threadpoolctl import threadpool_limits

from adapters import registry
from core.data.dataset import DatasetConfig
from core.evaluation.decision import Gates
from core.evaluation.review import Review, ReviewInputs, explain_candidate, review_candidate
from tasks.retrying import IO_ANY_ERROR

log = logging.getLogger(__name__)


@task(name="review", cache_policy=NO_CACHE)
def review(inputs: ReviewInputs, config: DatasetConfig, gates: Gates, seed: int, beside: bool = False) -> Review:
    """Prefect task: see `review_candidate`, without the importances (they are no gate: the `explain` task's).

    `beside`: it runs in a thread beside other work of the flow's process, so its OpenMP/BLAS pools get one
    thread: two pools of every core's size in one process made each wait for the other's spinning threads
    (four gradient-boosting trials took 441 s instead of 71 s with a second pool beside them).
    """
    # None: no limit; OpenMP's is per thread (a BLAS limit would be the whole process's)
    with threadpool_limits(1 if beside else None, user_api="openmp"):
        return review_candidate(inputs, config, gates, seed, explain=False)


@task(name="explain", cache_policy=NO_CACHE)
def explain(
    candidate: Any, holdout: pd.DataFrame, config: DatasetConfig, seed: int, beside: threading.Event | None = None
) -> pd.DataFrame:
    """Prefect task: `explain_candidate`, the importances for the run and the card.

    `beside`: set while other steps of the flow's process compute beside it (the review, the compile check, the
    model's logging). Until it is cleared its predictions get one OpenMP thread, as `review`'s; after, every
    one. With one thread throughout and one prediction per shuffle, a 100k-row run's promotion waited 1.9-2.2 s
    for it after the serving check (3 runs, 2026-12-07); with the shuffles predicted together
    (`permutation_importances`) and every thread after the review, 1.0-1.25 s (3 runs).
    """
    return explain_candidate(candidate, holdout, config, seed, threads=_one_while(beside))


def _one_while(beside: threading.Event | None) -> Callable[[], int | None]:
    return lambda: 1 if beside is not None and beside.is_set() else None


@task(name="champion-schema", **IO_ANY_ERROR)
def champion_schema(model_name: str, version: str) -> dict[str, str]:
    """Prefect task: the champion's inputs as its logged signature says (what callers send today)."""
    return registry.input_schema(model_name, version)


def explained(future: PrefectFuture[pd.DataFrame]) -> pd.DataFrame:
    """The importances of a submitted `explain`; none (empty, said in the log) when it failed.

    They are no gate and the flow reads them after the promotion: their failure must not fail a promoted run.
    """
    importances = future.result(raise_on_failure=False)
    if isinstance(importances, BaseException):
        log.warning("no feature importances for this run: %s: %s", type(importances).__name__, importances)
        return pd.DataFrame()
    return importances
