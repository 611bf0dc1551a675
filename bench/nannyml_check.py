"""Performance estimated without labels, ours against NannyML's, on synthetic data with known shifts (out of suite).

Issue 27 asks that the estimates (CBPE for classifiers, DLE for regressors; `core.monitoring.estimation`) be checked
against NannyML. NannyML's pins do not fit ours (nannyml 0.13.1 needs lightgbm<4.6; we pin 4.7.0), so it runs in a
separate virtual environment, on the same rows, through `bench/nannyml_side.py`. The venv this was last run with
(`uv venv -p 3.11 /tmp/nannyml-venv`; `uv pip install nannyml==0.13.1 statsmodels pandas==2.3.3 pyarrow`):

    nannyml 0.13.1, numpy 2.4.6, pandas 2.3.3, scikit-learn 1.9.1, lightgbm 4.5.0, scipy 1.17.1, pyarrow 26.0.1,
    statsmodels 0.15.0 (nannyml imports it without declaring it), Python 3.11.7

(uv's own resolution picked pandas 3.1.1, which nannyml 0.13.1 predates; pandas is pinned to ours, 2.3.3, instead.)

The data, generated here (project venv), five features x1..x5 independent standard normal, x1 the most important:

- **binary**: y ~ Bernoulli(sigmoid(-0.4 + 1.5 x1 + 0.8 x2 - 0.6 x3 + 0.3 x4)); two models fitted on 20,000 other
  rows: a HistGradientBoostingClassifier (close to calibrated) and a shallow RandomForestClassifier (under-confident,
  so calibration matters);
- **multiclass**: three classes c0, c1, c2 with softmax logits (0, 1.2 x1 + 0.6 x2, 2.4 x1 + 0.5 x2 - 0.6 x3); the
  same two kinds of model;
- **regression**: y = 3 x1 + 2 sin(1.5 x2) + x3 + 0.5 x4 x5 + (0.5 + 0.8 |x1|) e, e standard normal
  (heteroscedastic: noisier where |x1| is large); a HistGradientBoostingRegressor.

Per task a reference period (5,000 rows with labels, the "holdout") and windows of 5,000 rows: unshifted and
covariate shifts of x1 (classification: x1 scaled by 0.75, 0.5, 0.25, and scaled by 0.5 then moved by +1, which lower
the true ROC AUC; regression: x1 scaled by 1.25, 1.5, 2, and moved by +1, which raise the true MAE). The relation of
target to inputs never changes (covariate shift only), so both estimators should track the realised values.

Both sides read the same Parquet files (features, model outputs, predicted class, labels). Ours:
`fit_estimator` on the reference and `estimate_performance` per window (default `BandRule`). NannyML: `CBPE`
(roc_auc, f1, precision, recall; problem_type binary or multiclass) or `DLE` (mae, rmse), `chunk_size` = the
window's rows, so each window is one chunk. The realised values come from the labels (`realised_metrics`; NannyML's
own realised values are checked against them). A third column separates the two sources of difference: our formulas
(`expected_metrics`) on probabilities calibrated as NannyML chose (isotonic for the classes it calibrated, multiclass
rows renormalised to sum 1). Results: bench/results/nannyml_check.{json,md}.

    python -m bench.nannyml_check --venv /tmp/nannyml-venv
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

RESULTS = Path(__file__).parent / "results"
SIDE = Path(__file__).parent / "nannyml_side.py"
SEED = 27
TRAIN_ROWS = 20_000
REFERENCE_ROWS = 5_000
WINDOW_ROWS = 5_000
FEATURES = ["x1", "x2", "x3", "x4", "x5"]
CLASSIFIER_METRICS = ["roc_auc", "f1", "precision", "recall"]
REGRESSOR_METRICS = ["mae", "rmse"]
AUC_GAP = 0.01  # a gap between ours and NannyML's ROC AUC worth investigating, when NannyML is this close to realised


@dataclass(frozen=True)
class Window:
    """A window of rows: x1 scaled by `scale`, then moved by `shift` (a covariate shift; the target's relation
    to the inputs is unchanged)."""

    name: str
    scale: float = 1.0
    shift: float = 0.0


CLASSIFIER_WINDOWS = [
    Window("unshifted"),
    Window("x1 x0.75", 0.75),
    Window("x1 x0.5", 0.5),
    Window("x1 x0.25", 0.25),
    Window("x1 x0.5 +1", 0.5, 1.0),
]
REGRESSOR_WINDOWS = [
    Window("unshifted"),
    Window("x1 x1.25", 1.25),
    Window("x1 x1.5", 1.5),
    Window("x1 x2", 2.0),
    Window("x1 +1", 1.0, 1.0),
]


# --- data ---


def draw_features(rng: np.random.Generator, rows: int, window: Window | None = None) -> pd.DataFrame:
    """Five independent standard normal features; x1 shifted as the window says."""
    frame = pd.DataFrame(rng.standard_normal((rows, len(FEATURES))), columns=FEATURES)
    if window is not None:
        frame["x1"] = frame["x1"] * window.scale + window.shift
    return frame


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def binary_target(rng: np.random.Generator, x: pd.DataFrame) -> np.ndarray:
    """The known logistic data-generating process."""
    logit = -0.4 + 1.5 * x["x1"] + 0.8 * x["x2"] - 0.6 * x["x3"] + 0.3 * x["x4"]
    return (rng.uniform(size=len(x)) < sigmoid(logit.to_numpy())).astype(int)


def multiclass_target(rng: np.random.Generator, x: pd.DataFrame) -> np.ndarray:
    """Softmax over three linear logits, x1 the strongest."""
    logits = np.column_stack(
        [
            np.zeros(len(x)),
            1.2 * x["x1"] + 0.6 * x["x2"],
            2.4 * x["x1"] + 0.5 * x["x2"] - 0.6 * x["x3"],
        ]
    )
    chances = np.exp(logits - logits.max(axis=1, keepdims=True))
    chances /= chances.sum(axis=1, keepdims=True)
    drawn = (rng.uniform(size=(len(x), 1)) > np.cumsum(chances, axis=1)).sum(axis=1)
    return np.array(["c0", "c1", "c2"])[np.minimum(drawn, 2)]


def regression_target(rng: np.random.Generator, x: pd.DataFrame) -> np.ndarray:
    """Heteroscedastic: the noise grows with |x1|."""
    mean = 3 * x["x1"] + 2 * np.sin(1.5 * x["x2"]) + x["x3"] + 0.5 * x["x4"] * x["x5"]
    return (mean + (0.5 + 0.8 * np.abs(x["x1"])) * rng.standard_normal(len(x))).to_numpy()


def hgb_classifier() -> Any:
    from sklearn.ensemble import HistGradientBoostingClassifier

    return HistGradientBoostingClassifier(max_iter=200, learning_rate=0.05, random_state=SEED)


def rf_classifier() -> Any:
    from sklearn.ensemble import RandomForestClassifier

    return RandomForestClassifier(n_estimators=100, max_depth=4, min_samples_leaf=50, random_state=SEED)


def hgb_regressor() -> Any:
    from sklearn.ensemble import HistGradientBoostingRegressor

    return HistGradientBoostingRegressor(max_iter=200, learning_rate=0.05, random_state=SEED)


@dataclass(frozen=True)
class Task:
    """One model on one data-generating process, with its windows."""

    name: str
    kind: str  # binary, multiclass or regression
    description: str
    target: Callable[[np.random.Generator, pd.DataFrame], np.ndarray]
    model: Callable[[], Any]
    windows: list[Window]


TASKS = [
    Task(
        "binary_hgb",
        "binary",
        "binary, HistGradientBoostingClassifier",
        binary_target,
        hgb_classifier,
        CLASSIFIER_WINDOWS,
    ),
    Task(
        "binary_rf",
        "binary",
        "binary, RandomForestClassifier (depth 4; under-confident probabilities)",
        binary_target,
        rf_classifier,
        CLASSIFIER_WINDOWS,
    ),
    Task(
        "multiclass_hgb",
        "multiclass",
        "multiclass (3 classes), HistGradientBoostingClassifier",
        multiclass_target,
        hgb_classifier,
        CLASSIFIER_WINDOWS,
    ),
    Task(
        "multiclass_rf",
        "multiclass",
        "multiclass (3 classes), RandomForestClassifier (depth 4; under-confident probabilities)",
        multiclass_target,
        rf_classifier,
        CLASSIFIER_WINDOWS,
    ),
    Task(
        "regression_hgb",
        "regression",
        "regression (heteroscedastic noise), HistGradientBoostingRegressor",
        regression_target,
        hgb_regressor,
        REGRESSOR_WINDOWS,
    ),
]


def output_columns(task: Task, classes: list[Any]) -> list[str]:
    """The model output columns written for a task: one probability per class, or the prediction."""
    return [f"proba_{c}" for c in classes] if classes else ["prediction"]


def model_frame(task: Task, model: Any, x: pd.DataFrame, y: np.ndarray, window: str) -> pd.DataFrame:
    """Features, model outputs, the predicted class (argmax of the probabilities), the label and the window."""
    frame = x.copy()
    if task.kind == "regression":
        frame["prediction"] = model.predict(x)
    else:
        probabilities = model.predict_proba(x)
        for k, c in enumerate(model.classes_):
            frame[f"proba_{c}"] = probabilities[:, k]
        frame["y_pred"] = model.classes_[probabilities.argmax(axis=1)]
    frame["target"] = y
    frame["window"] = window
    return frame


def write_task(task: Task, folder: Path, seed: int) -> dict[str, Any]:
    """Fit the task's model on training rows; write its reference and windows to Parquet; the side's manifest."""
    rng = np.random.default_rng(seed)
    train = draw_features(rng, TRAIN_ROWS)
    model = task.model().fit(train, task.target(rng, train))
    classes = [] if task.kind == "regression" else list(model.classes_)
    reference_x = draw_features(rng, REFERENCE_ROWS)
    reference = model_frame(task, model, reference_x, task.target(rng, reference_x), "reference")
    windows = []
    for window in task.windows:
        x = draw_features(rng, WINDOW_ROWS, window)
        windows.append(model_frame(task, model, x, task.target(rng, x), window.name))
    analysis = pd.concat(windows, ignore_index=True)
    paths = {part: folder / f"{task.name}_{part}.parquet" for part in ("reference", "analysis")}
    reference.to_parquet(paths["reference"], index=False)
    analysis.to_parquet(paths["analysis"], index=False)
    entry: dict[str, Any] = {
        "name": task.name,
        "kind": task.kind,
        "reference": str(paths["reference"]),
        "analysis": str(paths["analysis"]),
        "window_rows": WINDOW_ROWS,
        "features": FEATURES,
        "y_true": "target",
        "classes": [str(c) for c in classes],
    }
    if task.kind == "regression":
        entry |= {"y_pred": "prediction", "metrics": REGRESSOR_METRICS}
    else:
        probability = "proba_1" if task.kind == "binary" else {str(c): f"proba_{c}" for c in classes}
        entry |= {"y_pred": "y_pred", "y_pred_proba": probability, "metrics": CLASSIFIER_METRICS}
    return entry


# --- our side ---


def run_ours(entry: dict[str, Any]) -> dict[str, Any]:
    """Our estimator on the same Parquet files: fitted on the reference, estimated per window with labels beside."""
    from core.monitoring.estimation import BandRule, estimate_performance, fit_estimator, realised_metrics

    reference = pd.read_parquet(entry["reference"])
    analysis = pd.read_parquet(entry["analysis"])
    regression = entry["kind"] == "regression"
    classes: list[Any] = [] if regression else sorted(reference["target"].unique().tolist())
    outputs = ["prediction"] if regression else [f"proba_{c}" for c in classes]

    def scores(frame: pd.DataFrame) -> np.ndarray:
        values = frame[outputs].to_numpy(dtype=float)
        return values[:, 0] if regression else values

    started = time.perf_counter()
    estimator = fit_estimator(reference[FEATURES], scores(reference), reference["target"].to_numpy(), classes, SEED)
    fitted = time.perf_counter()
    rows = []
    for name, window in analysis.groupby("window", sort=False):
        y = window["target"].to_numpy()
        labelled = (np.ones(len(window), dtype=bool), y)
        estimated = estimate_performance(estimator, window[FEATURES], scores(window), BandRule(), labelled)
        realised = realised_metrics(y, scores(window), classes)
        metrics = {}
        for m in estimated.metrics:
            metrics[m.metric] = {
                "estimate": m.estimate,
                "realised": realised[m.metric],
                "band": [m.lower, m.upper],
                "flagged": m.worse,
            }
        rows.append({"window": str(name), "metrics": metrics})
    done = time.perf_counter()
    return {
        "name": entry["name"],
        "method": estimator.method,
        "reference": estimator.reference,
        "fit_seconds": fitted - started,
        "estimate_seconds": done - fitted,
        "windows": rows,
    }


def ours_on_their_calibration(entry: dict[str, Any], calibrated: list[str]) -> dict[str, dict[str, float]]:
    """Our CBPE formulas (`expected_metrics`) on probabilities calibrated as NannyML did, per window.

    NannyML's choice per class (from its side) is replicated: isotonic regression fitted on the whole reference for
    the classes it calibrated, the others as they are, and for multiclass each row renormalised to sum 1. What is
    left between this and NannyML's estimate is the formulas; what is between it and ours is the calibration.
    """
    from sklearn.isotonic import IsotonicRegression

    from core.monitoring.estimation import expected_metrics

    reference = pd.read_parquet(entry["reference"])
    analysis = pd.read_parquet(entry["analysis"])
    classes = sorted(reference["target"].unique().tolist())
    outputs = [f"proba_{c}" for c in classes]
    raw_reference = reference[outputs].to_numpy(dtype=float)
    calibrators = {
        k: IsotonicRegression(out_of_bounds="clip", increasing=True).fit(
            raw_reference[:, k], (reference["target"] == c).to_numpy(dtype=float)
        )
        for k, c in enumerate(classes)
        if str(c) in calibrated
    }
    estimates = {}
    for name, window in analysis.groupby("window", sort=False):
        raw = window[outputs].to_numpy(dtype=float)
        chances = raw.copy()
        for k, calibrator in calibrators.items():
            chances[:, k] = calibrator.predict(raw[:, k])
        if len(classes) > 2:
            total = chances.sum(axis=1, keepdims=True)
            chances = np.divide(chances, total, out=np.full_like(chances, 1 / len(classes)), where=total != 0)
        estimates[str(name)] = expected_metrics(raw, chances, classes)
    return estimates


def run_nannyml(venv: Path, manifest: Path, out: Path) -> dict[str, Any]:
    """NannyML's side in its own venv (one subprocess for all tasks; LightGBM on one thread)."""
    python = venv / "bin" / "python"
    if not python.exists():
        raise SystemExit(f"no python in {venv}; create it as this module's docstring says")
    env = os.environ | {"OMP_NUM_THREADS": "1", "NML_DISABLE_USAGE_LOGGING": "1", "PYTHONWARNINGS": "ignore"}
    subprocess.run([str(python), str(SIDE), str(manifest), str(out)], check=True, env=env)
    return json.loads(out.read_text())


# --- comparison ---


def compare(
    ours: dict[str, Any], theirs: dict[str, Any], replicated: dict[str, dict[str, float]]
) -> list[dict[str, Any]]:
    """Per window and metric: realised, ours, NannyML's, ours on NannyML's calibration, and the gaps."""
    rows = []
    for mine, other in zip(ours["windows"], theirs["windows"], strict=True):
        assert mine["window"] == other["window"], (mine["window"], other["window"])
        for metric, figures in mine["metrics"].items():
            realised, estimate = figures["realised"], figures["estimate"]
            nannyml = other["metrics"][metric]["estimate"]
            same = replicated.get(mine["window"], {}).get(metric)
            rows.append(
                {
                    "window": mine["window"],
                    "metric": metric,
                    "realised": realised,
                    "ours": estimate,
                    "nannyml": nannyml,
                    "nannyml_realised": other["metrics"][metric]["realised"],
                    "nannyml_sampling_error": other["metrics"][metric]["sampling_error"],
                    "ours_minus_nannyml": estimate - nannyml,
                    "ours_on_nannyml_calibration": same,
                    "ours_on_nannyml_calibration_minus_nannyml": None if same is None else same - nannyml,
                    "ours_error": estimate - realised,
                    "nannyml_error": nannyml - realised,
                    "band": figures["band"],
                    "flagged": figures["flagged"],
                }
            )
    return rows


def largest(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per metric, the window of the largest |ours - NannyML|, with the largest errors against realised."""
    summary = []
    for metric in dict.fromkeys(r["metric"] for r in rows):
        mine = [r for r in rows if r["metric"] == metric]
        widest = max(mine, key=lambda r: abs(r["ours_minus_nannyml"]))
        summary.append(
            {
                "metric": metric,
                "window": widest["window"],
                "max_abs_ours_minus_nannyml": abs(widest["ours_minus_nannyml"]),
                "max_abs_ours_error": max(abs(r["ours_error"]) for r in mine),
                "max_abs_nannyml_error": max(abs(r["nannyml_error"]) for r in mine),
                "max_abs_same_calibration_minus_nannyml": None
                if widest["ours_on_nannyml_calibration"] is None
                else max(abs(r["ours_on_nannyml_calibration_minus_nannyml"]) for r in mine),
            }
        )
    return summary


def suspicious(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """ROC AUC windows where ours is more than AUC_GAP from NannyML while NannyML is within AUC_GAP of realised."""
    return [
        r
        for r in rows
        if r["metric"] == "roc_auc" and abs(r["ours_minus_nannyml"]) > AUC_GAP and abs(r["nannyml_error"]) <= AUC_GAP
    ]


def render(report: dict[str, Any]) -> str:
    """The Markdown page."""
    theirs = report["nannyml_versions"]
    lines = [
        "# Estimated performance without labels: ours against NannyML",
        "",
        f"Run {report['finished']} by `python -m bench.nannyml_check --venv {report['venv']}` "
        f"({report['seconds']:.0f} s in all: data and models {report['data_seconds']:.0f} s, ours "
        f"{report['ours_seconds']:.1f} s, NannyML's subprocess {report['nannyml_seconds']:.0f} s with its imports).",
        "",
        "Ours: `core.monitoring.estimation` in the project venv (numpy "
        f"{report['ours_versions']['numpy']}, pandas {report['ours_versions']['pandas']}, scikit-learn "
        f"{report['ours_versions']['scikit-learn']}). NannyML {theirs['nannyml']} in its own venv (numpy "
        f"{theirs['numpy']}, pandas {theirs['pandas']}, scikit-learn {theirs['scikit-learn']}, lightgbm "
        f"{theirs['lightgbm']}, Python {theirs['python']}).",
        "",
        f"Synthetic data (see the module's docstring): reference {REFERENCE_ROWS:,} labelled rows, windows of "
        f"{WINDOW_ROWS:,} rows, each window one NannyML chunk; covariate shifts of x1, the most important feature. "
        "Realised = computed from the window's labels (NannyML's own realised values agree to "
        f"{report['realised_agreement']:.1e} at most).",
        "",
        "**How each calibrates.** Both compute the same CBPE sums (expected confusion matrix from calibrated "
        "probabilities; ROC AUC from the expected positive and negative mass in the order of the raw score) and "
        "the same DLE (a model of each row's absolute and squared error; MAE = mean, RMSE = root of the mean). "
        "What differs is what is fitted on the reference. NannyML decides per class whether to calibrate with "
        "an expected-calibration-error test (10 stratified 90/10 splits, 10 bins; isotonic if it lowers ECE) "
        "and, for multiclass, renormalises the calibrated probabilities to sum 1 per row; ours decides once for "
        "all classes by two-fold cross-fitted Brier score (isotonic if it lowers it by more than 1 %) and does not "
        "renormalise. NannyML's ROC AUC breaks ties in the raw score by sort order and rounds the cumulated "
        "masses to 5 decimals; ours counts ties half. DLE: NannyML fits LightGBM at its defaults, ours "
        "HistGradientBoosting (150 iterations, learning rate 0.05, 40 rows per leaf). So small differences are "
        "expected.",
        "",
        "## Largest differences",
        "",
        "Per task and metric over its five windows: the largest gap between the two estimates (and its window), "
        "the largest error of each against the realised value, and the largest gap left when our formulas are "
        "given NannyML's calibration (its per-class isotonic choice replicated, multiclass rows renormalised): "
        "what remains there is the formulas, the rest of the first column is the calibration.",
        "",
        "| task | metric | window of the largest gap | max abs(ours - NannyML) | max abs(ours - realised) "
        "| max abs(NannyML - realised) "
        "| same calibration: max abs(ours - NannyML) |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for task in report["tasks"]:
        for s in task["largest"]:
            same = s["max_abs_same_calibration_minus_nannyml"]
            lines.append(
                f"| {task['name']} | {s['metric']} | {s['window']} | {s['max_abs_ours_minus_nannyml']:.4f} "
                f"| {s['max_abs_ours_error']:.4f} | {s['max_abs_nannyml_error']:.4f} "
                f"| {'n/a (DLE)' if same is None else f'{same:.1e}'} |"
            )
    flagged = [(t["name"], r) for t in report["tasks"] for r in t["suspicious"]]
    lines += ["", f"ROC AUC windows where ours is more than {AUC_GAP} from NannyML while NannyML is within {AUC_GAP} "]
    lines[-1] += "of realised: " + (
        ", ".join(f"{n} {r['window']} ({r['ours_minus_nannyml']:+.4f})" for n, r in flagged) if flagged else "none."
    )
    for task in report["tasks"]:
        lines += [
            "",
            f"## {task['name']}: {task['description']}",
            "",
            f"Ours: {task['ours_method']}. NannyML: {task['nannyml_calibration']}. Reference (realised): "
            + ", ".join(f"{k} {v:.4f}" for k, v in task["reference"].items())
            + ".",
            "",
            "| window | metric | realised | ours | NannyML | abs(ours - NannyML) | abs(ours - realised) "
            "| abs(NannyML - realised) | our band | flagged |",
            "|---|---|---:|---:|---:|---:|---:|---:|---|---|",
        ]
        for r in task["rows"]:
            lines.append(
                f"| {r['window']} | {r['metric']} | {r['realised']:.4f} | {r['ours']:.4f} | {r['nannyml']:.4f} "
                f"| {abs(r['ours_minus_nannyml']):.4f} | {abs(r['ours_error']):.4f} | {abs(r['nannyml_error']):.4f} "
                f"| {r['band'][0]:.4f} to {r['band'][1]:.4f} | {'yes' if r['flagged'] else ''} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--venv", type=Path, default=Path("/tmp/nannyml-venv"), help="the venv with nannyml")
    parser.add_argument("--tasks", nargs="*", default=[t.name for t in TASKS], help="which tasks to run")
    args = parser.parse_args()
    import sklearn.ensemble  # noqa: F401  (loads its OpenMP runtime, so that the limit below reaches it)
    from threadpoolctl import threadpool_limits

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="nannyml-check-") as tmp, threadpool_limits(1):
        folder = Path(tmp)
        tasks = [t for t in TASKS if t.name in args.tasks]
        manifest = {"tasks": [write_task(t, folder, SEED + i) for i, t in enumerate(tasks)]}
        (folder / "manifest.json").write_text(json.dumps(manifest))
        data_done = time.perf_counter()
        ours = [run_ours(entry) for entry in manifest["tasks"]]
        ours_done = time.perf_counter()
        theirs = run_nannyml(args.venv, folder / "manifest.json", folder / "nannyml.json")
        nannyml_done = time.perf_counter()
        replicated = [
            {} if entry["kind"] == "regression" else ours_on_their_calibration(entry, other["calibrated_classes"])
            for entry, other in zip(manifest["tasks"], theirs["tasks"], strict=True)
        ]

    report_tasks, agreement = [], 0.0
    for task, mine, other, same in zip(tasks, ours, theirs["tasks"], replicated, strict=True):
        rows = compare(mine, other, same)
        agreement = max([agreement, *(abs(r["nannyml_realised"] - r["realised"]) for r in rows)])
        report_tasks.append(
            {
                "name": task.name,
                "kind": task.kind,
                "description": task.description,
                "ours_method": mine["method"],
                "nannyml_calibration": other["calibration"],
                "reference": mine["reference"],
                "seconds": {
                    "ours_fit": mine["fit_seconds"],
                    "ours_estimate": mine["estimate_seconds"],
                    "nannyml_fit": other["fit_seconds"],
                    "nannyml_estimate": other["estimate_seconds"],
                },
                "rows": rows,
                "largest": largest(rows),
                "suspicious": suspicious(rows),
            }
        )
    report = {
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        "venv": str(args.venv),
        "seconds": time.perf_counter() - started,
        "data_seconds": data_done - started,
        "ours_seconds": ours_done - data_done,
        "nannyml_seconds": nannyml_done - ours_done,
        "ours_versions": {n: version(n) for n in ("numpy", "pandas", "scikit-learn")}
        | {"python": sys.version.split()[0]},
        "nannyml_versions": theirs["versions"],
        "realised_agreement": agreement,
        "reference_rows": REFERENCE_ROWS,
        "window_rows": WINDOW_ROWS,
        "tasks": report_tasks,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "nannyml_check.json").write_text(json.dumps(report, indent=1) + "\n")
    (RESULTS / "nannyml_check.md").write_text(render(report))
    print(render(report))


if __name__ == "__main__":
    main()
