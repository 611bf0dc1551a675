"""Calibrated probabilities: measured on the holdout, and calibrated after the search when it helps.

Measures (classification; `calibration_metrics`, logged beside the other holdout metrics):
- **ECE** (expected calibration error, `expected_calibration_error`): the probabilities are put in
  `N_BINS` = 10 equal-width bins of [0, 1], as scikit-learn's `calibration_curve(strategy="uniform")`
  bins them ([0, 0.1], (0.1, 0.2], ..., (0.9, 1]); ECE = sum over the bins of (rows in the bin / rows) x
  |observed frequency - mean probability|. Binary: the probability of the positive class (`classes[1]`)
  against the share of positive rows. Multiclass: *top-label*: each row's highest probability (its
  confidence) against whether that class is the true one (the accuracy at that confidence).
- **Brier** score (`brier_score`): the holdout metric `brier` of `core.modeling.metrics.compute_metrics`,
  the mean over rows of the sum over classes of (probability - one-hot truth)², halved so that two
  classes give scikit-learn's binary `brier_score_loss` (multiclass: scikit-learn's
  `brier_score_loss(..., scale_by_half=True)`).

Calibration (`choose_calibration`, run by the search after it picked a configuration): the chosen
configuration is fitted on each CV fold's training rows and predicts that fold's validation rows (the
out-of-fold responses: `decision_function` when the model has one, else the positive class's probability
or every class's, as `CalibratedClassifierCV` reads them). The holdout is never used. Three candidates are
compared on those rows by Brier score:
- `none`: the out-of-fold probabilities themselves;
- `sigmoid` (Platt) and `isotonic`: cross-fitted, so a calibrator never scores rows it was fitted on: the
  rows of each validation fold are calibrated by a calibrator fitted on the other folds' validation rows.
A method is chosen over the simpler one (none < sigmoid < isotonic) only when it lowers the Brier score
by more than `MIN_RELATIVE_GAIN` (1 %) of it, and only if its cross-fitted ROC AUC (macro one-vs-rest for
multiclass; the mean over the validation folds) is at most `MAX_AUC_DROP` below the uncalibrated one's
(isotonic steps tie scores, which the search's ranking metric may not forgive).

The shipped model then stays `Pipeline([("preprocess", ...), ("model", ...)])` with the chosen
configuration fitted on all training rows; when a method is chosen its step `model` is a scikit-learn
`CalibratedClassifierCV` (`ensemble=False` form: one classifier, one calibrator per class, or one for
binary) whose classifier is that refitted estimator and whose calibrators were fitted on every
out-of-fold response: exactly what `CalibratedClassifierCV(estimator, cv=folds, ensemble=False)` fits
when the folds partition the training rows (a unit test checks the equality). Time-ordered folds
(expanding windows) validate every row but the earliest block: the calibrators are fitted on the rows the
folds do validate, which `CalibratedClassifierCV` cannot do (`cross_val_predict` needs a partition).
skops loads it with the `sklearn.` types already trusted, skl2onnx converts it (the compiled form's
parity check decides whether it is served compiled), and `classes_` and `predict_proba` are the
wrapper's, so explanations, the review and serving read it as any classifier.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from sklearn.base import clone
from sklearn.calibration import CalibratedClassifierCV, _CalibratedClassifier, _SigmoidCalibration
from sklearn.isotonic import IsotonicRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import label_binarize

log = logging.getLogger(__name__)

N_BINS = 10
METHODS = ("sigmoid", "isotonic")  # in order of flexibility; "none" comes first
# A calibration is shipped only when it lowers the cross-fitted Brier score by more than this share of it.
MIN_RELATIVE_GAIN = 0.01
# ... and when its cross-fitted ROC AUC is at most this much below the uncalibrated one.
MAX_AUC_DROP = 0.005


# --- measures ---


def _binary(classes: Sequence[Any]) -> bool:
    return len(classes) == 2


def reliability_inputs(
    y_true: Sequence[Any], proba: np.ndarray, classes: Sequence[Any]
) -> tuple[np.ndarray, np.ndarray]:
    """What ECE and the reliability curve compare: (probability, outcome 0/1) per row.

    Binary: the positive class's probability and whether the row is positive. Multiclass (top-label): the
    highest probability and whether its class is the true one.
    """
    classes = list(classes)
    y = np.asarray(y_true)
    proba = np.asarray(proba, dtype="float64")
    if proba.ndim != 2 or proba.shape != (len(y), len(classes)):
        raise ValueError(f"probabilities have shape {proba.shape}, expected ({len(y)}, {len(classes)})")
    if _binary(classes):
        return proba[:, 1], (y == classes[1]).astype("float64")
    top = proba.argmax(axis=1)
    return proba[np.arange(len(y)), top], (np.asarray(classes, dtype=object)[top] == y).astype("float64")


def expected_calibration_error(
    y_true: Sequence[Any], proba: np.ndarray, classes: Sequence[Any], n_bins: int = N_BINS
) -> float:
    """ECE of probabilities: equal-width bins, positive class (binary) or top label (multiclass); see the module."""
    confidence, outcome = reliability_inputs(y_true, proba, classes)
    if len(confidence) == 0:
        return float("nan")
    # calibration_curve's bins: searchsorted on the inner edges puts a value equal to an edge in the lower bin.
    bins = np.searchsorted(np.linspace(0.0, 1.0, n_bins + 1)[1:-1], confidence)
    # Per bin: |sum of (outcome - probability)| = rows x |observed frequency - mean probability|.
    gaps = np.abs(np.bincount(bins, weights=outcome - confidence, minlength=n_bins))
    return float(np.sum(gaps) / len(confidence))


def brier_score(y_true: Sequence[Any], proba: np.ndarray, classes: Sequence[Any]) -> float:
    """Brier score as the holdout metric `brier` (halved sum over classes; binary: `brier_score_loss`)."""
    onehot = label_binarize(np.asarray(y_true), classes=list(classes))
    if _binary(classes):
        onehot = np.hstack([1 - onehot, onehot])
    return float(np.mean(np.sum((np.asarray(proba, dtype="float64") - onehot) ** 2, axis=1)) / 2)


def calibration_metrics(y_true: Sequence[Any], proba: np.ndarray, classes: Sequence[Any]) -> dict[str, float]:
    """The holdout's `ece` for a classifier (its Brier score is `compute_metrics`' already); {} for a regressor."""
    if not list(classes):
        return {}
    return {"ece": expected_calibration_error(y_true, proba, classes)}


def _roc_auc(y: np.ndarray, proba: np.ndarray, classes: list[Any]) -> float:
    if _binary(classes):
        return float(roc_auc_score(y == classes[1], proba[:, 1]))
    return float(roc_auc_score(y, proba, multi_class="ovr", average="macro", labels=classes))


def _fold_auc(oof: OutOfFold, proba: np.ndarray) -> float:
    """Mean over the validation folds of each fold's ROC AUC.

    Each fold is calibrated by one mapping: a monotone one keeps the fold's ranking, so only what a method
    really does to the ranking (e.g. isotonic's ties) shows, not the folds' different mappings pooled.
    """
    scores = []
    for number in np.unique(oof.fold):
        mine = oof.fold == number
        try:
            scores.append(_roc_auc(oof.y[mine], proba[mine], oof.classes))
        except ValueError:  # a fold without every class: the pooled rows instead
            try:
                return _roc_auc(oof.y, proba, oof.classes)
            except ValueError:  # a class no validated row has: no ranking to protect
                return float("nan")
    return float(np.mean(scores))


# --- the shipped model ---


def base_classifier(model: Any) -> Any:
    """The fitted estimator of the chosen configuration in a shipped pipeline, calibrated or not."""
    estimator = model.named_steps["model"] if isinstance(model, Pipeline) else model
    if isinstance(estimator, CalibratedClassifierCV):
        return estimator.calibrated_classifiers_[0].estimator
    return estimator


def uncalibrated(model: Pipeline) -> Pipeline:
    """The shipped pipeline without its calibration (the same fitted steps): the configuration the search chose."""
    estimator = model.named_steps["model"]
    if not isinstance(estimator, CalibratedClassifierCV):
        return model
    return Pipeline([*model.steps[:-1], ("model", base_classifier(model))])


def calibration_method(model: Any) -> str:
    """`sigmoid` or `isotonic` for a calibrated pipeline, `none` otherwise."""
    estimator = model.named_steps["model"] if isinstance(model, Pipeline) else model
    return str(estimator.method) if isinstance(estimator, CalibratedClassifierCV) else "none"


def responses_of(model: Any, X: pd.DataFrame) -> np.ndarray:
    """What `CalibratedClassifierCV` calibrates, as (n, 1) for binary or (n, classes)."""
    if hasattr(model, "decision_function"):
        values = np.asarray(model.decision_function(X), dtype="float64")
    else:
        values = np.asarray(model.predict_proba(X), dtype="float64")
        if values.shape[1] == 2:
            values = values[:, 1]
    return values.reshape(-1, 1) if values.ndim == 1 else values


def fit_calibrators(responses: np.ndarray, y: np.ndarray, classes: Sequence[Any], method: str) -> list[Any]:
    """One calibrator per class (one for binary), as `CalibratedClassifierCV` fits them."""
    targets = label_binarize(y, classes=list(classes))
    calibrators = []
    for column in range(responses.shape[1]):
        calibrator = IsotonicRegression(out_of_bounds="clip") if method == "isotonic" else _SigmoidCalibration()
        calibrators.append(calibrator.fit(responses[:, column], targets[:, column]))
    return calibrators


def apply_calibrators(calibrators: list[Any], responses: np.ndarray, n_classes: int) -> np.ndarray:
    """Calibrated probabilities from responses, as `CalibratedClassifierCV.predict_proba` computes them."""
    if n_classes == 2:
        positive = calibrators[0].predict(responses[:, 0])
        proba = np.column_stack([1.0 - positive, positive])
    else:
        proba = np.column_stack([c.predict(responses[:, k]) for k, c in enumerate(calibrators)])
        total = proba.sum(axis=1, keepdims=True)
        proba = np.divide(proba, total, out=np.full_like(proba, 1.0 / n_classes), where=total != 0)
    proba[(proba > 1.0) & (proba <= 1.0 + 1e-5)] = 1.0
    return proba


def calibrated_pipeline(model: Pipeline, method: str, calibrators: list[Any], n_folds: int) -> Pipeline:
    """The fitted pipeline with its model wrapped in a fitted `CalibratedClassifierCV` (ensemble=False form).

    The wrapper's `estimator` parameter is the unfitted configuration; its one calibrated classifier holds
    the fitted estimator of `model` and `calibrators`; `cv` says how many folds the calibration rows came from.
    """
    estimator = model.named_steps["model"]
    classes = np.asarray(estimator.classes_)
    wrapper = CalibratedClassifierCV(clone(estimator), method=method, cv=n_folds, ensemble=False)
    wrapper.calibrated_classifiers_ = [_CalibratedClassifier(estimator, calibrators, classes=classes, method=method)]
    wrapper.classes_ = classes
    for attribute in ("n_features_in_", "feature_names_in_"):
        if hasattr(estimator, attribute):
            setattr(wrapper, attribute, getattr(estimator, attribute))
    return Pipeline([*model.steps[:-1], ("model", wrapper)])


# --- the choice ---


@dataclass(frozen=True)
class OutOfFold:
    """The chosen configuration's predictions on the rows the CV folds validate, each by a model not fitted on it."""

    rows: np.ndarray  # positions in the training rows
    fold: np.ndarray  # which fold validated each row
    responses: np.ndarray = field(repr=False)  # (n, 1) or (n, classes): what a calibrator reads
    proba: np.ndarray = field(repr=False)  # (n, classes): the uncalibrated probabilities
    y: np.ndarray = field(repr=False)
    classes: list[Any]


def fold_predictions(fitted: Any, X_valid: pd.DataFrame, classes: list[Any]) -> tuple[np.ndarray, np.ndarray]:
    """One fold's model on its validation rows: (responses a calibrator reads, probabilities).

    Raises:
        ValueError: The fold's model lacks a class.
    """
    if list(fitted.classes_) != list(classes):
        raise ValueError(f"a fold's training rows lack a class ({list(fitted.classes_)} of {list(classes)})")
    return responses_of(fitted, X_valid), np.asarray(fitted.predict_proba(X_valid), dtype="float64")


def assemble(
    folds: list[tuple[Any, Any]], predictions: Sequence[tuple[np.ndarray, np.ndarray]], y: pd.Series
) -> OutOfFold:
    """The out-of-fold rows from each fold's `fold_predictions`, in row order (as `cross_val_predict` gives them).

    Raises:
        ValueError: Two folds validate the same row.
    """
    classes = list(np.unique(y.to_numpy()))
    positions = np.concatenate([np.asarray(valid) for _, valid in folds])
    if len(np.unique(positions)) != len(positions):
        raise ValueError("the CV folds validate some rows more than once")
    fold = np.concatenate([np.full(len(valid), number) for number, (_, valid) in enumerate(folds)])
    order = np.argsort(positions, kind="stable")
    positions = positions[order]
    return OutOfFold(
        positions,
        fold[order],
        np.vstack([r for r, _ in predictions])[order],
        np.vstack([p for _, p in predictions])[order],
        y.to_numpy()[positions],
        classes,
    )


def out_of_fold(pipeline: Pipeline, X: pd.DataFrame, y: pd.Series, folds: list[tuple[Any, Any]]) -> OutOfFold:
    """Fit `pipeline` (unfitted) on each fold's training rows and predict its validation rows.

    The search keeps these predictions of the trials it completed (the same fits), so the chosen one is
    normally not fitted again (`choose_calibration(..., predictions=...)`).

    Raises:
        ValueError: A fold's model lacks a class, or two folds validate the same row.
    """
    classes = list(np.unique(y.to_numpy()))
    predictions = [
        fold_predictions(clone(pipeline).fit(X.iloc[train], y.iloc[train]), X.iloc[valid], classes)
        for train, valid in folds
    ]
    return assemble(folds, predictions, y)


def cross_fitted(oof: OutOfFold, method: str) -> np.ndarray:
    """Calibrated probabilities of every out-of-fold row, each by a calibrator fitted on the other folds' rows."""
    proba = np.empty_like(oof.proba)
    for number in np.unique(oof.fold):
        mine = oof.fold == number
        calibrators = fit_calibrators(oof.responses[~mine], oof.y[~mine], oof.classes, method)
        proba[mine] = apply_calibrators(calibrators, oof.responses[mine], len(oof.classes))
    return proba


@dataclass(frozen=True)
class Calibration:
    """What the calibration step compared on the out-of-fold rows, what it chose and why.

    Attributes:
        method: `none`, `sigmoid` or `isotonic`: what the shipped model does.
        brier: Cross-fitted Brier score of each method compared (`none`: the uncalibrated probabilities).
        roc_auc: Their ROC AUC on the same rows (macro one-vs-rest for multiclass), the mean over the folds.
        ece: Their ECE on the same rows.
        rows: Out-of-fold rows compared on (the rows the folds validate).
        training_rows: The rows the search saw (every training row, or its sample of them); more than `rows`
            when the folds do not partition them.
        reason: Why this method, in one sentence.
        calibrators: The chosen method's calibrators fitted on every out-of-fold row (empty for `none`).
    """

    method: str
    brier: dict[str, float]
    roc_auc: dict[str, float]
    ece: dict[str, float]
    rows: int
    training_rows: int
    reason: str
    calibrators: list[Any] = field(default_factory=list, repr=False)
    n_folds: int = 0

    @property
    def brier_before(self) -> float:
        """The uncalibrated out-of-fold Brier score."""
        return self.brier.get("none", float("nan"))

    @property
    def brier_after(self) -> float:
        """The Brier score of what is shipped (equal to `brier_before` when nothing is calibrated)."""
        return self.brier.get(self.method, self.brier_before)

    def params(self) -> dict[str, str]:
        """Run parameters: the method shipped."""
        return {"calibration.method": self.method}

    def metrics(self) -> dict[str, float]:
        """Run metrics: the cross-fitted Brier before and after, and each method's."""
        values = {"calibration.brier_cv_before": self.brier_before, "calibration.brier_cv_after": self.brier_after}
        values |= {f"calibration.brier_cv_{m}": v for m, v in self.brier.items()}
        values |= {f"calibration.ece_cv_{m}": v for m, v in self.ece.items()}
        return {k: float(v) for k, v in values.items() if np.isfinite(v)}

    def tags(self) -> dict[str, str]:
        """Run tags: why, and on which rows."""
        return {
            "calibration.reason": self.reason[:4900],
            "calibration.rows": f"{self.rows} of the {self.training_rows} rows the search saw (out-of-fold)",
        }

    def summary(self) -> str:
        """One line for the model card."""
        compared = ", ".join(f"{m} {v:.4f}" for m, v in self.brier.items())
        scores = f"; cross-fitted Brier on {self.rows} out-of-fold rows: {compared}" if self.brier else ""
        return f"{self.method}{scores}. {self.reason}"

    def to_dict(self) -> dict[str, Any]:
        """For the run's `search/best.json`."""
        return {
            "method": self.method,
            "brier_cv": self.brier,
            "roc_auc_cv": self.roc_auc,
            "ece_cv": self.ece,
            "rows": self.rows,
            "training_rows": self.training_rows,
            "reason": self.reason,
        }


def _not_calibrated(reason: str, training_rows: int) -> Calibration:
    return Calibration("none", {}, {}, {}, 0, training_rows, reason)


def choose_calibration(
    pipeline: Pipeline,
    X: pd.DataFrame,
    y: pd.Series,
    folds: list[tuple[Any, Any]],
    predictions: Sequence[tuple[np.ndarray, np.ndarray]] | None = None,
) -> Calibration:
    """Compare no calibration, sigmoid and isotonic on the out-of-fold rows of `pipeline` (unfitted); see the module.

    `predictions`: each fold's `fold_predictions` of the same configuration on the same folds, when the search
    kept them (its trial fitted exactly these models); else the folds are fitted here. Never raises for data it
    cannot calibrate on: the result is `none` with the reason.
    """
    try:
        oof = assemble(folds, predictions, y) if predictions is not None else out_of_fold(pipeline, X, y, folds)
    except ValueError as exc:
        return _not_calibrated(f"shipped uncalibrated: {exc}", len(X))
    if len(np.unique(oof.fold)) < 2:
        return _not_calibrated("shipped uncalibrated: cross-fitting needs at least two validation folds", len(X))
    scored = {"none": oof.proba}
    for method in METHODS:
        try:
            scored[method] = cross_fitted(oof, method)
        except ValueError as exc:  # e.g. a class without a row in the other folds
            log.warning("calibration %s could not be cross-fitted: %s", method, exc)
    brier = {m: brier_score(oof.y, p, oof.classes) for m, p in scored.items()}
    auc = {m: _fold_auc(oof, p) for m, p in scored.items()}
    ece = {m: expected_calibration_error(oof.y, p, oof.classes) for m, p in scored.items()}
    chosen, reasons = "none", []
    for method in METHODS:
        if method not in brier:
            continue
        gain = (brier[chosen] - brier[method]) / brier[chosen] if brier[chosen] > 0 else 0.0
        if gain <= MIN_RELATIVE_GAIN:
            reasons.append(
                f"{method} lowers the Brier score of {chosen} by {gain:.2%}, not more than {MIN_RELATIVE_GAIN:.0%}"
            )
        elif auc["none"] - auc[method] > MAX_AUC_DROP:
            reasons.append(
                f"{method} lowers the Brier score by {gain:.2%} but its ROC AUC {auc[method]:.4f} is more than "
                f"{MAX_AUC_DROP} below the uncalibrated {auc['none']:.4f}"
            )
        else:
            reasons.append(
                f"{method} lowers the Brier score of {chosen} by {gain:.2%} (more than {MIN_RELATIVE_GAIN:.0%})"
            )
            chosen = method
    calibrators = [] if chosen == "none" else fit_calibrators(oof.responses, oof.y, oof.classes, chosen)
    verdict = "shipped uncalibrated" if chosen == "none" else f"shipped with {chosen} calibration"
    result = Calibration(
        chosen, brier, auc, ece, len(oof.rows), len(X), f"{verdict}: {'; '.join(reasons)}", calibrators, len(folds)
    )
    log.info("calibration: %s", result.summary())
    return result


def calibrate(model: Pipeline, calibration: Calibration) -> Pipeline:
    """The shipped pipeline: `model` (the chosen configuration fitted on all rows), calibrated when chosen."""
    if calibration.method == "none":
        return model
    return calibrated_pipeline(model, calibration.method, calibration.calibrators, calibration.n_folds)
