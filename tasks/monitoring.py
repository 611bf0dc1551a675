"""Drift and decay monitoring: recent data against the champion's training reference.

Pure core (unit-tested, no I/O): PSI, KS, chi-square and total-variation distance per feature, drift of
the champion's predictions, performance on late-arriving labels, and the verdict against thresholds.
Thin I/O around it: the reference sample stored with each model (`reference/reference.parquet` in the
model's MLflow run), the recent data (a partition and/or the serving prediction log), the HTML report
in S3, and the trigger of the `training` deployment with a cooldown.

Rules (stated once, here):
- A feature has drifted when its PSI reaches `psi`, or when its test rejects "same distribution"
  (KS for numeric, chi-square for categorical, p < `p_value`) *and* the effect is material (KS
  statistic or total-variation distance >= `min_effect`): at large row counts a test alone flags
  differences nobody cares about.
- A window (the partition, or the prediction log) has drifted when the share of drifted features reaches
  `drifted_share`, or the champion's predictions drifted: their PSI reaches `prediction_psi`. What is
  compared depends on the task:
  - binary: the positive-class probability (PSI over the reference's deciles, KS test);
  - multiclass: the shares of the predicted classes (PSI over the classes, chi-square test), so a
    change in the class mix the champion predicts is seen whichever class gains or loses;
  - regression: the predicted value (PSI over the reference's deciles, KS test).
- It has decayed when, on at least `min_labelled_rows` labelled rows (late labels joined by id):
  - classification: ROC AUC fell by more than `max_auc_drop` or F1 by more than `max_f1_drop` below the
    champion's holdout figures (absolute drops; macro averages for multiclass, as on the holdout);
  - regression: RMSE rose by more than `max_rmse_rise` or MAE by more than `max_mae_rise` above the
    champion's holdout figures, relative to them (0.10: more than 10 % worse). With the minimum of 200
    labelled rows the window's own RMSE or MAE has a standard error of about 5 % (Gaussian errors), so
    10 % is about two standard errors: a real loss, not noise; heavier-tailed errors are noisier.
- A window with fewer than `min_rows` rows gives no verdict. Any drifted or decayed window triggers.
"""

from __future__ import annotations

import html
import io
import json
import logging
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict, Field
from scipy import stats

from adapters.clients import S3Location, mlflow_client, put_bytes, s3_client
from adapters.registry import holdout_metrics, load_model
from adapters.settings import get_settings
from core.dataset import DatasetConfig
from core.errors import PermanentError
from core.features import prepare_inputs
from core.metrics import REGRESSION_METRICS, compute_metrics, model_classes, model_scores
from tasks.loading import read_snapshot
from tasks.retrying import IO_RETRIES, IO_RETRY_DELAYS, retry_unless_permanent

log = logging.getLogger(__name__)

REFERENCE_ARTIFACT = "reference/reference.parquet"
REFERENCE_ROWS = 5000
PROBA_PREFIX = "proba_"
PREDICTION_COLUMN = "prediction"  # a regressor's predicted value in the reference sample
RELATIVE_METRICS = ("rmse", "mae")  # judged by their rise relative to the holdout's
METRIC_NAMES = {
    "roc_auc": "ROC AUC",
    "pr_auc": "PR AUC",
    "f1": "F1",
    "log_loss": "log loss",
    "brier": "Brier",
    "rmse": "RMSE",
    "mae": "MAE",
    "r2": "R²",
}
MISSING = "__missing__"
EPSILON = 1e-4  # floor of a bin's share in PSI, so an empty bin does not make it infinite
DRIFT_TAG = "drift-triggered"
IO = {
    "retries": IO_RETRIES,
    "retry_delay_seconds": IO_RETRY_DELAYS,
    "retry_condition_fn": retry_unless_permanent,
    "cache_policy": NO_CACHE,
}


class MonitoringError(PermanentError):
    """Monitoring cannot run as asked (no champion, no reference, unreadable labels); names the problem."""


class DriftThresholds(BaseModel):
    """When drift or decay is bad enough to retrain (the rules are in `tasks/monitoring.py`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    psi: float = Field(0.2, gt=0, title="Feature PSI", description="A feature whose PSI reaches this has drifted.")
    p_value: float = Field(
        0.001,
        gt=0,
        lt=1,
        title="Test p-value",
        description="KS (numeric) or chi-square (categorical) p-value below which a feature's shift is significant.",
    )
    min_effect: float = Field(
        0.1,
        gt=0,
        le=1,
        title="Minimum effect",
        description="A significant shift counts only when the KS statistic or total-variation distance reaches this.",
    )
    drifted_share: float = Field(
        0.2,
        gt=0,
        le=1,
        title="Drifted feature share",
        description="Retrain when this share of the features has drifted.",
    )
    prediction_psi: float = Field(
        0.2, gt=0, title="Prediction PSI", description="Retrain when the champion's predictions drift this much."
    )
    max_auc_drop: float = Field(
        0.05,
        ge=0,
        le=1,
        title="Maximum ROC AUC drop",
        description="Retrain when ROC AUC on labelled recent rows "
        "is lower than the champion's holdout ROC AUC by more than this.",
    )
    max_f1_drop: float = Field(0.1, ge=0, le=1, title="Maximum F1 drop", description="The same for F1.")
    max_rmse_rise: float = Field(
        0.1,
        ge=0,
        title="Maximum RMSE rise (relative)",
        description="Regression: retrain when RMSE on labelled recent rows is higher than the champion's holdout "
        "RMSE by more than this fraction of it (0.1: more than 10 % worse).",
    )
    max_mae_rise: float = Field(
        0.1, ge=0, title="Maximum MAE rise (relative)", description="Regression: the same for MAE."
    )
    min_rows: int = Field(200, ge=10, title="Minimum rows", description="A window with fewer rows gives no verdict.")
    min_labelled_rows: int = Field(
        200, ge=10, title="Minimum labelled rows", description="Performance is judged on at least this many rows."
    )


# ---------------------------------------------------------------------------------------------- pure core


def psi_from_shares(reference: np.ndarray, current: np.ndarray) -> float:
    """Population stability index of two distributions over the same bins (shares, or counts).

    PSI = sum((c - r) * ln(c / r)); shares are floored at `EPSILON` so an empty bin stays finite.
    """
    ref = np.asarray(reference, dtype=float)
    cur = np.asarray(current, dtype=float)
    if ref.shape != cur.shape:
        raise ValueError(f"bins differ: reference has {ref.shape}, current has {cur.shape}")
    if ref.sum() <= 0 or cur.sum() <= 0:
        raise ValueError("a distribution with no observations has no PSI")
    ref = np.clip(ref / ref.sum(), EPSILON, None)
    cur = np.clip(cur / cur.sum(), EPSILON, None)
    return float(np.sum((cur - ref) * np.log(cur / ref)))


def quantile_edges(reference: np.ndarray, bins: int = 10) -> np.ndarray:
    """Inner bin edges at the reference's quantiles (distinct values only, so ties do not make empty bins)."""
    values = np.asarray(reference, dtype=float)
    values = values[~np.isnan(values)]
    if values.size == 0:
        return np.array([])
    return np.unique(np.quantile(values, np.linspace(0, 1, bins + 1)[1:-1]))


def numeric_counts(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Counts per bin (`(-inf, e0], (e0, e1], ..., (ek, inf)`) plus a last bin for missing values."""
    values = np.asarray(values, dtype=float)
    missing = np.isnan(values)
    index = np.searchsorted(edges, values[~missing], side="left")
    counts = np.bincount(index, minlength=len(edges) + 1).astype(float)
    return np.append(counts, missing.sum())


def numeric_psi(reference: np.ndarray, current: np.ndarray, bins: int = 10) -> float:
    """PSI of a numeric feature over the reference's quantile bins (missing values are a bin of their own)."""
    edges = quantile_edges(reference, bins)
    return psi_from_shares(numeric_counts(reference, edges), numeric_counts(current, edges))


def _labels(values: Any) -> pd.Series:
    series = pd.Series(values, dtype="object")
    return series.where(series.notna(), MISSING).astype(str)


def category_counts(reference: Any, current: Any) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Categories seen in either sample (missing values as `__missing__`) and both samples' counts."""
    ref, cur = _labels(reference), _labels(current)
    categories = sorted(set(ref) | set(cur))
    ref_counts = ref.value_counts().reindex(categories, fill_value=0).to_numpy(dtype=float)
    cur_counts = cur.value_counts().reindex(categories, fill_value=0).to_numpy(dtype=float)
    return categories, ref_counts, cur_counts


def categorical_psi(reference: Any, current: Any) -> float:
    """PSI of a categorical feature over the categories of both samples."""
    _, ref, cur = category_counts(reference, current)
    return psi_from_shares(ref, cur)


def total_variation(reference: Any, current: Any) -> float:
    """Total-variation distance of two categorical samples: half the sum of absolute share differences (0..1)."""
    _, ref, cur = category_counts(reference, current)
    return float(0.5 * np.abs(ref / ref.sum() - cur / cur.sum()).sum())


def ks_test(reference: np.ndarray, current: np.ndarray) -> tuple[float, float]:
    """Two-sample Kolmogorov-Smirnov statistic and p-value on the non-missing values ((0, 1) if either is empty)."""
    ref = np.asarray(reference, dtype=float)
    cur = np.asarray(current, dtype=float)
    ref, cur = ref[~np.isnan(ref)], cur[~np.isnan(cur)]
    if ref.size == 0 or cur.size == 0:
        return 0.0, 1.0
    result = stats.ks_2samp(ref, cur)
    return float(result.statistic), float(result.pvalue)


def chi_square_test(reference: Any, current: Any) -> tuple[float, float]:
    """Chi-square test of homogeneity of two categorical samples: statistic and p-value ((0, 1) for one category)."""
    _, ref, cur = category_counts(reference, current)
    if len(ref) < 2:
        return 0.0, 1.0
    statistic, p_value, _, _ = stats.chi2_contingency(np.vstack([ref, cur]), correction=False)
    return float(statistic), float(p_value)


@dataclass(frozen=True)
class FeatureDrift:
    """Drift of one column: PSI, the test (`ks` or `chi2`), its statistic and p-value, the effect size."""

    name: str
    kind: Literal["numeric", "categorical"]
    psi: float
    test: Literal["ks", "chi2"]
    statistic: float
    p_value: float
    effect: float
    drifted: bool


def column_drift(
    name: str, kind: Literal["numeric", "categorical"], reference: Any, current: Any, thresholds: DriftThresholds
) -> FeatureDrift:
    """Drift of one column of the reference against the current sample (see the module's rules)."""
    if kind == "numeric":
        psi = numeric_psi(reference, current)
        statistic, p_value = ks_test(reference, current)
        test, effect = "ks", statistic
    else:
        psi = categorical_psi(reference, current)
        statistic, p_value = chi_square_test(reference, current)
        test, effect = "chi2", total_variation(reference, current)
    drifted = psi >= thresholds.psi or (p_value < thresholds.p_value and effect >= thresholds.min_effect)
    return FeatureDrift(name, kind, psi, test, statistic, p_value, effect, bool(drifted))


def feature_drifts(
    reference: pd.DataFrame, current: pd.DataFrame, config: DatasetConfig, thresholds: DriftThresholds
) -> list[FeatureDrift]:
    """Drift of every feature of the dataset, in the config's order."""
    return [
        column_drift(
            feature,
            "numeric" if feature in config.numeric_features else "categorical",
            reference[feature].to_numpy() if feature in config.numeric_features else reference[feature],
            current[feature].to_numpy() if feature in config.numeric_features else current[feature],
            thresholds,
        )
        for feature in config.feature_names
    ]


def proba_columns(classes: list[Any]) -> list[str]:
    """Names of the probability columns, in class order: `proba_<class>`."""
    return [f"{PROBA_PREFIX}{cls}" for cls in classes]


def output_columns(classes: list[Any]) -> list[str]:
    """Columns of the model's outputs in a reference sample: `proba_<class>` per class, or `prediction`."""
    return proba_columns(classes) if classes else [PREDICTION_COLUMN]


def task_of(classes: list[Any]) -> str:
    """`regression` (no classes), `binary` (two) or `multiclass`."""
    if len(classes) == 0:
        return "regression"
    return "binary" if len(classes) == 2 else "multiclass"


def prediction_drift(
    reference_scores: np.ndarray, current_scores: np.ndarray, classes: list[Any], thresholds: DriftThresholds
) -> FeatureDrift:
    """Drift of the champion's predictions (see the module's rules).

    Binary: the positive-class probability (numeric, named `proba_<class>`). Multiclass: the shares of the
    predicted classes (categorical, named `predicted`): every class counts, not only one probability
    column. Regression: the predicted value (numeric, named `prediction`).

    Args:
        reference_scores: The model's outputs on the reference rows: probabilities (n, classes), or values (n,).
        current_scores: The same on the recent rows.
        classes: The model's classes; empty for a regressor.
        thresholds: The rules' limits.
    """
    if not classes:
        return column_drift(
            PREDICTION_COLUMN,
            "numeric",
            np.asarray(reference_scores, dtype=float),
            np.asarray(current_scores, dtype=float),
            thresholds,
        )
    if len(classes) == 2:
        return column_drift(
            f"{PROBA_PREFIX}{classes[1]}", "numeric", reference_scores[:, 1], current_scores[:, 1], thresholds
        )
    labels = np.asarray(classes, dtype=object)
    return column_drift(
        "predicted",
        "categorical",
        labels[reference_scores.argmax(axis=1)],
        labels[current_scores.argmax(axis=1)],
        thresholds,
    )


def prediction_basis(classes: list[Any]) -> str:
    """What prediction drift is measured on, in words (for the reports)."""
    if len(classes) == 0:
        return "the predicted value"
    if len(classes) == 2:
        return f"the probability of class {classes[1]}"
    return f"the shares of the predicted classes ({', '.join(map(str, classes))})"


@dataclass(frozen=True)
class Performance:
    """Metrics on the labelled recent rows next to the champion's holdout metrics."""

    rows: int
    metrics: dict[str, float]
    holdout: dict[str, float]

    def drop(self, metric: str) -> float | None:
        """Holdout minus recent (positive = worse now for a higher-is-better metric), or None when unknown."""
        if metric not in self.metrics or metric not in self.holdout:
            return None
        return self.holdout[metric] - self.metrics[metric]

    def rise(self, metric: str) -> float | None:
        """Relative rise of an error metric: (recent - holdout) / holdout (positive = worse now).

        None when either is unknown. A holdout error of 0 makes any recent error an infinite rise (and
        none a rise of 0).
        """
        if metric not in self.metrics or metric not in self.holdout:
            return None
        recent, holdout = self.metrics[metric], self.holdout[metric]
        if holdout <= 0:
            return 0.0 if recent <= holdout else float("inf")
        return (recent - holdout) / holdout

    def change(self, metric: str) -> str:
        """The change from the holdout in words for the reports (`-0.0312`, `+12.5 %`), empty when unknown."""
        if metric in RELATIVE_METRICS:
            rise = self.rise(metric)
            return "" if rise is None else f"{rise:+.1%}"
        drop = self.drop(metric)
        return "" if drop is None else f"{-drop:+.4f}"


@dataclass(frozen=True)
class WindowResult:
    """The verdict on one window of recent data (`partition` or `prediction-log`)."""

    name: str
    source: str
    rows: int
    features: list[FeatureDrift] = field(default_factory=list)
    prediction: FeatureDrift | None = None
    performance: Performance | None = None
    labelled_rows: int = 0
    drifted: bool = False
    decayed: bool = False
    reasons: list[str] = field(default_factory=list)
    note: str = ""
    judged: bool = True  # False when the window is too small for a verdict (its figures are noise)

    @property
    def drifted_features(self) -> list[str]:
        """Names of the drifted features."""
        return [f.name for f in self.features if f.drifted]

    @property
    def triggered(self) -> bool:
        """Drift or decay crossed a threshold."""
        return self.drifted or self.decayed


def decay_reasons(performance: Performance, thresholds: DriftThresholds) -> list[str]:
    """Why the labelled rows say the champion decayed (empty: it did not); see the module's rules.

    Classification: absolute drops of ROC AUC and F1; regression: relative rises of RMSE and MAE. A metric
    the window or the holdout lacks is not judged.
    """
    reasons = []
    for metric, limit in (("roc_auc", thresholds.max_auc_drop), ("f1", thresholds.max_f1_drop)):
        drop = performance.drop(metric)
        if drop is not None and drop > limit:
            reasons.append(
                f"{metric} {performance.metrics[metric]:.4f} on {performance.rows} labelled rows is "
                f"{drop:.4f} below the holdout's {performance.holdout[metric]:.4f} (allowed {limit})"
            )
    for metric, limit in (("rmse", thresholds.max_rmse_rise), ("mae", thresholds.max_mae_rise)):
        rise = performance.rise(metric)
        if rise is not None and rise > limit:
            reasons.append(
                f"{metric} {performance.metrics[metric]:.4g} on {performance.rows} labelled rows is "
                f"{rise:.1%} above the holdout's {performance.holdout[metric]:.4g} (allowed {limit:.0%})"
            )
    return reasons


def judge_window(
    name: str,
    source: str,
    rows: int,
    features: list[FeatureDrift],
    prediction: FeatureDrift | None,
    performance: Performance | None,
    labelled_rows: int,
    thresholds: DriftThresholds,
) -> WindowResult:
    """Apply the thresholds to one window's figures: a pure function of numbers."""
    if rows < thresholds.min_rows:
        note = f"{rows} rows, fewer than the {thresholds.min_rows} needed for a verdict"
        return WindowResult(
            name, source, rows, features, prediction, performance, labelled_rows, note=note, judged=False
        )
    reasons = []
    drifted_names = [f.name for f in features if f.drifted]
    share = len(drifted_names) / len(features) if features else 0.0
    drifted = share >= thresholds.drifted_share
    if drifted:
        reasons.append(
            f"{len(drifted_names)}/{len(features)} features drifted ({', '.join(drifted_names)}), "
            f"share {share:.0%} >= {thresholds.drifted_share:.0%}"
        )
    if prediction is not None and prediction.psi >= thresholds.prediction_psi:
        drifted = True
        reasons.append(f"prediction drift: PSI {prediction.psi:.3f} >= {thresholds.prediction_psi}")
    decayed = False
    if performance is not None:
        decay = decay_reasons(performance, thresholds)
        decayed = bool(decay)
        reasons += decay
    note = "" if reasons else "no threshold crossed"
    return WindowResult(
        name, source, rows, features, prediction, performance, labelled_rows, drifted, decayed, reasons, note
    )


@dataclass(frozen=True)
class Verdict:
    """Whether to retrain, and why, over every window."""

    triggered: bool
    reasons: list[str]
    summary: str


def decay_summary(performance: Performance) -> str:
    """The headline figure of a decayed window: RMSE and its rise for a regressor, else ROC AUC."""
    metrics = performance.metrics
    if "rmse" in metrics:
        return f"RMSE {metrics['rmse']:.4g} ({performance.change('rmse')} vs holdout)"
    if "roc_auc" in metrics:
        return f"ROC AUC {metrics['roc_auc']:.3f}"
    return ", ".join(f"{METRIC_NAMES.get(k, k)} {v:.3f}" for k, v in metrics.items())


def overall_verdict(windows: list[WindowResult]) -> Verdict:
    """Retrain when any window drifted or decayed; the summary is short enough for a run's reason."""
    reasons = [f"{w.name}: {reason}" for w in windows for reason in w.reasons]
    if not windows:
        return Verdict(False, [], "no recent data to compare")
    if not reasons:
        notes = "; ".join(f"{w.name}: {w.note}" for w in windows)
        return Verdict(False, [], f"no drift or decay ({notes})")
    parts = []
    for w in windows:
        if not w.triggered:
            continue
        bits = []
        if w.drifted_features:
            bits.append(f"{len(w.drifted_features)}/{len(w.features)} features ({', '.join(w.drifted_features[:4])})")
        if w.prediction is not None and w.drifted:
            bits.append(f"prediction PSI {w.prediction.psi:.2f}")
        if w.decayed and w.performance is not None:
            bits.append(decay_summary(w.performance))
        parts.append(f"{w.name} " + ", ".join(bits))
    return Verdict(True, reasons, "; ".join(parts))


def summary_markdown(
    model_name: str,
    champion: str,
    windows: list[WindowResult],
    verdict: Verdict,
    report_uri: str,
    report_link: str,
    trigger: str,
    classes: list[Any] | None = None,
) -> str:
    """The Prefect artifact: verdict, a table per window and the link to the full report.

    `classes` (the champion's; empty for a regressor) names the task and what prediction drift measured.
    """
    classes = None if classes is None else list(classes)
    lines = [
        f"# Drift monitoring: **{'RETRAIN' if verdict.triggered else 'OK'}**",
        "",
        f"- model: `{model_name}`, champion v{champion}; report: [report.html]({report_link}) (`{report_uri}`)",
    ]
    if classes is not None:
        lines.append(f"- task: {task_of(classes)}; prediction drift is measured on {prediction_basis(classes)}")
    lines += [f"- retraining: {trigger}", f"- summary: {verdict.summary}", ""]
    for w in windows:
        lines += [f"## {w.name}: {w.rows} rows from `{w.source}`", ""]
        lines += [f"- {reason}" for reason in w.reasons] or [f"- {w.note}"]
        if w.performance is not None:
            lines += ["", "| metric | recent | holdout | change |", "|---|---|---|---|"]
            for metric, value in w.performance.metrics.items():
                holdout = w.performance.holdout.get(metric)
                lines.append(
                    f"| {metric_label(metric, classes)} | {value:.4f} | {'' if holdout is None else f'{holdout:.4f}'} "
                    f"| {w.performance.change(metric)} |"
                )
            lines.append(f"\n{w.performance.rows} labelled rows")
        elif w.labelled_rows:
            lines.append(f"- only {w.labelled_rows} labelled rows: no performance figures")
        lines += [
            "",
            "| column | kind | PSI | test | statistic | p-value | effect | drifted |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for f in [*w.features, *([w.prediction] if w.prediction else [])]:
            name = f"{f.name} (prediction)" if f is w.prediction else f.name
            lines.append(
                f"| {name} | {f.kind} | {f.psi:.3f} | {f.test} | {f.statistic:.3f} | {f.p_value:.2g} | "
                f"{f.effect:.3f} | {('**yes**' if f.drifted else 'no') if w.judged else 'not judged'} |"
            )
        lines.append("")
    return "\n".join(lines) + "\n"


def metric_label(metric: str, classes: list[Any] | None) -> str:
    """A metric's name for people: `RMSE`, `ROC AUC`, `F1 (macro)` for a multiclass model's averages."""
    name = METRIC_NAMES.get(metric, metric)
    averaged = classes is not None and len(classes) > 2 and metric in ("roc_auc", "pr_auc", "f1")
    return f"{name} (macro)" if averaged else name


def reference_sample(train: pd.DataFrame, model: Any, config: DatasetConfig, max_rows: int, seed: int) -> pd.DataFrame:
    """Features of up to `max_rows` training rows (a seeded sample) and the model's outputs on them.

    The outputs are a classifier's probabilities (`proba_<class>` per class) or a regressor's predicted
    value (`prediction`).
    """
    rows = train.sample(n=min(max_rows, len(train)), random_state=seed) if len(train) > max_rows else train
    features = prepare_inputs(rows, config).reset_index(drop=True)
    classes = model_classes(model)
    scores = model_scores(model, features)
    outputs = scores.T if classes else [scores]
    return features.assign(**dict(zip(output_columns(classes), outputs, strict=True)))


def reference_scores(reference: pd.DataFrame, classes: list[Any]) -> np.ndarray:
    """The model's outputs stored in a reference sample: probabilities (n, classes), or values (n,).

    Raises MonitoringError when the reference holds other outputs (a reference of another kind of model).
    """
    columns = output_columns(classes)
    missing = [c for c in columns if c not in reference.columns]
    if missing:
        raise MonitoringError(
            f"the training reference lacks the model's output columns {missing}: it was stored for another "
            f"kind of model ({task_of(classes)} expected); retrain to store a new one"
        )
    return reference[columns].to_numpy(dtype=float) if classes else reference[columns[0]].to_numpy(dtype=float)


def join_labels(current: pd.DataFrame, key: str, labels: pd.DataFrame, id_column: str, target: str) -> pd.Series:
    """The label of each current row (NaN where none arrived yet), matched on `current[key] == labels[id_column]`.

    Ids are compared as text: the prediction log keeps them as text whatever their type in the labels.
    """
    if key not in current.columns:
        return pd.Series(np.nan, index=current.index, dtype=object)
    latest = labels.drop_duplicates(id_column, keep="last")
    mapping = pd.Series(latest[target].to_numpy(), index=latest[id_column].astype(str).to_numpy())
    ids = current[key]
    return ids.where(ids.isna(), ids.astype(str)).map(mapping)


LOG_KEY = "label_key"


def prediction_log_key(frame: pd.DataFrame) -> pd.Series:
    """What labels join on for each logged prediction.

    The record's own id when it sent one (the dataset's id column), else its request id (a client sending
    one record per request can set `x-request-id`).
    """
    request = frame["request_id"] if "request_id" in frame.columns else pd.Series(None, index=frame.index)
    if "record_id" not in frame.columns:
        return request.astype(object)
    return frame["record_id"].astype(object).where(frame["record_id"].notna(), request)


def labelled_performance(
    y: np.ndarray, scores: np.ndarray, classes: list[Any], holdout: dict[str, float]
) -> Performance | None:
    """Metrics of the champion on labelled recent rows, beside its holdout figures (None if not measurable).

    Classification: ROC AUC, F1, PR AUC, log loss (macro averages for multiclass), when at least two
    classes are among the labels; a metric that is undefined on these rows (e.g. ROC AUC of a class that no
    label has) is left out. Regression: RMSE, MAE and R².
    """
    if classes:
        if len(set(y)) < 2:
            return None
        y = y.astype(np.asarray(classes).dtype)
        names: tuple[str, ...] = ("roc_auc", "f1", "pr_auc", "log_loss")
    else:
        y = y.astype("float64")
        names = REGRESSION_METRICS
    metrics = compute_metrics(y, scores, classes)
    chosen = {k: metrics[k] for k in names if k in metrics and np.isfinite(metrics[k])}
    return Performance(len(y), chosen, {k: v for k, v in holdout.items() if k in chosen})


def analyse(
    name: str,
    source: str,
    current: pd.DataFrame,
    key: str,
    reference: pd.DataFrame,
    model: Any,
    config: DatasetConfig,
    labels: pd.DataFrame | None,
    holdout: dict[str, float],
    thresholds: DriftThresholds,
) -> WindowResult:
    """Compare one window of recent rows with the reference: features, the champion's predictions, labels."""
    if len(current) == 0:
        return judge_window(name, source, 0, [], None, None, 0, thresholds)
    features = prepare_inputs(current, config)
    classes = model_classes(model)
    scores = model_scores(model, features)
    drifts = feature_drifts(reference, features, config, thresholds)
    prediction = prediction_drift(reference_scores(reference, classes), scores, classes, thresholds)
    performance, labelled = None, 0
    if labels is not None:
        y = join_labels(current, key, labels, config.id_column, config.target)
        known = y.notna().to_numpy()
        labelled = int(known.sum())
        if labelled >= thresholds.min_labelled_rows:
            performance = labelled_performance(y[known].to_numpy(), scores[known], classes, holdout)
    return judge_window(name, source, len(current), drifts, prediction, performance, labelled, thresholds)


def result_json(windows: list[WindowResult], verdict: Verdict, extra: dict[str, Any]) -> str:
    """Machine-readable result (stored beside the HTML report)."""
    return json.dumps(
        {"verdict": asdict(verdict), "windows": [asdict(w) for w in windows]} | extra, indent=2, default=str
    )


# ---------------------------------------------------------------------------------------------- I/O


@task(name="log-reference", **IO)
def log_reference(run_id: str, model: Any, train: pd.DataFrame, config: DatasetConfig, seed: int = 0) -> str:
    """Prefect task: store the training reference (features + the model's outputs) in the model's run.

    Monitoring compares recent data with it. Returns the artifact path in the run.
    """
    frame = reference_sample(train, model, config, REFERENCE_ROWS, seed)
    client = mlflow_client(get_settings())
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / Path(REFERENCE_ARTIFACT).name
        frame.to_parquet(path, index=False)
        client.log_artifact(run_id, str(path), str(Path(REFERENCE_ARTIFACT).parent))
    log.info("training reference: %d rows in run %s at %s", len(frame), run_id, REFERENCE_ARTIFACT)
    return REFERENCE_ARTIFACT


@dataclass(frozen=True)
class Champion:
    """The champion being monitored: version, run, fitted pipeline, holdout metrics and training reference."""

    model_name: str
    version: str
    run_id: str
    model: Any = field(repr=False)
    holdout: dict[str, float]
    reference: pd.DataFrame = field(repr=False)

    @property
    def classes(self) -> list[Any]:
        """The champion's classes; empty for a regressor."""
        return model_classes(self.model)


@task(name="load-champion-reference", **IO)
def load_champion_reference(model_name: str) -> Champion:
    """Prefect task: the current champion with its training reference and holdout metrics."""
    from mlflow.exceptions import MlflowException

    from adapters.registry import champion_version

    client = mlflow_client(get_settings())
    version = champion_version(model_name)
    if version is None:
        raise MonitoringError(f"{model_name!r} has no champion in the registry: nothing to monitor (train first)")
    run_id = client.get_model_version(model_name, version).run_id
    with tempfile.TemporaryDirectory() as folder:
        try:
            path = client.download_artifacts(run_id, REFERENCE_ARTIFACT, folder)
        except (MlflowException, OSError) as exc:
            raise MonitoringError(
                f"champion v{version} of {model_name!r} has no training reference ({REFERENCE_ARTIFACT} in run "
                f"{run_id}); it was trained before monitoring existed: retrain to create one"
            ) from exc
        reference = pd.read_parquet(path)
    if reference.empty:
        raise MonitoringError(f"the training reference of {model_name!r} v{version} (run {run_id}) is empty")
    logged = client.get_run(run_id).data.metrics
    holdout = holdout_metrics(logged)
    model = load_model(model_name, version)
    log.info("monitoring %s v%s against %d reference rows", model_name, version, len(reference))
    return Champion(model_name, version, run_id, model, holdout, reference)


@dataclass(frozen=True)
class Window:
    """Recent rows to compare: `key` names the column that labels join on."""

    name: str
    source: str
    frame: pd.DataFrame = field(repr=False)
    key: str


@task(name="load-partition", **IO)
def load_partition(uri: str, config: DatasetConfig) -> Window:
    """Prefect task: a recent partition (file or folder, the dataset's format); labels join on the id column."""
    snapshot = read_snapshot(uri, config.format, get_settings())
    missing = [c for c in config.feature_names if c not in snapshot.frame.columns]
    if missing:
        raise MonitoringError(f"partition {uri} lacks the feature columns {missing}")
    return Window("partition", uri, snapshot.frame, config.id_column)


def prediction_log_keys(client: Any, bucket: str, model_name: str, days: int, now: datetime) -> list[str]:
    """Keys of the serving prediction log for the last `days` UTC dates (today included)."""
    from serving.prediction_log import prefix_for

    keys: list[str] = []
    for back in range(days):
        prefix = f"{prefix_for(model_name)}date={(now - timedelta(days=back)):%Y-%m-%d}/"
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            keys += [o["Key"] for o in page.get("Contents", []) if o["Key"].endswith(".parquet")]
    return sorted(keys)


@task(name="load-prediction-log", **IO)
def load_prediction_log(model_name: str, days: int, config: DatasetConfig) -> Window:
    """Prefect task: what the serving API logged over the last `days` days.

    Labels join on each record's id, or its request id (see `prediction_log_key`).
    """
    settings = get_settings()
    client = s3_client(settings)
    now = datetime.now(UTC)
    keys = prediction_log_keys(client, settings.bucket, model_name, days, now)
    frames = [
        pd.read_parquet(io.BytesIO(client.get_object(Bucket=settings.bucket, Key=k)["Body"].read())) for k in keys
    ]
    frame = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=config.feature_names)
    if frames:
        cutoff = pd.Timestamp(now - timedelta(days=days))
        frame = frame[pd.to_datetime(frame["predicted_at"], utc=True) >= cutoff].reset_index(drop=True)
    source = f"s3://{settings.bucket}/predictions/serving/{model_name}/ (last {days} day(s), {len(keys)} file(s))"
    log.info("prediction log: %d rows from %d file(s)", len(frame), len(keys))
    if frames:
        frame[LOG_KEY] = prediction_log_key(frame)
    return Window("prediction-log", source, frame, LOG_KEY)


@task(name="load-labels", **IO)
def load_labels(uri: str, config: DatasetConfig) -> pd.DataFrame:
    """Prefect task: late-arriving labels (the dataset's id column and target), file or folder."""
    frame = read_snapshot(uri, config.format, get_settings()).frame
    missing = [c for c in (config.id_column, config.target) if c not in frame.columns]
    if missing:
        raise MonitoringError(f"labels at {uri} lack the columns {missing} (need the id column and the target)")
    return frame[[config.id_column, config.target]].dropna()


@task(name="analyse-window", cache_policy=NO_CACHE)
def analyse_window(
    window: Window, champion: Champion, config: DatasetConfig, labels: pd.DataFrame | None, thresholds: DriftThresholds
) -> WindowResult:
    """Prefect task: compare one window with the champion's reference (see `analyse`)."""
    result = analyse(
        window.name,
        window.source,
        window.frame,
        window.key,
        champion.reference,
        champion.model,
        config,
        labels,
        champion.holdout,
        thresholds,
    )
    log.info("%s: %s", window.name, "; ".join(result.reasons) or result.note)
    return result


def report_html(champion: Champion, windows: list[Window], results: list[WindowResult], config: DatasetConfig) -> str:
    """The HTML report: Evidently's data-drift report per window (when installed), after our own summary."""
    summary = _summary_html(champion, results)
    try:
        from evidently import DataDefinition, Dataset, Report
        from evidently.presets import DataDriftPreset
    except ImportError:  # the numbers above are ours anyway; Evidently only adds the plots
        return f"<html><body>{summary}<p>Evidently is not installed: no plots.</p></body></html>"
    classes = champion.classes
    # The prediction column as prediction drift sees it: the positive-class probability (binary), the
    # predicted class (multiclass, categorical), the predicted value (regression).
    multiclass = len(classes) > 2
    numeric = [*config.numeric_features, *([] if multiclass else ["prediction"])]
    categorical = [*config.categorical_features, *(["prediction"] if multiclass else [])]
    definition = DataDefinition(numerical_columns=numeric, categorical_columns=categorical)
    reference = champion.reference[config.feature_names].assign(
        prediction=_prediction_column(reference_scores(champion.reference, classes), classes)
    )
    parts = []
    for window, result in zip(windows, results, strict=True):
        if len(window.frame) == 0 or not result.judged:
            continue
        current = prepare_inputs(window.frame, config)
        current = current.assign(prediction=_prediction_column(model_scores(champion.model, current), classes))
        snapshot = Report([DataDriftPreset()]).run(
            current_data=Dataset.from_pandas(current, data_definition=definition),
            reference_data=Dataset.from_pandas(reference, data_definition=definition),
        )
        title = (
            f"<h2>Evidently data drift: {html.escape(window.name)}</h2><p>Plots and per-column tests by Evidently. "
            "Its own dataset verdict uses its default rule (half the columns drifted); the verdict that triggers "
            "retraining is ours, above.</p>"
        )
        frame = html.escape(snapshot.get_html_str(as_iframe=False), quote=True)
        parts.append(f'{title}<iframe srcdoc="{frame}" style="width:100%;height:1400px;border:0"></iframe>')
    return f"<html><head><meta charset='utf-8'></head><body>{summary}{''.join(parts)}</body></html>"


def _prediction_column(scores: np.ndarray, classes: list[Any]) -> np.ndarray:
    """One prediction per row for the report's plots: see `prediction_drift` for what it is per task."""
    if not classes:
        return np.asarray(scores, dtype=float)
    if len(classes) == 2:
        return scores[:, 1]
    return np.asarray([str(c) for c in classes], dtype=object)[scores.argmax(axis=1)]


def _summary_html(champion: Champion, results: list[WindowResult]) -> str:
    classes = champion.classes
    out = [
        f"<h1>Drift monitoring of {html.escape(champion.model_name)} v{champion.version}</h1>",
        f"<p>Task: {task_of(classes)}; prediction drift is measured on {html.escape(prediction_basis(classes))}.</p>",
    ]
    for w in results:
        out.append(f"<h2>{html.escape(w.name)}: {w.rows} rows</h2><ul>")
        out += [f"<li>{html.escape(r)}</li>" for r in w.reasons] or [f"<li>{html.escape(w.note)}</li>"]
        out.append("</ul>")
        if w.performance is not None:
            out.append(f"<p>Performance on {w.performance.rows} labelled rows:</p>")
            out.append("<table border=1 cellpadding=4><tr><th>metric</th><th>recent</th><th>holdout</th>")
            out.append("<th>change</th></tr>")
            for metric, value in w.performance.metrics.items():
                holdout = w.performance.holdout.get(metric)
                out.append(
                    f"<tr><td>{html.escape(metric_label(metric, classes))}</td><td>{value:.4f}</td>"
                    f"<td>{'' if holdout is None else f'{holdout:.4f}'}</td>"
                    f"<td>{w.performance.change(metric)}</td></tr>"
                )
            out.append("</table>")
        out.append("<table border=1 cellpadding=4><tr><th>column</th><th>PSI</th><th>test</th>")
        out.append("<th>p-value</th><th>effect</th><th>drifted</th></tr>")
        for f in [*w.features, *([w.prediction] if w.prediction else [])]:
            name = f"{f.name} (prediction)" if f is w.prediction else f.name
            out.append(
                f"<tr><td>{html.escape(name)}</td><td>{f.psi:.3f}</td><td>{f.test}</td><td>{f.p_value:.2g}</td>"
                f"<td>{f.effect:.3f}</td><td>{('yes' if f.drifted else 'no') if w.judged else 'not judged'}</td></tr>"
            )
        out.append("</table>")
    return "".join(out)


@dataclass(frozen=True)
class StoredReport:
    """Where the report went: S3 URIs and a link a browser can open (presigned, 7 days)."""

    html_uri: str
    json_uri: str
    link: str


@task(name="store-monitoring-report", **IO)
def store_report(
    champion: Champion, windows: list[Window], results: list[WindowResult], verdict: Verdict, config: DatasetConfig
) -> StoredReport:
    """Prefect task: the HTML report and the JSON result to `s3://<bucket>/reports/monitoring/<model>/<time>-<run>/`."""
    from prefect.runtime import flow_run

    settings = get_settings()
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    folder = S3Location(
        settings.bucket, f"reports/monitoring/{champion.model_name}/{stamp}-{flow_run.get_id() or 'local'}"
    )
    page = report_html(champion, windows, results, config)
    html_uri = put_bytes(settings, folder.child("report.html"), page.encode(), "text/html; charset=utf-8")
    body = result_json(results, verdict, {"model": champion.model_name, "champion": champion.version})
    json_uri = put_bytes(settings, folder.child("result.json"), body.encode(), "application/json")
    key = folder.child("report.html").key
    link = s3_client(settings).generate_presigned_url(
        "get_object", Params={"Bucket": settings.bucket, "Key": key}, ExpiresIn=7 * 24 * 3600
    )
    log.info("monitoring report stored at %s", html_uri)
    return StoredReport(html_uri, json_uri, link)


@task(name="publish-monitoring-summary", cache_policy=NO_CACHE)
def publish_summary(markdown: str) -> None:
    """Prefect task: the summary table as the run's `drift-report` markdown artifact."""
    from prefect.artifacts import create_markdown_artifact

    create_markdown_artifact(markdown=markdown, key="drift-report", description="Drift monitoring summary")


@dataclass(frozen=True)
class Trigger:
    """What happened to the retraining: `triggered`, `cooldown` (skipped) or `disabled`."""

    status: Literal["triggered", "cooldown", "disabled", "not-needed"]
    detail: str
    flow_run_id: str | None = None


def model_tag(model_name: str) -> str:
    """Prefect tag naming the model a drift-triggered run retrains."""
    return f"model:{model_name}"


def blocking_runs(runs: list[Any], since: datetime) -> list[Any]:
    """Drift-triggered runs that keep a new trigger back: started (or due) since `since`, or not finished yet."""
    return [
        run
        for run in runs
        if (run.expected_start_time is not None and run.expected_start_time >= since)
        or (run.state is not None and not run.state.is_final())
    ]


@task(name="trigger-retraining", **IO)
def trigger_retraining(model_name: str, dataset: str, reason: str, cooldown_minutes: float, deployment: str) -> Trigger:
    """Prefect task: start a run of the training deployment, unless one was drift-triggered within the cooldown.

    Any drift-triggered run of this model due within `cooldown_minutes` blocks a new one whatever its
    state (a failed retrain is not retried by the next check: a person should look), and so does one that
    has not finished. Check and trigger hold a one-slot lock per model, so two checks at once start one run.
    The run gets the deployment's default parameters with `dataset` and `reason` set, and the tags
    `drift-triggered` and `model:<name>`.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags
    from prefect.client.schemas.sorting import FlowRunSort
    from prefect.concurrency.sync import concurrency
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    tags = [DRIFT_TAG, model_tag(model_name)]
    lock = f"drift-trigger-{model_name}"
    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(lock, limit=1)
    with concurrency(lock, occupy=1, strict=True, timeout_seconds=300):
        since = datetime.now(UTC) - timedelta(minutes=cooldown_minutes)
        with get_client(sync_client=True) as client:
            runs = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=tags)),
                sort=FlowRunSort.EXPECTED_START_TIME_DESC,
                limit=50,
            )
            blocking = blocking_runs(runs, since)
            if blocking:
                run = blocking[0]
                detail = (
                    f"cooldown: drift-triggered run {run.name} ({run.id}, {run.state_name}) of {model_name} is within "
                    f"the last {cooldown_minutes:g} min or unfinished; not starting another"
                )
                log.warning("%s", detail)
                return Trigger("cooldown", detail, str(run.id))
            try:
                defaults = client.read_deployment_by_name(deployment).parameters or {}
            except ObjectNotFound as exc:
                raise MonitoringError(
                    f"deployment {deployment!r} not found on {client.api_url}: deploy it (`mlops deploy`) to retrain"
                ) from exc
        params = dict(defaults.get("params") or {}) | {"dataset": dataset, "reason": reason[:500]}
        run = run_deployment(deployment, parameters={"params": params}, tags=tags, timeout=0)
    detail = f"started {deployment} run {run.name} ({run.id}): {reason}"
    log.info("%s", detail)
    return Trigger("triggered", detail, str(run.id))
