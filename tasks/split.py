"""Prefect task: the frozen holdout split (`core.data.split`)."""

from __future__ import annotations

import logging

import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from core.data.dataset import DatasetConfig
from core.data.split import Split, split_frame

log = logging.getLogger(__name__)


@task(name="split", cache_policy=NO_CACHE)
def split_snapshot(frame: pd.DataFrame, config: DatasetConfig) -> Split:
    """Prefect task: frozen holdout split."""
    return split_frame(frame, config)
