"""Compiled inference: the fitted pipeline as one ONNX graph, its exact array form, and the parity gate.

A trained pipeline (`core.search.make_pipeline`: a `ColumnTransformer` of small step pipelines, then the
model) is read into a *plan*: per column block, the fitted numbers of each step (imputation statistics,
clipping bounds, scaler means and scales, one-hot code tables). The plan is then emitted twice:

- as an ONNX graph (`compile_onnx`): numeric preprocessing in float64 exactly as scikit-learn computes it
  (the same IEEE operations in the same order), text columns through a code table, and the model
  behind it: histogram gradient boosting by our own converter (`_hist_onnx`: one float64 `TreeEnsemble`,
  `ai.onnx.ml` 5, then its link in float64; skl2onnx's float32 thresholds send values at a split
  threshold the wrong way), other models by skl2onnx (decision trees and forests on float32 input, as
  scikit-learn's own are; linear models in float64). Text cannot be null in ONNX, so a null is fed as
  `NULL_TEXT`. Markers start with `MARK` (the NUL character), which no real value may collide with: a training
  category starting with it is refused (`ConversionError`), and a value sent that starts with it is fed
  as `UNSEEN_TEXT`, an unseen category, as the pipeline scores it;
- as plain numpy (`ArrayForm`): the same steps on arrays, then the fitted model, bypassing the
  `ColumnTransformer`'s per-call overhead. It is meant to be bit-identical to `predict_proba`.

Neither form is trusted on faith: `check_parity` compares a form with the pipeline's own scores on the
holdout plus generated edge cases (`edge_cases`: a null in every column, unseen and infrequent
categories, values at and beyond the clip bounds, extreme magnitudes). A step without a converter raises
`ConversionError` (the check then fails with that reason, and serving falls back). Histogram gradient
boosting with native categorical features is refused: skl2onnx converts it without an error but wrongly
(#1051), the kind of mistake only the parity check would catch, which is why it is never skipped.

Pure: no I/O (bytes in, bytes out); onnxruntime sessions are created from bytes.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

# A null text value as the compiled graph receives it (ONNX strings cannot be null); a float NaN in a
# text column (which `SimpleImputer(missing_values=np.nan)` imputes, unlike None) is fed as `NAN_TEXT`.
# Every marker starts with MARK: a real string starting with it is fed as `UNSEEN_TEXT` (`text_key`), and
# a category starting with it is refused, so a value sent can never be read as a null.
MARK = "\x00"
NULL_TEXT = MARK + "null"
NAN_TEXT = MARK + "nan"
UNSEEN_TEXT = MARK + "unseen"  # in no code table: the code of a category not seen in training
TOLERANCE = 1e-6  # max |delta probability|; for a regressor, max |delta| / |value|
ONNX_ARTIFACT = "compiled/model.onnx"  # in the training run, next to the model (tasks.compile)
PARITY_ARTIFACT = "compiled/parity.json"
ONNX_OPSET = {"": 18, "ai.onnx.ml": 3}  # what skl2onnx converts to
TREE_OPSET = {"": 21, "ai.onnx.ml": 5}  # TreeEnsemble (float64 thresholds, leaves and output): `_hist_onnx`
TREE_MODELS = (
    "DecisionTreeClassifier",
    "DecisionTreeRegressor",
    "RandomForestClassifier",
    "RandomForestRegressor",
    "ExtraTreesClassifier",
    "ExtraTreesRegressor",
    "HistGradientBoostingClassifier",
    "HistGradientBoostingRegressor",
    "GradientBoostingClassifier",
    "GradientBoostingRegressor",
)


class ConversionError(ValueError):
    """The pipeline has a step (or a setting) that cannot be compiled exactly."""


# --- the plan: what each fitted step computes -------------------------------------------------------


@dataclass(frozen=True)
class NumericStep:
    """One elementwise numeric step on a block's columns (in order)."""

    kind: str  # impute | clip | scale
    a: np.ndarray | None = None  # impute: statistics; clip: lower; scale: mean
    b: np.ndarray | None = None  # clip: upper; scale: scale
    indicator: np.ndarray | None = None  # impute: columns whose missing indicator is appended


@dataclass(frozen=True)
class NumericBlock:
    """Numeric columns and the steps applied to them, in order."""

    columns: list[str]
    steps: list[NumericStep]


@dataclass(frozen=True)
class TextBlock:
    """Text columns one-hot encoded: per column, value -> output column within its block (-1: all zeros)."""

    columns: list[str]
    codes: list[dict[Any, int]]  # keys: category values, None, and NAN_TEXT (a float NaN)
    unknown: list[int]  # the code of a value not in `codes`
    widths: list[int]


@dataclass(frozen=True)
class Plan:
    """The fitted preprocessing as blocks (in the `ColumnTransformer`'s output order) and the model."""

    blocks: list[NumericBlock | TextBlock]
    model: Any
    inputs: list[str]


def _imputer_step(name: str, step: Any, width: int) -> NumericStep:
    if not (isinstance(step.missing_values, float) and np.isnan(step.missing_values)):
        raise ConversionError(f"step {name!r}: only missing_values=np.nan is supported")
    stats = np.asarray(step.statistics_, dtype="float64")
    if len(stats) != width or np.isnan(stats).any():
        raise ConversionError(f"step {name!r}: a column without statistics would be dropped")
    indicator = None
    if step.add_indicator:
        indicator = np.asarray(step.indicator_.features_, dtype="int64")
        if step.indicator_.features != "missing-only" or step.indicator_.sparse not in ("auto", False):
            raise ConversionError(f"step {name!r}: only a dense missing-only indicator is supported")
    return NumericStep("impute", stats, indicator=indicator)


def _clip_function_step(name: str, step: Any, width: int) -> NumericStep:
    """`FunctionTransformer(np.clip, kw_args={"a_min": .., "a_max": ..})` (or `min`/`max`)."""
    kw = dict(step.kw_args or {})
    lower = kw.pop("a_min", kw.pop("min", None))
    upper = kw.pop("a_max", kw.pop("max", None))
    if kw or lower is None or upper is None or step.inverse_func is not None:
        raise ConversionError(f"step {name!r}: np.clip needs exactly a lower and an upper bound")
    lo = np.broadcast_to(np.asarray(lower, "float64"), (width,)).copy()
    hi = np.broadcast_to(np.asarray(upper, "float64"), (width,)).copy()
    return NumericStep("clip", lo, hi)


def _numeric_steps(steps: list[tuple[str, Any]], width: int) -> list[NumericStep]:
    from sklearn.impute import SimpleImputer
    from sklearn.preprocessing import FunctionTransformer, StandardScaler

    from core.transformers import QuantileClipper

    plan = []
    for name, step in steps:
        if step in ("passthrough", None) or (isinstance(step, FunctionTransformer) and step.func is None):
            continue  # identity ("passthrough" in a ColumnTransformer becomes FunctionTransformer())
        if isinstance(step, SimpleImputer):
            plan.append(_imputer_step(name, step, width))
            width += 0 if plan[-1].indicator is None else len(plan[-1].indicator)
        elif isinstance(step, QuantileClipper):
            plan.append(NumericStep("clip", step.lower_bounds_.astype("float64"), step.upper_bounds_.astype("float64")))
        elif isinstance(step, StandardScaler):
            mean = step.mean_ if step.with_mean else np.zeros(width)
            scale = step.scale_ if step.with_std else np.ones(width)
            plan.append(NumericStep("scale", np.asarray(mean, "float64"), np.asarray(scale, "float64")))
        elif isinstance(step, FunctionTransformer) and step.func is np.clip:
            plan.append(_clip_function_step(name, step, width))
        else:
            raise ConversionError(f"step {name!r} ({type(step).__name__}) has no converter")
    return plan


def _text_block(columns: list[str], steps: list[tuple[str, Any]]) -> TextBlock:
    from sklearn.impute import SimpleImputer
    from sklearn.preprocessing import OneHotEncoder

    steps = [(n, s) for n, s in steps if s not in ("passthrough", None)]
    *imputers, (name, encoder) = steps
    if not isinstance(encoder, OneHotEncoder):
        raise ConversionError(f"text step {name!r} ({type(encoder).__name__}) has no converter")
    if encoder.drop is not None or encoder.handle_unknown not in ("ignore", "infrequent_if_exist"):
        raise ConversionError(f"step {name!r}: only drop=None with handle_unknown ignore/infrequent is supported")
    for imp_name, imputer in imputers:
        if not isinstance(imputer, SimpleImputer) or imputer.add_indicator:
            raise ConversionError(f"text step {imp_name!r} ({type(imputer).__name__}) has no converter")
    codes, unknown, widths = [], [], []
    infrequent = getattr(encoder, "infrequent_categories_", None) or [None] * len(columns)
    for j, categories in enumerate(encoder.categories_):
        rare = [] if infrequent[j] is None else list(infrequent[j])
        frequent = [c for c in categories if not any(_same(c, r) for r in rare)]
        width = len(frequent) + (1 if rare else 0)
        for value in categories:
            if value is not None and not isinstance(value, str) and not _is_nan(value):
                raise ConversionError(f"column {columns[j]!r}: category {value!r} is not text")

        def encode(value: Any, frequent: list[Any] = frequent, rare: list[Any] = rare, width: int = width) -> int:
            for k, c in enumerate(frequent):
                if _same(value, c):
                    return k
            if any(_same(value, r) for r in rare):
                return width - 1
            return width - 1 if rare and encoder.handle_unknown == "infrequent_if_exist" else -1

        # Each value the imputers can see, passed through them as scikit-learn does, then encoded.
        seen = [*categories, None, float("nan")] + [
            s for _, imp in imputers for s in [imp.statistics_[j]] if isinstance(s, str)
        ]
        for value in seen:
            if isinstance(value, str) and value.startswith(MARK):
                reserved = f"starts with {MARK!r}, which marks nulls and unseen values in the compiled forms"
                raise ConversionError(f"column {columns[j]!r}: category {value!r} {reserved}")
        imputed = [_impute(v, imputers, j, len(columns)) for v in seen]
        table = {}
        for value, after in zip(seen, imputed, strict=True):
            key = NAN_TEXT if _is_nan(value) else value
            table[key] = encode(after)
        codes.append(table)
        unknown.append(encode(UNSEEN_TEXT))
        widths.append(width)
    return TextBlock(columns, codes, unknown, widths)


def _impute(value: Any, imputers: list[tuple[str, Any]], j: int, n: int) -> Any:
    for _, imputer in imputers:
        row = np.array([[value] * n], dtype=object)
        names = getattr(imputer, "feature_names_in_", None)
        value = imputer.transform(row if names is None else pd.DataFrame(row, columns=names))[0, j]
    return value


def _is_nan(value: Any) -> bool:
    return isinstance(value, float) and np.isnan(value)


def text_key(value: Any, null: Any = NULL_TEXT) -> Any:
    """A text value as the code tables look it up (None as `null`, a float NaN as `NAN_TEXT`).

    A string starting with `MARK` is never a category (`_text_block` refuses those): it is looked up as
    `UNSEEN_TEXT`, so that a client sending a marker's text (`NULL_TEXT` as a JSON string) is scored as the
    unseen category it is, not as a null.
    """
    if value is None:
        return null
    if isinstance(value, str):
        return UNSEEN_TEXT if value.startswith(MARK) else value
    return NAN_TEXT if _is_nan(value) else value


def _same(a: Any, b: Any) -> bool:
    if a is None or b is None:
        return a is b
    if _is_nan(a) or _is_nan(b):
        return _is_nan(a) and _is_nan(b)
    return type(a) is type(b) and a == b


def plan_of(pipeline: Any, text_columns: set[str]) -> Plan:
    """Read a fitted `Pipeline([("preprocess", ColumnTransformer), ("model", estimator)])` into a plan.

    Raises:
        ConversionError: A step or setting without an exact converter (named).
    """
    from sklearn.compose import ColumnTransformer
    from sklearn.pipeline import Pipeline

    if not isinstance(pipeline, Pipeline) or len(pipeline.steps) != 2:
        raise ConversionError("expected a pipeline of a ColumnTransformer and a model")
    preprocess, model = pipeline.steps[0][1], pipeline.steps[1][1]
    if not isinstance(preprocess, ColumnTransformer) or preprocess.sparse_output_:
        raise ConversionError("expected a dense ColumnTransformer as the first step")
    blocks: list[NumericBlock | TextBlock] = []
    inputs: list[str] = []
    for name, transformer, columns in preprocess.transformers_:
        if transformer == "drop" or (name == "remainder" and transformer == "drop"):
            continue
        if not isinstance(columns, list) or not all(isinstance(c, str) for c in columns):
            raise ConversionError(f"transformer {name!r}: columns must be given by name")
        if not columns:
            continue
        steps = transformer.steps if isinstance(transformer, Pipeline) else [(name, transformer)]
        inputs += columns
        if all(c in text_columns for c in columns):
            blocks.append(_text_block(columns, steps))
        elif not any(c in text_columns for c in columns):
            blocks.append(NumericBlock(columns, _numeric_steps(steps, len(columns))))
        else:
            raise ConversionError(f"transformer {name!r} mixes numeric and text columns")
    return Plan(blocks, model, inputs)


# --- exact array form --------------------------------------------------------------------------------


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


def _text_array(block: TextBlock, frame: pd.DataFrame) -> np.ndarray:
    parts = []
    for column, table, unknown, width in zip(block.columns, block.codes, block.unknown, block.widths, strict=True):
        values = frame[column].to_numpy()
        keys = (v if type(v) is str and v[:1] != MARK else text_key(v, None) for v in values)
        index = np.fromiter((table.get(k, unknown) for k in keys), dtype="int64", count=len(values))
        parts.append((index[:, None] == np.arange(width)[None, :]).astype("float64"))
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
            else:
                parts.append(_text_array(block, frame))
        return np.hstack(parts)

    def scores(self, frame: pd.DataFrame) -> np.ndarray:
        """Probabilities (n, classes) of a classifier, predicted values (n,) of a regressor."""
        X = self.features(frame)
        if self.classification:
            return self.plan.model.predict_proba(X)
        return np.asarray(self.plan.model.predict(X), dtype="float64")


# --- ONNX ------------------------------------------------------------------------------------------------

_PATCH_LOCK = threading.Lock()


@contextlib.contextmanager
def _int_booleans() -> Iterator[None]:
    """skl2onnx 1.20.0 passes Python booleans in integer attributes, which protobuf 7 rejects: coerce them.

    True/False become 1/0, which is what the ONNX attribute means; only for the duration of a conversion.
    """
    import onnx.helper

    original = onnx.helper.make_attribute

    def make_attribute(key: str, value: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(value, list | tuple) and any(isinstance(v, bool | np.bool_) for v in value):
            value = [int(v) if isinstance(v, bool | np.bool_) else v for v in value]
        return original(key, value, *args, **kwargs)

    with _PATCH_LOCK:
        onnx.helper.make_attribute = make_attribute
        try:
            yield
        finally:
            onnx.helper.make_attribute = original


class _Graph:
    """Nodes and initializers of the preprocessing part, with unique `pre_` names."""

    def __init__(self) -> None:
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        self.count = 0

    def name(self, hint: str) -> str:
        self.count += 1
        return f"pre_{hint}_{self.count}"

    def const(self, value: np.ndarray, hint: str) -> str:
        from onnx import numpy_helper

        name = self.name(hint)
        self.initializers.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def op(self, op_type: str, inputs: list[str], hint: str, domain: str = "", **attrs: Any) -> str:
        from onnx import helper

        out = self.name(hint)
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=out, domain=domain, **attrs))
        return out


def _numeric_onnx(g: _Graph, block: NumericBlock) -> str:
    X = g.op("Concat", list(block.columns), "numeric", axis=1) if len(block.columns) > 1 else block.columns[0]
    for step in block.steps:
        if step.kind == "impute":
            missing = g.op("IsNaN", [X], "missing")
            X = g.op("Where", [missing, g.const(step.a[None, :], "stats"), X], "imputed")
            if step.indicator is not None and len(step.indicator):
                picked = g.op("Gather", [missing, g.const(step.indicator, "ind_idx")], "ind", axis=1)
                flag = g.op("Cast", [picked], "ind_f", to=11)  # DOUBLE
                X = g.op("Concat", [X, flag], "with_ind", axis=1)
        elif step.kind == "clip":  # np.clip(x, lo, hi) == minimum(maximum(x, lo), hi)
            X = g.op("Max", [X, g.const(step.a[None, :], "lo")], "clip_lo")
            X = g.op("Min", [X, g.const(step.b[None, :], "hi")], "clip_hi")
        else:
            X = g.op("Sub", [X, g.const(step.a[None, :], "mean")], "centred")
            X = g.op("Div", [X, g.const(step.b[None, :], "scale")], "scaled")
    return X


def _text_onnx(g: _Graph, block: TextBlock) -> str:
    parts = []
    for column, table, unknown, width in zip(block.columns, block.codes, block.unknown, block.widths, strict=True):
        keys = [NULL_TEXT if k is None else k for k in table]
        code = g.op(
            "LabelEncoder",
            [column],
            "code",
            domain="ai.onnx.ml",
            keys_strings=keys,
            values_int64s=list(table.values()),
            default_int64=int(unknown),
        )
        hit = g.op("Equal", [code, g.const(np.arange(width, dtype="int64")[None, :], "range")], "onehot")
        parts.append(g.op("Cast", [hit], "onehot_f", to=11))
    return g.op("Concat", parts, "text", axis=1) if len(parts) > 1 else parts[0]


def compile_onnx(pipeline: Any, text_columns: set[str]) -> bytes:
    """The fitted pipeline as one ONNX model (serialized): one input per column, [n, 1] each.

    Numeric inputs are float64, text inputs strings (`NULL_TEXT` for a null). Outputs: `probabilities`
    (n, classes) for a classifier, `variable` (n, 1) for a regressor.

    Raises:
        ConversionError: A step without an exact converter, or a model skl2onnx cannot convert.
    """
    import onnx
    from onnx import TensorProto, helper

    plan = plan_of(pipeline, text_columns)
    g = _Graph()
    parts = [_numeric_onnx(g, b) if isinstance(b, NumericBlock) else _text_onnx(g, b) for b in plan.blocks]
    features = g.op("Concat", parts, "features", axis=1) if len(parts) > 1 else parts[0]
    model = plan.model
    width = _n_features(model)
    classification = getattr(model, "classes_", None) is not None
    output = "probabilities" if classification else "variable"
    if type(model).__name__.startswith("HistGradientBoosting"):
        scores = _hist_onnx(g, features, model)
        model_nodes, model_initializers, opsets, ir_version = [], [], TREE_OPSET, 10
    else:
        converted = _skl2onnx(model, width, classification)
        # scikit-learn's trees and forests compare float32 inputs (skl2onnx adjusts their thresholds for it):
        # cast last. Linear models take float64.
        if type(model).__name__ in TREE_MODELS:
            features = g.op("Cast", [features], "features_f", to=TensorProto.FLOAT)
        g.nodes.append(helper.make_node("Identity", [features], ["features"], name="pre_to_model"))
        model_nodes, model_initializers = list(converted.graph.node), list(converted.graph.initializer)
        found = {o.domain: o.version for o in converted.opset_import}
        opsets = {d: max(v, found.get(d, 0)) for d, v in ONNX_OPSET.items()} | {
            d: v for d, v in found.items() if d not in ONNX_OPSET
        }
        ir_version = converted.ir_version
        scores = f"{output}_model"
        for node in model_nodes:
            node.output[:] = [scores if name == output else name for name in node.output]
    # The output under its public name, as float64 (skl2onnx's tree ensembles answer float32).
    last = helper.make_node("Cast", [scores], [output], name="scores_to_double", to=TensorProto.DOUBLE)
    inputs = [
        helper.make_tensor_value_info(c, TensorProto.STRING if c in text_columns else TensorProto.DOUBLE, [None, 1])
        for c in plan.inputs
    ]
    out = helper.make_tensor_value_info(
        output, TensorProto.DOUBLE, [None, len(model.classes_) if classification else 1]
    )
    graph = helper.make_graph(
        [*g.nodes, *model_nodes, last],
        "compiled_pipeline",
        inputs,
        [out],
        initializer=[*g.initializers, *model_initializers],
    )
    merged = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()])
    merged.ir_version = ir_version
    try:
        onnx.checker.check_model(merged)
    except Exception as exc:
        raise ConversionError(f"the compiled graph is invalid: {exc}") from exc
    return merged.SerializeToString()


def _hist_onnx(g: _Graph, features: str, model: Any) -> str:
    """Histogram gradient boosting as one `ai.onnx.ml` 5 `TreeEnsemble` in float64, then its link, in float64.

    Written here rather than by skl2onnx, whose tree ensembles hold float32 thresholds and leaf values
    (a value between a float64 threshold and its float32 rounding goes the wrong way; values at the clip
    bounds do, as bounds and bin thresholds are both quantiles of the training data) and answer float32.
    Raw scores are the baseline plus each tree's leaf, as scikit-learn sums them; then the logistic
    (binary: [1 - p, p]), softmax (multiclass) or identity (squared, absolute or quantile loss) link.

    Raises:
        ConversionError: Native categorical splits, or a loss with another link.
    """
    from onnx import numpy_helper

    per_iteration = len(model._predictors[0])
    node_feature, node_split, node_missing = [], [], []
    true_ids, true_leaf, false_ids, false_leaf = [], [], [], []
    leaf_target, leaf_weight, roots = [], [], []
    for iteration in model._predictors:
        for target, tree in enumerate(iteration):
            nodes = tree.nodes
            if nodes["is_categorical"].any():
                raise ConversionError(f"{type(model).__name__}: native categorical splits have no exact converter")
            branch = {i: len(node_feature) + k for k, i in enumerate(np.flatnonzero(nodes["is_leaf"] == 0))}
            leaves = {i: len(leaf_target) + k for k, i in enumerate(np.flatnonzero(nodes["is_leaf"] != 0))}
            for i in np.flatnonzero(nodes["is_leaf"] != 0):
                leaf_target.append(target)
                leaf_weight.append(float(nodes[i]["value"]))
            if not branch:  # a single leaf: a split whose both sides are that leaf
                roots.append(len(node_feature))
                node_feature.append(0)
                node_split.append(0.0)
                node_missing.append(0)
                true_ids.append(leaves[0])
                false_ids.append(leaves[0])
                true_leaf.append(1)
                false_leaf.append(1)
                continue
            roots.append(branch[0])
            for i in branch:
                node = nodes[i]
                node_feature.append(int(node["feature_idx"]))
                node_split.append(float(node["num_threshold"]))
                node_missing.append(int(node["missing_go_to_left"]))  # NaN goes left, the `<=` side
                for child, ids, is_leaf in (
                    (node["left"], true_ids, true_leaf),
                    (node["right"], false_ids, false_leaf),
                ):
                    ids.append(leaves[child] if child in leaves else branch[child])
                    is_leaf.append(int(child in leaves))
    raw = g.op(
        "TreeEnsemble",
        [features],
        "trees",
        domain="ai.onnx.ml",
        tree_roots=roots,
        nodes_featureids=node_feature,
        nodes_splits=numpy_helper.from_array(np.array(node_split, dtype="float64")),
        nodes_modes=numpy_helper.from_array(np.zeros(len(node_feature), dtype="uint8")),  # BRANCH_LEQ
        nodes_missing_value_tracks_true=node_missing,
        nodes_truenodeids=true_ids,
        nodes_trueleafs=true_leaf,
        nodes_falsenodeids=false_ids,
        nodes_falseleafs=false_leaf,
        leaf_targetids=leaf_target,
        leaf_weights=numpy_helper.from_array(np.array(leaf_weight, dtype="float64")),
        n_targets=per_iteration,
        aggregate_function=1,  # SUM
        post_transform=0,
    )
    baseline = np.asarray(model._baseline_prediction, dtype="float64").reshape(1, per_iteration)
    raw = g.op("Add", [g.const(baseline, "baseline"), raw], "raw")
    loss = type(model._loss).__name__
    if getattr(model, "classes_", None) is None:
        if loss not in ("HalfSquaredError", "AbsoluteError", "PinballLoss"):
            raise ConversionError(f"{type(model).__name__}: loss {loss} has no exact converter")
        return g.op("Identity", [raw], "variable")
    if per_iteration == 1:  # binary: [1 - expit(raw), expit(raw)], as HalfBinomialLoss.predict_proba
        positive = g.op("Sigmoid", [raw], "positive")
        negative = g.op("Sub", [g.const(np.ones((1, 1)), "one"), positive], "negative")
        return g.op("Concat", [negative, positive], "probabilities", axis=1)
    return g.op("Softmax", [raw], "probabilities", axis=1)


def _skl2onnx(model: Any, width: int, classification: bool) -> Any:
    """skl2onnx's conversion of the model alone, on an input `features` (float32 for trees, else float64)."""
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import DoubleTensorType, FloatTensorType

    tensor = FloatTensorType if type(model).__name__ in TREE_MODELS else DoubleTensorType
    options = {id(model): {"zipmap": False}} if classification else None
    try:
        with _int_booleans():
            return convert_sklearn(
                model, initial_types=[("features", tensor([None, width]))], options=options, target_opset=ONNX_OPSET
            )
    except Exception as exc:
        raise ConversionError(f"skl2onnx cannot convert {type(model).__name__}: {type(exc).__name__}: {exc}") from exc


def _n_features(model: Any) -> int:
    n = getattr(model, "n_features_in_", None)
    if n is None:
        raise ConversionError(f"{type(model).__name__} does not say how many features it takes")
    return int(n)


class OnnxForm:
    """An onnxruntime session of a compiled pipeline (one intra-op thread), scoring frames like the pipeline."""

    form = "onnx"
    takes_columns = True  # `scores` accepts a mapping of column -> array as well as a frame

    def __init__(self, model: bytes, text_columns: set[str], classification: bool) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.text = [c in text_columns for c in self.inputs]
        self.output = ["probabilities" if classification else "variable"]
        self.classification = classification

    def feeds(self, data: Any) -> dict[str, np.ndarray]:
        """The session's inputs from the pipeline's columns: a frame, or a mapping of column -> 1-d array.

        A mapping (what the serving API decodes a request into: float64 numbers with NaN for null, object
        text with None for null) is fed without building a frame; nulls become `NULL_TEXT`/NaN either way,
        text starting with `MARK` becomes `UNSEEN_TEXT` (`text_key`).
        """
        feeds = {}
        for name, text in zip(self.inputs, self.text, strict=True):
            values = np.asarray(data[name])
            if text:
                # the usual value (text without MARK) tested inline: a call per value costs 3x as much
                values = np.array(
                    [v if type(v) is str and v[:1] != MARK else text_key(v) for v in values.tolist()], dtype=object
                )
            elif values.dtype != np.float64:
                values = values.astype("float64")
            feeds[name] = values.reshape(-1, 1)
        return feeds

    def scores(self, data: Any) -> np.ndarray:
        """Probabilities (n, classes) as float64, or predicted values (n,) of a regressor, of a frame or columns."""
        (out,) = self.session.run(self.output, self.feeds(data))
        out = np.asarray(out, dtype="float64")
        return out if self.classification else out.reshape(-1)


# --- parity ------------------------------------------------------------------------------------------


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

    A null in each column, all nulls, every known category (frequent and infrequent), unseen and empty
    text, the compiled forms' own marker strings sent as text (they must score as unseen, not as nulls),
    numbers at, just beyond and far beyond each clip bound, extreme magnitudes and signed zeros, plus
    random mixes of all of these.
    """
    base = sample.iloc[[0]].reset_index(drop=True)
    numeric = [c for c in sample.columns if c not in text_columns]
    text = [c for c in sample.columns if c in text_columns]
    values: dict[str, list[Any]] = {}
    bounds = _clip_bounds(pipeline, text_columns)
    for c in numeric:
        v: list[Any] = [np.nan, 0.0, -0.0, 5e-324, -1e-300, 1.0, -1.0, 1e15, -1e15, 1e300, -1e300]
        for bound in bounds.get(c, []):
            v += [bound, np.nextafter(bound, np.inf), np.nextafter(bound, -np.inf), bound * 10, bound - 1e6]
        if c in sample:
            finite = sample[c].dropna()
            if len(finite):
                v += [float(finite.min()), float(finite.max()), float(finite.median())]
        values[c] = v
    categories = _categories(pipeline)
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


def _clip_bounds(pipeline: Any, text_columns: set[str]) -> dict[str, list[float]]:
    try:
        plan = plan_of(pipeline, text_columns)
    except Exception:  # a pipeline without a plan still gets the generic edge cases
        return {}
    bounds: dict[str, list[float]] = {}
    for block in plan.blocks:
        if not isinstance(block, NumericBlock):
            continue
        for step in block.steps:
            if step.kind == "clip":
                for j, c in enumerate(block.columns):
                    bounds.setdefault(c, []).extend([float(step.a[j]), float(step.b[j])])
    return bounds


def _categories(pipeline: Any) -> dict[str, list[Any]]:
    from sklearn.preprocessing import OneHotEncoder

    found: dict[str, list[Any]] = {}
    preprocess = getattr(pipeline, "steps", [(None, None)])[0][1]
    for _, transformer, columns in getattr(preprocess, "transformers_", []):
        steps = getattr(transformer, "steps", [(None, transformer)])
        for _, step in steps:
            if isinstance(step, OneHotEncoder):
                for c, cats in zip(columns, step.categories_, strict=False):
                    found[c] = [v for v in cats if isinstance(v, str)]
    return found


def check_parity(pipeline: Any, form: Any, frame: pd.DataFrame, tolerance: float = TOLERANCE) -> Parity:
    """Score `frame` with the pipeline (the reference) and with `form`; compare as `compare` does."""
    classification = getattr(pipeline, "classes_", None) is not None
    reference = pipeline.predict_proba(frame) if classification else np.asarray(pipeline.predict(frame), "float64")
    try:
        candidate = form.scores(frame)
    except Exception as exc:
        return Parity(False, len(frame), reason=f"scoring failed: {type(exc).__name__}: {exc}")
    return compare(reference, candidate, classification, tolerance)


# --- the whole check, as the training flow runs it -----------------------------------------------------

FORMS = ("onnx", "exact-arrays", "pipeline")


@dataclass(frozen=True)
class CompiledCheck:
    """What compiling one candidate gave: the ONNX model (if any), both parity results and the form to serve."""

    form: str  # onnx | exact-arrays | pipeline: what serving should use
    onnx: Parity
    arrays: Parity
    model: bytes | None = field(default=None, repr=False)
    seconds: float = 0.0

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
        return tags

    def to_dict(self) -> dict[str, Any]:
        """`compiled/parity.json`."""
        return {
            "form": self.form,
            "onnx": self.onnx.to_dict(),
            "exact_arrays": self.arrays.to_dict(),
            "seconds": self.seconds,
            "null_text": NULL_TEXT,
            "nan_text": NAN_TEXT,
        }


def compile_and_check(pipeline: Any, holdout: pd.DataFrame, text_columns: set[str], seed: int = 0) -> CompiledCheck:
    """Compile `pipeline` and check both fast forms on `holdout` (prepared inputs) plus `edge_cases`.

    Never raises for a pipeline it cannot compile: the check fails with the reason, and the form to serve
    falls back to the exact array form (when it is bit-identical) or the plain pipeline.
    """
    import time

    started = time.perf_counter()
    classification = getattr(pipeline, "classes_", None) is not None
    try:
        frame = pd.concat([holdout, edge_cases(pipeline, holdout, text_columns, seed)], ignore_index=True)
    except Exception as exc:  # still checked, on the holdout alone (said in the result)
        log.warning("edge cases could not be built (%s): checking on the holdout only", exc)
        frame = holdout
    model = None
    try:
        model = compile_onnx(pipeline, text_columns)
        onnx_parity = check_parity(pipeline, OnnxForm(model, text_columns, classification), frame)
    except Exception as exc:  # ConversionError, or anything skl2onnx/onnxruntime raise
        onnx_parity = Parity(False, len(frame), reason=f"{type(exc).__name__}: {exc}"[:500])
    try:
        arrays_parity = check_parity(pipeline, ArrayForm(pipeline, text_columns), frame, tolerance=0.0)
    except Exception as exc:
        arrays_parity = Parity(False, len(frame), tolerance=0.0, reason=f"{type(exc).__name__}: {exc}"[:500])
    form = "onnx" if onnx_parity.passed else "exact-arrays" if arrays_parity.passed else "pipeline"
    return CompiledCheck(form, onnx_parity, arrays_parity, model, time.perf_counter() - started)
