"""Model artifacts in MLflow: log a fitted pipeline with its signature, register it, load a version to serve.

The one place outside `adapters/registry.py` that speaks MLflow's model API, so tasks, services and the serving
API stay free of it. Built from settings; nothing at import.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from adapters.clients import mlflow_client, use_tracking_server
from adapters.run_records import set_version_tags
from adapters.settings import Settings
from core.modeling.artifacts import (
    MLMODEL_FILE,
    MODEL_FILE,
    ArtifactDigests,
    UntrustedArtifactError,
    load_skops,
)


@dataclass(frozen=True)
class LoggedModel:
    """What `log_sklearn_model` needs besides the model: its example frames, artifacts and trust list."""

    signature_inputs: pd.DataFrame  # inputs the signature is inferred from
    example: pd.DataFrame  # rows the stored model's outputs are checked on (and the signature's outputs)
    baseline_json: str  # the explanation baseline record
    baseline_artifact: str
    requirements: list[str]
    trusted_types: list[str]


def log_sklearn_model(
    settings: Settings, run_id: str, model: Any, artifact: str, logged: LoggedModel
) -> tuple[str, ArtifactDigests]:
    """Log the pipeline (skops) with its signature and explanation baseline into run `run_id`.

    Returns its model URI and the digests of the stored files (`stored_digests`), for the registered version.
    """
    import mlflow
    import mlflow.sklearn
    from mlflow.models import infer_signature

    use_tracking_server(settings)
    signature = infer_signature(logged.signature_inputs, model.predict(logged.example))
    # The fluent API refuses a run outside the process's active experiment (a notebook's `set_experiment`, or the
    # last dataset trained in this process): make the run's own experiment the active one.
    mlflow.set_experiment(experiment_id=mlflow_client(settings).get_run(run_id).info.experiment_id)
    with mlflow.start_run(run_id=run_id), _no_requirement_check():
        mlflow.log_text(logged.baseline_json, logged.baseline_artifact)
        info = mlflow.sklearn.log_model(
            model,
            name=artifact,
            signature=signature,
            # No input example: MLflow would load the stored model through its own loader to check it, which
            # MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false forbids; `stored_digests` checks the example with ours.
            pip_requirements=logged.requirements,
            skops_trusted_types=logged.trusted_types,
        )
    return info.model_uri, stored_digests(settings, info.model_uri, model, logged.example)


@contextmanager
def _no_requirement_check() -> Iterator[None]:
    """Leave out MLflow's check of the logged requirements against the installed packages, for the block.

    The requirements are the installed versions themselves (`tasks.tracking.MODEL_REQUIREMENTS`), so the check
    cannot find a mismatch, and it costs about a second per process: it maps every installed distribution's
    files to their modules first.
    """
    from mlflow.utils import environment

    check = environment.warn_dependency_requirement_mismatches
    environment.warn_dependency_requirement_mismatches = lambda requirements: None
    try:
        yield
    finally:
        environment.warn_dependency_requirement_mismatches = check


def _download(settings: Settings, uri: str) -> bytes:
    """The bytes of one stored artifact file (into a temporary folder, removed after)."""
    import mlflow.artifacts

    use_tracking_server(settings)  # a models:/ URI is resolved by the process's registry, not `tracking_uri`
    with tempfile.TemporaryDirectory() as folder:
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=uri, dst_path=folder, tracking_uri=settings.mlflow_tracking_uri
        )
        return Path(local).read_bytes()


def _outputs(model: Any, rows: pd.DataFrame) -> np.ndarray:
    return model.predict_proba(rows) if hasattr(model, "predict_proba") else model.predict(rows)


def stored_digests(settings: Settings, model_uri: str, model: Any, example: pd.DataFrame) -> ArtifactDigests:
    """The digests of the model just logged at `model_uri` (`models:/m-...`), read back from the store.

    The stored skops file is loaded (with the project's own types only) and must give `model`'s outputs on
    `example` exactly: the digests recorded at registration are those of the model this run trained.
    """
    location = mlflow_client(settings).get_logged_model(model_uri.removeprefix("models:/")).artifact_location
    data = _download(settings, f"{location}/{MODEL_FILE}")
    mlmodel = _download(settings, f"{location}/{MLMODEL_FILE}")
    stored = load_skops(data, f"the model just logged at {model_uri}")
    if not np.array_equal(_outputs(stored, example), _outputs(model, example)):
        raise UntrustedArtifactError(f"the model stored at {model_uri} does not give the trained model's outputs")
    return ArtifactDigests.of(data, mlmodel)


@dataclass(frozen=True)
class RegisteredModel:
    """A registered version loaded after its checks: the fitted pipeline, its signature and the version."""

    pipeline: Any
    signature: Any
    details: Any  # MLflow's ModelVersion (tags, run id, source)


def load_registered(settings: Settings, model_name: str, version: str) -> RegisteredModel:
    """A registered version, loaded only when its stored files are the ones training recorded.

    The version's digests (tags) are checked on the downloaded skops file and MLmodel, and the types the
    skops file names against the project's list, before anything is deserialised; the artifact's own
    loading instructions (format, trusted types) are never read. The signature comes from the checked MLmodel.

    Raises:
        UntrustedArtifactError: no digests, another format, other bytes, or a type the project does not load.
    """
    from mlflow.models import Model

    what = f"{model_name} v{version}"
    details = mlflow_client(settings).get_model_version(model_name, version)
    digests = ArtifactDigests.from_tags(details.tags or {}, what)
    data = _download(settings, f"models:/{model_name}/{version}/{MODEL_FILE}")
    mlmodel = _download(settings, f"models:/{model_name}/{version}/{MLMODEL_FILE}")
    digests.check(data, mlmodel, what)
    signature = Model.from_dict(yaml.safe_load(mlmodel)).signature
    return RegisteredModel(load_skops(data, what), signature, details)


@dataclass(frozen=True)
class TrustResult:
    """What `trust_version` recorded (or found already recorded)."""

    digests: ArtifactDigests
    onnx: str | None  # the compiled file's digest, when the version is served compiled
    already: bool  # the version already carried these digests


def trust_version(settings: Settings, model_name: str, version: str, actor: str) -> TrustResult:
    """Record the digests of a version registered before digests existed, after checking what can be checked.

    Refused (UntrustedArtifactError): an MLmodel that does not describe an sklearn model stored with skops in
    `model.skops` (a pickle cannot be checked without running it: retrain instead), a skops file naming a type
    the project does not load, or a version whose recorded digests no longer match (changed after
    registration). The file is loaded with the project's types only, never the artifact's own list.
    """
    from mlflow.models import Model

    from core.inference.compiled import ONNX_ARTIFACT
    from core.modeling.artifacts import MODEL_DIGEST_TAG, ONNX_DIGEST_TAG, sha256_hex

    what = f"{model_name} v{version}"
    client = mlflow_client(settings)
    details = client.get_model_version(model_name, version)
    tags = details.tags or {}
    mlmodel = _download(settings, f"models:/{model_name}/{version}/{MLMODEL_FILE}")
    flavor = (Model.from_dict(yaml.safe_load(mlmodel)).flavors or {}).get("sklearn") or {}
    if flavor.get("serialization_format") != "skops" or flavor.get("pickled_model") != MODEL_FILE:
        raise UntrustedArtifactError(
            f"{what} is stored as {flavor.get('serialization_format')!r} ({flavor.get('pickled_model')!r}), "
            f"not skops in {MODEL_FILE}: it cannot be checked without running it; retrain it instead"
        )
    data = _download(settings, f"models:/{model_name}/{version}/{MODEL_FILE}")
    if tags.get(MODEL_DIGEST_TAG):
        recorded = ArtifactDigests.from_tags(tags, what)
        recorded.check(data, mlmodel, what)
        return TrustResult(recorded, tags.get(ONNX_DIGEST_TAG), already=True)
    load_skops(data, what)  # the project's types only: refuses anything else before building it
    digests = ArtifactDigests.of(data, mlmodel)
    onnx = None
    if tags.get("inference_form") == "onnx" and details.run_id:
        onnx = sha256_hex(run_bytes(details.run_id, ONNX_ARTIFACT))
    new_tags = digests.tags() | ({ONNX_DIGEST_TAG: onnx} if onnx else {}) | {"trusted_by": actor}
    set_version_tags(client, model_name, version, new_tags)
    return TrustResult(digests, onnx, already=False)


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
