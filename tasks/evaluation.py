"""Prefect task: holdout evaluation of a fitted pipeline (the metrics are `core.modeling.metrics`)."""

from __future__ import annotations

import logging
from typing import Any

import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from core.data.dataset import DatasetConfig
from core.data.features import prepare_target
from core.modeling.calibration import calibration_metrics
from core.modeling.metrics import (
    Evaluation,
    compute_metrics,
    evaluation_figures,
    model_classes,
    predict_proba,
    regression_figures,
)

log = logging.getLogger(__name__)


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate_candidate(model: Any, holdout: pd.DataFrame, config: DatasetConfig, figures: bool = True) -> Evaluation:
    """Prefect task: score a fitted pipeline on the frozen holdout (and draw its plots)."""
    y_true = prepare_target(holdout, config)
    proba = predict_proba(model, holdout, config)
    classes = model_classes(model)
    metrics = compute_metrics(y_true, proba, classes) | calibration_metrics(y_true, proba, classes)  # + ece
    log.info("holdout metrics: %s", {k: round(v, 4) for k, v in metrics.items()})
    if not figures:
        return Evaluation(metrics, {}, proba)
    drawn = evaluation_figures(y_true, proba, classes) if classes else regression_figures(y_true, proba)
    return Evaluation(metrics, drawn, proba)
