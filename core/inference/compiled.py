"""Compiled inference: the fitted pipeline as one ONNX graph, its exact array form, and the parity gate.

A trained pipeline (`core.modeling.search.make_pipeline`: a `ColumnTransformer` of small step pipelines, then the
model) is read into a *plan* (`core/inference/compiled_plan.py`): per column block, the fitted numbers of each step
(imputation statistics, clipping bounds, scaler means and scales, one-hot code tables, target encoders' code
tables into their float64 encodings, whose last row, the target's mean, answers unseen values). The plan is
then emitted twice:

- as an ONNX graph (`compile_onnx`, `core/inference/compiled_onnx.py`): numeric preprocessing in float64 exactly as
  scikit-learn computes it (the same IEEE operations in the same order), text columns through a code
  table, and the model behind it: histogram gradient boosting by our own converter (`_hist_onnx`: one
  float64 `TreeEnsemble`, `ai.onnx.ml` 5, then its link in float64; skl2onnx's float32 thresholds send
  values at a split threshold the wrong way), other models by skl2onnx (decision trees and forests on
  float32 input, as scikit-learn's own are; linear models in float64). Text cannot be null in ONNX, so a
  null is fed as `NULL_TEXT`. Markers start with `MARK` (the NUL character), which no real value may
  collide with: a training category starting with it is refused (`ConversionError`), and a value sent
  that starts with it is fed as `UNSEEN_TEXT`, an unseen category, as the pipeline scores it;
- as plain numpy (`ArrayForm`, `core/inference/compiled_arrays.py`): the same steps on arrays, then the fitted
  model, bypassing the `ColumnTransformer`'s per-call overhead. It is meant to be bit-identical to
  `predict_proba`.

Neither form is trusted on faith: `check_parity` (`core/inference/compiled_parity.py`) compares a form with the
pipeline's own scores on the holdout plus generated edge cases (`edge_cases`: a null in every column,
unseen and infrequent categories, values at and beyond the clip bounds, extreme magnitudes). A step
without a converter raises `ConversionError` (the check then fails with that reason, and serving falls
back). Histogram gradient boosting with native categorical features is refused: skl2onnx converts it
without an error but wrongly (#1051), the kind of mistake only the parity check would catch, which is why
it is never skipped.

This module is the entry point: `compile_and_check` runs the whole check as the training flow does, and
the names serving, tasks and tests use are importable from here.

Pure: no I/O (bytes in, bytes out); onnxruntime sessions are created from bytes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from core.inference.compiled_arrays import ArrayForm
from core.inference.compiled_onnx import OnnxForm, compile_onnx
from core.inference.compiled_parity import TOLERANCE, Parity, check_parity, compare, edge_cases
from core.inference.compiled_plan import NAN_TEXT, NULL_TEXT, UNSEEN_TEXT, ConversionError
from core.modeling.artifacts import ONNX_DIGEST_TAG, sha256_hex
from core.modeling.metrics import model_scores

__all__ = [
    "FORMS",
    "NAN_TEXT",
    "NULL_TEXT",
    "ONNX_ARTIFACT",
    "PARITY_ARTIFACT",
    "TOLERANCE",
    "UNSEEN_TEXT",
    "ArrayForm",
    "CompiledCheck",
    "ConversionError",
    "OnnxForm",
    "Parity",
    "check_parity",
    "compare",
    "compile_and_check",
    "compile_onnx",
    "edge_cases",
]

log = logging.getLogger(__name__)

ONNX_ARTIFACT = "compiled/model.onnx"  # in the training run, next to the model (tasks.compile)
PARITY_ARTIFACT = "compiled/parity.json"
FORMS = ("onnx", "exact-arrays", "pipeline")


@dataclass(frozen=True)
class CompiledCheck:
    """What compiling one candidate gave: the ONNX model (if any), both parity results and the form to serve."""

    form: str  # onnx | exact-arrays | pipeline: what serving should use
    onnx: Parity
    arrays: Parity
    model: bytes | None = field(default=None, repr=False)
    seconds: float = 0.0
    edge_cases: int = 0  # generated rows checked besides the holdout (0: they could not be built)

    def line(self) -> str:
        """The review's and the model card's line."""
        fallback = "exact-arrays, bit-identical" if self.form == "exact-arrays" else "the plain pipeline"
        if self.onnx.passed:
            return f"compiled form (ONNX): {self.onnx.summary()}; served compiled"
        return f"compiled form (ONNX) failed: {self.onnx.reason}; serving uses the exact pipeline ({fallback})"

    def tags(self) -> dict[str, str]:
        """Model version tags: serving picks its form from them without downloading anything."""
        tags = {
            "inference_form": self.form,
            "compiled_parity": "passed" if self.onnx.passed else "failed",
            "exact_arrays_parity": "passed" if self.arrays.passed else "failed",
        }
        if self.onnx.max_abs_delta is not None:
            tags["compiled_max_abs_delta"] = f"{self.onnx.max_abs_delta:.3g}"
        if not self.onnx.passed:  # why serving falls back (e.g. a step without a converter)
            tags["compiled_failure"] = self.onnx.reason[:250]
        if self.model is not None:  # serving checks the downloaded ONNX file against it before using it
            tags[ONNX_DIGEST_TAG] = sha256_hex(self.model)
        return tags

    def to_dict(self) -> dict[str, Any]:
        """`compiled/parity.json`."""
        return {
            "form": self.form,
            "onnx": self.onnx.to_dict(),
            "exact_arrays": self.arrays.to_dict(),
            "seconds": self.seconds,
            "edge_cases": self.edge_cases,
            "null_text": NULL_TEXT,
            "nan_text": NAN_TEXT,
        }


def compile_and_check(pipeline: Any, holdout: pd.DataFrame, text_columns: set[str], seed: int = 0) -> CompiledCheck:
    """Compile `pipeline` and check both fast forms on `holdout` (prepared inputs) plus `edge_cases`.

    Never raises for a pipeline it cannot compile: the check fails with the reason, and the form to serve
    falls back to the exact array form (when it is bit-identical) or the plain pipeline. Edge cases are built
    for every table shape; should building them fail all the same (a bug), a warning says so with its
    traceback, and both forms are checked on the holdout alone (`CompiledCheck.edge_cases` 0).
    """
    import time

    started = time.perf_counter()
    classification = getattr(pipeline, "classes_", None) is not None
    try:
        cases = edge_cases(pipeline, holdout, text_columns, seed)
    except Exception as exc:  # unexpected (every table shape has its cases): still checked, on the holdout alone
        log.warning("edge cases could not be built (%s): checking on the holdout only", exc, exc_info=True)
        cases = holdout.iloc[:0]
    frame = pd.concat([holdout, cases], ignore_index=True) if len(cases) else holdout
    try:
        reference = model_scores(pipeline, frame)  # once, for both forms
    except Exception:  # each form's check below meets the same error and says so
        reference = None
    model = None
    try:
        model = compile_onnx(pipeline, text_columns)
        onnx_form = OnnxForm(model, text_columns, classification)
        onnx_parity = check_parity(pipeline, onnx_form, frame, reference=reference)
    except Exception as exc:  # ConversionError, or anything skl2onnx/onnxruntime raise
        onnx_parity = Parity(False, len(frame), reason=f"{type(exc).__name__}: {exc}"[:500])
    try:
        arrays = ArrayForm(pipeline, text_columns)
        arrays_parity = check_parity(pipeline, arrays, frame, tolerance=0.0, reference=reference)
    except Exception as exc:
        arrays_parity = Parity(False, len(frame), tolerance=0.0, reason=f"{type(exc).__name__}: {exc}"[:500])
    form = "onnx" if onnx_parity.passed else "exact-arrays" if arrays_parity.passed else "pipeline"
    return CompiledCheck(form, onnx_parity, arrays_parity, model, time.perf_counter() - started, len(cases))
