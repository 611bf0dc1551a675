"""The compiled form of a calibrated classifier: the classifier's scores, then its calibrators, in float64.

The search ships a calibrated classifier as scikit-learn's `CalibratedClassifierCV` in its `ensemble=False`
form (`core/modeling/calibration.py`): one fitted classifier and one calibrator per class (one for binary).
skl2onnx converts that wrapper, but runs the classifier inside on the wrapper's input type: float64 trees
that do not load, and skl2onnx's float32 gradient-boosting thresholds, which `_hist_onnx` exists to avoid.
So the wrapper is compiled here from its parts, as `CalibratedClassifierCV.predict_proba` computes:

1. the classifier's response: histogram gradient boosting's raw score (`_hist_onnx` without its link), a
   linear model's `decision_function` (`X @ coef_.T + intercept_`, float64), or else the probabilities
   skl2onnx computes (the positive class's for binary), cast to float64;
2. each calibrator on its column: sigmoid `1 / (1 + exp(a f + b))`; isotonic: `f` clipped to the fitted
   range, then linear interpolation between the fitted thresholds, as scipy's `interp1d` computes it (the
   segment found by counting the thresholds below `f`, in blocks: `_count_below`);
3. binary: `[1 - p, p]`; multiclass: each row divided by its sum (uniform when the sum is 0).

The parity check (`core/inference/compiled_parity.py`) still decides whether the compiled form is served.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from core.inference.compiled_plan import ConversionError


def is_calibrated(model: Any) -> bool:
    """Whether the model is a fitted `CalibratedClassifierCV`."""
    from sklearn.calibration import CalibratedClassifierCV

    return isinstance(model, CalibratedClassifierCV)


def _sigmoid(g: Any, column: str, calibrator: Any) -> str:
    linear = g.op("Mul", [column, g.const(np.array([[calibrator.a_]], dtype="float64"), "sig_a")], "sig_af")
    linear = g.op("Add", [linear, g.const(np.array([[calibrator.b_]], dtype="float64"), "sig_b")], "sig_afb")
    return g.op("Sigmoid", [g.op("Neg", [linear], "sig_neg")], "sig_p")


def _count_below(g: Any, xs: np.ndarray, x: str) -> str:
    """`searchsorted(xs, x)` (left: how many of the sorted `xs` are below x), as (n, 1) int64.

    In two steps of about sqrt(len(xs)) comparisons per row, not len(xs): the block of `xs` that x falls in
    (how many blocks start below x), then how many of that block's values are below x. The blocks before it
    are all below x (their successor's first value is), the ones after all at or above it.
    """
    size = int(np.ceil(np.sqrt(len(xs))))
    blocks = np.full((int(np.ceil(len(xs) / size)), size), np.inf)
    blocks.flat[: len(xs)] = xs
    one = g.const(np.array(1, dtype="int64"), "cnt_one")
    started = g.op("Less", [g.const(blocks[:, 0][None, :], "cnt_starts"), x], "cnt_started")
    started = g.op("Cast", [started], "cnt_started_n", to=7)  # int64
    axis = g.const(np.array([1], dtype="int64"), "cnt_axis")
    block = g.op("Sub", [g.op("ReduceSum", [started, axis], "cnt_blocks", keepdims=1), one], "cnt_block")
    block = g.op("Max", [block, g.const(np.array(0, dtype="int64"), "cnt_zero")], "cnt_block0")  # (n, 1)
    values = g.op("Gather", [g.const(blocks, "cnt_table"), block], "cnt_values", axis=0)  # (n, 1, size)
    inside = g.op(
        "Less", [values, g.op("Unsqueeze", [x, g.const(np.array([2], dtype="int64"), "cnt_2")], "cnt_x")], "cnt_in"
    )
    inside = g.op("Cast", [inside], "cnt_in_n", to=7)
    counted = g.op("ReduceSum", [inside, g.const(np.array([2], dtype="int64"), "cnt_axis2")], "cnt_inside", keepdims=0)
    before = g.op("Mul", [block, g.const(np.array(size, dtype="int64"), "cnt_size")], "cnt_before")
    return g.op("Add", [before, counted], "cnt_count")


def _isotonic(g: Any, column: str, calibrator: Any) -> str:
    if calibrator.out_of_bounds != "clip":
        raise ConversionError(f"isotonic calibration with out_of_bounds={calibrator.out_of_bounds!r}")
    xs = np.asarray(calibrator.X_thresholds_, dtype="float64")
    ys = np.asarray(calibrator.y_thresholds_, dtype="float64")
    low = g.const(np.array(calibrator.X_min_, dtype="float64"), "iso_min")
    high = g.const(np.array(calibrator.X_max_, dtype="float64"), "iso_max")
    x = g.op("Clip", [column, low, high], "iso_x")
    if len(xs) == 1:  # one threshold: a constant
        return g.op(
            "Add",
            [g.op("Mul", [x, g.const(np.zeros((1, 1)), "iso_zero")], "iso_0"), g.const(ys[None, :1], "iso_y")],
            "iso_p",
        )
    count = _count_below(g, xs, x)
    hi = g.op(
        "Clip",
        [
            count,
            g.const(np.array(1, dtype="int64"), "iso_one"),
            g.const(np.array(len(xs) - 1, dtype="int64"), "iso_last"),
        ],
        "iso_hi",
    )
    lo = g.op("Sub", [hi, g.const(np.array(1, dtype="int64"), "iso_step")], "iso_lo")
    table_x, table_y = g.const(xs, "iso_xs"), g.const(ys, "iso_ys")
    x_lo, x_hi = (g.op("Gather", [table_x, i], "iso_xg", axis=0) for i in (lo, hi))
    y_lo, y_hi = (g.op("Gather", [table_y, i], "iso_yg", axis=0) for i in (lo, hi))
    slope = g.op("Div", [g.op("Sub", [y_hi, y_lo], "iso_dy"), g.op("Sub", [x_hi, x_lo], "iso_dx")], "iso_slope")
    return g.op("Add", [g.op("Mul", [slope, g.op("Sub", [x, x_lo], "iso_t")], "iso_rise"), y_lo], "iso_p")


def calibrated_scores(g: Any, responses: str, model: Any) -> str:
    """The calibrated probabilities (n, classes) of `responses` (n, 1) or (n, classes) in float64."""
    calibrated = model.calibrated_classifiers_[0]
    n_classes = len(model.classes_)
    columns = []
    for index, calibrator in enumerate(calibrated.calibrators):
        picked = g.op("Gather", [responses, g.const(np.array([index], dtype="int64"), "col")], "response", axis=1)
        method = _isotonic if calibrated.method == "isotonic" else _sigmoid
        columns.append(method(g, picked, calibrator))
    if n_classes == 2:
        negative = g.op("Sub", [g.const(np.ones((1, 1)), "one"), columns[0]], "cal_negative")
        return g.op("Concat", [negative, columns[0]], "cal_probabilities", axis=1)
    stacked = g.op("Concat", columns, "cal_stacked", axis=1)
    total = g.op("ReduceSum", [stacked, g.const(np.array([1], dtype="int64"), "axis")], "cal_total", keepdims=1)
    zero = g.op("Equal", [total, g.const(np.zeros((1, 1)), "zero")], "cal_zero")
    safe = g.op("Where", [zero, g.const(np.ones((1, 1)), "one"), total], "cal_safe_total")
    divided = g.op("Div", [stacked, safe], "cal_divided")
    uniform = g.const(np.full((1, n_classes), 1.0 / n_classes), "uniform")
    return g.op("Where", [zero, uniform, divided], "cal_probabilities")


def check_calibrated(model: Any) -> Any:
    """The classifier inside a calibrated model, after checking the wrapper is a form compiled here.

    Raises:
        ConversionError: An ensemble of classifiers, another method (temperature), or classes that differ.
    """
    if len(model.calibrated_classifiers_) != 1:
        raise ConversionError("CalibratedClassifierCV with ensemble=True (several classifiers) is not compiled")
    calibrated = model.calibrated_classifiers_[0]
    if calibrated.method not in ("sigmoid", "isotonic"):
        raise ConversionError(f"calibration method {calibrated.method!r} has no converter")
    inner = calibrated.estimator
    if list(getattr(inner, "classes_", [])) != list(model.classes_):
        raise ConversionError("the calibrated classifier's classes differ from the wrapper's")
    return inner


def linear_responses(g: Any, features: str, model: Any) -> str:
    """A linear classifier's `decision_function` in float64, as (n, 1) for binary or (n, classes)."""
    coef = np.asarray(model.coef_, dtype="float64")
    intercept = np.asarray(model.intercept_, dtype="float64").reshape(1, -1)
    product = g.op("MatMul", [features, g.const(coef.T.copy(), "coef")], "decision_dot")
    return g.op("Add", [product, g.const(intercept, "intercept")], "decision")


def probability_responses(g: Any, probabilities: str, n_classes: int) -> str:
    """skl2onnx's probabilities as float64: the positive class's (n, 1) for binary, else all of them."""
    as_double = g.op("Cast", [probabilities], "proba_double", to=11)
    if n_classes != 2:
        return as_double
    return g.op("Gather", [as_double, g.const(np.array([1], dtype="int64"), "positive")], "proba_positive", axis=1)
