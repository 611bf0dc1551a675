"""The plan of a fitted pipeline: per column block, the fitted numbers of each step, and the model.

`plan_of` reads a trained pipeline (`core.modeling.search.make_pipeline`) into blocks in the `ColumnTransformer`'s
output order: numeric blocks (imputation statistics, clipping bounds, scaler means and scales), text
blocks (a one-hot code table per column) and target-encoded blocks (per column, a code table into the
encoder's fitted encodings, whose last row, the training target's mean, answers unseen values). Both
compiled forms are emitted from it (`core/inference/compiled.py`). A step without an exact converter raises
`ConversionError`.

Text cannot be null in ONNX, so a null is fed as `NULL_TEXT`. Markers start with `MARK` (the NUL
character), which no real value may collide with: a training category starting with it is refused, and a
value sent that starts with it is looked up as `UNSEEN_TEXT` (`text_key`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

# A null text value as the compiled graph receives it (ONNX strings cannot be null); a float NaN in a
# text column (which `SimpleImputer(missing_values=np.nan)` imputes, unlike None) is fed as `NAN_TEXT`.
# Every marker starts with MARK: a real string starting with it is fed as `UNSEEN_TEXT` (`text_key`), and
# a category starting with it is refused, so a value sent can never be read as a null.
MARK = "\x00"
NULL_TEXT = MARK + "null"
NAN_TEXT = MARK + "nan"
UNSEEN_TEXT = MARK + "unseen"  # in no code table: the code of a category not seen in training


class ConversionError(ValueError):
    """The pipeline has a step (or a setting) that cannot be compiled exactly."""


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
class TargetBlock:
    """Text columns target-encoded (`TargetEncoder.transform`): per column, value -> row of its table.

    A table holds the fitted encodings (one column, or one per class for multiclass), one row per category,
    and a last row of the training target's mean(s): the row of a value not in `codes` (`unknown`).
    """

    columns: list[str]
    codes: list[dict[Any, int]]  # keys: category values, None, and NAN_TEXT (a float NaN)
    unknown: list[int]  # the row of a value not in `codes` (the table's last)
    tables: list[np.ndarray]  # (categories + 1, width) float64
    widths: list[int]  # 1, or the number of classes


@dataclass(frozen=True)
class Plan:
    """The fitted preprocessing as blocks (in the `ColumnTransformer`'s output order) and the model."""

    blocks: list[NumericBlock | TextBlock | TargetBlock]
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


def numeric_steps(steps: list[tuple[str, Any]], width: int) -> list[NumericStep]:
    """A numeric entry's fitted steps on its `width` columns, in order (identity steps left out).

    Raises:
        ConversionError: A step without a converter (named).
    """
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


def _text_block(columns: list[str], steps: list[tuple[str, Any]]) -> TextBlock | TargetBlock:
    from sklearn.impute import SimpleImputer
    from sklearn.preprocessing import OneHotEncoder, TargetEncoder

    steps = [(n, s) for n, s in steps if s not in ("passthrough", None)]
    if not steps:
        raise ConversionError(f"text columns {columns} are passed through without an encoding")
    *imputers, (name, encoder) = steps
    for imp_name, imputer in imputers:
        if not isinstance(imputer, SimpleImputer) or imputer.add_indicator:
            raise ConversionError(f"text step {imp_name!r} ({type(imputer).__name__}) has no converter")
    if isinstance(encoder, TargetEncoder):
        return _target_block(columns, imputers, encoder)
    if not isinstance(encoder, OneHotEncoder):
        raise ConversionError(f"text step {name!r} ({type(encoder).__name__}) has no converter")
    if encoder.drop is not None or encoder.handle_unknown not in ("ignore", "infrequent_if_exist"):
        raise ConversionError(f"step {name!r}: only drop=None with handle_unknown ignore/infrequent is supported")
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

        codes.append(_code_table(columns, j, categories, imputers, encode))
        unknown.append(encode(UNSEEN_TEXT))
        widths.append(width)
    return TextBlock(columns, codes, unknown, widths)


def _code_table(
    columns: list[str], j: int, categories: Any, imputers: list[tuple[str, Any]], encode: Any
) -> dict[Any, int]:
    """Each value the imputers can see (the categories, None, NaN, their fill values), as `encode` codes it.

    Values pass through the imputers as scikit-learn passes them, then are encoded.

    Raises:
        ConversionError: A category or a fill value starting with `MARK`.
    """
    seen = [*categories, None, float("nan")] + [
        s for _, imp in imputers for s in [imp.statistics_[j]] if isinstance(s, str)
    ]
    for value in seen:
        if isinstance(value, str) and value.startswith(MARK):
            reserved = f"starts with {MARK!r}, which marks nulls and unseen values in the compiled forms"
            raise ConversionError(f"column {columns[j]!r}: category {value!r} {reserved}")
    imputed = _impute_all(seen, imputers, j, len(columns))
    table = {}
    for value, after in zip(seen, imputed, strict=True):
        key = NAN_TEXT if _is_nan(value) else value
        table[key] = encode(after)
    return table


def _target_block(columns: list[str], imputers: list[tuple[str, Any]], encoder: Any) -> TargetBlock:
    """A fitted `TargetEncoder`'s `transform` as code tables into its encodings (unseen: the target's mean).

    Its `fit_transform` (cross-fitted, training rows only) is not what serving computes, and not compiled.
    """
    classes = getattr(encoder, "classes_", None)
    width = len(classes) if encoder.target_type_ == "multiclass" else 1
    means = np.asarray(encoder.target_mean_, dtype="float64").reshape(width)
    codes, unknown, tables = [], [], []
    for j, categories in enumerate(encoder.categories_):
        for value in categories:
            if value is not None and not isinstance(value, str):
                raise ConversionError(f"column {columns[j]!r}: category {value!r} is not text")
        rows = [np.asarray(encoder.encodings_[j * width + c], dtype="float64") for c in range(width)]
        table = np.vstack([np.column_stack(rows), means[None, :]])
        last = len(categories)
        index = {c: k for k, c in enumerate(categories) if c is not None}  # text (checked above): by equality
        null = next((k for k, c in enumerate(categories) if c is None), last)

        def encode(value: Any, index: dict[str, int] = index, null: int = null, last: int = last) -> int:
            if value is None:
                return null
            return index.get(value, last) if type(value) is str else last

        codes.append(_code_table(columns, j, categories, imputers, encode))
        unknown.append(last)
        tables.append(table)
    return TargetBlock(columns, codes, unknown, tables, [width] * len(columns))


def _impute_all(values: list[Any], imputers: list[tuple[str, Any]], j: int, n: int) -> list[Any]:
    """`values` as column `j` of the imputers' input (each row holds one value in every column), imputed."""
    rows = np.empty((len(values), n), dtype=object)
    for i, value in enumerate(values):
        rows[i, :] = [value] * n
    for _, imputer in imputers:
        names = getattr(imputer, "feature_names_in_", None)
        rows = np.asarray(imputer.transform(rows if names is None else pd.DataFrame(rows, columns=names)), dtype=object)
    return list(rows[:, j])


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


def selects_nothing(columns: Any) -> bool:
    """Whether a `ColumnTransformer` entry's columns select none: an empty list or array, or a mask of all False.

    scikit-learn never fits such an entry: it stays in `transformers_` as it was given, without its fitted
    attributes (an encoder there has no `categories_`, a scaler no `mean_`).
    """
    values = np.asarray(columns)
    return values.size == 0 or (values.dtype == bool and not values.any())


# A `ColumnTransformer` entry that transforms columns: its name, its columns, its steps (name, fitted step).
Entry = tuple[str, list[str], list[tuple[str, Any]]]


def column_steps(pipeline: Any) -> list[Entry]:
    """A fitted pipeline's column entries that transform columns (name, columns, steps), in output order.

    The pipeline is `Pipeline([("preprocess", ColumnTransformer), ("model", estimator)])`. Entries that drop
    their columns are left out, and so are those given no columns (`selects_nothing`): a table without a one-hot
    categorical column (numeric columns only, or its categories all target-encoded) still has the `categorical`
    entry of `core.data.features.build_preprocessor`, never fitted.

    Raises:
        ConversionError: Not such a pipeline (a dense `ColumnTransformer` first), or an entry's columns not given by
            name.
    """
    from sklearn.compose import ColumnTransformer
    from sklearn.pipeline import Pipeline

    if not isinstance(pipeline, Pipeline) or len(pipeline.steps) != 2:
        raise ConversionError("expected a pipeline of a ColumnTransformer and a model")
    preprocess = pipeline.steps[0][1]
    if not isinstance(preprocess, ColumnTransformer) or preprocess.sparse_output_:
        raise ConversionError("expected a dense ColumnTransformer as the first step")
    entries: list[Entry] = []
    for name, transformer, columns in preprocess.transformers_:
        if (isinstance(transformer, str) and transformer == "drop") or selects_nothing(columns):
            continue
        if not isinstance(columns, list) or not all(isinstance(c, str) for c in columns):
            raise ConversionError(f"transformer {name!r}: columns must be given by name")
        steps = transformer.steps if isinstance(transformer, Pipeline) else [(name, transformer)]
        entries.append((name, columns, steps))
    return entries


def plan_of(pipeline: Any, text_columns: set[str]) -> Plan:
    """Read a fitted `Pipeline([("preprocess", ColumnTransformer), ("model", estimator)])` into a plan.

    Entries of the `ColumnTransformer` given no columns are left out (`column_steps`).

    Raises:
        ConversionError: A step or setting without an exact converter (named).
    """
    blocks: list[NumericBlock | TextBlock | TargetBlock] = []
    inputs: list[str] = []
    for name, columns, steps in column_steps(pipeline):
        inputs += columns
        if all(c in text_columns for c in columns):
            blocks.append(_text_block(columns, steps))
        elif not any(c in text_columns for c in columns):
            blocks.append(NumericBlock(columns, numeric_steps(steps, len(columns))))
        else:
            raise ConversionError(f"transformer {name!r} mixes numeric and text columns")
    return Plan(blocks, pipeline.steps[1][1], inputs)
