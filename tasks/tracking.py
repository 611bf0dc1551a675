"""MLflow bookkeeping: the run of a training flow, its metrics, plots and model, and the registry entry."""

from __future__ import annotations

import functools
import io
import logging
import subprocess
from dataclasses import dataclass, field
from importlib import metadata, util
from pathlib import Path
from typing import Any

import pandas as pd
from prefect import task

from adapters.clients import log_database_outage, mlflow_client
from adapters.feature_store import service_sources
from adapters.model_store import LoggedModel, log_sklearn_model, register
from adapters.registry import champion_version, run_holdout_metrics
from adapters.run_records import log_run_records, set_version_tags
from adapters.settings import get_settings
from adapters.snapshot_listing import snapshot_listing
from core.data.dataset import DatasetConfig
from core.data.features import prepare_inputs
from core.data.fingerprint import Fingerprint, canonical_hash, code_version, listing_version, params_version
from core.evaluation.review import Review
from core.modeling.artifacts import ArtifactDigests
from core.modeling.explain import baseline_row, importance_figure
from core.modeling.search import SearchResult
from core.modeling.signature import BASELINE_ARTIFACT
from core.transformers import skops_trusted_types
from tasks.retrying import IO

log = logging.getLogger(__name__)

MODEL_ARTIFACT = "model"
# What a loaded model needs; listing it avoids MLflow's slow requirement inference (~5-10 s a model).
MODEL_REQUIREMENTS = [
    f"{dist}=={metadata.version(dist)}"
    for dist in ("scikit-learn", "pandas", "numpy", "scipy", "skops", "lightgbm")  # lightgbm: the Dask engine's models
]


def git_commit() -> str:
    """Commit of the code that runs, or `unknown` outside a git checkout."""
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# The source that trains and decides (not the CLI, the serving API or the deployments), and the libraries
# that fit the model: a change in either may change the answer, so it is part of a run's fingerprint.
TRAINING_PACKAGES = ("core", "adapters", "dask_engine", "tasks", "services", "flows")
MODEL_LIBRARIES = (
    "scikit-learn",
    "numpy",
    "scipy",
    "pandas",
    "pyarrow",
    "optuna",
    "lightgbm",
    "skops",
    "dask",
    "distributed",  # the Dask engine's training (partitions, LightGBM's Dask estimator)
    "feast",  # the point-in-time join of a feature service
)


@functools.cache  # once per process: the code it imported, even if the files are edited while it runs
def code_fingerprint() -> str:
    """The code part of a run's fingerprint: the training packages' source files and the model libraries.

    Read from wherever the packages are imported from (a checkout or an installed wheel), so a worker
    without a checkout has one too, the same code gives the same value on every worker, and an edit not yet
    committed counts (a git commit would miss it). A few hundred kB: milliseconds.
    """
    files = []
    for package in TRAINING_PACKAGES:
        spec = util.find_spec(package)
        roots = (spec.submodule_search_locations or []) if spec is not None else []
        for root in roots:
            base = Path(root)
            files += [
                (f"{package}/{path.relative_to(base).as_posix()}", path.read_bytes())
                for path in sorted(base.rglob("*"))
                if path.suffix in {".py", ".yaml"} and "__pycache__" not in path.parts
            ]
    libraries = {}
    for dist in MODEL_LIBRARIES:
        try:
            libraries[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            libraries[dist] = "absent"
    return code_version(files, libraries)


@task(name="fingerprint", **IO)
def fingerprint_run(config: DatasetConfig, params: dict[str, Any]) -> Fingerprint:
    """Prefect task: what this run depends on (data listing, config, params, code), without reading the data."""
    settings = get_settings()
    listing = snapshot_listing(config.source, config.format, settings)
    if config.feature_service:
        # Features joined from the store are training data too: a rewritten history table is new data even when
        # the snapshot's files are the same (its listing counts under a name no snapshot file can have).
        listing += [
            (f"feature-store:{config.feature_service}:{source}{name}", stamp, size)
            for source in service_sources(settings, config.feature_service)  # its views' tables, per the registry
            for name, stamp, size in snapshot_listing(source, "parquet", settings)
        ]
    fingerprint = Fingerprint(
        data=listing_version(listing),
        config=canonical_hash(config.model_dump(mode="json")),
        params=params_version(params),
        code=code_fingerprint(),
    )
    log.info("fingerprint of this run (%d file(s) listed): %s", len(listing), fingerprint.tags())
    return fingerprint


@dataclass(frozen=True)
class ChampionRecord:
    """The current champion as its registry entry records it (version None: no champion)."""

    version: str | None = None
    fingerprint: Fingerprint | None = None
    data_version: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)


@task(name="champion-fingerprint", **IO)
def champion_record(model_name: str) -> ChampionRecord:
    """Prefect task: the champion's version, recorded fingerprint, data version and holdout metrics."""
    version = champion_version(model_name)
    if version is None:
        return ChampionRecord()
    client = mlflow_client(get_settings())
    tags = client.get_model_version(model_name, version).tags
    fingerprint = Fingerprint.from_tags(tags)
    metrics = run_holdout_metrics(client, tags.get("run_id")) if fingerprint is not None else {}
    return ChampionRecord(version, fingerprint, tags.get("data_version"), metrics)


@task(name="start-run", **IO)
def start_run(config: DatasetConfig, params: dict[str, Any], tags: dict[str, str]) -> str:
    """Prefect task: create the MLflow run of this training flow in the dataset's experiment."""
    client = mlflow_client(get_settings())
    experiment = client.get_experiment_by_name(config.name)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(config.name)
    run = client.create_run(experiment_id, tags=tags | {"git_commit": git_commit()}, run_name=tags.get("run_name"))
    log_run_records(client, run.info.run_id, params=params)
    log.info("MLflow run %s in experiment %r", run.info.run_id, config.name)
    return run.info.run_id


@task(name="log-evaluation", **IO)
def log_evaluation(
    run_id: str, search: SearchResult, metrics: dict[str, float], figures: dict[str, Any], report_json: str
) -> None:
    """Prefect task: holdout metrics, plots, the search trials and the validation report, in the run."""
    import matplotlib.pyplot as plt

    client = mlflow_client(get_settings())
    states = [t.state for t in search.trials]
    # The parameters of the shipped model: the chosen trial's, exactly (a test compares them with the model).
    params = {"best_family": search.family} | {f"best_{key}": value for key, value in search.params.items()}
    scores = {f"holdout_{name}": value for name, value in metrics.items()} | {
        f"cv_{search.metric or search.scoring}": search.cv_metric
    }
    scores |= {f"search_{state}_trials": states.count(state) for state in ("complete", "pruned", "degenerate")}
    tags: dict[str, str] = dict(search.record_tags)  # training.*: what ran where, on how many rows
    best = {"family": search.family, "params": search.params, "cv": search.cv_metric}
    if search.calibration is not None:  # what the calibration step compared, chose and why
        calibration = search.calibration
        params |= calibration.params()
        scores |= calibration.metrics()
        tags |= calibration.tags()
        best["calibration"] = calibration.to_dict()
    log_run_records(client, run_id, params=params, metrics=scores, tags=tags)
    client.log_dict(run_id, best, "search/best.json")
    for name, figure in figures.items():
        client.log_figure(run_id, figure, f"plots/{name}")
        plt.close(figure)
    buffer = io.StringIO()
    search.trials_frame().to_csv(buffer, index=False)
    client.log_text(run_id, buffer.getvalue(), "search/trials.csv")
    client.log_text(run_id, report_json, "validation/report.json")


@task(name="log-model", **IO)
def log_model(run_id: str, model: Any, train: pd.DataFrame, config: DatasetConfig) -> tuple[str, ArtifactDigests]:
    """Prefect task: log the pipeline with its signature and an input example.

    Returns the model URI and the digests of the stored files, which the registered version must carry:
    loaders refuse a version without them (`adapters.model_store.load_registered`).
    """
    example = prepare_inputs(train.head(200), config).dropna().head(5)
    if example.empty:
        example = prepare_inputs(train.head(5), config)
    logged = LoggedModel(
        signature_inputs=prepare_inputs(train.head(1000), config),
        example=example,
        # The reference record that per-prediction contributions are measured against (serving, `?explain=true`).
        baseline_json=baseline_row(prepare_inputs(train, config)).to_json(orient="records"),
        baseline_artifact=BASELINE_ARTIFACT,
        requirements=MODEL_REQUIREMENTS,
        trusted_types=skops_trusted_types(model),
    )
    return log_sklearn_model(get_settings(), run_id, model, MODEL_ARTIFACT, logged)


@task(name="log-review", **IO)
def log_review(run_id: str, review: Review) -> None:
    """Prefect task: what the reviewer found, in the run: gates, intervals, slices, fairness."""
    client = mlflow_client(get_settings())
    client.log_text(run_id, review.to_json(), "review/review.json")
    deltas = {f"delta_{i.metric}_low": i.low for i in review.intervals} | {
        f"delta_{i.metric}": i.delta for i in review.intervals
    }
    log_run_records(client, run_id, metrics=deltas)


@task(name="log-importances", **IO)
def log_importances(run_id: str, importances: pd.DataFrame) -> None:
    """Prefect task: what the candidate relies on, in the run: the importance plot and table."""
    if importances.empty:
        return
    client = mlflow_client(get_settings())
    client.log_figure(run_id, importance_figure(importances), "plots/feature_importance.png")
    client.log_text(run_id, importances.to_csv(index=False), "explain/importances.csv")


@task(name="register", **IO)
def register_model(model_uri: str, model_name: str, run_id: str, tags: dict[str, str]) -> str:
    """Prefect task: register the candidate as a new version of `model_name`; returns the version."""
    version = register(get_settings(), model_uri, model_name, tags | {"run_id": run_id})
    log.info("registered %s v%s", model_name, version)
    return version


@task(name="record-decision", **IO)
def record_decision(
    run_id: str, model_name: str, version: str | None, tags: dict[str, str], markdown: str, decision_json: str
) -> None:
    """Prefect task: the decision as tags on the run and the model version, and as files in the run."""
    client = mlflow_client(get_settings())
    log_run_records(client, run_id, tags=tags)
    if version is not None:
        set_version_tags(client, model_name, version, tags)
    client.log_text(run_id, markdown, "decision/decision.md")
    client.log_text(run_id, decision_json, "decision/decision.json")


def explain_outage() -> None:
    """After a failed run: log it when the cause is the database under Prefect and MLflow.

    Not a task: Prefect's own API may be what is down.
    """
    log_database_outage(get_settings())


@task(name="end-run", **IO)
def end_run(run_id: str, status: str) -> None:
    """Prefect task: close the MLflow run as FINISHED or FAILED."""
    mlflow_client(get_settings()).set_terminated(run_id, status=status)
