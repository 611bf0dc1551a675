"""NannyML's side of bench/nannyml_check.py: run CBPE / DLE on the Parquet files it wrote (NannyML venv only).

Runs in a separate virtual environment with nannyml installed (its pins do not fit the project's), so it imports
nothing from the project: only nannyml, pandas and numpy. It reads a manifest (JSON) naming, per task, the
reference and analysis Parquet files, the columns and the window size, fits NannyML's estimator on the reference,
estimates on the analysis rows with one chunk per window (`chunk_size` = the window's rows, the windows written
one after another) and writes per window NannyML's estimate and its realised value (the analysis rows carry their
labels, which CBPE and DLE use only for the realised column), with how NannyML calibrated, to a JSON file.

    /tmp/nannyml-venv/bin/python bench/nannyml_side.py MANIFEST.json OUT.json
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from importlib.metadata import version
from typing import Any

import pandas as pd

PROBLEM_TYPES = {
    "binary": "classification_binary",
    "multiclass": "classification_multiclass",
    "regression": "regression",
}


def run_task(task: dict[str, Any]) -> dict[str, Any]:
    """Fit NannyML's estimator on the task's reference and estimate its windows (one chunk each)."""
    import nannyml as nml

    reference = pd.read_parquet(task["reference"])
    analysis = pd.read_parquet(task["analysis"])
    window_rows = int(task["window_rows"])
    kind = task["kind"]
    started = time.perf_counter()
    if kind == "regression":
        estimator = nml.DLE(
            feature_column_names=task["features"],
            y_pred=task["y_pred"],
            y_true=task["y_true"],
            metrics=task["metrics"],
            chunk_size=window_rows,
        )
    else:
        estimator = nml.CBPE(
            y_pred_proba=task["y_pred_proba"],
            y_pred=task["y_pred"],
            y_true=task["y_true"],
            metrics=task["metrics"],
            problem_type=PROBLEM_TYPES[kind],
            chunk_size=window_rows,
        )
    estimator.fit(reference.drop(columns=["window"], errors="ignore"))
    fitted = time.perf_counter()
    result = estimator.estimate(analysis.drop(columns=["window"]))
    estimated = time.perf_counter()

    frame = result.filter(period="analysis").to_df()
    windows = list(dict.fromkeys(analysis["window"]))
    starts = frame[("chunk", "start_index")].to_numpy()
    ends = frame[("chunk", "end_index")].to_numpy()
    if len(frame) != len(windows):
        raise SystemExit(f"{task['name']}: {len(frame)} chunks for {len(windows)} windows")
    rows = []
    for i, window in enumerate(windows):
        chunk_rows = analysis.iloc[int(starts[i]) : int(ends[i]) + 1]
        if set(chunk_rows["window"]) != {window} or len(chunk_rows) != window_rows:
            raise SystemExit(f"{task['name']}: chunk {i} is not exactly the window {window!r}")
        metrics = {}
        for metric in task["metrics"]:
            metrics[metric] = {
                "estimate": float(frame[(metric, "value")].iloc[i]),
                "realised": float(frame[(metric, "realized")].iloc[i]),
                "sampling_error": float(frame[(metric, "sampling_error")].iloc[i]),
            }
        rows.append({"window": window, "metrics": metrics})
    return {
        "name": task["name"],
        "calibration": calibration(estimator, kind),
        "calibrated_classes": calibrated_classes(estimator, kind),
        "fit_seconds": fitted - started,
        "estimate_seconds": estimated - fitted,
        "windows": rows,
    }


def calibration(estimator: Any, kind: str) -> str:
    """How NannyML calibrated (or, for DLE, what it learnt the losses with), in words."""
    if kind == "regression":
        return "DLE: one LGBMRegressor at LightGBM defaults per metric (absolute error; squared error)"
    if kind == "binary":
        used = "isotonic" if estimator.needs_calibration else "none (ECE test: not needed)"
        return f"calibrator on the positive class: {used}"
    chosen = sorted((str(k), type(v).__name__) for k, v in estimator._calibrators.items())
    return "calibrators per class (then rows renormalised to sum 1): " + ", ".join(f"{k}: {v}" for k, v in chosen)


def calibrated_classes(estimator: Any, kind: str) -> list[str]:
    """The classes whose probabilities NannyML calibrates (isotonic), for the bench to replicate."""
    if kind == "regression":
        return []
    if kind == "binary":
        return ["1"] if estimator.needs_calibration else []
    return sorted(str(k) for k, v in estimator._calibrators.items() if type(v).__name__ != "NoopCalibrator")


def versions() -> dict[str, str]:
    """The versions that matter in this venv."""
    names = ("nannyml", "numpy", "pandas", "scikit-learn", "lightgbm", "scipy", "pyarrow")
    return {name: version(name) for name in names} | {"python": sys.version.split()[0]}


def main() -> None:
    manifest_path, out_path = sys.argv[1], sys.argv[2]
    with open(manifest_path) as handle:
        manifest = json.load(handle)
    os.environ.setdefault("NML_DISABLE_USAGE_LOGGING", "1")  # no usage analytics sent (read when nannyml loads)
    warnings.filterwarnings("ignore")  # NannyML warns that one reference chunk is too few for its thresholds
    started = time.perf_counter()
    tasks = [run_task(task) for task in manifest["tasks"]]
    with open(out_path, "w") as handle:
        json.dump({"versions": versions(), "seconds": time.perf_counter() - started, "tasks": tasks}, handle)


if __name__ == "__main__":
    main()
