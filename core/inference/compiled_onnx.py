"""The compiled pipeline as one ONNX graph, and an onnxruntime session that scores frames with it.

Numeric preprocessing runs in float64 exactly as scikit-learn computes it (the same IEEE operations in the
same order), text columns go through a code table (one-hot, or a row of the target encoder's float64
encodings: `_target_onnx`), and the model follows: histogram gradient boosting by
our own converter (`_hist_onnx`: one float64 `TreeEnsemble`, `ai.onnx.ml` 5, then its link in float64;
skl2onnx's float32 thresholds send values at a split threshold the wrong way), other models by skl2onnx
(decision trees and forests on float32 input, as scikit-learn's own are; linear models in float64); a
calibrated classifier (`CalibratedClassifierCV`) as its classifier's scores, then its calibrators in float64
(`core/inference/compiled_calibration.py`). LightGBM's estimators (the `lightgbm` family) are refused with a
`ConversionError` saying why (no converter without onnxmltools): serving then uses the exact array form.

Pure: bytes out; onnxruntime sessions are created from bytes.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from core.inference.compiled_calibration import (
    calibrated_scores,
    check_calibrated,
    is_calibrated,
    linear_responses,
    probability_responses,
)
from core.inference.compiled_plan import (
    MARK,
    NULL_TEXT,
    ConversionError,
    NumericBlock,
    Plan,
    TargetBlock,
    TextBlock,
    plan_of,
    text_key,
)

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


def _code_onnx(g: _Graph, column: str, table: dict, unknown: int, hint: str) -> str:
    """A text column's codes (`LabelEncoder`: the table's keys, null as `NULL_TEXT`; others `unknown`)."""
    keys = [NULL_TEXT if k is None else k for k in table]
    return g.op(
        "LabelEncoder",
        [column],
        hint,
        domain="ai.onnx.ml",
        keys_strings=keys,
        values_int64s=list(table.values()),
        default_int64=int(unknown),
    )


def _text_onnx(g: _Graph, block: TextBlock) -> str:
    parts = []
    for column, table, unknown, width in zip(block.columns, block.codes, block.unknown, block.widths, strict=True):
        code = _code_onnx(g, column, table, unknown, "code")
        hit = g.op("Equal", [code, g.const(np.arange(width, dtype="int64")[None, :], "range")], "onehot")
        parts.append(g.op("Cast", [hit], "onehot_f", to=11))
    return g.op("Concat", parts, "text", axis=1) if len(parts) > 1 else parts[0]


def _target_onnx(g: _Graph, block: TargetBlock) -> str:
    """Each column's code (`LabelEncoder`, unseen: the last row), then that row of its encodings (`Gather`).

    The encodings stay float64 (skl2onnx's own TargetEncoder converter holds them as float32, and converts
    binary and regression targets only): the rows are the fitted encoder's numbers, bit for bit.
    """
    parts = []
    for column, table, unknown, encodings in zip(block.columns, block.codes, block.unknown, block.tables, strict=True):
        code = _code_onnx(g, column, table, unknown, "target_code")
        flat = g.op("Reshape", [code, g.const(np.array([-1], dtype="int64"), "flat")], "target_row")
        parts.append(g.op("Gather", [g.const(encodings, "encodings"), flat], "target_enc", axis=0))
    return g.op("Concat", parts, "target", axis=1) if len(parts) > 1 else parts[0]


def _block_onnx(g: _Graph, block: NumericBlock | TextBlock | TargetBlock) -> str:
    if isinstance(block, NumericBlock):
        return _numeric_onnx(g, block)
    return _target_onnx(g, block) if isinstance(block, TargetBlock) else _text_onnx(g, block)


def compile_onnx(pipeline: Any, text_columns: set[str]) -> bytes:
    """The fitted pipeline as one ONNX model (serialized): one input per column, [n, 1] each.

    Numeric inputs are float64, text inputs strings (`NULL_TEXT` for a null). Outputs: `probabilities`
    (n, classes) for a classifier, `variable` (n, 1) for a regressor.

    Raises:
        ConversionError: A step without an exact converter, or a model skl2onnx cannot convert.
    """
    plan = plan_of(pipeline, text_columns)
    model = plan.model
    inner = model.calibrated_classifiers_[0].estimator if is_calibrated(model) else model
    if type(inner).__module__.startswith("lightgbm"):  # before skl2onnx says it in a page of text
        raise ConversionError(
            f"{type(inner).__name__}: LightGBM has no ONNX converter here (onnxmltools, which has one, is not "
            "a dependency)"
        )
    g = _Graph()
    parts = [_block_onnx(g, b) for b in plan.blocks]
    features = g.op("Concat", parts, "features", axis=1) if len(parts) > 1 else parts[0]
    width = _n_features(model)
    classification = getattr(model, "classes_", None) is not None
    output = "probabilities" if classification else "variable"
    if is_calibrated(model):  # CalibratedClassifierCV: its classifier, then its calibrators
        part = calibrated_model_part(g, features, model, width)
    elif type(model).__name__.startswith("HistGradientBoosting"):
        part = _ModelPart(_hist_onnx(g, features, model), [], [], TREE_OPSET, 10)
    else:
        part = _converted_model(g, features, model, width, output)
    return _serialized(g, part, plan, text_columns, output)


@dataclass(frozen=True)
class _ModelPart:
    """The model's part of the compiled graph: the name of its scores, its nodes, initializers and versions."""

    scores: str
    nodes: list[Any]
    initializers: list[Any]
    opsets: dict[str, int]
    ir_version: int


def _converted_model(g: _Graph, features: str, model: Any, width: int, output: str) -> _ModelPart:
    """skl2onnx's conversion of the model, fed `features` (cast to float32 for trees), its output renamed."""
    from onnx import TensorProto, helper

    converted = _skl2onnx(model, width, output == "probabilities")
    # scikit-learn's trees and forests compare float32 inputs (skl2onnx adjusts their thresholds for it):
    # cast last. Linear models take float64.
    if type(model).__name__ in TREE_MODELS:
        features = g.op("Cast", [features], "features_f", to=TensorProto.FLOAT)
    g.nodes.append(helper.make_node("Identity", [features], ["features"], name="pre_to_model"))
    nodes, initializers = list(converted.graph.node), list(converted.graph.initializer)
    found = {o.domain: o.version for o in converted.opset_import}
    opsets = {d: max(v, found.get(d, 0)) for d, v in ONNX_OPSET.items()} | {
        d: v for d, v in found.items() if d not in ONNX_OPSET
    }
    scores = f"{output}_model"
    for node in nodes:  # a converter may read its own output too (e.g. CalibratedClassifierCV's label ArgMax)
        node.input[:] = [scores if name == output else name for name in node.input]
        node.output[:] = [scores if name == output else name for name in node.output]
    return _ModelPart(scores, nodes, initializers, opsets, converted.ir_version)


def _serialized(g: _Graph, part: _ModelPart, plan: Plan, text_columns: set[str], output: str) -> bytes:
    """The preprocessing and the model in one checked ONNX model, its output under its public name in float64.

    Raises:
        ConversionError: The merged graph does not pass the ONNX checker.
    """
    import onnx
    from onnx import TensorProto, helper

    # The output under its public name, as float64 (skl2onnx's tree ensembles answer float32).
    last = helper.make_node("Cast", [part.scores], [output], name="scores_to_double", to=TensorProto.DOUBLE)
    inputs = [
        helper.make_tensor_value_info(c, TensorProto.STRING if c in text_columns else TensorProto.DOUBLE, [None, 1])
        for c in plan.inputs
    ]
    classification = output == "probabilities"
    out = helper.make_tensor_value_info(
        output, TensorProto.DOUBLE, [None, len(plan.model.classes_) if classification else 1]
    )
    graph = helper.make_graph(
        [*g.nodes, *part.nodes, last],
        "compiled_pipeline",
        inputs,
        [out],
        initializer=[*g.initializers, *part.initializers],
    )
    merged = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in part.opsets.items()])
    merged.ir_version = part.ir_version
    try:
        onnx.checker.check_model(merged)
    except Exception as exc:
        raise ConversionError(f"the compiled graph is invalid: {exc}") from exc
    return merged.SerializeToString()


@dataclass
class _TreeArrays:
    """The attributes of one `ai.onnx.ml` 5 `TreeEnsemble`, filled tree by tree (`add`)."""

    node_feature: list[int] = field(default_factory=list)
    node_split: list[float] = field(default_factory=list)
    node_missing: list[int] = field(default_factory=list)
    true_ids: list[int] = field(default_factory=list)
    true_leaf: list[int] = field(default_factory=list)
    false_ids: list[int] = field(default_factory=list)
    false_leaf: list[int] = field(default_factory=list)
    leaf_target: list[int] = field(default_factory=list)
    leaf_weight: list[float] = field(default_factory=list)
    roots: list[int] = field(default_factory=list)

    def add(self, nodes: np.ndarray, target: int) -> None:
        """One fitted tree's nodes (scikit-learn's `TreePredictor.nodes`), adding to output `target`."""
        branch = {i: len(self.node_feature) + k for k, i in enumerate(np.flatnonzero(nodes["is_leaf"] == 0))}
        leaves = {i: len(self.leaf_target) + k for k, i in enumerate(np.flatnonzero(nodes["is_leaf"] != 0))}
        for i in np.flatnonzero(nodes["is_leaf"] != 0):
            self.leaf_target.append(target)
            self.leaf_weight.append(float(nodes[i]["value"]))
        if not branch:  # a single leaf: a split whose both sides are that leaf
            self.roots.append(len(self.node_feature))
            self.node_feature.append(0)
            self.node_split.append(0.0)
            self.node_missing.append(0)
            self.true_ids.append(leaves[0])
            self.false_ids.append(leaves[0])
            self.true_leaf.append(1)
            self.false_leaf.append(1)
            return
        self.roots.append(branch[0])
        for i in branch:
            node = nodes[i]
            self.node_feature.append(int(node["feature_idx"]))
            self.node_split.append(float(node["num_threshold"]))
            self.node_missing.append(int(node["missing_go_to_left"]))  # NaN goes left, the `<=` side
            for child, ids, is_leaf in (
                (node["left"], self.true_ids, self.true_leaf),
                (node["right"], self.false_ids, self.false_leaf),
            ):
                ids.append(leaves[child] if child in leaves else branch[child])
                is_leaf.append(int(child in leaves))


def _hist_onnx(g: _Graph, features: str, model: Any, link: bool = True) -> str:
    """Histogram gradient boosting as one `ai.onnx.ml` 5 `TreeEnsemble` in float64, then its link, in float64.

    Written here rather than by skl2onnx, whose tree ensembles hold float32 thresholds and leaf values
    (a value between a float64 threshold and its float32 rounding goes the wrong way; values at the clip
    bounds do, as bounds and bin thresholds are both quantiles of the training data) and answer float32.
    Raw scores are the baseline plus each tree's leaf, as scikit-learn sums them; then the logistic
    (binary: [1 - p, p]), softmax (multiclass) or identity (squared, absolute or quantile loss) link;
    `link=False` stops at the raw scores (`decision_function`, what a calibration reads).

    Raises:
        ConversionError: Native categorical splits, or a loss with another link.
    """
    from onnx import numpy_helper

    per_iteration = len(model._predictors[0])
    trees = _TreeArrays()
    for iteration in model._predictors:
        for target, tree in enumerate(iteration):
            if tree.nodes["is_categorical"].any():
                raise ConversionError(f"{type(model).__name__}: native categorical splits have no exact converter")
            trees.add(tree.nodes, target)
    raw = g.op(
        "TreeEnsemble",
        [features],
        "trees",
        domain="ai.onnx.ml",
        tree_roots=trees.roots,
        nodes_featureids=trees.node_feature,
        nodes_splits=numpy_helper.from_array(np.array(trees.node_split, dtype="float64")),
        nodes_modes=numpy_helper.from_array(np.zeros(len(trees.node_feature), dtype="uint8")),  # BRANCH_LEQ
        nodes_missing_value_tracks_true=trees.node_missing,
        nodes_truenodeids=trees.true_ids,
        nodes_trueleafs=trees.true_leaf,
        nodes_falsenodeids=trees.false_ids,
        nodes_falseleafs=trees.false_leaf,
        leaf_targetids=trees.leaf_target,
        leaf_weights=numpy_helper.from_array(np.array(trees.leaf_weight, dtype="float64")),
        n_targets=per_iteration,
        aggregate_function=1,  # SUM
        post_transform=0,
    )
    return _hist_link(g, raw, model, per_iteration, link)


def _hist_link(g: _Graph, raw: str, model: Any, per_iteration: int, link: bool = True) -> str:
    """The baseline added to the trees' sums, then the model's link: the graph's scores.

    Raises:
        ConversionError: A regression loss whose link is not the identity.
    """
    baseline = np.asarray(model._baseline_prediction, dtype="float64").reshape(1, per_iteration)
    raw = g.op("Add", [g.const(baseline, "baseline"), raw], "raw")
    if not link:
        return raw
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


def calibrated_model_part(g: Any, features: str, model: Any, width: int) -> Any:
    """The calibrated classifier's part of the compiled graph (`core/inference/compiled_calibration.py`).

    Histogram gradient boosting and linear classifiers are written into `g` (float64 throughout); other
    classifiers are converted by skl2onnx and the calibration follows their nodes.
    """

    class _After(_Graph):
        """Nodes that follow skl2onnx's (after the preprocessing's), under names of their own."""

        def name(self, hint: str) -> str:
            self.count += 1
            return f"cal_{hint}_{self.count}"

    inner = check_calibrated(model)
    if type(inner).__name__ == "HistGradientBoostingClassifier":
        responses = _hist_onnx(g, features, inner, link=False)
        return _ModelPart(calibrated_scores(g, responses, model), [], [], TREE_OPSET, 10)
    if hasattr(inner, "coef_") and hasattr(inner, "intercept_") and hasattr(inner, "decision_function"):
        return _ModelPart(calibrated_scores(g, linear_responses(g, features, inner), model), [], [], TREE_OPSET, 10)
    part = _converted_model(g, features, inner, width, "probabilities")
    after = _After()
    scores = calibrated_scores(after, probability_responses(after, part.scores, len(model.classes_)), model)
    return _ModelPart(
        scores, [*part.nodes, *after.nodes], [*part.initializers, *after.initializers], part.opsets, part.ir_version
    )
