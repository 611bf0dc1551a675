"""The exact array form of a compiled pipeline: its fitted steps on plain numpy arrays, then the fitted model.

It bypasses the `ColumnTransformer`'s per-call overhead and is meant to be bit-identical to the pipeline's
`predict_proba` (`core/inference/compiled.py` checks it with a tolerance of 0).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from core.inference.compiled_plan import MARK, NumericBlock, TargetBlock, TextBlock, plan_of, text_key


def _numeric_array(block: NumericBlock, X: np.ndarray) -> np.ndarray:
    for step in block.steps:
        if step.kind == "impute":
            missing = np.isnan(X)
            X = np.where(missing, step.a, X)
            if step.indicator is not None:
                X = np.hstack((X, missing[:, step.indicator].astype(X.dtype)))
        elif step.kind == "clip":
            X = np.clip(X, step.a, step.b)
        else:  # scale, in scikit-learn's order: subtract, then divide
            X = (X - step.a) / step.b
    return X


def _codes(values: np.ndarray, table: dict, unknown: int) -> np.ndarray:
    """Each value's code in `table` (text as it is, anything else by `text_key`), `unknown` when absent."""
    keys = (v if type(v) is str and v[:1] != MARK else text_key(v, None) for v in values)
    return np.fromiter((table.get(k, unknown) for k in keys), dtype="int64", count=len(values))


def _text_array(block: TextBlock, frame: pd.DataFrame) -> np.ndarray:
    parts = []
    for column, table, unknown, width in zip(block.columns, block.codes, block.unknown, block.widths, strict=True):
        index = _codes(frame[column].to_numpy(), table, unknown)
        parts.append((index[:, None] == np.arange(width)[None, :]).astype("float64"))
    return np.hstack(parts) if parts else np.empty((len(frame), 0))


def _target_array(block: TargetBlock, frame: pd.DataFrame) -> np.ndarray:
    parts = []
    for column, table, unknown, encodings in zip(block.columns, block.codes, block.unknown, block.tables, strict=True):
        parts.append(encodings[_codes(frame[column].to_numpy(), table, unknown)])
    return np.hstack(parts) if parts else np.empty((len(frame), 0))


class ArrayForm:
    """The pipeline's fitted steps applied to plain arrays, then the fitted model (`scores` like the pipeline's)."""

    form = "exact-arrays"
    takes_columns = False  # `scores` needs a frame

    def __init__(self, pipeline: Any, text_columns: set[str]) -> None:
        self.plan = plan_of(pipeline, text_columns)
        self.classification = getattr(pipeline, "classes_", None) is not None

    def features(self, frame: pd.DataFrame) -> np.ndarray:
        """The model's input matrix (float64), as the `ColumnTransformer` would give it."""
        parts = []
        for block in self.plan.blocks:
            if isinstance(block, NumericBlock):
                X = frame[block.columns].to_numpy(dtype="float64", copy=True)
                parts.append(_numeric_array(block, X))
            elif isinstance(block, TargetBlock):
                parts.append(_target_array(block, frame))
            else:
                parts.append(_text_array(block, frame))
        return np.hstack(parts)

    def scores(self, frame: pd.DataFrame) -> np.ndarray:
        """Probabilities (n, classes) of a classifier, predicted values (n,) of a regressor."""
        X = self.features(frame)
        if self.classification:
            return self.plan.model.predict_proba(X)
        return np.asarray(self.plan.model.predict(X), dtype="float64")
