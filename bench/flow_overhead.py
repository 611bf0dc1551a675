"""Wall time of the training flow against a bare scikit-learn script on the same data, in one run.

The baseline reads the same Parquet bytes into pandas, splits with the same frozen holdout, runs the
same search (same families, trials, folds, seed) and evaluates on the holdout: no Prefect, no MLflow, no
Great Expectations, no S3. The flow does all of that plus validation, tracking, plots, registration and
the champion comparison. The per-task breakdown comes from the Prefect server's task runs.

Needs the stack (`mlops stack up`). Usage: `python -m bench.flow_overhead [--rows 100000 1000000]`.
Results: bench/results/flow_overhead.md and .json.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import time
from collections import defaultdict
from pathlib import Path

from mlops.stack import CLIENT_DEFAULTS

os.environ.update(CLIENT_DEFAULTS)  # before Prefect and MLflow load

import pandas as pd
import yaml

from adapters.clients import S3Location, check_stack, put_bytes, s3_client
from adapters.settings import get_settings
from core.data.dataset import bundled_config_text, parse_dataset_config
from core.data.split import split_frame
from core.data.synthetic import generate_frame
from core.modeling.metrics import evaluate_on
from core.modeling.search import ModelFamily, SearchSpec, search_models

RESULTS = Path(__file__).parent / "results"
SPEC = SearchSpec(
    families=[ModelFamily.logistic_regression, ModelFamily.hist_gradient_boosting],
    trials_per_family=2,
    cv_folds=3,
)
SEED = 42


def _prepare(rows: int) -> tuple[str, bytes]:
    """Write `rows` synthetic rows to S3 as one Parquet file and a config pointing at it."""
    settings = get_settings()
    frame = generate_frame(rows, seed=SEED)
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    body = buffer.getvalue()
    name = f"bench-{rows}"
    data = S3Location(settings.bucket, f"bench/{name}/data/part-0.parquet")
    put_bytes(settings, data, body, "application/x-parquet")
    raw = yaml.safe_load(bundled_config_text("credit-risk")) | {
        "name": name,
        "model_name": name,
        "source": f"s3://{settings.bucket}/bench/{name}/data/",
    }
    config_location = S3Location(settings.bucket, f"bench/{name}/dataset.yaml")
    put_bytes(settings, config_location, yaml.safe_dump(raw).encode(), "application/yaml")
    return config_location.uri, body


def baseline(config_uri: str, body: bytes) -> float:
    """Bare scikit-learn: parse, split, search, evaluate. Returns seconds."""
    location = S3Location.parse(config_uri)
    text = s3_client(get_settings()).get_object(Bucket=location.bucket, Key=location.key)["Body"].read().decode()
    config = parse_dataset_config(text, config_uri)
    started = time.perf_counter()
    frame = pd.read_parquet(io.BytesIO(body))
    split = split_frame(frame, config)
    result = search_models(split.train, config, SPEC, SEED)
    evaluate_on(result.model, split.holdout, config)
    return time.perf_counter() - started


def _task_breakdown(flow_run_id: str) -> dict[str, float]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    totals: dict[str, float] = defaultdict(float)
    for run in runs:
        # task run names are "<task name>-<suffix>"
        totals[run.name.rsplit("-", 1)[0]] += run.total_run_time.total_seconds()
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


def flow(config_uri: str) -> tuple[float, dict[str, float]]:
    """The full training flow on the same data. Returns seconds and seconds per task name."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.training import TrainingParams, training

    settings = get_settings()
    with temporary_settings({PREFECT_API_URL: settings.prefect_api_url}):
        started = time.perf_counter()
        state = training(TrainingParams(dataset=config_uri, search=SPEC, seed=SEED), return_state=True)
        seconds = time.perf_counter() - started
        if not state.is_completed():
            raise RuntimeError(f"flow failed: {state.message}")
        return seconds, _task_breakdown(str(state.state_details.flow_run_id))


def main() -> None:
    """Run both sides at each size and write the report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    args = parser.parse_args()
    check_stack(get_settings())
    RESULTS.mkdir(exist_ok=True)
    results = []
    for rows in args.rows:
        config_uri, body = _prepare(rows)
        base = baseline(config_uri, body)
        seconds, tasks = flow(config_uri)
        # the same data again: validation comes from the S3 cache keyed by data version
        rerun_seconds, rerun_tasks = flow(config_uri)
        result = {
            "rows": rows,
            "baseline_s": round(base, 2),
            "flow_s": round(seconds, 2),
            "overhead_pct": round(100 * (seconds / base - 1), 1),
            "tasks_s": {k: round(v, 2) for k, v in tasks.items()},
            "rerun_flow_s": round(rerun_seconds, 2),
            "validate_s": round(tasks.get("validate", 0.0), 2),
            "rerun_validate_s": round(rerun_tasks.get("validate", 0.0), 2),
        }
        print(json.dumps(result), flush=True)
        results.append(result)
    (RESULTS / "flow_overhead.json").write_text(json.dumps(results, indent=2))
    lines = [
        "# Flow overhead vs a bare scikit-learn script",
        "",
        f"Search: {[f.value for f in SPEC.families]}, {SPEC.trials_per_family} trials each, {SPEC.cv_folds}-fold CV.",
        "",
        "| rows | bare sklearn (s) | flow (s) | overhead |",
        "|---:|---:|---:|---:|",
        *[f"| {r['rows']:,} | {r['baseline_s']} | {r['flow_s']} | {r['overhead_pct']} % |" for r in results],
        "",
        "## Rerun on unchanged data (validation cached by data version)",
        "",
        "| rows | validate, first run (s) | validate, rerun (s) | flow, rerun (s) |",
        "|---:|---:|---:|---:|",
        *[f"| {r['rows']:,} | {r['validate_s']} | {r['rerun_validate_s']} | {r['rerun_flow_s']} |" for r in results],
        "",
        "## Where the flow's time goes (sum of task run times, s)",
        "",
    ]
    for r in results:
        lines.append(f"- {r['rows']:,} rows: " + ", ".join(f"{k} {v}" for k, v in r["tasks_s"].items()))
    (RESULTS / "flow_overhead.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
