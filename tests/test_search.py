"""The model search, without servers: the shipped model is the chosen trial's, ranges fit the data, seeds repeat."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest
from sklearn.base import clone
from sklearn.datasets import load_diabetes, load_wine

from core.data.dataset import DatasetConfig
from core.modeling.calibration import apply_calibrators, base_classifier, calibration_method, responses_of, uncalibrated
from core.modeling.search import (
    DataShape,
    ModelFamily,
    SearchSpec,
    Trial,
    base_estimator,
    choose,
    make_pipeline,
    search_models,
)


def _table(loader, task: str, extra_categorical: bool = False) -> tuple[pd.DataFrame, DatasetConfig]:
    frame = loader(as_frame=True).frame.rename(columns=lambda c: c.replace(" ", "_").replace("/", "_"))
    frame.insert(0, "row_id", [f"r{i:05d}" for i in range(len(frame))])
    features = [{"name": c, "type": "numeric"} for c in frame.columns if c not in ("row_id", "target")]
    if extra_categorical:
        rng = np.random.default_rng(1)
        frame["colour"] = rng.choice(np.array(["red", "white", None], dtype=object), size=len(frame))
        features.append({"name": "colour", "type": "categorical"})
    config = DatasetConfig(
        name="t", model_name="t", source="unused", target="target", task=task, id_column="row_id", features=features
    )
    return frame.sample(frac=1, random_state=3).reset_index(drop=True), config


ALL_CLASSIFIERS = [ModelFamily.hist_gradient_boosting, ModelFamily.logistic_regression, ModelFamily.random_forest]


@pytest.fixture(scope="module")
def wine_search():
    frame, config = _table(load_wine, "multiclass", extra_categorical=True)
    spec = SearchSpec(families=ALL_CLASSIFIERS, trials_per_family=5, cv_folds=3)
    return frame, config, spec, search_models(frame, config, spec, seed=11)


def test_the_shipped_model_has_exactly_the_chosen_trials_parameters(wine_search):
    frame, config, _, result = wine_search
    # the chosen trial is the best complete one, and the result reports its parameters
    complete = [t for t in result.trials if t.state == "complete"]
    best = max(complete, key=lambda t: t.cv_mean)
    assert (result.family, result.params, result.cv_mean) == (best.family, best.params, best.cv_mean)
    # the fitted estimator carries those parameters (the bug: it carried the family's last trial's), inside the
    # calibration when one was chosen
    estimator = base_classifier(result.model)
    assert type(estimator) is type(base_estimator(ModelFamily(best.family), True, 11))
    assert {k: estimator.get_params()[k] for k in result.params} == result.params
    # and it predicts exactly like a pipeline built independently from those parameters on the same rows
    reference = make_pipeline(
        config, clone(base_estimator(ModelFamily(best.family), True, 11)).set_params(**best.params)
    )
    from core.data.features import prepare_inputs, prepare_target

    X, y = prepare_inputs(frame, config), prepare_target(frame, config)
    reference.fit(X, y)
    np.testing.assert_array_equal(reference.predict_proba(X), uncalibrated(result.model).predict_proba(X))
    # the shipped probabilities are that pipeline's, through the chosen calibration if any (on this search a
    # strongly regularised, under-confident logistic regression wins and sigmoid calibration is chosen)
    assert result.calibration is not None and calibration_method(result.model) == result.calibration.method
    assert [name for name, _ in result.model.steps] == ["preprocess", "model"]
    if result.calibration.method == "none":
        assert uncalibrated(result.model) is result.model
    else:
        n_classes = len(reference.classes_)
        calibrated = apply_calibrators(result.calibration.calibrators, responses_of(reference, X), n_classes)
        np.testing.assert_array_equal(calibrated, result.model.predict_proba(X))
        assert result.calibration.brier_after < result.calibration.brier_before


def test_every_family_gets_its_trials_and_they_are_logged(wine_search):
    _, _, spec, result = wine_search
    families = [t.family for t in result.trials]
    assert families == [f.value for f in ALL_CLASSIFIERS for _ in range(spec.trials_per_family)]
    assert [t.number for t in result.trials] == list(range(len(result.trials)))
    table = result.trials_frame()
    assert {"number", "family", "state", "folds", "cv_mean", "cv_std", "seconds"} <= set(table.columns)
    assert set(table["state"]) <= {"complete", "pruned", "degenerate"}
    # pruned trials stopped before the last fold; complete ones scored every fold
    assert (table.loc[table["state"] == "complete", "folds"] == spec.cv_folds).all()
    assert (table.loc[table["state"] == "pruned", "folds"] < spec.cv_folds).all()


def test_leaf_sizes_never_exceed_half_the_smallest_class_of_a_fold(wine_search):
    frame, _, spec, result = wine_search
    smallest = frame["target"].value_counts().min()  # 48 rows; about 32 per training fold with 3 folds
    bound = smallest * (spec.cv_folds - 1) // spec.cv_folds // 2 + 1
    leaves = [t.params["min_samples_leaf"] for t in result.trials if "min_samples_leaf" in t.params]
    assert leaves and max(leaves) <= bound
    assert DataShape(fold_rows=200, smallest_class=7).max_leaf == 3
    assert DataShape(fold_rows=4000, smallest_class=None).max_leaf == 200
    assert DataShape(fold_rows=60, smallest_class=None).max_leaf == 3


def test_same_seed_same_data_same_trials_and_choice(wine_search):
    frame, config, spec, result = wine_search
    again = search_models(frame, config, spec, seed=11)
    assert [(t.family, t.params, t.cv_mean, t.state) for t in again.trials] == [
        (t.family, t.params, t.cv_mean, t.state) for t in result.trials
    ]
    assert (again.family, again.params) == (result.family, result.params)
    other = search_models(frame, config, spec, seed=12)
    assert [t.params for t in other.trials] != [t.params for t in result.trials]


def test_regression_search_ranks_by_rmse_and_ships_the_chosen_model():
    frame, config = _table(load_diabetes, "regression")
    result = search_models(frame, config, SearchSpec(trials_per_family=3, cv_folds=3), seed=5)
    assert (result.scoring, result.metric) == ("neg_root_mean_squared_error", "rmse")
    assert {t.family for t in result.trials} == {"ridge", "hist_gradient_boosting"}
    assert result.cv_metric == -result.cv_mean > 0
    # diabetes' target has a standard deviation of about 77: any sensible model beats the mean's RMSE
    assert result.cv_metric < -result.baseline
    estimator = result.model.named_steps["model"]
    assert {k: estimator.get_params()[k] for k in result.params} == result.params
    assert not hasattr(result.model, "predict_proba")
    assert result.calibration is None  # probabilities only


@pytest.mark.parametrize(("loader", "task"), [(load_wine, "multiclass"), (load_diabetes, "regression")])
def test_lightgbm_is_one_family_among_the_others_and_goes_where_models_go(loader, task):
    import skops.io

    from core.data.features import prepare_inputs
    from core.inference.compiled import compile_and_check
    from core.transformers import skops_trusted_types

    # Given a table with a categorical column, when the search tries lightgbm beside another family
    frame, config = _table(loader, task, extra_categorical=True)
    other = ModelFamily.random_forest
    spec = SearchSpec(families=[other, ModelFamily.lightgbm], trials_per_family=2, cv_folds=3)
    result = search_models(frame, config, spec, seed=5)
    assert [t.family for t in result.trials] == [other.value] * 2 + ["lightgbm"] * 2
    # then its trials draw from its own small space, leaves capped like the other families'
    drawn = [t.params for t in result.trials if t.family == "lightgbm"]
    assert all(
        set(p) == {"n_estimators", "learning_rate", "num_leaves", "min_child_samples", "reg_lambda"} for p in drawn
    )
    smallest = frame["target"].value_counts().min() if task == "multiclass" else None
    bound = DataShape(len(frame) * 2 // 3, smallest and smallest * 2 // 3).max_leaf
    assert max(p["min_child_samples"] for p in drawn) <= bound
    # and the fitted model is LightGBM's scikit-learn estimator with one thread, whichever family won
    lightgbm = search_models(frame, config, spec.model_copy(update={"families": [ModelFamily.lightgbm]}), seed=5)
    estimator = base_classifier(lightgbm.model)
    assert type(estimator).__name__ == ("LGBMClassifier" if task == "multiclass" else "LGBMRegressor")
    assert {k: estimator.get_params()[k] for k in lightgbm.params} == lightgbm.params and estimator.n_jobs == 1
    # skops (how MLflow saves it) loads it back with the trusted types, predicting the same
    X = prepare_inputs(frame.head(100), config)
    predict = "predict_proba" if task == "multiclass" else "predict"
    loaded = skops.io.loads(skops.io.dumps(lightgbm.model), trusted=skops_trusted_types(lightgbm.model))
    np.testing.assert_array_equal(getattr(loaded, predict)(X), getattr(lightgbm.model, predict)(X))
    # no ONNX converter: the compiled check says why and serving uses the exact array form (bit-identical)
    check = compile_and_check(lightgbm.model, X, {"colour"}, seed=1)
    assert not check.onnx.passed and "LightGBM has no ONNX converter here" in check.onnx.reason
    assert check.form == "exact-arrays" and check.tags()["compiled_failure"].startswith("ConversionError: LGBM")


def test_a_family_of_the_other_task_is_refused_by_name():
    _, config = _table(load_diabetes, "regression")
    with pytest.raises(ValueError, match="'logistic_regression' does not fit a regression task: use 'ridge'"):
        SearchSpec(families=[ModelFamily.logistic_regression]).families_for(config.task)
    assert SearchSpec().families_for(config.task) == [ModelFamily.ridge, ModelFamily.hist_gradient_boosting]


def test_features_that_carry_nothing_give_degenerate_trials_that_are_logged(caplog):
    frame, config = _table(load_wine, "multiclass")
    constant = frame.assign(**{c: 1.0 for c in config.numeric_features})
    with caplog.at_level(logging.WARNING, logger="tasks.training"):
        result = search_models(
            constant, config, SearchSpec(families=[ModelFamily.decision_tree], trials_per_family=2), seed=1
        )
    # a model that can only predict the class prior scores exactly the constant predictor's CV score
    assert {t.state for t in result.trials} == {"degenerate"}
    assert result.cv_mean == pytest.approx(result.baseline, abs=1e-9)
    assert "constant predictor" in caplog.text


def test_choose_prefers_complete_trials_over_degenerate_ones():
    trials = [
        Trial("a", {}, 0.5, 0, 0, 0, "degenerate", 3),
        Trial("b", {}, 0.49, 0, 0, 1, "complete", 3),
        Trial("c", {}, 0.9, 0, 0, 2, "pruned", 1),
    ]
    assert choose(trials).number == 1
    with pytest.raises(ValueError, match="no search trial completed"):
        choose([trials[2]])


def test_a_time_budget_keeps_the_first_batch_of_every_family():
    frame, config = _table(load_wine, "multiclass")
    for batch in (1, 3):
        spec = SearchSpec(
            families=ALL_CLASSIFIERS[:2], trials_per_family=50, trials_per_batch=batch, time_budget_seconds=0.01
        )
        result = search_models(frame, config, spec, seed=2)
        assert [t.family for t in result.trials] == [f.value for f in ALL_CLASSIFIERS[:2] for _ in range(batch)]


def test_too_few_rows_of_a_class_for_the_folds_is_named():
    frame, config = _table(load_wine, "multiclass")
    few = pd.concat([frame[frame["target"] != 2], frame[frame["target"] == 2].head(2)])
    with pytest.raises(ValueError, match=r"class 2 of 'target' has 2 training rows, fewer than cv_folds=3"):
        search_models(few, config, SearchSpec(trials_per_family=1), seed=0)


def _sequential_optuna_reference(frame, config, spec, seed):
    """The search as one plain sequential Optuna loop per family (`study.optimize`, pruning inside the
    objective), written out here: what the batched search must equal with one trial per batch."""
    import optuna
    from sklearn.metrics import get_scorer
    from sklearn.model_selection import StratifiedKFold

    from core.data.features import prepare_inputs, prepare_target
    from core.modeling.search import build_model, suggest

    X, y = prepare_inputs(frame, config), prepare_target(frame, config)
    folds = list(StratifiedKFold(n_splits=spec.cv_folds, shuffle=True, random_state=seed).split(X, y))
    shape = DataShape(min(len(t) for t, _ in folds), min(int(y.iloc[t].value_counts().min()) for t, _ in folds))
    scorer = get_scorer("roc_auc_ovr")
    rows = []
    for index, family in enumerate(spec.families):
        study = optuna.create_study(
            direction="maximize",
            sampler=optuna.samplers.TPESampler(seed=seed + index),
            pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0),
        )

        def objective(trial, family=family):
            params = suggest(family, trial, shape)
            scores = []
            for step, (train, valid) in enumerate(folds):
                model = build_model(config, family, params, seed).fit(X.iloc[train], y.iloc[train])
                scores.append(scorer(model, X.iloc[valid], y.iloc[valid]))
                trial.report(float(np.mean(scores)), step)
                if step < len(folds) - 1 and trial.should_prune():
                    raise optuna.TrialPruned()
            return float(np.mean(scores))

        study.optimize(objective, n_trials=spec.trials_per_family)
        for t in study.trials:
            pruned = t.state == optuna.trial.TrialState.PRUNED
            value = list(t.intermediate_values.values())[-1] if pruned else t.value
            rows.append((family.value, t.params, "pruned" if pruned else "complete", value))
    return rows


LIGHT = [ModelFamily.decision_tree, ModelFamily.logistic_regression]  # single-threaded: quick on a busy machine


def test_one_trial_per_batch_is_exactly_the_sequential_optuna_search():
    frame, config = _table(load_wine, "multiclass")
    spec = SearchSpec(families=LIGHT, trials_per_family=6, trials_per_batch=1, cv_folds=3)
    result = search_models(frame, config, spec, seed=4)
    got = [(t.family, t.params, t.state, t.cv_mean) for t in result.trials]
    expected = _sequential_optuna_reference(frame, config, spec, seed=4)
    assert [row[:3] for row in got] == [row[:3] for row in expected]
    np.testing.assert_allclose([row[3] for row in got], [row[3] for row in expected], rtol=0, atol=1e-12)
    assert "pruned" in {row[2] for row in expected}  # the comparison covers pruning


def test_batches_run_in_any_order_give_the_same_search_and_prune_only_against_earlier_batches():
    from concurrent.futures import ThreadPoolExecutor

    from core.modeling.search import evaluate_trial, prepare_search, run_search

    frame, config = _table(load_wine, "multiclass")
    spec = SearchSpec(families=LIGHT, trials_per_family=5, trials_per_batch=2, cv_folds=3)
    data = prepare_search(frame, config, spec, seed=11)
    batches = []

    def shuffled_parallel(jobs):
        # like workers finishing in any order: evaluated in reverse, two at a time, returned in the order given
        batches.append(jobs)
        with ThreadPoolExecutor(2) as pool:
            outcomes = pool.map(lambda j: evaluate_trial(data, j), reversed(jobs))
            done = dict(zip(reversed(range(len(jobs))), outcomes, strict=True))
        return [done[i] for i in range(len(jobs))]

    parallel = run_search(data, spec, run_batch=shuffled_parallel)
    sequential = search_models(frame, config, spec, seed=11)
    assert [(t.family, t.params, t.cv_mean, t.state, t.folds) for t in parallel.trials] == [
        (t.family, t.params, t.cv_mean, t.state, t.folds) for t in sequential.trials
    ]
    assert (parallel.family, parallel.params) == (sequential.family, sequential.params)
    assert "pruned" in {t.state for t in parallel.trials}
    # every family's batch of two in each round; pruning sees only trials completed in earlier rounds
    assert [len(b) for b in batches] == [4, 4, 2]
    for round_, jobs in enumerate(batches):
        for job in jobs:
            assert all(earlier.number < 2 * round_ for earlier in job.earlier)
            assert len(job.earlier) <= 2 * round_
    assert not any(job.earlier for job in batches[0])


def test_one_batch_of_all_trials_prunes_nothing():
    frame, config = _table(load_wine, "multiclass")
    spec = SearchSpec(families=LIGHT, trials_per_family=4, trials_per_batch=4, cv_folds=3)
    result = search_models(frame, config, spec, seed=4)
    assert {t.state for t in result.trials} <= {"complete", "degenerate"}
    assert all(t.folds == 3 for t in result.trials)


def test_lost_workers_during_the_search_are_explained():
    from types import SimpleNamespace

    from distributed.scheduler import KilledWorker

    from tasks.search_trials import lost_workers_message

    text = lost_workers_message(
        8_000_000, 3 * 2**30, KilledWorker("run_trial-1", SimpleNamespace(address="tcp://127.0.0.1:1"), 3)
    )
    assert "8,000,000 training rows" in text and "3.0 GiB" in text
    assert "MLOPS_DASK_WORKER_MEMORY" in text and "engine: dask" in text and "run_trial-1" in text
