"""High-cardinality categories: target encoding (scikit-learn's `TargetEncoder`, cross-fitted) in training, serving,
the compiled form and drift monitoring.

Units, all in-process and fast: the encoder's `transform` against an independent textbook computation of the
smoothed mean (pandas groupby, empirical Bayes shrinkage), its cross-fitted training encodings against a
hand-made fold computation, unseen and null values answered through the serving model's own request path, ONNX
and exact-array parity on a 2,000-value column for binary, multiclass and regression (and the fallback when a
pipeline cannot be compiled), a model that uses the column against the same model without it, and drift on a
column of thousands of values.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import r2_score, roc_auc_score
from sklearn.model_selection import KFold, StratifiedKFold

from core.data.dataset import DatasetConfig
from core.data.features import TARGET_ENCODER_FOLDS, build_preprocessor, target_encoded_features
from core.inference.compiled import (
    NULL_TEXT,
    ArrayForm,
    ConversionError,
    OnnxForm,
    compile_and_check,
    compile_onnx,
    edge_cases,
)
from core.modeling.explain import PermutationBudget, permutation_importances
from core.modeling.search import build_model
from core.modeling.signature import Column
from core.monitoring.drift import DriftThresholds, column_drift, column_partial, column_reference, drift_from_partial
from core.monitoring.drift_statistics import MAX_CATEGORIES, OTHER, categorical_bins
from serving.model import LoadedModel, choose_inference

SEED = 11
TASKS = ["binary", "multiclass", "regression"]
CLASSES = {"binary": [0, 1], "multiclass": ["a", "b", "c"], "regression": None}
TEXT = {"merchant", "colour"}
NULL = "<null>"  # a null category's key in the textbook tables


def _config(task: str, merchant: bool = True) -> DatasetConfig:
    features = [{"name": "x", "type": "numeric"}, {"name": "colour", "type": "categorical"}]
    if merchant:  # no categories listed: target-encoded only because it says so
        features.insert(1, {"name": "merchant", "type": "categorical", "encoding": "target"})
    return DatasetConfig.model_validate(
        {
            "name": "enc",
            "model_name": "enc",
            "source": "/enc.csv",
            "format": "csv",
            "target": "y",
            "task": task,
            "classes": CLASSES[task],
            "id_column": "id",
            "features": features,
        }
    )


def _table(task: str, rows: int, merchants: int = 2000, seed: int = 0, nulls: float = 0.03) -> pd.DataFrame:
    """Prepared inputs plus `y`: the merchant carries most of the signal (an effect per merchant), x a little."""
    rng = np.random.default_rng(seed)
    names = np.array([f"m{i:04d}" for i in range(merchants)], dtype=object)
    effect = np.random.default_rng(99).normal(0, 1.5, merchants)  # the same merchants' effects in every table
    which = rng.integers(0, merchants, rows)
    x = rng.normal(size=rows)
    frame = pd.DataFrame(
        {"x": x, "merchant": names[which], "colour": rng.choice(np.array(["red", "green", "blue"], dtype=object), rows)}
    )
    frame.loc[rng.random(rows) < nulls, "merchant"] = None
    frame["merchant"] = frame["merchant"].astype(object).where(frame["merchant"].notna(), None)
    signal = np.where(frame["merchant"].isna(), 0.8, effect[which]) + 0.4 * x + rng.normal(0, 0.7, rows)
    if task == "binary":
        frame["y"] = (signal > 0).astype("int64")
    elif task == "multiclass":
        frame["y"] = np.array(["a", "b", "c"], dtype=object)[np.digitize(signal, [-0.8, 0.8])]
    else:
        frame["y"] = 100 + 20 * signal
    return frame


def _xy(frame: pd.DataFrame) -> tuple[pd.DataFrame, pd.Series]:
    return frame[["x", "merchant", "colour"]], frame["y"]


def _targets(y: pd.Series, task: str) -> dict[str, np.ndarray]:
    """What the encoder averages: the positive class's indicator, each class's, or the value."""
    if task == "binary":
        return {"1": (y.to_numpy() == 1).astype(float)}
    if task == "multiclass":
        return {c: (y.to_numpy() == c).astype(float) for c in CLASSES["multiclass"]}
    return {"value": y.to_numpy(dtype=float)}


def _textbook(values: pd.Series, target: np.ndarray) -> tuple[dict[object, float], float]:
    """Per category, the smoothed mean of `smooth="auto"` (scikit-learn's user guide): empirical Bayes shrinkage.

    encoding(c) = lambda_c * mean_c + (1 - lambda_c) * mean, lambda_c = n_c / (n_c + sigma_c^2 / tau^2), where
    sigma_c^2 is the target's variance within c and tau^2 its variance overall (both population variances).
    Returns the table (a null as None) and the overall mean, the encoding of a value never seen.
    """
    keys = values.map(lambda v: NULL if v is None else v)
    frame = pd.DataFrame({"c": keys.to_numpy(), "t": target})
    groups = frame.groupby("c")["t"].agg(n="count", mean="mean", var=lambda s: s.var(ddof=0))
    mean, tau2 = float(target.mean()), float(target.var())
    lam = groups["n"] * tau2 / (groups["n"] * tau2 + groups["var"])
    encoding = lam * groups["mean"] + (1 - lam) * mean
    return {None if c == NULL else c: float(v) for c, v in encoding.items()}, mean


def _encoded(preprocess, X: pd.DataFrame, task: str) -> np.ndarray:
    """The merchant's columns of the fitted preprocessing's output (one, or one per class)."""
    names = list(preprocess.get_feature_names_out())
    wanted = ["merchant"] if task != "multiclass" else [f"merchant_{c}" for c in CLASSES["multiclass"]]
    return preprocess.transform(X)[:, [names.index(n) for n in wanted]]


def _family(task: str) -> tuple[str, dict]:
    return ("ridge", {"alpha": 1.0}) if task == "regression" else ("logistic_regression", {"C": 1.0})


# --- the encoding itself ------------------------------------------------------------------------------------


def test_a_categorical_feature_is_target_encoded_when_it_says_so_or_lists_many_categories():
    config = _config("binary")
    assert target_encoded_features(config) == ["merchant"]
    listed = config.model_dump(mode="json")
    listed["features"][1] = {"name": "merchant", "type": "categorical", "categories": [f"m{i}" for i in range(51)]}
    assert target_encoded_features(DatasetConfig.model_validate(listed)) == ["merchant"]
    listed["features"][1]["encoding"] = "one_hot"
    assert target_encoded_features(DatasetConfig.model_validate(listed)) == []
    transformers = {name: columns for name, _, columns in build_preprocessor(config, SEED).transformers}
    assert transformers["target"] == ["merchant"] and transformers["categorical"] == ["colour"]
    assert "target" not in {name for name, _, _ in build_preprocessor(_config("binary", merchant=False)).transformers}


@pytest.mark.parametrize("task", TASKS)
def test_transform_equals_the_textbook_smoothed_mean(task):
    X, y = _xy(_table(task, 3000, merchants=300))
    family, params = _family(task)
    pipeline = build_model(_config(task), family, params, SEED).fit(X, y)
    encoder = pipeline[0].named_transformers_["target"]["encode"]
    assert encoder.target_type_ == {"binary": "binary", "multiclass": "multiclass", "regression": "continuous"}[task]

    # every category seen (None among them: a null is a category of its own here), and one never seen
    probe = pd.DataFrame({"x": 0.0, "merchant": [*X["merchant"].drop_duplicates(), "never seen"], "colour": "red"})
    probe["merchant"] = probe["merchant"].astype(object).where(probe["merchant"].notna(), None)
    got = _encoded(pipeline[0], probe, task)
    for k, target in enumerate(_targets(y, task).values()):
        table, mean = _textbook(X["merchant"], target)
        expected = np.array([table.get(v, mean) for v in probe["merchant"]])
        assert expected[-1] == mean and None in table  # the unseen row expects the mean; nulls were seen
        np.testing.assert_allclose(got[:, k], expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("task", TASKS)
def test_training_rows_are_cross_fitted_never_encoded_with_their_own_target(task):
    X, y = _xy(_table(task, 2000, merchants=400, seed=1))
    preprocess = build_preprocessor(_config(task), SEED)
    names = list(preprocess.fit(X, y).get_feature_names_out())  # `fit`: encodings learnt on every row
    wanted = [n for n in names if n.startswith("merchant")]
    columns = [names.index(n) for n in wanted]
    fitted = preprocess.transform(X)[:, columns]
    trained = build_preprocessor(_config(task), SEED).fit_transform(X, y)[:, columns]  # what fitting the model sees

    # the same folds as the encoder's (seeded), each fold's rows encoded from the other folds alone
    splitter = KFold if task == "regression" else StratifiedKFold
    folds = splitter(n_splits=TARGET_ENCODER_FOLDS, shuffle=True, random_state=SEED).split(X, y)
    expected = np.empty_like(trained)
    for train, valid in folds:
        for k, target in enumerate(_targets(y.iloc[train], task).values()):
            table, mean = _textbook(X["merchant"].iloc[train], target)
            expected[valid, k] = [table.get(v, mean) for v in X["merchant"].iloc[valid]]
    np.testing.assert_allclose(trained, expected, rtol=1e-12, atol=1e-12)
    assert (np.abs(trained - fitted) > 1e-9).any(axis=1).mean() > 0.3  # not the all-rows encodings

    # A merchant seen once: the all-rows encoding is that row's own target (no spread within it, so no
    # shrinkage), the leak cross-fitting avoids; in training it is encoded as if unseen, by its fold's mean.
    counts = X["merchant"].value_counts()
    single = np.flatnonzero(X["merchant"].isin(counts.index[counts == 1]).to_numpy())
    assert len(single) > 10
    own = np.column_stack(list(_targets(y, task).values()))
    np.testing.assert_allclose(fitted[single], own[single], rtol=1e-12, atol=1e-12)
    folds = list(splitter(n_splits=TARGET_ENCODER_FOLDS, shuffle=True, random_state=SEED).split(X, y))
    for row in single:
        train = next(t for t, v in folds if row in v)
        means = [target.mean() for target in _targets(y.iloc[train], task).values()]
        np.testing.assert_allclose(trained[row], means, rtol=1e-12)


def test_changing_a_rows_target_leaves_its_own_training_encoding_unchanged():
    """Regression folds do not depend on the target: a row's training encoding cannot depend on its own target."""
    X, y = _xy(_table("regression", 1500, merchants=100, seed=2))
    column = list(build_preprocessor(_config("regression"), SEED).fit(X, y).get_feature_names_out()).index("merchant")
    before = build_preprocessor(_config("regression"), SEED).fit_transform(X, y)[:, column]
    for row in (3, 70, 500):
        changed = y.copy()
        changed.iloc[row] += 1000.0
        after = build_preprocessor(_config("regression"), SEED).fit_transform(X, changed)[:, column]
        assert after[row] == before[row]
        assert not np.array_equal(after, before)  # the other folds' rows of its merchant see the change


# --- serving: unseen values and nulls ---------------------------------------------------------------------------


def _served(pipeline, holdout: pd.DataFrame, classes: list) -> tuple[LoadedModel, dict]:
    """The model as serving loads it: the form training found exact, re-checked on a probe."""
    check = compile_and_check(pipeline, holdout, TEXT, seed=SEED)
    columns = [Column(c, "text" if c in TEXT else "numeric") for c in holdout.columns]
    inference, facts = choose_inference(pipeline, columns, check.tags(), "run", holdout.head(20), lambda _: check.model)
    return LoadedModel("enc", "1", pipeline, columns, classes, inference=inference), facts


def _request(model: LoadedModel, records: list[dict]) -> np.ndarray:
    """A request body through the serving path: decoded and checked, then scored by the served form."""
    decoded = model.adapter.decode(json.dumps({"records": records}).encode(), max_records=100)
    assert decoded is not None
    return model.scores(model.columns_of(decoded[1]))


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("with_nulls", [True, False], ids=["nulls-seen", "no-nulls-seen"])
def test_unseen_and_null_values_are_answered_with_the_encoders_fallback(task, with_nulls):
    frame = _table(task, 3000, merchants=500, seed=3, nulls=0.05 if with_nulls else 0.0)
    X, y = _xy(frame)
    family, params = _family(task)
    pipeline = build_model(_config(task), family, params, SEED).fit(X.iloc[:2500], y.iloc[:2500])
    classes = list(getattr(pipeline, "classes_", []))
    model, facts = _served(pipeline, X.iloc[2500:].reset_index(drop=True), classes)
    assert model.form == "onnx" and "fallbacks" not in facts

    encoder = pipeline[0].named_transformers_["target"]["encode"]
    known = str(X["merchant"].dropna().iloc[0])
    records = [
        {"x": 0.3, "merchant": known, "colour": "red"},
        {"x": 0.3, "merchant": "a merchant never seen", "colour": "red"},
        {"x": 0.3, "merchant": None, "colour": "red"},
        {"x": 0.3, "merchant": NULL_TEXT, "colour": "red"},  # a marker sent as text is an unseen value
    ]
    served = _request(model, records)

    # the model's inputs built by hand: the known row's, with the merchant's encoding replaced
    base = pipeline[0].transform(pd.DataFrame([records[0]]))
    names = list(pipeline[0].get_feature_names_out())
    columns = [i for i, n in enumerate(names) if n.startswith("merchant")]
    mean = np.atleast_1d(encoder.target_mean_)
    categories = list(encoder.categories_[0])
    null = np.array([e[categories.index(None)] for e in encoder.encodings_]) if with_nulls else mean
    assert (None in categories) == with_nulls
    rows = np.repeat(base, 4, axis=0)
    rows[1, columns], rows[2, columns], rows[3, columns] = mean, null, mean
    estimator = pipeline[-1]
    expected = estimator.predict_proba(rows) if classes else estimator.predict(rows)
    np.testing.assert_allclose(served, expected, rtol=1e-9, atol=1e-9)
    # ... and what the plain pipeline answers for the same records
    plain = LoadedModel("enc", "1", pipeline, model.columns, classes)
    np.testing.assert_allclose(_request(plain, records), expected, rtol=1e-12, atol=1e-12)
    if with_nulls:  # the learnt null encoding is not the mean, so the two fallbacks are told apart
        assert np.abs(null - mean).max() > 1e-3


def test_a_target_encoded_pipeline_is_saved_and_loaded_by_skops():
    import skops.io

    from core.transformers import skops_trusted_types

    X, y = _xy(_table("binary", 1500, merchants=200, seed=4))
    pipeline = build_model(_config("binary"), "logistic_regression", {"C": 1.0}, SEED).fit(X, y)
    data = skops.io.dumps(pipeline)
    loaded = skops.io.loads(data, trusted=skops_trusted_types(pipeline))
    assert np.array_equal(loaded.predict_proba(X), pipeline.predict_proba(X))


# --- the compiled form ------------------------------------------------------------------------------------------


FAMILIES = {
    "binary": [("hist_gradient_boosting", {"max_iter": 40}), ("logistic_regression", {"C": 1.0})],
    "multiclass": [("hist_gradient_boosting", {"max_iter": 30}), ("logistic_regression", {"C": 1.0})],
    "regression": [("hist_gradient_boosting", {"max_iter": 40}), ("ridge", {"alpha": 1.0})],
}


@pytest.mark.parametrize(
    ("task", "family", "params"), [(t, f, p) for t in TASKS for f, p in FAMILIES[t]], ids=lambda v: str(v)[:24]
)
def test_compiled_form_matches_the_pipeline_on_a_2000_value_column(task, family, params):
    frame = _table(task, 6000, merchants=2000, seed=5)
    X, y = _xy(frame)
    train_X, train_y, holdout = X.iloc[:5000], y.iloc[:5000], X.iloc[5000:].reset_index(drop=True)
    pipeline = build_model(_config(task), family, params, SEED).fit(train_X, train_y)
    started = time.perf_counter()
    check = compile_and_check(pipeline, holdout, TEXT, seed=SEED)
    assert time.perf_counter() - started < 20
    assert check.form == "onnx" and check.onnx.passed and check.arrays.passed, check.line()
    assert check.arrays.max_abs_delta == 0  # the array form is bit-identical
    assert check.onnx.max_abs_delta <= 1e-9 and (check.onnx.max_rel_delta or 0) <= 1e-9, check.line()
    assert "compiled_failure" not in check.tags()

    # the edge cases cover the target encoder's categories (sampled), nulls, unseen values and markers
    cases = edge_cases(pipeline, holdout, TEXT, SEED)
    seen = set(cases["merchant"].dropna())
    assert len(seen & set(train_X["merchant"].dropna())) >= 400 and "UNSEEN category" in seen
    assert cases["merchant"].isna().any()
    onnx = OnnxForm(check.model, TEXT, task != "regression").scores(cases)
    reference = pipeline.predict_proba(cases) if task != "regression" else pipeline.predict(cases)
    np.testing.assert_allclose(onnx, reference, rtol=1e-9, atol=1e-9)
    assert np.array_equal(ArrayForm(pipeline, TEXT).scores(cases), reference)


def test_the_compiled_encodings_are_the_fitted_float64_numbers():
    """The ONNX graph holds the encoder's encodings as float64 (skl2onnx's own converter would round to float32)."""
    import onnx
    from onnx import numpy_helper

    X, y = _xy(_table("regression", 3000, merchants=1000, seed=6))
    pipeline = build_model(_config("regression"), "ridge", {"alpha": 1.0}, SEED).fit(X, y)
    graph = onnx.load_from_string(compile_onnx(pipeline, TEXT)).graph
    tables = [numpy_helper.to_array(i) for i in graph.initializer if "encodings" in i.name]
    encoder = pipeline[0].named_transformers_["target"]["encode"]
    assert len(tables) == 1 and tables[0].dtype == np.float64
    assert np.array_equal(tables[0][:-1, 0], encoder.encodings_[0]) and tables[0][-1, 0] == encoder.target_mean_


def test_a_pipeline_that_cannot_be_compiled_is_served_by_the_pipeline_and_says_why():
    """A category with the compiled forms' marker cannot be compiled: both fast forms fail, serving says so."""
    frame = _table("binary", 2000, merchants=300, seed=7)
    frame.loc[frame.index[:30], "merchant"] = "\x00odd"
    X, y = _xy(frame)
    pipeline = build_model(_config("binary"), "logistic_regression", {"C": 1.0}, SEED).fit(X, y)
    with pytest.raises(ConversionError, match="column 'merchant': category '\\\\x00odd' starts with"):
        compile_onnx(pipeline, TEXT)
    check = compile_and_check(pipeline, X.head(200), TEXT, seed=SEED)
    assert check.form == "pipeline" and check.model is None and not check.onnx.passed
    assert "ConversionError: column 'merchant': category" in check.line()
    assert check.line().endswith("serving uses the exact pipeline (the plain pipeline)")
    tags = check.tags()
    assert tags["inference_form"] == "pipeline" and tags["compiled_parity"] == "failed"
    assert tags["compiled_failure"].startswith("ConversionError: column 'merchant': category")
    columns = [Column(c, "text" if c in TEXT else "numeric") for c in X.columns]
    inference, facts = choose_inference(pipeline, columns, tags, "run", X.head(20), lambda _: b"")
    assert inference is None and facts["compiled"] == "failed"
    model = LoadedModel("enc", "1", pipeline, columns, [0, 1], inference=inference)
    records = [{"x": 0.1, "merchant": "\x00odd", "colour": "red"}, {"x": 0.1, "merchant": "new", "colour": "red"}]
    assert model.form == "pipeline"
    assert np.array_equal(_request(model, records), pipeline.predict_proba(pd.DataFrame(records)))


# --- the column is used -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", ["binary", "regression"])
def test_a_2000_value_column_carrying_the_signal_makes_the_model_better(task):
    frame = _table(task, 24000, merchants=2000, seed=8)
    X, y = _xy(frame)
    train, holdout = slice(0, 18000), slice(18000, None)
    family, params = _family(task)
    scores = {}
    for merchant in (True, False):
        config = _config(task, merchant=merchant)
        inputs = X[config.feature_names]
        model = build_model(config, family, params, SEED).fit(inputs.iloc[train], y.iloc[train])
        if task == "binary":
            scores[merchant] = roc_auc_score(y.iloc[holdout], model.predict_proba(inputs.iloc[holdout])[:, 1])
        else:
            scores[merchant] = r2_score(y.iloc[holdout], model.predict(inputs.iloc[holdout]))
    assert scores[True] > scores[False] + 0.15, scores
    # ... and the explanations name it: shuffling the merchant costs the most
    importances = permutation_importances(
        model := build_model(_config(task), family, params, SEED).fit(X.iloc[train], y.iloc[train]),
        X.iloc[holdout],
        y.iloc[holdout],
        scoring="roc_auc" if task == "binary" else "r2",
        budget=PermutationBudget(n_repeats=2, max_rows=2000),
    )
    assert importances["feature"].iloc[0] == "merchant", importances
    assert model[0].get_feature_names_out().tolist() == ["x", "colour_blue", "colour_green", "colour_red", "merchant"]


# --- drift ------------------------------------------------------------------------------------------------------


def test_drift_of_a_column_of_thousands_of_values_is_bounded_and_not_noise():
    rng = np.random.default_rng(9)
    names = np.array([f"m{i}" for i in range(3000)], dtype=object)
    shares = rng.dirichlet(np.full(3000, 0.5))
    reference = pd.Series(names[rng.choice(3000, 5000, p=shares)], dtype=object)
    same = pd.Series(names[rng.choice(3000, 1000, p=shares)], dtype=object)
    top = np.argsort(-shares)[:10]
    moved_shares = shares.copy()
    moved_shares[top] *= 8
    moved = pd.Series(names[rng.choice(3000, 1000, p=moved_shares / moved_shares.sum())], dtype=object)
    thresholds = DriftThresholds()

    started = time.perf_counter()
    unchanged = column_drift("merchant", "categorical", reference, same, thresholds)
    shifted = column_drift("merchant", "categorical", reference, moved, thresholds)
    assert time.perf_counter() - started < 2
    assert not unchanged.drifted and unchanged.psi < 0.2, unchanged  # thousands of sparse bins read ~1.4 here
    assert shifted.drifted, shifted
    bins = categorical_bins(reference, same)
    assert len(bins.labels) == MAX_CATEGORIES + 1 and bins.labels[-1] == OTHER
    assert bins.reference.sum() == 5000 and bins.current.sum() == 1000

    # the partitioned path (counts merged over partitions) gives the same figures
    ref = column_reference("merchant", "categorical", reference)
    partial = column_partial(ref, same.iloc[:400]).merge(column_partial(ref, same.iloc[400:]))
    merged = drift_from_partial(ref, partial, thresholds)
    assert merged.psi == pytest.approx(unchanged.psi) and merged.p_value == pytest.approx(unchanged.p_value)
    assert merged.effect == pytest.approx(unchanged.effect) and merged.drifted == unchanged.drifted

    # a handful of categories is compared one by one, as before
    small = categorical_bins(["a", "b", "b"], ["a", "c"])
    assert small.labels == ["a", "b", "c"]
