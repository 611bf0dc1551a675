"""One window of recent rows against the champion's training reference, and the verdict over all windows (pure).

The statistics and the rules are in `core/monitoring/drift.py`, decay in `core/monitoring/decay.py`; this module
holds the value types monitoring passes around (the champion, a window, a window's result, the verdict), the reference
sample stored with each model, the label join and `analyse_window`, which puts them together. No I/O.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime
from typing import Any

import numpy as np
import pandas as pd

from core.data.dataset import DatasetConfig
from core.data.features import prepare_inputs, prepare_target
from core.modeling.metrics import model_classes, model_scores
from core.monitoring.decay import Performance, decay_reasons, decay_summary, labelled_performance
from core.monitoring.drift import (
    DriftThresholds,
    FeatureDrift,
    MonitoringError,
    drift_features,
    feature_drifts,
    output_columns,
    prediction_drift,
    task_of,
)
from core.monitoring.estimation import (
    REFERENCE_TARGET,
    BandRule,
    Estimated,
    PerformanceEstimator,
    estimate_performance,
    estimate_reasons,
    fit_estimator,
)
from core.monitoring.multivariate import MultivariateDrift, domain_classifier_drift
from core.monitoring.prediction_log import LOG_KEY, PREDICTED_AT, prediction_log_key, window_start

REFERENCE_ROWS = 5000  # holdout rows kept in the reference sample stored with each model


@dataclass(frozen=True)
class Champion:
    """The champion being monitored: version, run, fitted pipeline, holdout metrics and training reference."""

    model_name: str
    version: str
    run_id: str
    model: Any = field(repr=False)
    holdout: dict[str, float]
    reference: pd.DataFrame = field(repr=False)
    estimator: PerformanceEstimator | None = field(default=None, repr=False)  # `with_estimator` fits it

    @property
    def classes(self) -> list[Any]:
        """The champion's classes; empty for a regressor."""
        return model_classes(self.model)


@dataclass(frozen=True)
class Window:
    """Recent rows to compare: `key` names the column that labels join on."""

    name: str
    source: str
    frame: pd.DataFrame = field(repr=False)
    key: str


@dataclass(frozen=True)
class WindowFigures:
    """What was measured on one window, before the thresholds judge it (`judge_window`)."""

    name: str
    source: str
    rows: int
    features: list[FeatureDrift] = field(default_factory=list)
    prediction: FeatureDrift | None = None
    performance: Performance | None = None
    labelled_rows: int = 0
    estimated: Estimated | None = None  # performance expected without labels (`core/monitoring/estimation.py`)
    estimation_note: str = ""  # why nothing was estimated, when nothing was
    multivariate: MultivariateDrift | None = None  # the domain classifier's verdict
    null_rates: dict[str, float] = field(default_factory=dict)  # share of missing values per feature


@dataclass(frozen=True)
class WindowResult(WindowFigures):
    """The verdict on one window of recent data (`partition` or `prediction-log`): its figures, judged."""

    drifted: bool = False
    decayed: bool = False
    estimated_drop: bool = False  # an estimate without labels is beyond its band on the worse side
    reasons: list[str] = field(default_factory=list)
    note: str = ""
    judged: bool = True  # False when the window is too small for a verdict (its figures are noise)

    @property
    def drifted_features(self) -> list[str]:
        """Names of the drifted features."""
        return [f.name for f in self.features if f.drifted]

    @property
    def triggered(self) -> bool:
        """Drift, decay or an estimated drop crossed a threshold."""
        return self.drifted or self.decayed or self.estimated_drop


@dataclass(frozen=True)
class Verdict:
    """Whether to retrain, and why, over every window."""

    triggered: bool
    reasons: list[str]
    summary: str


# ---------------------------------------------------------------------------------------------- inputs


def partition_window(frame: pd.DataFrame, uri: str, config: DatasetConfig) -> Window:
    """A recent partition as a window (labels join on the id column); raises when a feature column is missing."""
    missing = [c for c in config.feature_names if c not in frame.columns]
    if missing:
        raise MonitoringError(f"partition {uri} lacks the feature columns {missing}")
    return Window("partition", uri, frame, config.id_column)


def prediction_log_window(
    frames: list[pd.DataFrame], source: str, now: datetime, days: int, config: DatasetConfig
) -> Window:
    """The prediction log's objects of the last `days` date folders as one window.

    Rows predicted before the window's first date (written late, after an S3 outage) are dropped, so the
    window is exactly `days` UTC dates: today and the `days - 1` before. Labels join on each record's id,
    or its request id (see `core.monitoring.prediction_log.prediction_log_key`).
    """
    if not frames:
        return Window("prediction-log", source, pd.DataFrame(columns=config.feature_names), LOG_KEY)
    frame = pd.concat(frames, ignore_index=True)
    start = pd.Timestamp(window_start(now, days))
    frame = frame[pd.to_datetime(frame[PREDICTED_AT], utc=True) >= start].reset_index(drop=True)
    frame[LOG_KEY] = prediction_log_key(frame)
    return Window("prediction-log", source, frame, LOG_KEY)


def label_frame(frame: pd.DataFrame, uri: str, config: DatasetConfig) -> pd.DataFrame:
    """Late labels: the id column and the target, rows without either dropped; raises when a column is missing."""
    missing = [c for c in (config.id_column, config.target) if c not in frame.columns]
    if missing:
        raise MonitoringError(f"labels at {uri} lack the columns {missing} (need the id column and the target)")
    return frame[[config.id_column, config.target]].dropna()


def reference_sample(
    rows: pd.DataFrame, model: Any, config: DatasetConfig, max_rows: int, seed: int, scores: np.ndarray | None = None
) -> pd.DataFrame:
    """Features of up to `max_rows` of `rows` (a seeded sample) and the model's outputs on them.

    Pass rows the model was not fitted on (the training flow passes its frozen holdout): on its own
    training rows an overfit model is more confident than on any new data, so prediction drift would
    fire on unchanged data. The outputs are a classifier's probabilities (`proba_<class>` per class) or a
    regressor's predicted value (`prediction`). `scores`: the model's outputs on all of `rows`, in their order,
    when the caller has them (the holdout evaluation's): the sampled rows' are taken instead of predicting again.
    """
    if len(rows) > max_rows:  # the rows `rows.sample(n=max_rows, random_state=seed)` picks, by position
        positions = pd.Series(np.arange(len(rows))).sample(n=max_rows, random_state=seed).to_numpy()
        rows, scores = rows.iloc[positions], None if scores is None else scores[positions]
    features = prepare_inputs(rows, config).reset_index(drop=True)
    classes = model_classes(model)
    scores = model_scores(model, features) if scores is None else scores
    outputs = scores.T if classes else [scores]
    labels = {REFERENCE_TARGET: prepare_target(rows, config).to_numpy()}  # what the estimates are fitted on
    return features.assign(**dict(zip(output_columns(classes), outputs, strict=True)), **labels)


def with_estimator(champion: Champion, config: DatasetConfig, seed: int = 0) -> Champion:
    """The champion with its performance estimator fitted on the reference rows (their features, outputs, labels).

    A reference stored before estimation existed has no labels: the champion is returned as it is, and each window
    says why nothing was estimated (`estimation_note`).
    """
    reference = champion.reference
    if REFERENCE_TARGET not in reference.columns:
        return champion
    classes = champion.classes
    y = reference[REFERENCE_TARGET].to_numpy()
    y = y.astype(np.asarray(classes).dtype) if classes else y.astype(float)
    features = reference[drift_features(config)]
    estimator = fit_estimator(features, reference_scores(reference, classes), y, classes, seed)
    return replace(champion, estimator=estimator)


NO_REFERENCE_LABELS = (
    "no estimated performance: the champion's training reference has no labels (stored before estimation "
    "existed); the next retraining stores one"
)


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


# ---------------------------------------------------------------------------------------------- verdicts


def judge_window(figures: WindowFigures, thresholds: DriftThresholds) -> WindowResult:
    """Apply the thresholds to one window's figures: a pure function of numbers."""
    measured = {f.name: getattr(figures, f.name) for f in fields(WindowFigures)}
    rows, features, prediction, performance = figures.rows, figures.features, figures.prediction, figures.performance
    if rows < thresholds.min_rows:
        note = f"{rows} rows, fewer than the {thresholds.min_rows} needed for a verdict"
        return WindowResult(**measured, note=note, judged=False)
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
    if thresholds.multivariate and figures.multivariate is not None and figures.multivariate.drifted:
        drifted = True
        reasons.append(f"multivariate drift (domain classifier): {figures.multivariate.describe()}")
    decayed = False
    if performance is not None:
        decay = decay_reasons(performance, thresholds)
        decayed = bool(decay)
        reasons += decay
    estimated = []
    if figures.estimated is not None and thresholds.estimate_triggers:
        estimated = estimate_reasons(figures.estimated, WATCHED)
    reasons += estimated
    note = "" if reasons else "no threshold crossed"
    return WindowResult(
        **measured, drifted=drifted, decayed=decayed, estimated_drop=bool(estimated), reasons=reasons, note=note
    )


WATCHED = ("roc_auc", "f1", "rmse", "mae")  # the estimated metrics that trigger retraining (as decay's)


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
        if w.multivariate is not None and w.multivariate.drifted:
            bits.append(f"domain classifier AUC {w.multivariate.auc:.2f}")
        if w.decayed and w.performance is not None:
            bits.append(decay_summary(w.performance))
        if w.estimated_drop and w.estimated is not None:
            worse = [m for m in w.estimated.metrics if m.worse and m.metric in WATCHED]
            bits.append(", ".join(f"estimated {m.metric} {m.estimate:.3g}" for m in worse))
        parts.append(f"{w.name} " + ", ".join(bits))
    return Verdict(True, reasons, "; ".join(parts))


def analyse_window(
    window: Window, champion: Champion, config: DatasetConfig, labels: pd.DataFrame | None, thresholds: DriftThresholds
) -> WindowResult:
    """Compare one window of recent rows with the champion's reference: features, its predictions, labels.

    Labels (late, joined by id on `window.key`) are judged against the champion's holdout figures.
    """
    current = window.frame
    if len(current) == 0:
        return judge_window(WindowFigures(window.name, window.source, 0), thresholds)
    model, reference = champion.model, champion.reference
    features = prepare_inputs(current, config)
    classes = model_classes(model)
    scores = model_scores(model, features)
    drifts = feature_drifts(reference, features, config, thresholds)
    prediction = prediction_drift(reference_scores(reference, classes), scores, classes, thresholds)
    performance, labelled, known_labels = None, 0, None
    if labels is not None:
        y = join_labels(current, window.key, labels, config.id_column, config.target)
        known = y.notna().to_numpy()
        labelled = int(known.sum())
        if labelled >= thresholds.min_labelled_rows:
            y_known = y[known].to_numpy()
            y_known = y_known.astype(np.asarray(classes).dtype) if classes else y_known.astype(float)
            performance = labelled_performance(y_known, scores[known], classes, champion.holdout)
            known_labels = (known, y_known) if performance is not None else None
    columns = drift_features(config)
    figures = WindowFigures(
        window.name, window.source, len(current), drifts, prediction, performance, labelled,
        null_rates={c: float(features[c].isna().mean()) for c in columns},
    )  # fmt: skip
    if len(current) < thresholds.min_rows:
        return judge_window(figures, thresholds)
    champion = champion if champion.estimator is not None else with_estimator(champion, config)
    estimator = champion.estimator
    estimated = None if estimator is None else estimate_performance(
        estimator, features[columns], scores, BandRule(thresholds.estimate_sigmas, thresholds.estimate_min_change),
        known_labels,
    )  # fmt: skip
    multivariate = None
    if thresholds.multivariate:
        multivariate = domain_classifier_drift(
            reference, features, columns, thresholds.domain_permutations, thresholds.domain_min_auc
        )
    note = "" if estimated is not None else NO_REFERENCE_LABELS
    figures = replace(figures, estimated=estimated, estimation_note=note, multivariate=multivariate)
    return judge_window(figures, thresholds)


def result_json(windows: list[WindowResult], verdict: Verdict, extra: dict[str, Any]) -> str:
    """Machine-readable result (stored beside the HTML report)."""
    return json.dumps(
        {"verdict": asdict(verdict), "windows": [asdict(w) for w in windows]} | extra, indent=2, default=str
    )


# ------------------------------------------------------------------ will a retrain see the drifted data?

DATA_SUFFIXES = (".parquet", ".pq", ".csv")


def window_location(source: str) -> str:
    """Where a window's rows live: its source without the description in parentheses.

    `s3://b/predictions/serving/m/ (last 1 day(s), 3 file(s))` gives `s3://b/predictions/serving/m/`.
    """
    return source.split(" (", 1)[0].strip()


def inside_source(location: str, source: str) -> bool:
    """Whether the training source (a folder or one file, as the dataset config's `source`) covers `location`.

    A folder covers everything below it (`s3://b/d/` covers `s3://b/d/month=7/`, not `s3://b/dx/`); a file
    covers only itself.
    """
    location, source = location.strip(), source.strip()
    if source.endswith(DATA_SUFFIXES):
        return location == source
    folder = source if source.endswith("/") else source + "/"
    return location == source.rstrip("/") or location.startswith(folder)


@dataclass(frozen=True)
class RetrainScope:
    """Which triggered windows a retrain on the dataset's `source` would read, and which it would not."""

    source: str
    inside: list[WindowResult]
    outside: list[WindowResult]

    @property
    def retrain(self) -> bool:
        """A retrain is worth starting: some drifted (or decayed) data is in what training reads."""
        return bool(self.inside)

    @property
    def window_key(self) -> str:
        """A short stable key of the triggered windows inside the source (the same data gives the same key)."""
        import hashlib

        places = sorted({window_location(w.source) for w in self.inside})
        return hashlib.sha256("\n".join(places).encode()).hexdigest()[:12]

    @property
    def note(self) -> str:
        """What the scope means for retraining, in one line ("" when every triggered window is inside)."""
        if not self.outside:
            return ""
        where = ", ".join(dict.fromkeys(window_location(w.source) for w in self.outside))
        verb = "retraining on the rest" if self.inside else "not retraining"
        return f"{verb}: the drifted data ({where}) is outside the training source ({self.source})"


def retrain_scope(results: list[WindowResult], source: str) -> RetrainScope:
    """Split the triggered windows by whether a retrain on `source` reads their rows (`inside_source`)."""
    triggered = [r for r in results if r.triggered]
    inside = [r for r in triggered if inside_source(window_location(r.source), source)]
    return RetrainScope(source, inside, [r for r in triggered if r not in inside])
