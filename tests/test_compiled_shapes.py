"""The compiled-form parity gate's edge cases for every table shape (core/inference/compiled_parity.py `edge_cases`).

Units, no servers. The bug: on a table without a one-hot categorical column (a public 85-column numeric table)
the `ColumnTransformer` keeps its categorical entry, given no columns, unfitted, so reading its encoder's
`categories_` raised, and `compile_and_check` fell back to "checking on the holdout only" (a warning).

For each shape (numbers only, text only, booleans only, one number, one text column, mixed, target-encoded
without one-hot, dates with time features; binary and regression, multiclass once), a model fitted by the
project's own search (linear models, trees) or family code (boosting, 20 iterations) on 700 rows: its edge
cases hold a null row per column, the all-null row, every known and an unseen category per categorical column,
the clip bounds; no fallback warning; and the compiled form's scores equal scikit-learn's own
`predict_proba`/`predict` on them within the gate's tolerance (the exact-array form's bit for bit). Booleans and
dates have no compiled form (a named `ConversionError`): their edge cases are built and scored by the pipeline.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pandas as pd
import pytest
from sklearn.compose import ColumnTransformer
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler

from core.data.dataset import DatasetConfig
from core.data.features import prepare_inputs, prepare_target
from core.inference.compiled import TOLERANCE, ArrayForm, OnnxForm, compile_and_check, edge_cases
from core.inference.compiled_plan import column_steps, plan_of
from core.modeling.search import SearchSpec, build_model, search_models

FALLBACK = "edge cases could not be built"


def _numeric_table(columns: int, rows: int, seed: int = 0) -> tuple[pd.DataFrame, DatasetConfig]:
    """`columns` numeric features (a few nulls), a binary target, an id: no categorical column at all."""
    rng = np.random.default_rng(seed)
    values = rng.normal(size=(rows, columns))
    values[rng.random(values.shape) < 0.02] = np.nan
    frame = pd.DataFrame(values, columns=[f"f{i:02d}" for i in range(columns)])
    frame["y"] = (np.nan_to_num(values[:, :3]).sum(axis=1) + rng.normal(size=rows) > 0).astype(int)
    frame.insert(0, "row_id", [f"r{i:05d}" for i in range(rows)])
    features = [{"name": c, "type": "numeric"} for c in frame.columns[1:-1]]
    config = DatasetConfig.model_validate(
        {
            "name": "wide",
            "model_name": "wide",
            "source": "/wide.csv",
            "format": "csv",
            "target": "y",
            "task": "binary",
            "id_column": "row_id",
            "features": features,
        }
    )
    return frame, config


def test_a_table_without_categorical_columns_gets_its_edge_cases(caplog):
    """The reported failure: 85 numeric columns, no categorical one (the one-hot entry is given no columns)."""
    frame, config = _numeric_table(85, 1000)
    train, holdout = frame.iloc[:800], prepare_inputs(frame.iloc[800:], config)
    pipeline = build_model(config, "logistic_regression", {"C": 1.0}, 0)
    pipeline.fit(prepare_inputs(train, config), prepare_target(train, config))
    assert pipeline[0].named_transformers_["categorical"] is not None  # kept, with no columns, never fitted

    cases = edge_cases(pipeline, holdout, set())  # raised AttributeError: no attribute 'categories_'
    assert len(cases) > 0 and list(cases.columns) == list(holdout.columns)
    with caplog.at_level(logging.WARNING, logger="core.inference.compiled"):
        check = compile_and_check(pipeline, holdout, set())
    assert FALLBACK not in caplog.text
    assert check.onnx.passed and check.onnx.rows == len(holdout) + len(cases), check.line()


# --- every table shape, fitted by the project's own search ----------------------------------------------------

SEED = 5
ROWS, TRAIN_ROWS = 900, 700  # each fit on at most 700 rows
# Linear models and trees by the search (one trial, two folds); boosting by its family code, 20 iterations.
SEARCHED = {"logistic_regression", "ridge", "decision_tree"}
BOOSTING = {"max_iter": 20, "max_leaf_nodes": 15}
# Shapes whose pipeline has no compiled form (a step or category without a converter, said by the check), with
# the reason's words: still checked on their edge cases, served by the plain pipeline.
NOT_COMPILED = {
    "boolean": "category False is not text",
    "dates": "(CalendarEncoder) has no converter",
}
SHAPES = {  # feature name -> kind: numeric, categorical (text, a few rare values and nulls), boolean, target
    "numeric": {"x0": "numeric", "x1": "numeric", "x2": "numeric"},
    "categorical": {"colour": "categorical", "size": "categorical"},
    "boolean": {"paid": "boolean", "active": "boolean"},
    "one_numeric": {"x0": "numeric"},
    "one_categorical": {"colour": "categorical"},
    "mixed": {"x0": "numeric", "colour": "categorical", "x1": "numeric", "size": "categorical"},
    "target_encoded": {"x0": "numeric", "merchant": "target"},  # no one-hot column either
    "dates": {"x0": "numeric", "colour": "categorical"},  # and the time column's calendar parts
}
LINEAR = {"binary": "logistic_regression", "multiclass": "logistic_regression", "regression": "ridge"}
CASES = [(shape, task, LINEAR[task]) for shape in SHAPES for task in ("binary", "regression")] + [
    ("mixed", "multiclass", "logistic_regression"),
    ("mixed", "binary", "hist_gradient_boosting"),
    ("numeric", "regression", "hist_gradient_boosting"),
    ("one_categorical", "binary", "decision_tree"),
    ("target_encoded", "regression", "decision_tree"),
]


def _column(kind: str, rng: np.random.Generator) -> np.ndarray:
    if kind == "numeric":
        values = rng.lognormal(size=ROWS) * rng.choice([-1.0, 1.0], ROWS)
        values[rng.random(ROWS) < 0.05] = np.nan
        return values
    if kind == "boolean":
        return rng.choice(np.array([True, False], dtype=object), ROWS)
    if kind == "target":
        return np.array([f"m{i:03d}" for i in rng.integers(0, 80, ROWS)], dtype=object)
    values = rng.choice(np.array(["red", "green", "blue", "grey"], dtype=object), ROWS, p=[0.4, 0.3, 0.2, 0.1])
    values[rng.random(ROWS) < 0.02] = "rare"  # below the one-hot encoder's min_frequency: infrequent
    values[rng.random(ROWS) < 0.05] = None
    return values


def _shaped_table(shape: str, task: str) -> tuple[pd.DataFrame, DatasetConfig]:
    """A table of the shape's features (plus `when`, a time column, for `dates`), its target for `task`."""
    rng = np.random.default_rng(SEED)
    kinds = SHAPES[shape]
    frame = pd.DataFrame({name: _column(kind, rng) for name, kind in kinds.items()})
    signal = rng.normal(size=ROWS)
    for name in frame.columns:
        codes = pd.Series(pd.factorize(frame[name])[0], dtype="float64") if frame[name].dtype == object else None
        signal += np.nan_to_num(frame[name].to_numpy("float64")) if codes is None else codes.to_numpy() % 3
    if shape == "dates":
        frame["when"] = pd.date_range("2025-01-01", periods=ROWS, freq="7h")
        signal += np.sin(np.arange(ROWS) * 2 * np.pi * 7 / 24)
    ranks = pd.Series(signal).rank(pct=True).to_numpy()
    targets = {
        "binary": (ranks > 0.5).astype(int),
        "multiclass": np.array(["low", "mid", "high"], dtype=object)[np.minimum((ranks * 3).astype(int), 2)],
        "regression": signal * 10 + 100,
    }
    frame["y"] = targets[task]
    frame.insert(0, "row_id", [f"r{i:05d}" for i in range(ROWS)])
    features: list[dict[str, Any]] = [
        {"name": name, "type": "numeric"} if kind == "numeric" else {"name": name, "type": "categorical"}
        for name, kind in kinds.items()
    ]
    for feature in features:
        if kinds[feature["name"]] == "target":
            feature["encoding"] = "target"
    dates = {"time_column": "when", "time_features": True} if shape == "dates" else {}
    config = DatasetConfig.model_validate(
        {
            "name": shape,
            "model_name": shape,
            "source": f"/{shape}.csv",
            "format": "csv",
            "target": "y",
            "task": task,
            "id_column": "row_id",
            "features": features,
            **dates,
        }
    )
    return frame, config


def _null_rows(cases: pd.DataFrame, base: pd.Series, column: str) -> pd.Series:
    """Rows of `cases` that are `base` with `column` alone null."""
    same = pd.Series(True, index=cases.index)
    for other in cases.columns.drop(column):
        same &= (cases[other] == base[other]) | (cases[other].isna() & pd.isna(base[other]))
    return same & cases[column].isna()


def _fit(config: DatasetConfig, train: pd.DataFrame, family: str) -> Any:
    """The searched model of `family` (one trial, two folds, calibrated when it helps), or boosting's small one."""
    if family in SEARCHED:
        return search_models(train, config, SearchSpec(families=[family], trials_per_family=1, cv_folds=2), SEED).model
    pipeline = build_model(config, family, BOOSTING, SEED)
    return pipeline.fit(prepare_inputs(train, config), prepare_target(train, config))


@pytest.mark.parametrize(("shape", "task", "family"), CASES, ids=["-".join(case) for case in CASES])
def test_every_table_shape_is_checked_on_its_edge_cases(shape, task, family, caplog):
    frame, config = _shaped_table(shape, task)
    train = frame.iloc[:TRAIN_ROWS]
    model = _fit(config, train, family)
    text = {*config.categorical_features, *config.calendar_columns}  # as the training flow's compile task
    holdout = prepare_inputs(frame.iloc[TRAIN_ROWS:], config)

    cases = edge_cases(model, holdout, text, seed=SEED)
    assert len(cases) > 0 and list(cases.columns) == list(holdout.columns)
    assert cases.isna().all(axis=1).any()  # the all-null row
    base = holdout.iloc[0]
    for column in holdout.columns:  # a null in each column, the others as the first holdout row
        assert _null_rows(cases, base, column).any(), column
    for column in config.categorical_features:
        sent = set(cases[column].dropna())
        known = set(train[column].dropna())
        assert known <= sent, f"{column}: known categories {known - sent} missing"
        assert "UNSEEN category" in sent and sent - known, f"{column}: no unseen category"
    for column in config.numeric_features:
        clip = model[0].named_transformers_["numeric"].named_steps["clip"]
        upper = clip.upper_bounds_[config.numeric_features.index(column)]
        assert {upper, np.nextafter(upper, np.inf)} <= set(cases[column]), column

    with caplog.at_level(logging.WARNING, logger="core.inference.compiled"):
        check = compile_and_check(model, holdout, text, seed=SEED)
    assert FALLBACK not in caplog.text
    assert check.edge_cases == len(cases) and check.onnx.rows == len(holdout) + len(cases)

    # the reference: scikit-learn's own scores, on the holdout and every edge case
    rows = pd.concat([holdout, cases], ignore_index=True)
    classification = task != "regression"
    expected = model.predict_proba(rows) if classification else model.predict(rows)
    assert np.isfinite(expected).all()
    if shape in NOT_COMPILED:
        assert check.form == "pipeline" and check.model is None, check.line()
        assert check.onnx.reason.startswith("ConversionError") and NOT_COMPILED[shape] in check.onnx.reason
        return
    assert check.form == "onnx" and check.onnx.passed and check.arrays.passed, check.line()
    got = OnnxForm(check.model, text, classification).scores(rows)
    assert got.shape == expected.shape
    if classification:
        assert np.abs(got - expected).max() <= TOLERANCE
        assert (got.argmax(axis=1) == expected.argmax(axis=1)).all()
    else:
        assert (np.abs(got - expected) / np.maximum(np.abs(expected), 1e-12)).max() <= TOLERANCE
    assert np.array_equal(ArrayForm(model, text).scores(rows), expected)


# --- entries given no columns, an empty sample, and the fallback kept for the unexpected ----------------------


def _hand_built(empty: object) -> tuple[Pipeline, pd.DataFrame]:
    """Numbers and a text column, with an unfitted one-hot entry given `empty` columns and a dropped one."""
    rng = np.random.default_rng(0)
    X = pd.DataFrame({"a": rng.normal(size=500), "b": rng.normal(size=500)})
    X["c"] = rng.choice(np.array(["x", "y", None], dtype=object), 500)
    y = (X["a"] + X["c"].eq("x") > 0.5).astype(int)
    numeric = Pipeline([("impute", SimpleImputer(add_indicator=True)), ("scale", StandardScaler())])
    text = Pipeline(
        [("impute", SimpleImputer(strategy="most_frequent")), ("encode", OneHotEncoder(handle_unknown="ignore"))]
    )
    encoder = OneHotEncoder(handle_unknown="ignore")
    pre = ColumnTransformer(
        [("n", numeric, ["a", "b"]), ("nothing", encoder, empty), ("t", text, ["c"]), ("gone", "drop", ["b"])]
    )
    return Pipeline([("preprocess", pre), ("model", LogisticRegression())]).fit(X, y), X


EMPTY = {"list": [], "array": np.array([], dtype=object), "mask": [False, False, False]}


@pytest.mark.parametrize("empty", list(EMPTY.values()), ids=list(EMPTY))
def test_entries_given_no_columns_are_left_out(empty):
    pipeline, X = _hand_built(empty)
    assert not hasattr(pipeline[0].named_transformers_["nothing"], "categories_")  # never fitted
    assert [name for name, _, _ in column_steps(pipeline)] == ["n", "t"]
    assert [block.columns for block in plan_of(pipeline, {"c"}).blocks] == [["a", "b"], ["c"]]
    cases = edge_cases(pipeline, X, {"c"})
    assert {"x", "y", "UNSEEN category"} <= set(cases["c"].dropna())
    check = compile_and_check(pipeline, X.head(100), {"c"})
    assert check.form == "onnx" and check.edge_cases == len(cases), check.line()


def test_an_empty_sample_starts_from_the_all_null_row():
    pipeline, X = _hand_built([])
    cases = edge_cases(pipeline, X.iloc[:0], {"c"})
    assert len(cases) > 0 and list(cases.columns) == list(X.columns)
    assert (cases.dtypes[["a", "b"]] == "float64").all() and cases["c"].dtype == object
    assert np.isfinite(pipeline.predict_proba(cases)).all()


def test_an_unexpected_failure_still_checks_the_holdout_and_says_so(monkeypatch, caplog):
    """The fallback stays for a bug no table shape should reach: a warning with the traceback, no edge case."""

    def broken(*args: object, **kwargs: object) -> pd.DataFrame:
        raise RuntimeError("a bug")

    pipeline, X = _hand_built([])
    monkeypatch.setattr("core.inference.compiled.edge_cases", broken)
    with caplog.at_level(logging.WARNING, logger="core.inference.compiled"):
        check = compile_and_check(pipeline, X.head(100), {"c"})
    assert f"{FALLBACK} (a bug): checking on the holdout only" in caplog.text and "Traceback" in caplog.text
    assert check.edge_cases == 0 and check.onnx.rows == 100 and check.to_dict()["edge_cases"] == 0
    assert check.onnx.passed, check.line()
