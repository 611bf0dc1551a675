"""Holdout evaluation: metrics (pure functions of labels and probabilities) and the plots people read."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import (
    average_precision_score,
    f1_score,
    log_loss,
    roc_auc_score,
)
from sklearn.preprocessing import label_binarize

from core.data.dataset import DatasetConfig, TaskType
from core.data.features import prepare_inputs, prepare_target

log = logging.getLogger(__name__)

# Metrics where lower is better; every other metric is higher-is-better. `ece` (expected calibration error,
# `core.modeling.calibration`) is a holdout metric of classifiers logged beside these, not one of `METRICS`.
LOWER_IS_BETTER = frozenset({"log_loss", "brier", "rmse", "mae", "ece"})
CLASSIFICATION_METRICS = ("roc_auc", "pr_auc", "f1", "log_loss", "brier")
REGRESSION_METRICS = ("rmse", "mae", "r2")
METRICS = CLASSIFICATION_METRICS + REGRESSION_METRICS


def metrics_for(task: TaskType) -> tuple[str, ...]:
    """The holdout metrics of a task (macro averages for multiclass)."""
    return CLASSIFICATION_METRICS if task.is_classification else REGRESSION_METRICS


def model_classes(model: Any) -> list[Any]:
    """A classifier's classes in `predict_proba` column order; `[]` for a regressor.

    Throughout the project a model's holdout "scores" are its probabilities (n, classes) for a classifier
    and its predicted values (n,) for a regressor, with `classes == []` telling the two apart.
    """
    classes = getattr(model, "classes_", None)
    return [] if classes is None else list(classes)


def regression_metrics(y_true: Sequence[Any], predicted: np.ndarray) -> dict[str, float]:
    """RMSE, MAE and R² of predicted values (textbook definitions; equal to scikit-learn's)."""
    y = np.asarray(y_true, dtype="float64")
    predicted = np.asarray(predicted, dtype="float64")
    if predicted.shape != y.shape:
        raise ValueError(f"predictions have shape {predicted.shape}, expected {y.shape}")
    errors = predicted - y
    total = float(np.sum((y - y.mean()) ** 2))
    return {
        "rmse": float(np.sqrt(np.mean(errors**2))),
        "mae": float(np.mean(np.abs(errors))),
        # A constant target has no variance to explain: R² is undefined there, reported as 0 like a constant model.
        "r2": 1.0 - float(np.sum(errors**2)) / total if total > 0 else 0.0,
    }


def compute_metrics(y_true: Sequence[Any], proba: np.ndarray, classes: Sequence[Any]) -> dict[str, float]:
    """Holdout metrics of one model's scores.

    Classification: ROC AUC, PR AUC, F1, log loss and Brier score; macro averages (one-vs-rest) for
    multiclass. Regression (`classes` empty): RMSE, MAE and R².

    Args:
        y_true: True labels (or values).
        proba: Predicted probabilities, one column per class in `classes` order; predicted values (n,) for
            a regressor.
        classes: The model's classes (`model_classes(model)`); empty for a regressor.
    """
    classes = list(classes)
    if not classes:
        return regression_metrics(y_true, proba)
    y_true = np.asarray(y_true)
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


def model_scores(model: Any, X: pd.DataFrame) -> np.ndarray:
    """Probabilities of a fitted classifier pipeline, or predicted values of a regressor, on prepared inputs."""
    return model.predict_proba(X) if model_classes(model) else np.asarray(model.predict(X), dtype="float64")


def predict_proba(model: Any, frame: pd.DataFrame, config: DatasetConfig) -> np.ndarray:
    """Scores of a fitted pipeline on raw rows of the dataset (probabilities, or values for regression)."""
    return model_scores(model, prepare_inputs(frame, config))


def evaluate_on(model: Any, holdout: pd.DataFrame, config: DatasetConfig) -> dict[str, float]:
    """Metrics of a fitted pipeline on the holdout rows."""
    return compute_metrics(prepare_target(holdout, config), predict_proba(model, holdout, config), model_classes(model))


def _pyplot() -> Any:
    """Pyplot, drawing with Agg (no display).

    Imported before the backend is set: `matplotlib.use` takes pyplot from `sys.modules` without waiting for its
    import to finish, and the training flow imports pyplot in a thread beside the search (`tasks/warmup.py`).
    After a short search the evaluation met the half-imported module there ("partially initialized module
    'matplotlib.pyplot' has no attribute 'switch_backend'": the model job's act test, twice); the import
    statement waits for the other thread's import.
    """
    import matplotlib
    import matplotlib.pyplot as plt

    matplotlib.use("Agg")  # nothing to do once it is Agg
    return plt


def regression_figures(y_true: Sequence[Any], predicted: np.ndarray) -> dict[str, Any]:
    """Predicted-vs-actual and residual plots of a regressor on the holdout."""
    plt = _pyplot()
    from sklearn.metrics import PredictionErrorDisplay

    figures: dict[str, Any] = {}
    for name, kind, title in (
        ("predicted_vs_actual.png", "actual_vs_predicted", "Predicted vs actual (holdout)"),
        ("residuals.png", "residual_vs_predicted", "Residuals vs predicted (holdout)"),
    ):
        fig, ax = plt.subplots(figsize=(5, 4.5))
        PredictionErrorDisplay.from_predictions(
            np.asarray(y_true, dtype="float64"), predicted, kind=kind, ax=ax, subsample=2000, random_state=0
        )
        ax.set_title(title)
        figures[name] = fig
    return figures


def evaluation_figures(y_true: Sequence[Any], proba: np.ndarray, classes: Sequence[Any]) -> dict[str, Any]:
    """Confusion matrix, ROC, precision-recall and calibration plots (one-vs-rest per class if multiclass).

    Returns matplotlib figures keyed by file name; the caller logs and closes them.
    """
    plt = _pyplot()
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

    # Reliability curve in the bins the ECE is computed in (10 equal-width); multiclass: the top label's
    # confidence too (what the ECE measures), beside each class against the rest.
    from core.modeling.calibration import N_BINS, expected_calibration_error, reliability_inputs

    fig, ax = plt.subplots(figsize=(5, 4.5))
    if len(classes) > 2:
        confidence, correct = reliability_inputs(y_true, proba, classes)
        CalibrationDisplay.from_predictions(correct, confidence, n_bins=N_BINS, name="top label", ax=ax)
    for cls in positives:
        index = classes.index(cls)
        CalibrationDisplay.from_predictions(y_true == cls, proba[:, index], n_bins=N_BINS, name=f"class {cls}", ax=ax)
    ax.set_title(f"Calibration (holdout), ECE {expected_calibration_error(y_true, proba, classes):.4f}")
    figures["calibration.png"] = fig
    return figures


@dataclass(frozen=True)
class Evaluation:
    """Holdout metrics, the scores behind them (probabilities, or values for regression) and a candidate's plots."""

    metrics: dict[str, float]
    figures: dict[str, Any] = field(default_factory=dict, repr=False)
    proba: np.ndarray | None = field(default=None, repr=False)


def improvement(metric: str, candidate: float, champion: float) -> float:
    """Candidate minus champion, signed so that positive always means better."""
    return champion - candidate if metric in LOWER_IS_BETTER else candidate - champion


@dataclass(frozen=True)
class Scoring:
    """How trials are ranked: a scikit-learn scorer (higher is better) and the metric it reports."""

    scorer: str
    metric: str
    sign: float  # metric = sign * scorer value (RMSE is scored as its negative)


def scoring_for(task: TaskType) -> Scoring:
    """Cross-validation score used to rank configurations."""
    match task:
        case TaskType.binary:
            return Scoring("roc_auc", "roc_auc", 1.0)
        case TaskType.multiclass:
            return Scoring("roc_auc_ovr", "roc_auc_ovr", 1.0)
    return Scoring("neg_root_mean_squared_error", "rmse", -1.0)
