"""Compiled inference (core/inference/compiled.py) and how serving picks its form.

Units: each form's scores against scikit-learn's own `predict_proba`/`predict` (the independent
reference), the one-hot table against `ColumnTransformer.transform`, the parity comparison, the edge
cases, a model that converts silently wrong (histogram gradient boosting with native categorical
features, skl2onnx #1051) failing parity with serving falling back, and a step without a converter.
Real stack: a champion trained by the flow is served compiled, and the API's probabilities equal the
registered pipeline's `predict_proba` within 1e-6.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pandas as pd
import pytest
from sklearn.compose import ColumnTransformer
from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer, OneHotEncoder, PolynomialFeatures, StandardScaler

from core.data.dataset import load_local_dataset_config
from core.data.features import prepare_inputs, prepare_target
from core.data.split import split_frame
from core.data.synthetic import generate_frame
from core.inference.compiled import (
    NAN_TEXT,
    NULL_TEXT,
    UNSEEN_TEXT,
    ArrayForm,
    ConversionError,
    OnnxForm,
    Parity,
    check_parity,
    compare,
    compile_and_check,
    compile_onnx,
    edge_cases,
)
from core.modeling.artifacts import ONNX_DIGEST_TAG, UntrustedArtifactError
from core.modeling.search import build_model, make_pipeline
from core.modeling.signature import Column
from serving.model import choose_inference

CONFIG = load_local_dataset_config("credit-risk")
TEXT = set(CONFIG.categorical_features)


@pytest.fixture(scope="module")
def data() -> tuple[pd.DataFrame, pd.Series, pd.DataFrame]:
    split = split_frame(generate_frame(4000, seed=3), CONFIG)
    train_X = prepare_inputs(split.train, CONFIG)
    # Rare categories (below the encoder's min_frequency=20), so the infrequent column is exercised too.
    train_X.loc[train_X.index[:7], "region"] = "tiny-region"
    train_X.loc[train_X.index[7:19], "loan_purpose"] = "rare-purpose"
    return train_X, prepare_target(split.train, CONFIG), prepare_inputs(split.holdout, CONFIG)


def _reference(pipeline, frame: pd.DataFrame) -> np.ndarray:
    return pipeline.predict_proba(frame)


FAMILIES = [
    ("logistic_regression", {"C": 0.5, "class_weight": "balanced"}),
    ("hist_gradient_boosting", {"max_iter": 100, "max_leaf_nodes": 31, "learning_rate": 0.1}),
    ("random_forest", {"n_estimators": 30, "max_depth": 10, "n_jobs": 1}),
    ("decision_tree", {"max_depth": 3, "min_samples_leaf": 5}),
]


@pytest.mark.parametrize(("family", "params"), FAMILIES, ids=[f for f, _ in FAMILIES])
def test_compiled_and_array_forms_match_sklearn(data, family, params):
    train_X, train_y, holdout = data
    pipeline = build_model(CONFIG, family, params, 42).fit(train_X, train_y)
    frame = pd.concat([holdout, edge_cases(pipeline, holdout, TEXT)], ignore_index=True)
    expected = _reference(pipeline, frame)

    onnx_scores = OnnxForm(compile_onnx(pipeline, TEXT), TEXT, True).scores(frame)
    assert np.abs(onnx_scores - expected).max() <= 1e-6
    assert (onnx_scores.argmax(axis=1) == expected.argmax(axis=1)).all()
    # the array form is bit-identical, not merely close
    assert np.array_equal(ArrayForm(pipeline, TEXT).scores(frame), expected)

    check = compile_and_check(pipeline, holdout, TEXT, seed=1)
    assert check.form == "onnx" and check.onnx.passed and check.arrays.passed, check.line()
    assert check.onnx.rows > len(holdout) and check.onnx.max_abs_delta <= 1e-6
    assert check.tags()["inference_form"] == "onnx" and check.tags()["compiled_parity"] == "passed"
    assert "parity passed (max |d| = " in check.line()


def test_the_pipeline_scores_the_checked_rows_once_for_both_forms(data):
    """Both forms are compared with one scoring of the holdout and edge cases by the pipeline (it was one each)."""
    train_X, train_y, holdout = data
    pipeline = build_model(CONFIG, "hist_gradient_boosting", {"max_iter": 50}, 42).fit(train_X, train_y)
    scored: list[int] = []
    predict_proba = pipeline.predict_proba

    def counted(frame):
        scored.append(len(frame))
        return predict_proba(frame)

    pipeline.predict_proba = counted
    check = compile_and_check(pipeline, holdout, TEXT, seed=1)
    assert scored == [check.onnx.rows] == [check.arrays.rows] and check.onnx.rows > len(holdout)
    # the same outcome as checking each form on its own, each scoring the rows again
    frame = pd.concat([holdout, edge_cases(pipeline, holdout, TEXT, 1)], ignore_index=True)
    assert check.arrays == check_parity(pipeline, ArrayForm(pipeline, TEXT), frame, tolerance=0.0)
    assert check.onnx == check_parity(pipeline, OnnxForm(check.model, TEXT, True), frame)


def test_regression_forms_match_sklearn(data):
    """Ridge and gradient boosting pass the relative limit; the array form of a regressor is bit-identical."""
    train_X, _, holdout = data
    y = train_X["annual_income"].fillna(0) / 1000 + train_X["age"]
    pipeline = build_model(CONFIG, "ridge", {"alpha": 1.0}, 42).fit(train_X, y)
    frame = pd.concat([holdout, edge_cases(pipeline, holdout, TEXT)], ignore_index=True)
    expected = pipeline.predict(frame)
    got = OnnxForm(compile_onnx(pipeline, TEXT), TEXT, False).scores(frame)
    assert (np.abs(got - expected) / np.maximum(np.abs(expected), 1e-12)).max() <= 1e-6
    assert np.array_equal(ArrayForm(pipeline, TEXT).scores(frame), expected)
    boosted = make_pipeline(CONFIG, HistGradientBoostingRegressor(max_iter=100, random_state=0)).fit(train_X, y)
    check = compile_and_check(boosted, holdout, TEXT)
    assert check.form == "onnx" and check.onnx.max_rel_delta <= 1e-6, check.line()


@pytest.mark.parametrize("estimator", [HistGradientBoostingClassifier, LogisticRegression])
def test_multiclass_forms_match_sklearn(data, estimator):
    train_X, _, holdout = data
    y = pd.qcut(train_X["age"] + train_X["debt_to_income"] * 10, 3, labels=["low", "mid", "high"]).astype(str)
    pipeline = make_pipeline(CONFIG, estimator(max_iter=60)).fit(train_X, y)
    check = compile_and_check(pipeline, holdout, TEXT)
    assert check.form == "onnx" and check.onnx.max_abs_delta <= 1e-9, check.line()
    frame = holdout.head(50)
    got = OnnxForm(check.model, TEXT, True).scores(frame)
    assert got.shape == (50, 3) and np.allclose(got, pipeline.predict_proba(frame), rtol=0, atol=1e-9)


@pytest.mark.parametrize("estimator", [HistGradientBoostingClassifier, HistGradientBoostingRegressor])
def test_hist_gradient_boosting_splits_exactly_at_its_thresholds(estimator):
    """Values at and one ulp either side of every split threshold go the way scikit-learn sends them.

    skl2onnx alone rounds thresholds to float32, which sends some of these rows the wrong way.
    """
    rng = np.random.default_rng(1)
    X = pd.DataFrame({"a": rng.normal(size=3000), "b": rng.lognormal(size=3000)})
    classification = estimator is HistGradientBoostingClassifier
    y = (X["a"] + np.log(X["b"]) > 0).astype(int) if classification else X["a"] * 50 + 100
    pre = ColumnTransformer([("numeric", "passthrough", ["a", "b"])])
    pipeline = Pipeline([("preprocess", pre), ("model", estimator(max_iter=40, random_state=0))]).fit(X, y)
    nodes = np.concatenate([tree.nodes for iteration in pipeline[-1]._predictors for tree in iteration])
    splits = nodes[nodes["is_leaf"] == 0]
    rows = []
    for feature, threshold in zip(splits["feature_idx"], splits["num_threshold"], strict=True):
        for value in (threshold, np.nextafter(threshold, np.inf), np.nextafter(threshold, -np.inf)):
            rows.append(X.iloc[len(rows) % len(X)].to_numpy().copy())
            rows[-1][feature] = value
    probe = pd.DataFrame(rows, columns=["a", "b"])
    parity = check_parity(pipeline, OnnxForm(compile_onnx(pipeline, set()), set(), classification), probe)
    assert parity.passed, parity.reason
    assert parity.max_abs_delta <= 1e-12  # float64 all through: only the summation order differs

    # skl2onnx's own conversion (float32 thresholds) sends some of these rows the wrong way.
    import onnxruntime as ort

    from core.inference.compiled_onnx import _skl2onnx

    session = ort.InferenceSession(_skl2onnx(pipeline[-1], 2, classification).SerializeToString())
    name = "probabilities" if classification else "variable"
    got = session.run([name], {"features": probe.to_numpy("float32")})[0]
    reference = pipeline.predict_proba(probe) if classification else pipeline.predict(probe)
    assert not compare(reference, got.reshape(reference.shape), classification).passed


def test_preprocessing_equals_the_column_transformer(data):
    """Imputation + indicator, clipping, scaling, one-hot with infrequent and unseen categories, None: exact."""
    train_X, train_y, holdout = data
    pipeline = build_model(CONFIG, "logistic_regression", {"C": 1.0}, 42).fit(train_X, train_y)
    encoder = pipeline[0].named_transformers_["categorical"].named_steps["encode"]
    assert any(rare is not None for rare in encoder.infrequent_categories_), "the data must exercise min_frequency"
    assert train_X[CONFIG.categorical_features].isna().any().any(), "and null categories"
    frame = pd.concat([holdout, edge_cases(pipeline, holdout, TEXT)], ignore_index=True)
    assert np.array_equal(ArrayForm(pipeline, TEXT).features(frame), pipeline[0].transform(frame))


def test_clip_function_transformer_converts():
    rng = np.random.default_rng(0)
    X = pd.DataFrame({"a": rng.normal(size=400) * 10, "b": rng.normal(size=400), "c": rng.choice(["x", "y"], 400)})
    y = (X["a"] + X["b"] > 0).astype(int)
    clip = FunctionTransformer(np.clip, kw_args={"a_min": -3.0, "a_max": 3.0})
    numeric = Pipeline([("impute", SimpleImputer(strategy="mean")), ("clip", clip), ("scale", StandardScaler())])
    text = Pipeline(
        [("impute", SimpleImputer(strategy="most_frequent")), ("encode", OneHotEncoder(handle_unknown="ignore"))]
    )
    pre = ColumnTransformer([("n", numeric, ["a", "b"]), ("t", text, ["c"])])
    pipeline = Pipeline([("preprocess", pre), ("model", LogisticRegression())]).fit(X, y)
    probe = pd.DataFrame({"a": [np.nan, -1e9, 3.0, 2.9], "b": [0.0, np.nan, 1e300, -4.0], "c": [None, "x", "y", "z"]})
    probe["c"] = probe["c"].astype(object)
    frame = pd.concat([X.head(50), probe], ignore_index=True)
    onnx_form = OnnxForm(compile_onnx(pipeline, {"c"}), {"c"}, True)
    assert check_parity(pipeline, onnx_form, frame).passed
    assert check_parity(pipeline, ArrayForm(pipeline, {"c"}), frame, tolerance=0.0).passed


def test_step_without_converter_fails_with_its_name(data):
    train_X, train_y, holdout = data
    numeric = CONFIG.numeric_features
    pre = ColumnTransformer(
        [("poly", Pipeline([("impute", SimpleImputer()), ("square", PolynomialFeatures(2))]), numeric)]
    )
    pipeline = Pipeline([("preprocess", pre), ("model", LogisticRegression(max_iter=500))]).fit(train_X, train_y)
    with pytest.raises(ConversionError, match="'square' \\(PolynomialFeatures\\) has no converter"):
        compile_onnx(pipeline, TEXT)
    check = compile_and_check(pipeline, holdout, TEXT)
    assert check.form == "pipeline" and not check.onnx.passed and not check.arrays.passed
    assert (
        "PolynomialFeatures" in check.line() and "serving uses the exact pipeline (the plain pipeline)" in check.line()
    )


def _native_categorical(seed: int = 0) -> tuple[Pipeline, pd.DataFrame]:
    """Histogram gradient boosting with a native categorical feature."""
    rng = np.random.default_rng(seed)
    X = pd.DataFrame({"a": rng.normal(size=2000), "code": rng.integers(0, 8, 2000).astype("float64")})
    y = (X["code"].isin([1, 5, 6]) ^ (X["a"] > 0.3)).astype(int)
    model = HistGradientBoostingClassifier(categorical_features=[1], max_iter=30, random_state=0)
    pre = ColumnTransformer([("numeric", "passthrough", ["a", "code"])])
    return Pipeline([("preprocess", pre), ("model", model)]).fit(X, y), X


def test_native_categorical_is_refused_and_served_exactly():
    pipeline, X = _native_categorical()
    with pytest.raises(ConversionError, match="native categorical splits"):
        compile_onnx(pipeline, set())
    check = compile_and_check(pipeline, X.head(500), set())
    assert not check.onnx.passed and check.model is None
    assert check.form == "exact-arrays" and check.arrays.passed and check.arrays.max_abs_delta == 0
    assert check.line().startswith("compiled form (ONNX) failed: ConversionError: HistGradientBoostingClassifier")
    assert check.line().endswith("serving uses the exact pipeline (exact-arrays, bit-identical)")
    assert check.tags()["inference_form"] == "exact-arrays" and check.tags()["compiled_parity"] == "failed"


def test_parity_catches_a_conversion_that_succeeds_but_is_wrong():
    """skl2onnx converts native categorical splits without an error, wrongly (skl2onnx #1051)."""
    import onnxruntime as ort

    from core.inference.compiled_onnx import _skl2onnx

    pipeline, X = _native_categorical()
    converted = _skl2onnx(pipeline[-1], 2, True)  # no exception
    session = ort.InferenceSession(converted.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(["probabilities"], {"features": X.to_numpy("float32")})[0]
    parity = compare(pipeline.predict_proba(X), got, classification=True)
    assert not parity.passed and parity.class_mismatches > 100 and parity.max_abs_delta > 0.1


def test_serving_falls_back_from_a_wrong_compiled_model():
    """Tags say the compiled form passed, but the ONNX file is another model's: re-checked at load, not served."""
    pipeline, X = _native_categorical()
    other = Pipeline([("preprocess", ColumnTransformer([("numeric", "passthrough", ["a", "code"])]))])
    other.steps.append(("model", LogisticRegression()))
    other.fit(X, (X["a"] > 0).astype(int))
    wrong = compile_onnx(other, set())
    columns = [Column("a", "numeric"), Column("code", "numeric")]
    # (the file is the one recorded, its digest matches: the parity re-check is what catches it)
    tags = {"inference_form": "onnx", "compiled_parity": "passed", "exact_arrays_parity": "passed"}
    tags |= {ONNX_DIGEST_TAG: hashlib.sha256(wrong).hexdigest()}
    inference, facts = choose_inference(pipeline, columns, tags, "run", X.head(200), onnx_bytes=lambda _: wrong)
    assert inference.form == "exact-arrays"
    assert facts["fallbacks"][0].startswith("onnx: max |d probability|")
    assert np.array_equal(inference.scores(X), pipeline.predict_proba(X))
    # ... and to the plain pipeline when neither fast form is known to be exact
    tags |= {"exact_arrays_parity": "failed"}
    inference, facts = choose_inference(pipeline, columns, tags, "run", X, lambda _: wrong)
    assert inference is None and len(facts["fallbacks"]) == 1


def test_serving_uses_onnx_when_it_passed(data):
    train_X, train_y, holdout = data
    pipeline = build_model(CONFIG, "hist_gradient_boosting", {"max_iter": 50}, 42).fit(train_X, train_y)
    check = compile_and_check(pipeline, holdout, TEXT)
    columns = [Column(c, "text" if c in TEXT else "numeric") for c in train_X.columns]
    inference, facts = choose_inference(pipeline, columns, check.tags(), "run", holdout.head(20), lambda _: check.model)
    assert inference.form == "onnx" and "fallbacks" not in facts
    assert facts["compiled"] == "passed" and facts["max_abs_delta"] <= 1e-6
    # a recorded file onnxruntime cannot read falls back to the next form
    recorded = check.tags() | {ONNX_DIGEST_TAG: hashlib.sha256(b"not onnx").hexdigest()}
    unreadable = choose_inference(pipeline, columns, recorded, "run", holdout, lambda _: b"not onnx")
    assert unreadable[0].form == "exact-arrays" and "onnx: " in unreadable[1]["fallbacks"][0]
    # a file that is not the one recorded is refused, before onnxruntime reads it
    with pytest.raises(UntrustedArtifactError, match="the compiled file of run run"):
        choose_inference(pipeline, columns, check.tags(), "run", holdout, lambda _: b"not onnx")
    # a version from before the digests is served without its compiled form
    undigested = {k: v for k, v in check.tags().items() if k != ONNX_DIGEST_TAG}
    older = choose_inference(pipeline, columns, undigested, "run", holdout, lambda _: check.model)
    assert older[0].form == "exact-arrays" and "no recorded digest" in older[1]["fallbacks"][0]
    assert choose_inference(pipeline, columns, {}, "run", holdout)[0] is None  # an old version: no tags


def test_compare():
    ref = np.array([[0.2, 0.8], [0.6, 0.4]])
    assert compare(ref, ref + 9e-7, True).passed
    failed = compare(ref, ref + np.array([[2e-6, -2e-6], [0, 0]]), True)
    assert not failed.passed and failed.max_abs_delta == pytest.approx(2e-6) and "limit 1e-06" in failed.reason
    tie = np.array([[0.5 + 1e-7, 0.5 - 1e-7]])
    flipped = compare(tie, tie[:, ::-1], True)
    assert not flipped.passed and flipped.class_mismatches == 1  # within 1e-6 but another class
    assert not compare(ref, ref[:1], True).passed
    assert "non-finite" in compare(ref, np.array([[np.nan, 1.0], [0.6, 0.4]]), True).reason
    values = np.array([1e6, -3.0, 0.5])
    assert compare(values, values * (1 + 5e-7), False).passed  # relative for a regressor
    assert not compare(values, values + np.array([0, 0, 1e-6]), False).passed  # 2e-6 relative on 0.5
    assert Parity(False, reason="x").summary() == "failed: x"


def test_edge_cases_cover_nulls_unseen_and_bounds(data):
    train_X, train_y, holdout = data
    pipeline = build_model(CONFIG, "logistic_regression", {"C": 1.0}, 42).fit(train_X, train_y)
    cases = edge_cases(pipeline, holdout, TEXT)
    assert list(cases.columns) == list(holdout.columns)
    assert cases.isna().all(axis=1).any()  # a row of nulls
    for column in holdout.columns:
        assert cases[column].isna().any(), column
    for column in CONFIG.categorical_features:
        known = set(holdout[column].dropna())
        assert set(cases[column].dropna()) - known, f"{column}: no unseen category"
        assert {NULL_TEXT, NAN_TEXT} <= set(cases[column].dropna()), f"{column}: no marker sent as text"
    clipper = pipeline[0].named_transformers_["numeric"].named_steps["clip"]
    for j, column in enumerate(CONFIG.numeric_features):
        upper = clipper.upper_bounds_[j]
        values = set(cases[column].dropna())
        assert upper in values and np.nextafter(upper, np.inf) in values, column
        assert max(values) >= 1e300 and min(values) <= -1e300
    assert (cases.dtypes[CONFIG.numeric_features] == "float64").all()


def test_null_text_is_fed_as_the_marker():
    form = OnnxForm.__new__(OnnxForm)
    form.inputs, form.text = ["t", "n"], [True, False]
    sent = np.array(["a", None, np.nan, NULL_TEXT, NAN_TEXT, "\x00x"], dtype=object)
    feeds = form.feeds(pd.DataFrame({"t": sent, "n": [1.0, np.nan] * 3}))
    assert feeds["t"].ravel().tolist() == ["a", NULL_TEXT, NAN_TEXT, UNSEEN_TEXT, UNSEEN_TEXT, UNSEEN_TEXT]
    assert feeds["n"].shape == (6, 1)


def _text_pipeline(categories: list[object], strategy: str = "most_frequent") -> tuple[Pipeline, pd.DataFrame]:
    """A logistic regression on a number and a text column `c` of these categories (None: a category too)."""
    rng = np.random.default_rng(0)
    text_values = np.array(categories, dtype=object)[rng.integers(0, len(categories), 600)]
    X = pd.DataFrame({"a": rng.normal(size=600), "c": text_values})
    y = ((X["a"] > 0) ^ X["c"].isin(categories[:1])).astype(int)
    text = Pipeline([("impute", SimpleImputer(strategy=strategy)), ("encode", OneHotEncoder(handle_unknown="ignore"))])
    pre = ColumnTransformer([("n", "passthrough", ["a"]), ("t", text, ["c"])])
    return Pipeline([("preprocess", pre), ("model", LogisticRegression())]).fit(X, y), X


@pytest.mark.parametrize("marker", [NULL_TEXT, NAN_TEXT, UNSEEN_TEXT, "\x00"])
def test_marker_strings_sent_as_text_are_unseen_categories_not_nulls(marker):
    """A client sending a marker's text (e.g. `NULL_TEXT` as a JSON string) gets the unseen category's scores."""
    pipeline, X = _text_pipeline(["x", "y", None])  # NaN imputed to "x", None a category, unseen: all zeros
    rows = X.head(4).reset_index(drop=True)
    expected = pipeline.predict_proba(rows.assign(c="never seen"))
    for null in (None, np.nan):  # the markers' meanings score otherwise here: a collision would show
        assert np.abs(expected - pipeline.predict_proba(rows.assign(c=null))).max() > 1e-3
    sent = rows.assign(c=marker)
    assert np.array_equal(pipeline.predict_proba(sent), expected)
    onnx_scores = OnnxForm(compile_onnx(pipeline, {"c"}), {"c"}, True).scores(sent)
    assert np.abs(onnx_scores - expected).max() <= 1e-6
    assert np.array_equal(ArrayForm(pipeline, {"c"}).scores(sent), expected)


def test_a_training_category_starting_with_the_marker_is_refused():
    pipeline, X = _text_pipeline(["x", NULL_TEXT, "y"])
    with pytest.raises(ConversionError, match="column 'c': category '\\\\x00null' starts with"):
        compile_onnx(pipeline, {"c"})
    check = compile_and_check(pipeline, X.head(50), {"c"})
    assert check.form == "pipeline" and not check.onnx.passed and not check.arrays.passed, check.line()
    # ... and an imputer's fill value too
    pipeline, X = _text_pipeline(["x", "y", None], strategy="constant")
    pipeline[0].named_transformers_["t"].named_steps["impute"].statistics_[0] = NAN_TEXT
    with pytest.raises(ConversionError, match="category '\\\\x00nan' starts with"):
        ArrayForm(pipeline, {"c"})


def test_card_shows_the_serving_form(data):
    from datetime import UTC, datetime

    from core.promotion.card import ModelCard
    from core.promotion.card_render import render_html, render_markdown

    train_X, train_y, holdout = data
    pipeline = build_model(CONFIG, "decision_tree", {"max_depth": 2}, 42).fit(train_X, train_y)
    line = compile_and_check(pipeline, holdout, TEXT).line()
    card = ModelCard(
        model_name="m",
        candidate_version="2",
        champion_version=None,
        verdict="promote",
        outcome="promoted",
        reasons=[],
        data_version="d",
        training_window=None,
        rows_train=1,
        rows_holdout=1,
        candidate_metrics={"roc_auc": 0.8},
        code_version="c",
        created_at=datetime(2026, 1, 1, tzinfo=UTC),
        inference=line,
    )
    assert "**Serving form:** compiled form (ONNX): parity passed (max \\|d\\| = " in render_markdown(card)
    assert "<dt>Serving form</dt><dd>compiled form (ONNX): parity passed (max |d| = " in render_html(card)
    assert '"inference": "compiled form (ONNX): parity passed' in card.to_json()


# --- real stack -------------------------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.slow
def test_served_champion_is_compiled_and_matches_the_registered_pipeline(stack, default_data, tmp_path):
    import os
    import shutil
    import sys

    import httpx
    import mlflow.artifacts
    import mlflow.sklearn
    import yaml

    from adapters.clients import mlflow_client, use_tracking_server
    from core.data.dataset import bundled_config_text
    from core.modeling.search import ModelFamily, SearchSpec
    from flows.training import TrainingParams, training
    from mlops.stack import running
    from tests.ports import free_port
    from tests.waiting import wait_for

    # Its own model (the bundled one's data and features), so the session's credit-risk keeps no champion
    # for the modules that start from a cold start, and its own serving API following it.
    model = "compiled-test"
    config = tmp_path / f"{model}.yaml"
    config.write_text(
        yaml.safe_dump(yaml.safe_load(bundled_config_text("credit-risk")) | {"name": model, "model_name": model})
    )
    search = SearchSpec(families=[ModelFamily.hist_gradient_boosting], trials_per_family=1, cv_folds=2)
    state = training(TrainingParams(dataset=str(config), search=search), return_state=True)
    assert state.is_completed(), state.message
    outcome = state.result()
    assert outcome.promoted
    version = outcome.candidate_version
    client = mlflow_client(stack)
    tags = client.get_model_version(model, version).tags
    assert tags["inference_form"] == "onnx" and tags["compiled_parity"] == "passed"
    assert {a.path for a in client.list_artifacts(outcome.run_id, "compiled")} == {
        "compiled/model.onnx",
        "compiled/parity.json",
    }
    run = client.get_run(outcome.run_id)
    assert run.data.metrics["compiled_parity_passed"] == 1.0
    use_tracking_server(stack)
    review = json.loads(mlflow.artifacts.load_text(f"runs:/{outcome.run_id}/review/review.json"))
    assert review["inference"].startswith("compiled form (ONNX): parity passed (max |d| = "), review["inference"]
    card = mlflow.artifacts.load_text(f"runs:/{outcome.run_id}/model_card/model_card.md")
    assert "**Serving form:** " + review["inference"].replace("|", "\\|") in card  # a Markdown-escaped cell
    port = free_port()
    mlops = shutil.which("mlops", path=os.path.dirname(sys.executable))
    command = [mlops, "serve", "--port", str(port), "--model", model, "--workers", "2"]
    server = running(command, f"http://127.0.0.1:{port}/health", dict(os.environ), tmp_path / "serving.log")
    url = f"http://127.0.0.1:{port}"
    with server:
        wait_for(lambda: httpx.get(f"{url}/ready", timeout=5).status_code == 200, 90, "every process to load it")
        _served_is_compiled_and_exact(url, model, version)


def _served_is_compiled_and_exact(url: str, model: str, version: str) -> None:
    """What the serving API at `url` says and answers for `model` v`version` (compiled, within 1e-6)."""
    import httpx
    import mlflow.sklearn
    from prometheus_client.parser import text_string_to_metric_families

    assert httpx.get(f"{url}/model", timeout=5).json()["version"] == version
    described = httpx.get(f"{url}/model", timeout=5).json()
    assert described["inference"]["form"] == "onnx", described["inference"]
    assert described["inference"]["parity"]["compiled"] == "passed"
    httpx.post(f"{url}/reload", timeout=30)  # answers once every worker process serves the same version
    forms: dict[str, dict[str, float]] = {}  # pid -> form -> value, over every live worker process
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=5).text):
        for sample in family.samples if family.name == "mlops_serving_inference_form" else []:
            if sample.labels.get("model") != model:  # other served models' series are not this one's
                continue
            forms.setdefault(sample.labels.get("pid", "-"), {})[sample.labels["form"]] = sample.value
    assert forms and all(f["onnx"] == 1.0 and f["pipeline"] == 0.0 for f in forms.values()), forms

    # The API's probabilities against the registered pipeline's own predict_proba, on raw rows plus every edge
    # case (nulls in each column, all-null rows, unseen categories, the compiled form's markers sent as text),
    # in requests of at most the server's limit of records.
    from adapters.settings import get_settings

    pipeline = mlflow.sklearn.load_model(f"models:/{model}/{version}")
    holdout = prepare_inputs(generate_frame(300, seed=11), CONFIG)
    cases = edge_cases(pipeline, holdout, TEXT)
    frame = pd.concat([holdout, cases], ignore_index=True)
    frame = frame[np.isfinite(frame[CONFIG.numeric_features].fillna(0)).all(axis=1)]
    assert len(frame) == len(holdout) + len(cases)  # every edge case is finite: none is left out
    records = json.loads(frame.to_json(orient="records", double_precision=15))
    frame = pd.DataFrame(records)[list(holdout.columns)]  # exactly what the API received
    frame = prepare_inputs(frame.assign(**{c: frame[c].astype(object) for c in CONFIG.categorical_features}), CONFIG)
    assert frame.isna().all(axis=1).any() and (frame[list(TEXT)] == NULL_TEXT).any().all()
    limit = get_settings().serving_max_records  # what the server, started from the same environment, allows
    predictions = []
    for start in range(0, len(records), limit):
        answer = httpx.post(f"{url}/predict", json={"records": records[start : start + limit]}, timeout=60)
        assert answer.status_code == 200, answer.text
        predictions += answer.json()["predictions"]
    classes = [str(c) for c in pipeline.classes_]
    served = np.array([[p["probabilities"][c] for c in classes] for p in predictions])
    expected = pipeline.predict_proba(frame)
    assert served.shape == expected.shape
    assert np.abs(served - expected).max() <= 1e-6
    assert (served.argmax(axis=1) == expected.argmax(axis=1)).all()


@pytest.mark.parametrize("family", ["hist_gradient_boosting", "logistic_regression"])
def test_onnx_fed_decoded_columns_equals_frame_fed_and_the_pipeline(data, family):
    """The serving path (JSON body -> msgspec structs -> column arrays -> ONNX, no DataFrame) scores exactly
    as the frame-fed session does, and within the parity limit of scikit-learn's own `predict_proba`,
    on the holdout plus the edge cases (nulls, unseen categories, clip bounds, +-1e300, signed zeros)."""
    import orjson

    from serving.model import LoadedModel

    train_X, train_y, holdout = data
    params = dict(FAMILIES)[family]
    pipeline = build_model(CONFIG, family, params, 42).fit(train_X, train_y)
    frame = pd.concat([holdout, edge_cases(pipeline, holdout, TEXT)], ignore_index=True)
    form = OnnxForm(compile_onnx(pipeline, TEXT), TEXT, True)
    columns = [Column(c, "text" if c in TEXT else "numeric") for c in frame.columns]
    served = LoadedModel("m", "1", pipeline, columns, list(pipeline.classes_), inference=form)
    records = [
        {c: (None if isinstance(v, float) and np.isnan(v) else v) for c, v in row.items()}
        for row in frame.to_dict(orient="records")
    ]
    body = orjson.dumps({"records": records})
    decoded = served.adapter.decode(body, len(records))
    assert decoded is not None  # the one-pass decoder took every row, edge cases included
    arrays = served.columns_of(decoded[1])
    assert all(isinstance(a, np.ndarray) for a in arrays.values()) and set(arrays) == set(frame.columns)
    from_arrays = served.scores(arrays)
    from_dicts = served.scores(served.columns_of(records))  # the step-by-step path's records (dicts)
    from_frame = form.scores(frame)
    assert np.array_equal(from_arrays, from_frame) and np.array_equal(from_dicts, from_frame)
    expected = pipeline.predict_proba(frame)
    assert np.abs(from_arrays - expected).max() <= 1e-6
    assert (from_arrays.argmax(axis=1) == expected.argmax(axis=1)).all()
    # one record at a time, as most requests come: the same scores, row by row
    for i in (0, len(holdout), len(frame) - 1):
        one = served.scores(served.columns_of(served.adapter.decode(orjson.dumps({"records": [records[i]]}), 1)[1]))
        assert np.array_equal(one, from_frame[i : i + 1])
