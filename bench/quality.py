"""Quality of the registered model on public tables, against HistGradientBoosting defaults and FLAML, in one run.

Tables that installed packages ship (nothing is downloaded): scikit-learn's breast_cancer, wine, digits and
diabetes; statsmodels' fair (binary: any affair) and randhie (doctor visits); vega_datasets' cars (mpg, with a
model-year date and a name column of 300+ values) and seattle-weather (daily maximum temperature, 2012-2015).
For each table, as a new user would run the project:

1. a row number is added as the id column (`row_id`), then 20 % of the rows are kept **outside** everything
   the project sees: a seeded random draw (stratified for a class target), or, for a table with a date
   column, the latest 20 % by that date (a model is used on later rows than it learnt from);
2. the other rows, the snapshot, are written to the stack's S3 as Parquet; the dataset config is what
   `mlops data init` infers from it (`core.data.config_inference.infer_config` on the snapshot as read back);
3. the training flow runs on it (registers a version; its frozen holdout comes out of the snapshot) and its
   wall time is measured; the registered version is loaded from the registry as serving loads it;
4. HistGradientBoosting with default parameters, and FLAML's AutoML at its defaults with the flow's wall time
   as its time budget, are fitted on the same training rows as the registered model (the project's split of
   the snapshot), on the table's own columns (id and target removed; see `baseline_inputs`, `flaml_inputs`);
5. all three are scored on the outside rows with the project's primary metric for the task (ROC AUC, macro
   one-vs-rest for multiclass; RMSE for regression, R² reported beside it), by `core.modeling.metrics`.

By default a private stack (S3, MLflow, Prefect; no Dask cluster, no serving API) runs on free loopback ports in
a temporary folder and is stopped at the end; `--stack` uses the configured one instead. `--quick` is a smoke
run: two small tables, one trial per family, two folds. Results: bench/results/quality.{json,md}.

    python -m bench.quality [--quick] [--tables breast_cancer diabetes] [--stack]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

RESULTS = Path(__file__).parent / "results"
SEED = 42
OUTSIDE_FRACTION = 0.2
ID = "row_id"
# HistGradientBoosting takes at most this many categories in a categorical column (its max_bins).
HGB_MAX_CATEGORIES = 255


# --- tables ---


@dataclass(frozen=True)
class Table:
    """A table shipped by an installed package: where it comes from, its target and its date column if any."""

    name: str
    origin: str
    target: str
    load: Callable[[], pd.DataFrame]
    time: str | None = None  # with a date column, the outside rows are the latest period


def _sklearn(loader: str) -> Callable[[], pd.DataFrame]:
    def load() -> pd.DataFrame:
        import sklearn.datasets

        return getattr(sklearn.datasets, loader)(as_frame=True).frame

    return load


def _fair() -> pd.DataFrame:
    from statsmodels.datasets import fair

    frame = fair.load_pandas().data
    # The usual binary reading of this table (statsmodels' own logit example): any affair at all.
    return frame.assign(had_affair=(frame["affairs"] > 0).astype("int64")).drop(columns=["affairs"])


def _randhie() -> pd.DataFrame:
    from statsmodels.datasets import randhie

    return randhie.load_pandas().data


def _cars() -> pd.DataFrame:
    from vega_datasets import local_data

    frame = local_data.cars()
    return frame.loc[frame["Miles_per_Gallon"].notna()].reset_index(drop=True)  # 8 cars have no mpg


def _seattle_weather() -> pd.DataFrame:
    from vega_datasets import local_data

    return local_data.seattle_weather()


TABLES = {
    t.name: t
    for t in (
        Table("breast_cancer", "scikit-learn load_breast_cancer", "target", _sklearn("load_breast_cancer")),
        Table("wine", "scikit-learn load_wine", "target", _sklearn("load_wine")),
        Table("digits", "scikit-learn load_digits", "target", _sklearn("load_digits")),
        Table("diabetes", "scikit-learn load_diabetes", "target", _sklearn("load_diabetes")),
        Table("fair", "statsmodels datasets.fair (affairs > 0)", "had_affair", _fair),
        Table("randhie", "statsmodels datasets.randhie", "mdvis", _randhie),
        Table("cars", "vega_datasets local_data.cars", "Miles_per_Gallon", _cars, time="Year"),
        Table("seattle_weather", "vega_datasets local_data.seattle_weather", "temp_max", _seattle_weather, "date"),
    )
}
QUICK_TABLES = ("breast_cancer", "diabetes")


def load_table(table: Table) -> pd.DataFrame:
    """The table as shipped, with a row number as its first column (the id the frozen holdout hashes)."""
    frame = table.load().reset_index(drop=True)
    frame.insert(0, ID, np.arange(len(frame), dtype="int64"))
    return frame


def split_outside(frame: pd.DataFrame, table: Table) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    """(snapshot, outside rows, how): the outside rows never reach the project's S3, config or training.

    With a date column: the rows at or after the time below which 80 % of the rows fall. Otherwise a draw
    seeded with SEED, stratified when the target has at most 20 distinct values (`data init`'s class cap).
    """
    if table.time is not None:
        times = pd.to_datetime(frame[table.time])
        ordered = times.sort_values(ignore_index=True)
        cutoff = ordered.iloc[int(np.floor((1 - OUTSIDE_FRACTION) * len(ordered)))]
        outside = (times >= cutoff).to_numpy()
        how = f"latest by {table.time} (from {cutoff.date().isoformat()})"
    else:
        from sklearn.model_selection import train_test_split

        target = frame[table.target]
        stratify = target if target.nunique() <= 20 else None
        _, held = train_test_split(frame.index, test_size=OUTSIDE_FRACTION, random_state=SEED, stratify=stratify)
        outside = frame.index.isin(held)
        how = f"random, seed {SEED}" + (", stratified" if stratify is not None else "")
    return frame.loc[~outside].reset_index(drop=True), frame.loc[outside].reset_index(drop=True), how


# --- the stack ---


@contextmanager
def private_stack(use_configured: bool) -> Iterator[Any]:
    """S3, MLflow and Prefect on free loopback ports in a temporary folder (or the configured stack); yields
    settings. Every client of this process points at it while the block runs."""
    from adapters.clients import check_stack, use_tracking_server
    from adapters.settings import Settings, get_settings
    from mlops import stack as local_stack
    from tests.ports import free_port, free_port_block

    def ready(settings: Settings) -> Iterator[Settings]:
        from prefect.settings import PREFECT_API_URL, temporary_settings

        env = local_stack.client_env(settings)
        if not use_configured:  # client_env names the default serving API; the private stack has none to check
            env.pop("MLOPS_SERVING_URL")
        os.environ.update(env)
        use_tracking_server(settings)
        with temporary_settings({PREFECT_API_URL: settings.prefect_api_url}):
            yield settings

    if use_configured:
        settings = get_settings()
        check_stack(settings)
        yield from ready(settings)
        return
    with tempfile.TemporaryDirectory(prefix="bench-quality-") as state:
        for var in ("MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL_S3", "MLFLOW_S3_ENDPOINT_URL", "PREFECT_API_URL"):
            os.environ.pop(var, None)
        for var in ("MLOPS_SERVING_URL", "MLOPS_DASK_ADDRESS"):  # no serving check, no cluster: this process
            os.environ.pop(var, None)
        os.environ.update(
            {
                "MLOPS_STATE_DIR": state,
                "MLOPS_S3_PORT": str(free_port()),
                "MLOPS_MLFLOW_PORT": str(free_port()),
                "MLOPS_PREFECT_PORT": str(free_port()),
                "MLOPS_POSTGRES_PORT": str(free_port()),
                "MLOPS_WEED_PORT_BASE": str(free_port_block(16)),
                "MLOPS_DASK_WORKERS": "0",
            }
        )
        settings = Settings()
        started = [s for s in local_stack.services(settings) if s.name in ("postgres", "s3", "mlflow", "prefect")]
        try:
            for service in started:
                local_stack._start(service, settings, 180.0)
            yield from ready(settings)
        finally:
            for service in reversed(started):
                if (pid := local_stack._read_pid(service)) is not None:
                    local_stack._stop_pid(pid)


def write_snapshot(settings: Any, table: Table, snapshot: pd.DataFrame, folder: Path) -> tuple[Path, Any, Any]:
    """The snapshot to S3 as Parquet, then `mlops data init`'s config of it; returns (config file, the
    inferred config, the snapshot as the flow reads it)."""
    import io

    from adapters.clients import S3Location, put_bytes
    from adapters.snapshots import read_snapshot
    from core.data.config_inference import InferenceRequest, infer_config

    name = f"quality-{table.name.replace('_', '-')}"
    buffer = io.BytesIO()
    snapshot.to_parquet(buffer, index=False)
    put_bytes(
        settings,
        S3Location(settings.bucket, f"datasets/{name}/part-0.parquet"),
        buffer.getvalue(),
        "application/x-parquet",
    )
    source = f"s3://{settings.bucket}/datasets/{name}/"
    # What `mlops data init SOURCE --target T --id row_id --name NAME --out FILE` does with the same arguments.
    read = read_snapshot(source, "parquet", settings).frame
    request = InferenceRequest(source=source, fmt="parquet", target=table.target, id_column=ID, name=name)
    inferred = infer_config(read, request)
    path = folder / f"{name}.yaml"
    path.write_text(inferred.to_yaml())
    return path, inferred, read


# --- the three contenders ---


def run_project(config_path: Path, config: Any, spec: Any, outside: pd.DataFrame) -> dict[str, Any]:
    """The training flow on the snapshot, then its registered version scored on the outside rows."""
    from adapters.registry import load_model
    from core.modeling.metrics import evaluate_on
    from flows.training import TrainingParams, training

    params = TrainingParams(dataset=str(config_path), search=spec, seed=SEED, force=True, reason="bench.quality")
    started = time.perf_counter()
    outcome = training(params)
    seconds = time.perf_counter() - started
    if outcome.candidate_version is None:
        raise RuntimeError(f"the flow registered no version: {outcome.decision.reasons}")
    model = load_model(config.model_name, outcome.candidate_version, where="bench.quality")
    estimator = model[-1] if hasattr(model, "steps") else model
    inner = getattr(estimator, "estimator", None)  # a wrapper's model (e.g. a calibrated classifier's)
    return {
        "metrics": evaluate_on(model, outside, config),
        "seconds": round(seconds, 1),
        "version": outcome.candidate_version,
        "model": type(estimator).__name__ + (f"({type(inner).__name__})" if inner is not None else ""),
        "promoted": outcome.promoted,
        "decision": outcome.decision.reasons[:3],
        "own_holdout": outcome.decision.candidate_metrics,
    }


def training_rows(read: pd.DataFrame, config: Any) -> pd.DataFrame:
    """The rows the registered model was fitted on: the project's own split of the snapshot."""
    from core.data.split import split_frame

    return split_frame(read, config).train


def baseline_inputs(frame: pd.DataFrame, config: Any, categories: dict[str, list[Any]] | None = None) -> tuple:
    """The table's columns as HistGradientBoosting takes them with its defaults: id and target removed, dates as
    days since 1970, text as pandas categories (those of the training rows; `categorical_features="from_dtype"`).
    Text with more than 255 values is dropped (HistGradientBoosting refuses it). Returns (X, categories)."""
    X = frame.drop(columns=[config.id_column, config.target])
    fitted = categories is None
    categories = {} if categories is None else categories
    for column in list(X.columns):
        values = X[column]
        if pd.api.types.is_datetime64_any_dtype(values.dtype):
            stamps = pd.to_datetime(values, utc=True)
            X[column] = (stamps - pd.Timestamp(0, tz="UTC")).dt.total_seconds() / 86_400
        elif pd.api.types.is_bool_dtype(values.dtype):
            X[column] = values.astype("float64")
        elif not pd.api.types.is_numeric_dtype(values.dtype):
            if fitted:
                seen = sorted(values.dropna().astype(str).unique())
                if len(seen) <= HGB_MAX_CATEGORIES:
                    categories[column] = seen
            if column not in categories:
                X = X.drop(columns=[column])
                continue
            X[column] = pd.Categorical(values.astype("string"), categories=categories[column])
    return X, categories


def run_hgb(train: pd.DataFrame, outside: pd.DataFrame, config: Any) -> dict[str, Any]:
    """HistGradientBoosting with default parameters (seeded), fitted on the training rows."""
    from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor

    from core.modeling.metrics import compute_metrics, model_classes, model_scores

    X, categories = baseline_inputs(train, config)
    kind = HistGradientBoostingClassifier if config.task.is_classification else HistGradientBoostingRegressor
    started = time.perf_counter()
    model = kind(random_state=SEED).fit(X, train[config.target])
    seconds = time.perf_counter() - started
    X_out, _ = baseline_inputs(outside, config, categories)
    scores = model_scores(model, X_out)
    return {
        "metrics": compute_metrics(outside[config.target], scores, model_classes(model)),
        "seconds": round(seconds, 1),
        "columns_dropped": sorted(set(train.columns) - set(X.columns) - {config.id_column, config.target}),
    }


def flaml_inputs(frame: pd.DataFrame, config: Any) -> pd.DataFrame:
    """The table's columns as FLAML takes them: id and target removed; it encodes dates and text itself."""
    return frame.drop(columns=[config.id_column, config.target])


def run_flaml(train: pd.DataFrame, outside: pd.DataFrame, config: Any, primary: str, budget: float) -> dict[str, Any]:
    """FLAML's AutoML at its defaults (estimators, evaluation, retraining on all the rows), `budget` seconds."""
    from flaml import AutoML

    from core.modeling.metrics import compute_metrics

    # The same metric as the project's, in FLAML's names (its roc_auc_ovr is macro-averaged, as ours).
    metric = {"roc_auc": "roc_auc_ovr" if config.task.value == "multiclass" else "roc_auc"}.get(primary, primary)
    task = "classification" if config.task.is_classification else "regression"
    automl = AutoML()
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        automl.fit(
            flaml_inputs(train, config),
            train[config.target],
            task=task,
            metric=metric,
            time_budget=budget,
            seed=SEED,
            verbose=0,
        )
        seconds = time.perf_counter() - started
        X_out = flaml_inputs(outside, config)
        if config.task.is_classification:
            scores, classes = automl.predict_proba(X_out), list(automl.classes_)
        else:
            scores, classes = np.asarray(automl.predict(X_out), dtype="float64"), []
    return {
        "metrics": compute_metrics(outside[config.target], scores, classes),
        "seconds": round(seconds, 1),
        "budget": round(budget, 1),
        "model": automl.best_estimator,
        "flaml_metric": metric,
    }


def _attempt(name: str, run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """A contender's result, or its error (one failure does not stop the other contenders or tables)."""
    started = time.perf_counter()
    try:
        result = run()
    except Exception as exc:  # recorded in the results, the run goes on
        traceback.print_exc()
        result = {"error": f"{type(exc).__name__}: {exc}"[:400]}
    print(f"[bench.quality] {name}: {time.perf_counter() - started:.1f} s in all", flush=True)
    return result


def run_table(settings: Any, table: Table, spec: Any, folder: Path, fallback_budget: float) -> dict[str, Any]:
    """The three contenders on one table."""
    from core.evaluation.decision import Gates, resolve_gates

    started = time.perf_counter()
    frame = load_table(table)
    snapshot, outside, how = split_outside(frame, table)
    result: dict[str, Any] = {
        "table": table.name,
        "origin": table.origin,
        "rows": len(frame),
        "snapshot_rows": len(snapshot),
        "outside_rows": len(outside),
        "outside": how,
    }
    try:
        config_path, inferred, read = write_snapshot(settings, table, snapshot, folder)
    except Exception as exc:  # `data init` refused the table: recorded, the run goes on
        return result | {"error": f"data init: {type(exc).__name__}: {exc}"[:400]}
    print(f"[bench.quality] {table.name}: snapshot and config in {time.perf_counter() - started:.1f} s", flush=True)
    config = inferred.config
    primary = resolve_gates(Gates(), config.task).primary_metric
    train = training_rows(read, config)
    result |= {
        "task": config.task.value,
        "metric": primary,
        "features": len(config.features),
        "time_column": config.time_column,
        "left_out": inferred.left_out,
        "training_rows": len(train),
    }
    result["project"] = _attempt("project", lambda: run_project(config_path, config, spec, outside))
    budget = result["project"].get("seconds", fallback_budget)
    result["hgb"] = _attempt("hgb", lambda: run_hgb(train, outside, config))
    result["flaml"] = _attempt("flaml", lambda: run_flaml(train, outside, config, primary, budget))
    result["winner"], result["project_vs_flaml"] = _verdict(result, primary)
    return result


CONTENDERS = {"project": "project", "hgb": "HGB defaults", "flaml": "FLAML"}


def _verdict(result: dict[str, Any], primary: str) -> tuple[str | None, float | None]:
    """The best contender on the primary metric, and project minus FLAML signed so that > 0 is the project ahead."""
    from core.modeling.metrics import improvement

    scored = {k: result[k]["metrics"][primary] for k in CONTENDERS if "metrics" in result[k]}
    if not scored:
        return None, None
    best = max(scored, key=lambda k: improvement(primary, scored[k], 0.0))
    gap = None
    if "project" in scored and "flaml" in scored:
        gap = round(improvement(primary, scored["project"], scored["flaml"]), 4)
    return CONTENDERS[best], gap


# --- report ---


def _score(part: dict[str, Any], metric: str) -> str:
    return f"{part['metrics'][metric]:.4f}" if "metrics" in part else "failed"


def markdown(report: dict[str, Any]) -> str:
    """The results as the Markdown page bench/results/quality.md."""
    search = report["search"]
    lines = [
        f"# Model quality on public tables ({report['started']}, {report['cpus']} CPUs"
        + (", --quick: a smoke run, not the benchmark" if report["quick"] else "")
        + ")",
        "",
        f"Scored on rows outside everything the project saw ({OUTSIDE_FRACTION:.0%} of each table: the latest "
        "period for a table with a date, else a seeded draw). **project**: the version the training flow "
        f"registered (search: {search}); **HGB defaults**: scikit-learn's HistGradientBoosting with default "
        f"parameters; **FLAML** {report['versions']['flaml']}: AutoML at its defaults with the flow's wall time "
        "as its time budget. HGB and FLAML are fitted on the registered model's training rows. Metric: the "
        "project's primary metric for the task (roc_auc higher is better, macro one-vs-rest for multiclass; "
        "rmse lower is better). The gap is project minus FLAML, signed so that > 0 means the project is ahead.",
        "",
        "| table | rows (outside) | task | metric | project | HGB defaults | FLAML | project wall | FLAML wall "
        "| winner | project vs FLAML |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in report["tables"]:
        if "metric" not in r:
            lines.append(f"| {r['table']} | {r['rows']:,} ({r['outside_rows']:,}) | | | {r['error']} | | | | | | |")
            continue
        m, p, f = r["metric"], r["project"], r["flaml"]
        gap = "" if r["project_vs_flaml"] is None else f"{r['project_vs_flaml']:+.4f}"
        lines.append(
            f"| {r['table']} | {r['rows']:,} ({r['outside_rows']:,}) | {r['task']} | {m} | {_score(p, m)} "
            f"| {_score(r['hgb'], m)} | {_score(f, m)} | {p.get('seconds', '-')} s | {f.get('seconds', '-')} s "
            f"| {r['winner'] or '-'} | {gap} |"
        )
    regressions = [r for r in report["tables"] if r.get("task") == "regression"]
    if regressions:
        lines += [
            "",
            "R² on the same rows (regression):",
            "",
            "| table | project | HGB defaults | FLAML |",
            "|---|---:|---:|---:|",
        ]
        lines += [
            f"| {r['table']} | {_score(r['project'], 'r2')} | {_score(r['hgb'], 'r2')} | {_score(r['flaml'], 'r2')} |"
            for r in regressions
        ]
    lines += ["", "Per table:", ""]
    for r in report["tables"]:
        lines.append(f"- **{r['table']}** ({r['origin']}): outside rows {r['outside']}; " + _details(r))
    return "\n".join(lines) + "\n"


def _details(r: dict[str, Any]) -> str:
    if "metric" not in r:
        return r["error"]
    p, m = r["project"], r["metric"]
    parts = [f"{r['features']} features, {r['training_rows']:,} training rows"]
    if r["left_out"]:
        parts.append("left out by data init: " + "; ".join(r["left_out"].values()))
    if "metrics" in p:
        own = p["own_holdout"].get(m)
        parts.append(
            f"project: v{p['version']} {p['model']}, "
            + ("promoted" if p["promoted"] else f"not promoted ({'; '.join(p['decision'])})")
            + (f", {m} {own:.4f} on its own holdout" if own is not None else "")
        )
    else:
        parts.append(f"project: {p['error']}")
    if r["hgb"].get("columns_dropped"):
        parts.append(f"HGB without {', '.join(r['hgb']['columns_dropped'])} (over {HGB_MAX_CATEGORIES} values)")
    f = r["flaml"]
    parts.append(f"FLAML: {f['model']}, budget {f['budget']} s" if "metrics" in f else f"FLAML: {f['error']}")
    return "; ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 small tables, 1 trial per family, 2 folds")
    parser.add_argument("--tables", nargs="+", choices=sorted(TABLES), help="default: all (--quick: 2)")
    parser.add_argument("--stack", action="store_true", help="use the configured stack instead of a private one")
    parser.add_argument(
        "--fallback-budget", type=float, default=60.0, help="FLAML's seconds on a table where the flow failed"
    )
    args = parser.parse_args()

    from mlops.stack import CLIENT_DEFAULTS

    os.environ.update(CLIENT_DEFAULTS)  # before Prefect and MLflow load
    from core.modeling.search import SearchSpec

    spec = SearchSpec(trials_per_family=1, cv_folds=2) if args.quick else SearchSpec()
    names = args.tables or (QUICK_TABLES if args.quick else list(TABLES))
    report: dict[str, Any] = {
        "started": datetime.now(UTC).replace(microsecond=0).isoformat(),
        "quick": args.quick,
        "cpus": os.cpu_count(),
        "seed": SEED,
        "outside_fraction": OUTSIDE_FRACTION,
        "search": "the default" if not args.quick else "1 trial per family, 2-fold CV",
        "search_spec": spec.model_dump(mode="json"),
        "versions": {p: version(p) for p in ("flaml", "scikit-learn", "lightgbm", "xgboost-cpu")},
        "tables": [],
    }
    started = time.perf_counter()
    with private_stack(args.stack) as settings, tempfile.TemporaryDirectory(prefix="bench-quality-configs-") as tmp:
        print(f"[bench.quality] stack ready in {time.perf_counter() - started:.1f} s", flush=True)
        for name in names:
            print(f"--- {name}", flush=True)
            result = run_table(settings, TABLES[name], spec, Path(tmp), args.fallback_budget)
            print(json.dumps(result, default=str), flush=True)
            report["tables"].append(result)
    report["seconds"] = round(time.perf_counter() - started, 1)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "quality.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    text = markdown(report)
    (RESULTS / "quality.md").write_text(text)
    print(text)
    print(f"total {report['seconds']} s")


if __name__ == "__main__":
    main()
