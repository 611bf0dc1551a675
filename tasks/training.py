"""Prefect task: the model search (`core.search`), with its progress as a Prefect artifact."""

from __future__ import annotations

import logging

import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from core.dataset import DatasetConfig
from core.search import (
    SearchResult,
    SearchSpec,
    Trial,
    search_models,
)

log = logging.getLogger(__name__)


@task(name="train", cache_policy=NO_CACHE)
def train_candidate(train: pd.DataFrame, config: DatasetConfig, spec: SearchSpec, seed: int) -> SearchResult:
    """Prefect task: search and refit; progress shows as a Prefect progress artifact."""
    from prefect.artifacts import create_progress_artifact, update_progress_artifact

    progress_id = create_progress_artifact(
        progress=0.0, key="search-progress", description="Model search: share of trials done"
    )

    def report(done: int, total: int, trial: Trial) -> None:
        update_progress_artifact(progress_id, progress=100.0 * done / total)

    return search_models(train, config, spec, seed, on_trial=report)
