"""The parity check of a compiled form: its scores against the pipeline's own, on real rows and edge cases.

Neither compiled form is trusted on faith: `check_parity` compares a form with the pipeline's scores on
the holdout plus generated edge cases (`edge_cases`: a null in every column, unseen and infrequent
categories, values at and beyond the clip bounds, extreme magnitudes); `compare` says by how much they
differ and whether that is within the tolerance.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from core.inference.compiled_plan import (
    MARK,
    NAN_TEXT,
    NULL_TEXT,
    UNSEEN_TEXT,
    ConversionError,
    Entry,
    column_steps,
    numeric_steps,
)
from core.modeling.metrics import model_scores

TOLERANCE = 1e-6  # max |delta probability|; for a regressor, max |delta| / |value|
# Known categories of a target-encoded column tried as edge cases at most (evenly spread over its sorted ones).
MAX_TARGET_CATEGORIES = 500


@dataclass(frozen=True)
class Parity:
    """How a form's scores compare with the pipeline's on the same rows."""

    passed: bool
    rows: int = 0
    max_abs_delta: float | None = None
    max_rel_delta: float | None = None
    class_mismatches: int = 0
    tolerance: float = TOLERANCE
    reason: str = ""
    extras: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """As JSON-ready values."""
        return asdict(self)

    def summary(self) -> str:
        """One line for the review and the model card."""
        if not self.passed:
            return f"failed: {self.reason}"
        detail = f"max |d| = {self.max_abs_delta:.2g}"
        if self.max_rel_delta is not None:
            detail += f", max relative {self.max_rel_delta:.2g}"
        return f"parity passed ({detail} over {self.rows} rows)"


def compare(reference: np.ndarray, candidate: np.ndarray, classification: bool, tolerance: float = TOLERANCE) -> Parity:
    """Compare scores: max |d| <= tolerance and the same argmax class (classifier), or relative for a regressor."""
    reference = np.asarray(reference, dtype="float64")
    candidate = np.asarray(candidate, dtype="float64")
    if reference.shape != candidate.shape:
        return Parity(False, len(reference), reason=f"shape {candidate.shape} differs from {reference.shape}")
    rows = len(reference)
    if not np.isfinite(candidate).all():
        bad = int(
            (~np.isfinite(candidate)).any(axis=-1).sum() if candidate.ndim > 1 else (~np.isfinite(candidate)).sum()
        )
        return Parity(False, rows, reason=f"{bad} rows with non-finite scores")
    delta = np.abs(candidate - reference)
    max_abs = float(delta.max()) if delta.size else 0.0
    if classification:
        mismatches = int((candidate.argmax(axis=1) != reference.argmax(axis=1)).sum())
        passed = max_abs <= tolerance and mismatches == 0
        reason = (
            "" if passed else f"max |d probability| {max_abs:.3g} (limit {tolerance:g}), {mismatches} class changes"
        )
        return Parity(passed, rows, max_abs, None, mismatches, tolerance, reason)
    relative = delta / np.maximum(np.abs(reference), 1e-12)
    max_rel = float(relative.max()) if relative.size else 0.0
    passed = max_rel <= tolerance
    reason = "" if passed else f"max relative |d| {max_rel:.3g} (limit {tolerance:g}), max |d| {max_abs:.3g}"
    return Parity(passed, rows, max_abs, max_rel, 0, tolerance, reason)


def edge_cases(pipeline: Any, sample: pd.DataFrame, text_columns: set[str], seed: int = 0) -> pd.DataFrame:
    """Rows that stress a compiled form, built around `sample`'s first row (same columns and dtypes).

    A null in each column, all nulls, every known category (frequent and infrequent; text, or true/false for a
    boolean column), unseen and empty text, the compiled forms' own marker strings sent as text (they must
    score as unseen, not as nulls), numbers at, just beyond and far beyond each clip bound, extreme magnitudes
    and signed zeros, plus random mixes of all of these.

    Built for every table shape: numeric columns only, text columns only, one column, dates. Only the entries
    of the pipeline's `ColumnTransformer` that were given columns are read (`column_steps`); a pipeline of
    another form gets the generic cases, without known categories or clip bounds.
    """
    numeric = [c for c in sample.columns if c not in text_columns]
    text = [c for c in sample.columns if c in text_columns]
    if len(sample):
        base = sample.iloc[[0]].reset_index(drop=True)
    else:  # no row to start from: the all-null row
        base = pd.DataFrame({c: [None if c in text_columns else np.nan] for c in sample.columns})
    base = base.astype({**dict.fromkeys(numeric, "float64"), **dict.fromkeys(text, "object")})
    entries = _entries(pipeline)
    values: dict[str, list[Any]] = {}
    bounds = _clip_bounds(entries, text_columns)
    for c in numeric:
        v: list[Any] = [np.nan, 0.0, -0.0, 5e-324, -1e-300, 1.0, -1.0, 1e15, -1e15, 1e300, -1e300]
        for bound in bounds.get(c, []):
            v += [bound, np.nextafter(bound, np.inf), np.nextafter(bound, -np.inf), bound * 10, bound - 1e6]
        finite = pd.to_numeric(sample[c], errors="coerce").dropna()
        if len(finite):
            v += [float(finite.min()), float(finite.max()), float(finite.median())]
        values[c] = v
    categories = _categories(entries)
    for c in text:
        markers = [NULL_TEXT, NAN_TEXT, UNSEEN_TEXT, MARK]
        values[c] = [None, "", *markers, "__missing__", "UNSEEN category", *categories.get(c, [])]
    rows = []
    for c, options in values.items():
        for value in options:
            row = base.copy()
            row.loc[0, c] = value
            rows.append(row)
    rows.append(pd.DataFrame({c: [None if c in text_columns else np.nan] for c in sample.columns}))
    rng = np.random.default_rng(seed)
    mixes = pd.DataFrame({c: [values[c][i] for i in rng.integers(0, len(values[c]), 200)] for c in sample.columns})
    out = pd.concat([*rows, mixes], ignore_index=True)
    for c in numeric:
        out[c] = out[c].astype("float64")
    for c in text:
        out[c] = out[c].astype("object").where(out[c].notna(), None)
    return out[list(sample.columns)]


def _entries(pipeline: Any) -> list[Entry]:
    """The pipeline's fitted column entries (`column_steps`); none for a pipeline of another form."""
    try:
        return column_steps(pipeline)
    except ConversionError:
        return []


def _clip_bounds(entries: list[Entry], text_columns: set[str]) -> dict[str, list[float]]:
    """Per numeric column, the lower and upper bounds of its clipping steps (entries without a converter: none)."""
    bounds: dict[str, list[float]] = {}
    for _, columns, steps in entries:
        if any(c in text_columns for c in columns):
            continue
        try:
            planned = numeric_steps(steps, len(columns))
        except ConversionError:  # e.g. a step without a converter: the other entries' bounds are still used
            continue
        for step in planned:
            if step.kind == "clip":
                for j, c in enumerate(columns):
                    bounds.setdefault(c, []).extend([float(step.a[j]), float(step.b[j])])
    return bounds


def _categories(entries: list[Entry]) -> dict[str, list[Any]]:
    """Known categories per column, nulls aside: a one-hot encoder's, up to `MAX_TARGET_CATEGORIES` of a target's.

    A target encoder may know thousands (its table is one lookup whatever the category): those taken are evenly
    spread over its sorted ones. Categories that are not text (true and false in a boolean column) are kept: the
    pipeline scores them, though no compiled form does.
    """
    from sklearn.preprocessing import OneHotEncoder, TargetEncoder

    found: dict[str, list[Any]] = {}
    for _, columns, steps in entries:
        for _, step in steps:
            if isinstance(step, OneHotEncoder | TargetEncoder):
                for c, cats in zip(columns, step.categories_, strict=True):
                    known = [v for v in cats if v is not None and not (isinstance(v, float) and np.isnan(v))]
                    if isinstance(step, TargetEncoder) and len(known) > MAX_TARGET_CATEGORIES:
                        picked = np.linspace(0, len(known) - 1, MAX_TARGET_CATEGORIES).round().astype(int)
                        known = [known[i] for i in np.unique(picked)]
                    found[c] = known
    return found


def check_parity(
    pipeline: Any, form: Any, frame: pd.DataFrame, tolerance: float = TOLERANCE, reference: np.ndarray | None = None
) -> Parity:
    """Score `frame` with `form` and compare with the pipeline's scores as `compare` does.

    `reference`: the pipeline's scores on `frame` (`core.modeling.metrics.model_scores`) when the caller has them.
    """
    classification = getattr(pipeline, "classes_", None) is not None
    reference = model_scores(pipeline, frame) if reference is None else reference
    try:
        candidate = form.scores(frame)
    except Exception as exc:
        return Parity(False, len(frame), reason=f"scoring failed: {type(exc).__name__}: {exc}")
    return compare(reference, candidate, classification, tolerance)
