"""Reference tests: the flow's holdout metrics equal a plain scikit-learn script's, on tables sklearn ships.

For each table (written to CSV here; no download), the training flow runs on the real stack. A plain
script then reads the same CSV, takes the same frozen holdout (the id hash), builds the logged family's
scikit-learn estimator with the logged best parameters, fits it on the training rows and scores the
holdout with `sklearn.metrics` directly. When the run calibrated the classifier (param `calibration.method`),
the script wraps it in scikit-learn's own `CalibratedClassifierCV(method, cv=<the search's folds>,
ensemble=False)`; the expected calibration error is computed here from its textbook definition. The flow's
logged holdout metrics must equal the script's within 1e-9, and the registered model's final estimator must
carry exactly the logged parameters: a search that shipped another configuration than the one it picked (the
bug this guards against) fails both.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from lightgbm import LGBMClassifier, LGBMRegressor
from sklearn import datasets
from sklearn.calibration import CalibratedClassifierCV
from sklearn.ensemble import (
    HistGradientBoostingClassifier,
    HistGradientBoostingRegressor,
    RandomForestClassifier,
    RandomForestRegressor,
)
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.metrics import (
    average_precision_score,
    f1_score,
    log_loss,
    mean_absolute_error,
    mean_squared_error,
    r2_score,
    roc_auc_score,
)
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import label_binarize
from sklearn.tree import DecisionTreeClassifier, DecisionTreeRegressor

from adapters.clients import mlflow_client
from core.data.dataset import load_local_dataset_config
from core.data.features import build_preprocessor
from core.data.split import holdout_mask
from core.modeling.calibration import base_classifier
from flows.training import TrainingParams, training

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SEED = 42
# Written out here, independently of the search code: which scikit-learn estimator each family name means.
ESTIMATORS = {
    ("logistic_regression", True): lambda: LogisticRegression(max_iter=1000),
    ("ridge", False): Ridge,
    ("hist_gradient_boosting", True): lambda: HistGradientBoostingClassifier(random_state=SEED),
    ("hist_gradient_boosting", False): lambda: HistGradientBoostingRegressor(random_state=SEED),
    ("random_forest", True): lambda: RandomForestClassifier(random_state=SEED, n_jobs=-1),
    ("random_forest", False): lambda: RandomForestRegressor(random_state=SEED, n_jobs=-1),
    ("decision_tree", True): lambda: DecisionTreeClassifier(random_state=SEED),
    ("decision_tree", False): lambda: DecisionTreeRegressor(random_state=SEED),
    ("lightgbm", True): lambda: LGBMClassifier(random_state=SEED, n_jobs=1, verbose=-1),
    ("lightgbm", False): lambda: LGBMRegressor(random_state=SEED, n_jobs=1, verbose=-1),
}
TABLES = {
    "breast-cancer": (datasets.load_breast_cancer, "binary", ["logistic_regression", "hist_gradient_boosting"]),
    "wine": (datasets.load_wine, "multiclass", ["logistic_regression", "random_forest"]),
    "diabetes": (datasets.load_diabetes, "regression", ["ridge", "hist_gradient_boosting", "lightgbm"]),
}


def _write_table(folder: Path, name: str) -> tuple[Path, Path]:
    """The table as CSV with an id column, and a dataset config for it; returns both paths."""
    loader, task, _ = TABLES[name]
    frame = loader(as_frame=True).frame.rename(columns=lambda c: c.replace(" ", "_"))
    frame.insert(0, "row_id", [f"{name}-{i:05d}" for i in range(len(frame))])
    csv = folder / f"{name}.csv"
    frame.to_csv(csv, index=False)
    config = {
        "name": f"ref-{name}",
        "model_name": f"ref-{name}",
        "source": str(csv),
        "format": "csv",
        "target": "target",
        "task": task,
        "id_column": "row_id",
        "min_rows": 100,
        "features": [{"name": c, "type": "numeric"} for c in frame.columns if c not in ("row_id", "target")],
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return csv, path


def _textbook_ece(y: np.ndarray, proba: np.ndarray, classes: np.ndarray) -> float:
    """Expected calibration error: 10 equal-width bins ((0, 0.1], ..., the first closed at 0), sum of
    (share of rows) x |observed frequency - mean probability|; binary on the positive class, multiclass on
    the top label."""
    if len(classes) == 2:
        confidence, hit = proba[:, 1], (y == classes[1]).astype(float)
    else:
        confidence, hit = proba.max(axis=1), (classes[proba.argmax(axis=1)] == y).astype(float)
    bins = np.clip(np.ceil(confidence * 10) - 1, 0, 9)
    return float(
        sum(np.mean(bins == b) * abs(hit[bins == b].mean() - confidence[bins == b].mean()) for b in np.unique(bins))
    )


def _reference_metrics(
    csv: Path, config_path: Path, family: str, params: dict, calibration: str = "none"
) -> dict[str, float]:
    """A plain script: same rows, same holdout, the logged configuration (calibrated as logged), sklearn.metrics."""
    config = load_local_dataset_config(str(config_path))
    frame = pd.read_csv(csv)
    mask = holdout_mask(frame["row_id"], config.holdout_fraction, config.holdout_salt)
    train, holdout = frame[~mask], frame[mask]
    features = config.feature_names
    classification = config.task.is_classification
    model = Pipeline(
        [
            ("preprocess", build_preprocessor(config)),
            ("model", ESTIMATORS[family, classification]().set_params(**params)),
        ]
    )
    if calibration != "none":  # the search's folds: stratified, shuffled, seeded, over the training rows
        folds = StratifiedKFold(n_splits=3, shuffle=True, random_state=SEED).split(train[features], train["target"])
        model = CalibratedClassifierCV(model, method=calibration, cv=list(folds), ensemble=False)
    model.fit(train[features].astype("float64"), train["target"])
    X, y = holdout[features].astype("float64"), holdout["target"].to_numpy()
    if not classification:
        predicted = model.predict(X)
        return {
            "rmse": float(np.sqrt(mean_squared_error(y, predicted))),
            "mae": mean_absolute_error(y, predicted),
            "r2": r2_score(y, predicted),
        }
    proba, classes = model.predict_proba(X), model.classes_
    predicted = classes[proba.argmax(axis=1)]
    onehot = label_binarize(y, classes=classes)
    if len(classes) == 2:
        metrics = {
            "roc_auc": roc_auc_score(y, proba[:, 1]),
            "pr_auc": average_precision_score(y, proba[:, 1]),
            "f1": f1_score(y, predicted),
            "brier": float(np.mean((proba[:, 1] - y) ** 2)),
        }
    else:
        metrics = {
            "roc_auc": roc_auc_score(y, proba, multi_class="ovr", average="macro"),
            "pr_auc": average_precision_score(onehot, proba, average="macro"),
            "f1": f1_score(y, predicted, average="macro"),
            "brier": float(np.mean(np.sum((proba - onehot) ** 2, axis=1)) / 2),
        }
    return metrics | {"log_loss": log_loss(y, proba, labels=classes), "ece": _textbook_ece(y, proba, classes)}


@pytest.mark.parametrize("name", list(TABLES))
def test_flow_metrics_equal_a_plain_sklearn_script(stack, tmp_path, name):
    csv, config_path = _write_table(tmp_path, name)
    _, task, families = TABLES[name]
    # Given a table nobody tuned the project for, when the flow trains on it (registering the candidate)
    params = TrainingParams(
        dataset=str(config_path),
        seed=SEED,
        search={"families": families, "trials_per_family": 4, "cv_folds": 3},
    )
    state = training(params, return_state=True)
    assert state.is_completed(), state.message
    outcome = state.result()
    client = mlflow_client(stack)
    run = client.get_run(outcome.run_id)
    best = json.loads(Path(client.download_artifacts(outcome.run_id, "search/best.json", str(tmp_path))).read_text())

    # then the registered pipeline's final estimator has exactly the logged best parameters
    import mlflow.sklearn

    registered = mlflow.sklearn.load_model(f"models:/ref-{name}/{outcome.candidate_version}")
    estimator = base_classifier(registered)  # the chosen configuration, inside a calibration if there is one
    assert {k: estimator.get_params()[k] for k in best["params"]} == best["params"]
    assert run.data.params["best_family"] == best["family"]
    assert {
        k[len("best_") :]: v for k, v in run.data.params.items() if k.startswith("best_") and k != "best_family"
    } == {k: str(v) for k, v in best["params"].items()}
    assert type(estimator) is type(ESTIMATORS[best["family"], task != "regression"]())

    # and the flow's holdout metrics equal the plain script's within 1e-9
    calibration = run.data.params.get("calibration.method", "none")
    reference = _reference_metrics(csv, config_path, best["family"], best["params"], calibration)
    flow = {k[len("holdout_") :]: v for k, v in run.data.metrics.items() if k.startswith("holdout_")}
    assert set(flow) == set(reference)
    for metric, value in reference.items():
        assert flow[metric] == pytest.approx(value, abs=1e-9), metric
    print(f"reference {name} (calibration {calibration}): flow {flow} | script {reference}")

    # and the cold start is judged on the holdout's size: small holdouts are not promoted, whatever the score
    holdout_rows = int(holdout_mask(pd.read_csv(csv)["row_id"], 0.2, "holdout-v1").sum())
    size_gate = next(c for c in outcome.decision.checks if c.gate == "holdout_size")
    assert size_gate.passed == (holdout_rows >= 100)
    if not size_gate.passed:
        assert not outcome.promoted
        assert f"{holdout_rows} holdout rows < min_holdout_rows 100" in size_gate.detail
