"""Estimated against realised performance, window by window, on the bundled credit-risk generator.

A hist-gradient-boosting pipeline (`core.modeling.search.build_model`, the project's own preprocessing) is fitted
on months 0-5; its holdout (month 6, 5,000 rows) is the monitoring reference, as the training flow stores it. Each
window is a later month of 20,000 rows, through the same `analyse_window` the monitoring flow runs, with the labels
given so the realised figures sit beside the estimates:

- `unchanged`: months 7-8 drawn as the training months were;
- `covariate`: applicants shifted (employment, region, income, utilisation: the generator's drift knob on the
  applicants) while the risk of a given applicant is unchanged: CBPE's assumption holds;
- `segment`: only applicants with a credit utilisation under 0.7 (a selection on the inputs: a covariate shift
  that removes the model's strongest signal, so the true ROC AUC drops);
- `concept`: the generator's full drift, which also changes how utilisation and income map to risk: CBPE's
  assumption fails, and the estimate's error against the realised value says by how much.

The covariate scenario uses the generator with `d` applied to the applicants only (`_shifted_applicants`).

Usage: `python -m bench.estimation`. Results: bench/results/estimation.{json,md}.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd

from core.data import synthetic
from core.data.dataset import load_local_dataset_config
from core.data.features import prepare_inputs, prepare_target
from core.monitoring.drift import DriftThresholds
from core.monitoring.drift_analysis import Champion, Window, analyse_window, reference_sample, with_estimator

RESULTS = Path(__file__).parent / "results"
ROWS = 20_000


def _covariate_month(month: int, strength: float, seed: int) -> pd.DataFrame:
    """A month whose applicants drifted by `strength` but whose risk given an applicant did not."""
    real = synthetic._defaults
    try:  # the concept part of the drift switched off: defaults drawn with d = 0
        synthetic._defaults = lambda rng, a, d: real(rng, a, 0.0)  # type: ignore[assignment]
        return synthetic.generate_month(month, ROWS, seed, drift=synthetic.DriftSpec(0, strength))
    finally:
        synthetic._defaults = real  # type: ignore[assignment]


def _segment(month: int, seed: int) -> pd.DataFrame:
    """A month of only the applicants whose credit utilisation is under 0.7 (`ROWS` of them)."""
    frame = synthetic.generate_month(month, ROWS * 3, seed)
    return frame[frame["credit_utilization"] < 0.7].head(ROWS).reset_index(drop=True)


def _windows(seed: int) -> list[tuple[str, pd.DataFrame]]:
    drift = synthetic.DriftSpec
    return [
        ("unchanged month 7", synthetic.generate_month(7, ROWS, seed)),
        ("unchanged month 8", synthetic.generate_month(8, ROWS, seed)),
        ("covariate 0.5", _covariate_month(9, 0.5, seed)),
        ("covariate 1.0", _covariate_month(10, 1.0, seed)),
        ("segment utilisation < 0.7", _segment(13, seed)),
        ("concept 0.5", synthetic.generate_month(11, ROWS, seed, drift=drift(0, 0.5))),
        ("concept 1.0", synthetic.generate_month(12, ROWS, seed, drift=drift(0, 1.0))),
    ]


def main() -> None:
    from core.modeling.search import build_model

    seed = 42
    config = load_local_dataset_config("credit-risk")
    train = pd.concat([synthetic.generate_month(m, 10_000, seed) for m in range(6)], ignore_index=True)
    holdout = synthetic.generate_month(6, 5000, seed)
    params = {"learning_rate": 0.05, "max_leaf_nodes": 31, "min_samples_leaf": 20, "max_iter": 300}
    model = build_model(config, "hist_gradient_boosting", params, seed)
    model.fit(prepare_inputs(train, config), prepare_target(train, config))
    reference = reference_sample(holdout, model, config, 5000, seed)
    started = time.perf_counter()
    champion = with_estimator(Champion(config.model_name, "1", "run", model, {}, reference), config)
    fit_seconds = time.perf_counter() - started
    rows = []
    for name, frame in _windows(seed):
        labels = frame[[config.id_column, config.target]]
        started = time.perf_counter()
        result = analyse_window(
            Window(name, "bench", frame, config.id_column), champion, config, labels, DriftThresholds()
        )
        seconds = time.perf_counter() - started
        estimated, mv = result.estimated, result.multivariate
        assert estimated is not None and mv is not None
        row = {
            "window": name,
            "rows": result.rows,
            "seconds": round(seconds, 2),
            "domain_auc": round(mv.auc, 4),
            "domain_threshold": round(mv.threshold, 4),
            "multivariate_drift": mv.drifted,
            "separating": [n for n, _ in mv.features],
            "triggered": result.triggered,
            "reasons": result.reasons,
        }
        for m in estimated.metrics:
            row[m.metric] = {
                "estimated": round(m.estimate, 4),
                "realised": None if m.realised is None else round(m.realised, 4),
                "error": None if m.error is None else round(m.error, 4),
                "band": [round(m.lower, 4), round(m.upper, 4)],
                "worse": m.worse,
            }
        rows.append(row)
        print(name, {k: row[k] for k in ("roc_auc", "f1", "domain_auc", "seconds")}, flush=True)
    out = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "method": champion.estimator.method if champion.estimator else None,
        "reference": champion.estimator.reference if champion.estimator else None,
        "estimator_fit_seconds": round(fit_seconds, 2),
        "windows": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "estimation.json").write_text(json.dumps(out, indent=2, default=float))
    (RESULTS / "estimation.md").write_text(_markdown(out))


def _markdown(out: dict) -> str:
    ref = out["reference"] or {}
    lines = [
        f"# Estimated against realised performance ({out['date']})",
        "",
        f"Reference (5,000 holdout rows): ROC AUC {ref.get('roc_auc', float('nan')):.4f}, "
        f"F1 {ref.get('f1', float('nan')):.4f}. {out['method']}; fitted in {out['estimator_fit_seconds']} s.",
        "",
        "| window | rows | est. ROC AUC | realised | error | band | est. F1 | realised | error | domain AUC "
        "(threshold) | separating | triggered | s |",
        "|---|---:|---:|---:|---:|---|---:|---:|---:|---|---|---|---:|",
    ]
    for w in out["windows"]:
        auc, f1 = w["roc_auc"], w["f1"]
        lines.append(
            f"| {w['window']} | {w['rows']:,} | {auc['estimated']:.4f} | {auc['realised']:.4f} | {auc['error']:+.4f} "
            f"| {auc['band'][0]:.4f}-{auc['band'][1]:.4f} | {f1['estimated']:.4f} | {f1['realised']:.4f} "
            f"| {f1['error']:+.4f} | {w['domain_auc']:.3f} ({w['domain_threshold']:.3f}) "
            f"| {', '.join(w['separating'][:3])} | {'yes' if w['triggered'] else 'no'} | {w['seconds']} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
