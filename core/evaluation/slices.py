"""Slices: metrics on sub-populations of the holdout, and the gate that stops a candidate worse on one.

A candidate can be better overall and still worse for one region or one age band; the slice gate compares
each slice measured for both models on the same holdout rows, on the primary metric, in that metric's
better direction (a higher RMSE or log loss is a drop).

Per task (the scores' contract of `tasks.evaluation`):
- binary: a slice needs `min_rows` rows and both classes (ROC AUC is undefined with one);
- multiclass: a slice needs `min_rows` rows and every class of the model; a slice lacking a class is not
  measured and says which class is missing (macro one-vs-rest ROC AUC and macro PR AUC are undefined for
  an absent class, and a macro average over the present classes only would not be the metric the
  decision is made on);
- regression (`classes` empty): a slice needs only `min_rows` rows; RMSE, MAE and R² (R² relative to the
  slice's own variance, 0 for a slice whose target is constant).
A slice that is not measured is never compared by the gate; `unmeasured_slices` lists it with why.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import numpy as np
import pandas as pd

from core.data.dataset import SliceSpec
from core.modeling.metrics import compute_metrics, improvement

MISSING = "missing"


def _number(value: float) -> str:
    """`18` rather than `18.0`, `2.5` as it is."""
    return f"{value:g}"


def bin_labels(bins: Sequence[float]) -> list[str]:
    """Labels of the bands between cut points, in order: `[a, b)` and, for the last one, `[y, z]`."""
    edges = [_number(b) for b in bins]
    labels = [f"[{low}, {high})" for low, high in pairwise(edges)]
    return [*labels[:-1], f"[{edges[-2]}, {edges[-1]}]"]


def slice_labels(frame: pd.DataFrame, spec: SliceSpec) -> pd.Series:
    """The slice each row belongs to, as text: its band for a binned column, its value otherwise.

    Bands are `[a, b)` (the last one `[y, z]` so the largest cut point is included); values outside the
    bins are labelled `< a` or `> z`; nulls are labelled `missing`.

    Args:
        frame: Rows holding `spec.column`.
        spec: The column and, for a numeric column, its cut points.

    Returns:
        A string Series with the frame's index, named after the column.
    """
    if spec.column not in frame.columns:
        raise KeyError(f"slice column {spec.column!r} is not in the frame")
    values = frame[spec.column]
    if spec.bins is None:
        labels = values.astype("object").where(values.notna(), MISSING).map(str)
        return labels.rename(spec.column)
    numbers = pd.to_numeric(values, errors="raise").astype("float64").to_numpy()
    bins = np.asarray(spec.bins, dtype="float64")
    names = np.asarray([f"< {_number(bins[0])}", *bin_labels(spec.bins), f"> {_number(bins[-1])}"], dtype=object)
    # Position 0 is below the bins, 1..k-1 the bands, k above; the last cut point belongs to the last band.
    position = np.searchsorted(bins, numbers, side="right")
    position[numbers == bins[-1]] = len(bins) - 1
    labels = names[position]
    labels[np.isnan(numbers)] = MISSING
    return pd.Series(labels, index=frame.index, name=spec.column, dtype="object")


def slice_order(spec: SliceSpec, labels: pd.Series) -> list[str]:
    """Slice values present in `labels`, in reading order: bands by value, categories sorted, `missing` last."""
    present = set(labels.unique())
    if spec.bins is not None:
        bins = spec.bins
        ordered = [f"< {_number(bins[0])}", *bin_labels(bins), f"> {_number(bins[-1])}"]
        return [label for label in [*ordered, MISSING] if label in present]
    return sorted(present - {MISSING}) + ([MISSING] if MISSING in present else [])


@dataclass(frozen=True)
class SliceMetric:
    """Metrics of one model on one slice of the holdout.

    Attributes:
        column: Column the slice is defined on.
        value: The slice's value or band label, e.g. `north` or `[18, 30)`.
        n_rows: Holdout rows in the slice.
        metrics: Metrics as `compute_metrics` gives them, or None when the slice is not measured.
        note: Why the slice is not measured (too few rows, a single class), or None.
    """

    column: str
    value: str
    n_rows: int
    metrics: dict[str, float] | None
    note: str | None = None

    @property
    def name(self) -> str:
        """`column=value`, as failures and tables name the slice."""
        return f"{self.column}={self.value}"


def slice_metrics(
    frame: pd.DataFrame,
    y_true: Sequence[Any],
    proba: np.ndarray,
    classes: Sequence[Any],
    specs: Sequence[SliceSpec],
    min_rows: int,
) -> list[SliceMetric]:
    """Metrics of one model on every slice of every spec.

    Args:
        frame: The holdout rows (raw columns, including the slice columns), in the order of `y_true`.
        y_true: True labels (or values, for a regressor) of those rows.
        proba: The model's scores on those rows: probabilities, one column per class; predicted values
            (n,) for a regressor.
        classes: Class labels in column order (`tasks.evaluation.model_classes`); empty for a regressor.
        specs: The slices to measure (`DatasetConfig.slices`).
        min_rows: A slice with fewer rows is not measured (`DatasetConfig.min_slice_rows`).

    Returns:
        One entry per (spec, value) in reading order; `metrics` is None for a slice that is too small or,
        for a classifier, holds fewer classes than the model has (ROC AUC is undefined there).
    """
    y = np.asarray(y_true)
    proba = np.asarray(proba)
    if not len(frame) == len(y) == len(proba):
        raise ValueError(f"frame, labels and scores differ in length: {len(frame)}, {len(y)}, {len(proba)}")
    classes = list(classes)
    results = []
    for spec in specs:
        labels = slice_labels(frame, spec)
        values = labels.to_numpy()
        for value in slice_order(spec, labels):
            mask = values == value
            n_rows = int(mask.sum())
            if n_rows < min_rows:
                results.append(SliceMetric(spec.column, value, n_rows, None, f"too few rows: {n_rows} < {min_rows}"))
                continue
            missing = _missing_classes(y[mask], classes)
            if missing:
                results.append(SliceMetric(spec.column, value, n_rows, None, _missing_note(missing, classes)))
            else:
                results.append(SliceMetric(spec.column, value, n_rows, compute_metrics(y[mask], proba[mask], classes)))
    return results


def _missing_classes(y: np.ndarray, classes: list[Any]) -> list[Any]:
    """The model's classes with no row in `y` (none for a regressor: it has no classes)."""
    present = set(y.tolist())
    return [c for c in classes if c not in present]


def _missing_note(missing: list[Any], classes: list[Any]) -> str:
    """Why a classification slice lacking a class is not measured."""
    present = len(classes) - len(missing)
    note = f"only {present} of {len(classes)} classes present"
    if len(classes) > 2:
        listed = ", ".join(str(c) for c in missing)
        note += f" (no row of class {listed}: macro one-vs-rest metrics are undefined)"
    return note


def slice_drop(metric: str, candidate: float, champion: float) -> float:
    """How much worse the candidate is than the champion (positive: worse), in the metric's better direction."""
    return -improvement(metric, candidate, champion)


def _measured_pairs(
    candidate: Sequence[SliceMetric], champion: Sequence[SliceMetric]
) -> list[tuple[SliceMetric, SliceMetric]]:
    """Slices measured for both models, matched by (column, value), in the candidate's order."""
    champions = {(s.column, s.value): s for s in champion}
    pairs = []
    for cand in candidate:
        champ = champions.get((cand.column, cand.value))
        if cand.metrics is not None and champ is not None and champ.metrics is not None:
            pairs.append((cand, champ))
    return pairs


def slice_gate(
    candidate: Sequence[SliceMetric], champion: Sequence[SliceMetric], metric: str, max_drop: float
) -> list[str]:
    """Failures: slices where the candidate is worse than the champion by more than `max_drop`.

    Only slices measured for both models are compared; `unmeasured_slices` lists the others. The drop is
    taken in the metric's better direction (a higher log loss, RMSE or MAE is a drop) and in the metric's
    units (for RMSE and MAE: the target's units).

    Args:
        candidate: The candidate's slice metrics on the holdout.
        champion: The champion's slice metrics on the same rows.
        metric: Metric compared, one of `tasks.evaluation.METRICS` (the resolved primary metric).
        max_drop: Largest tolerated drop (0 means the candidate must be at least as good on every slice).

    Returns:
        One line per failing slice naming it, both values, the drop and the rows, e.g.
        "slice region=north: roc_auc 0.7100 vs champion 0.7600 (drop 0.0500 > 0.0200, 812 rows)".
    """
    failures = []
    for cand, champ in _measured_pairs(candidate, champion):
        cand_metrics, champ_metrics = cand.metrics or {}, champ.metrics or {}
        if metric not in cand_metrics or metric not in champ_metrics:
            raise KeyError(f"metric {metric!r} was not measured on slice {cand.name}")
        cand_value, champ_value = cand_metrics[metric], champ_metrics[metric]
        drop = slice_drop(metric, cand_value, champ_value)
        if drop > max_drop and not math.isclose(drop, max_drop):
            failures.append(
                f"slice {cand.name}: {metric} {cand_value:.4f} vs champion {champ_value:.4f} "
                f"(drop {drop:.4f} > {max_drop:.4f}, {cand.n_rows} rows)"
            )
    return failures


def unmeasured_slices(candidate: Sequence[SliceMetric], champion: Sequence[SliceMetric] | None = None) -> list[str]:
    """Slices the gate could not compare, and why, e.g. "slice age=> 100: not measured (too few rows: 3 < 200)"."""
    champions = {(s.column, s.value): s for s in champion or []}
    lines = []
    for cand in candidate:
        champ = champions.get((cand.column, cand.value))
        if cand.metrics is None:
            lines.append(f"slice {cand.name}: not measured ({cand.note})")
        elif champion is not None and (champ is None or champ.metrics is None):
            reason = "no champion rows" if champ is None else champ.note
            lines.append(f"slice {cand.name}: not measured for the champion ({reason})")
    return lines
