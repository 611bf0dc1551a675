"""Model artifacts in MLflow: log a fitted pipeline with its signature, register it, load a version to serve.

The one place outside `adapters/registry.py` that speaks MLflow's model API, so tasks, services and the serving
API stay free of it. Built from settings; nothing at import.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pandas as pd

from adapters.clients import mlflow_client, use_tracking_server
from adapters.settings import Settings


@dataclass(frozen=True)
class LoggedModel:
    """What `log_sklearn_model` needs besides the model: its example frames, artifacts and trust list."""

    signature_inputs: pd.DataFrame  # inputs the signature is inferred from
    example: pd.DataFrame  # the input example stored with the model
    baseline_json: str  # the explanation baseline record
    baseline_artifact: str
    requirements: list[str]
    trusted_types: list[str]


def log_sklearn_model(settings: Settings, run_id: str, model: Any, artifact: str, logged: LoggedModel) -> str:
    """Log the pipeline (skops) with its signature, input example and baseline into run `run_id`; its model URI."""
    import mlflow
    import mlflow.sklearn
    from mlflow.models import infer_signature

    use_tracking_server(settings)
    signature = infer_signature(logged.signature_inputs, model.predict(logged.example))
    # The fluent API refuses a run outside the process's active experiment (a notebook's `set_experiment`, or the
    # last dataset trained in this process): make the run's own experiment the active one.
    mlflow.set_experiment(experiment_id=mlflow_client(settings).get_run(run_id).info.experiment_id)
    with mlflow.start_run(run_id=run_id):
        mlflow.log_text(logged.baseline_json, logged.baseline_artifact)
        info = mlflow.sklearn.log_model(
            model,
            name=artifact,
            signature=signature,
            input_example=logged.example,
            pip_requirements=logged.requirements,
            skops_trusted_types=logged.trusted_types,
        )
    return info.model_uri


def register(settings: Settings, model_uri: str, model_name: str, tags: dict[str, str]) -> str:
    """Register `model_uri` as a new version of `model_name` with `tags`; returns the version."""
    import mlflow

    use_tracking_server(settings)
    return str(mlflow.register_model(model_uri, model_name, tags=tags).version)


def version_exists(settings: Settings, model_name: str, version: str) -> bool:
    """Whether the registry has that version of the model."""
    from mlflow.exceptions import MlflowException

    try:
        mlflow_client(settings).get_model_version(model_name, version)
    except MlflowException:
        return False
    return True


def load_pyfunc(uri: str) -> tuple[Any, Any]:
    """The fitted model behind `models:/<name>/<version>` and its logged signature (MLflow's loader)."""
    import mlflow.pyfunc

    pyfunc = mlflow.pyfunc.load_model(uri)
    return pyfunc.get_raw_model(), pyfunc.metadata.signature


def run_text(run_id: str, path: str) -> str:
    """A text artifact of a run (raises when absent)."""
    import mlflow.artifacts

    return mlflow.artifacts.load_text(f"runs:/{run_id}/{path}")


def run_json(run_id: str, path: str) -> Any:
    """A JSON artifact of a run."""
    return json.loads(run_text(run_id, path))


def run_bytes(run_id: str, path: str) -> bytes:
    """A binary artifact of a run."""
    import mlflow.artifacts

    local = mlflow.artifacts.download_artifacts(f"runs:/{run_id}/{path}")
    with open(local, "rb") as file:
        return file.read()
