"""In-process per-call time of each inference path, in one run: pipeline vs exact-arrays vs onnx.

No servers: the bundled credit-risk generator's rows, the frozen holdout split, one pipeline per model
family fitted with fixed parameters (as `core.modeling.search.build_model` builds them). For each family and
batch size (1 and 100 rows by default) it times `LoadedModel.scores`' three possible forms on the same
holdout rows:
- `pipeline`: the fitted `Pipeline.predict_proba` on a DataFrame (what serving ran before);
- `exact-arrays`: `core.inference.compiled.ArrayForm` (fitted steps on plain arrays, bit-identical);
- `onnx`: `core.inference.compiled.OnnxForm` (the compiled graph in onnxruntime, one intra-op thread);
and reports median and p99 per call with the ratio to the pipeline's median, plus each form's parity
result (max |d| against `predict_proba`) on the holdout and edge cases. OpenMP threads are limited to 1
once for the process, as the serving API does.

Usage: `python -m bench.inference [--rows 20000] [--calls 300]`. Results: bench/results/inference.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from core.data.dataset import load_local_dataset_config
from core.data.features import prepare_inputs, prepare_target
from core.data.split import split_frame
from core.data.synthetic import generate_frame
from core.inference.compiled import ArrayForm, OnnxForm, compile_and_check
from core.modeling.search import build_model

RESULTS = Path(__file__).parent / "results"
SEED = 42
FAMILIES = {
    "logistic_regression": {"C": 1.0},
    "hist_gradient_boosting": {"max_iter": 200, "max_leaf_nodes": 31, "learning_rate": 0.1},
    "random_forest": {"n_estimators": 100, "max_depth": 10, "n_jobs": 1},
}


def _times(call: Any, calls: int) -> list[float]:
    call()  # warm-up
    out = []
    for _ in range(calls):
        started = time.perf_counter()
        call()
        out.append((time.perf_counter() - started) * 1e3)
    return out


def run(rows: int, calls: int, batches: list[int]) -> dict[str, Any]:
    config = load_local_dataset_config("credit-risk")
    split = split_frame(generate_frame(rows, seed=SEED), config)
    train_X, train_y = prepare_inputs(split.train, config), prepare_target(split.train, config)
    holdout = prepare_inputs(split.holdout, config)
    text = set(config.categorical_features)
    results: dict[str, Any] = {"rows": rows, "calls": calls, "families": {}}
    for family, params in FAMILIES.items():
        pipeline = build_model(config, family, params, SEED).fit(train_X, train_y)
        check = compile_and_check(pipeline, holdout, text, SEED)
        forms = {
            "pipeline": pipeline.predict_proba,
            "exact-arrays": ArrayForm(pipeline, text).scores,
            "onnx": OnnxForm(check.model, text, True).scores if check.model else None,
        }
        entry: dict[str, Any] = {
            "params": params,
            "parity": {"onnx": check.onnx.to_dict(), "exact-arrays": check.arrays.to_dict()},
            "times": {},
        }
        for batch in batches:
            frame = holdout.head(batch)
            base = None
            for form, scores in forms.items():
                if scores is None:
                    continue
                times = _times(lambda scores=scores, frame=frame: scores(frame), calls)
                median = statistics.median(times)
                base = base or median
                entry["times"][f"{form} x{batch}"] = {
                    "median_ms": median,
                    "p99_ms": float(np.percentile(times, 99)),
                    "speedup": base / median,
                }
        results["families"][family] = entry
    return results


def markdown(results: dict[str, Any]) -> str:
    lines = [
        "# In-process inference paths (per call)",
        "",
        f"{results['rows']} generated rows, {results['calls']} timed calls per cell after one warm-up, "
        "OpenMP limited to 1 thread, onnxruntime with 1 intra-op thread. Speedup: pipeline median / form median.",
        "",
        "| family | form | rows | median ms | p99 ms | speedup | parity (max abs delta) |",
        "|---|---|---|---|---|---|---|",
    ]
    for family, entry in results["families"].items():
        for key, t in entry["times"].items():
            form, batch = key.rsplit(" x", 1)
            parity = entry["parity"].get(form)
            shown = (
                "reference"
                if parity is None
                else f"{'passed' if parity['passed'] else 'FAILED'} ({parity['max_abs_delta']:.2g})"
            )
            cells = [family, form, batch, f"{t['median_ms']:.3f}", f"{t['p99_ms']:.3f}", f"{t['speedup']:.1f}x", shown]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 100])
    args = parser.parse_args()
    threadpool_limits(1)  # once per process, as the serving API's prediction threads
    results = run(args.rows, args.calls, args.batches)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "inference.json").write_text(json.dumps(results, indent=2, default=str))
    text = markdown(results)
    (RESULTS / "inference.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
