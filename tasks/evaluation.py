"""Holdout evaluation: metrics (pure functions of labels and probabilities) and the plots people read."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE
from sklearn.metrics import (
    average_precision_score,
    f1_score,
    log_loss,
    roc_auc_score,
)
from sklearn.preprocessing import label_binarize

from mlops.dataset import DatasetConfig
from tasks.features import prepare_inputs, prepare_target

log = logging.getLogger(__name__)

# Metrics where lower is better; every other metric is higher-is-better.
LOWER_IS_BETTER = frozenset({"log_loss", "brier"})
METRICS = ("roc_auc", "pr_auc", "f1", "log_loss", "brier")


def compute_metrics(y_true: Sequence[Any], proba: np.ndarray, classes: Sequence[Any]) -> dict[str, float]:
    """ROC AUC, PR AUC, F1, log loss and Brier score; macro averages (one-vs-rest) for multiclass.

    Args:
        y_true: True labels.
        proba: Predicted probabilities, one column per class in `classes` order.
        classes: The model's classes (`model.classes_`).
    """
    y_true = np.asarray(y_true)
    classes = list(classes)
    if proba.ndim != 2 or proba.shape[1] != len(classes):
        raise ValueError(f"probabilities have shape {proba.shape}, expected (n, {len(classes)})")
    predicted = np.asarray(classes)[proba.argmax(axis=1)]
    onehot = label_binarize(y_true, classes=classes)
    if len(classes) == 2:
        onehot = np.hstack([1 - onehot, onehot])
        positive = proba[:, 1]
        metrics = {
            "roc_auc": roc_auc_score(y_true == classes[1], positive),
            "pr_auc": average_precision_score(y_true == classes[1], positive),
            "f1": f1_score(y_true, predicted, pos_label=classes[1]),
        }
    else:
        metrics = {
            "roc_auc": roc_auc_score(y_true, proba, multi_class="ovr", average="macro", labels=classes),
            "pr_auc": average_precision_score(onehot, proba, average="macro"),
            "f1": f1_score(y_true, predicted, average="macro"),
        }
    metrics["log_loss"] = log_loss(y_true, proba, labels=classes)
    # Multiclass Brier: mean over rows of the squared distance to the one-hot truth, halved so the
    # binary case equals sklearn's brier_score_loss.
    metrics["brier"] = float(np.mean(np.sum((proba - onehot) ** 2, axis=1)) / 2)
    return {name: float(value) for name, value in metrics.items()}


def predict_proba(model: Any, frame: pd.DataFrame, config: DatasetConfig) -> np.ndarray:
    """Probabilities of a fitted pipeline on raw rows of the dataset."""
    return model.predict_proba(prepare_inputs(frame, config))


def evaluate_on(model: Any, holdout: pd.DataFrame, config: DatasetConfig) -> dict[str, float]:
    """Metrics of a fitted pipeline on the holdout rows."""
    return compute_metrics(prepare_target(holdout, config), predict_proba(model, holdout, config), model.classes_)


def evaluation_figures(y_true: Sequence[Any], proba: np.ndarray, classes: Sequence[Any]) -> dict[str, Any]:
    """Confusion matrix, ROC, precision-recall and calibration plots (one-vs-rest per class if multiclass).

    Returns matplotlib figures keyed by file name; the caller logs and closes them.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.calibration import CalibrationDisplay
    from sklearn.metrics import ConfusionMatrixDisplay, PrecisionRecallDisplay, RocCurveDisplay

    y_true = np.asarray(y_true)
    classes = list(classes)
    predicted = np.asarray(classes)[proba.argmax(axis=1)]
    positives = classes[1:] if len(classes) == 2 else classes
    figures: dict[str, Any] = {}

    fig, ax = plt.subplots(figsize=(5, 4.5))
    ConfusionMatrixDisplay.from_predictions(y_true, predicted, labels=classes, ax=ax, colorbar=False)
    ax.set_title("Confusion matrix (holdout)")
    figures["confusion_matrix.png"] = fig

    for name, display, title in (
        ("roc_curve.png", RocCurveDisplay, "ROC curve (holdout)"),
        ("pr_curve.png", PrecisionRecallDisplay, "Precision-recall curve (holdout)"),
    ):
        fig, ax = plt.subplots(figsize=(5, 4.5))
        for cls in positives:
            index = classes.index(cls)
            display.from_predictions(y_true == cls, proba[:, index], name=f"class {cls}", ax=ax)
        ax.set_title(title)
        figures[name] = fig

    fig, ax = plt.subplots(figsize=(5, 4.5))
    for cls in positives:
        index = classes.index(cls)
        CalibrationDisplay.from_predictions(
            y_true == cls, proba[:, index], n_bins=10, strategy="quantile", name=f"class {cls}", ax=ax
        )
    ax.set_title("Calibration (holdout)")
    figures["calibration.png"] = fig
    return figures


@dataclass(frozen=True)
class Evaluation:
    """Holdout metrics, the probabilities behind them and, for a candidate, its plots (keyed by file name)."""

    metrics: dict[str, float]
    figures: dict[str, Any] = field(default_factory=dict, repr=False)
    proba: np.ndarray | None = field(default=None, repr=False)


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate_candidate(model: Any, holdout: pd.DataFrame, config: DatasetConfig, figures: bool = True) -> Evaluation:
    """Prefect task: score a fitted pipeline on the frozen holdout (and draw its plots)."""
    y_true = prepare_target(holdout, config)
    proba = predict_proba(model, holdout, config)
    metrics = compute_metrics(y_true, proba, model.classes_)
    log.info("holdout metrics: %s", {k: round(v, 4) for k, v in metrics.items()})
    return Evaluation(metrics, evaluation_figures(y_true, proba, model.classes_) if figures else {}, proba)
