"""Only artifacts training built are loaded, against the real stack (S3, MLflow, Prefect, a serving process).

- A version registered as training does carries the SHA-256 of its stored files: equal to a digest of the
  objects read straight from S3 with boto3, and the loaded pipeline predicts as the fitted one.
- A planted artifact (the bucket's model file replaced by another, valid model) is refused by the loaders
  training, scoring and monitoring use, and by serving, which keeps answering with the previous champion,
  says why on /model and emits `mlops.model.refused`.
- A pickled version is never unpickled (a marker file its unpickling would write stays absent): refused for
  its missing digests, refused for its format even with digests, and `mlops models trust` will not trust it.
- A skops version registered by earlier code (no digests) is refused until `mlops models trust` records them.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import numpy as np
import pytest
import skops.io
from sklearn.linear_model import Ridge

from adapters.clients import mlflow_client, s3_client
from core.data.features import prepare_inputs
from core.modeling.artifacts import (
    FORMAT_TAG,
    MLMODEL_DIGEST_TAG,
    MODEL_DIGEST_TAG,
    UntrustedArtifactError,
)
from mlops.stack import running
from tests.ports import free_port
from tests.task_types import diabetes_config, diabetes_frame, fit
from tests.test_task_types import _records, _register
from tests.waiting import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

NAME = "trust-diabetes"
PICKLED = "trust-pickled"
EARLIER = "trust-earlier"
MARKER = "MLOPS_TRUST_MARKER"
BIN = Path(sys.executable).parent


def _write_marker() -> None:
    """What unpickling a `Planted` runs: writes the file $MLOPS_TRUST_MARKER names (read when it runs)."""
    Path(os.environ[MARKER]).write_text("code ran")


class Planted:
    """Unpickling it runs code (`_write_marker`)."""

    def __reduce__(self):
        return (_write_marker, ())


def _model_keys(stack, name: str, version: str) -> dict[str, str]:
    """The S3 keys of a version's stored files (model.skops / model.pkl, MLmodel) under MLflow's artifact root."""
    import mlflow

    source = mlflow_client(stack).get_model_version(name, version).source
    artifacts = mlflow.get_logged_model(source.removeprefix("models:/")).artifact_location
    prefix = "mlflow/" + artifacts.split("mlflow-artifacts:/", 1)[1].strip("/") + "/"
    listed = s3_client(stack).list_objects_v2(Bucket=stack.bucket, Prefix=prefix).get("Contents", [])
    return {Path(o["Key"]).name: o["Key"] for o in listed}


def _s3_bytes(stack, key: str) -> bytes:
    return s3_client(stack).get_object(Bucket=stack.bucket, Key=key)["Body"].read()


@pytest.fixture(scope="module")
def diabetes(stack):
    """Two Ridge versions of NAME registered as training does; v1 is the champion."""
    frame = diabetes_frame()
    config = diabetes_config(NAME)
    train, holdout = frame.iloc[:300], frame.iloc[300:].reset_index(drop=True)
    first = fit(config, train, Ridge(alpha=0.1))
    v1 = _register(stack, config, first, train, holdout)
    second = fit(config, train, Ridge(alpha=5.0))
    v2 = _register(stack, config, second, train, holdout)
    mlflow_client(stack).set_registered_model_alias(NAME, "champion", v1)
    return {"config": config, "holdout": holdout, "train": train, "models": {v1: first, v2: second}, "v1": v1, "v2": v2}


def test_a_registered_version_records_the_digests_of_its_stored_files_and_loads(stack, diabetes):
    from adapters.registry import load_model

    version = diabetes["v1"]
    tags = mlflow_client(stack).get_model_version(NAME, version).tags
    keys = _model_keys(stack, NAME, version)
    # the reference: the stored objects, read from S3 with boto3 and hashed here
    assert tags[MODEL_DIGEST_TAG] == hashlib.sha256(_s3_bytes(stack, keys["model.skops"])).hexdigest()
    assert tags[MLMODEL_DIGEST_TAG] == hashlib.sha256(_s3_bytes(stack, keys["MLmodel"])).hexdigest()
    assert tags[FORMAT_TAG] == "skops"
    rows = prepare_inputs(diabetes["holdout"], diabetes["config"])
    loaded = load_model(NAME, version, stack)
    assert np.array_equal(loaded.predict(rows), diabetes["models"][version].predict(rows))


def test_a_planted_artifact_is_refused_and_serving_keeps_the_champion_it_has(stack, diabetes, tmp_path):
    from adapters.registry import load_model
    from core.modeling.signature import ModelLoadError
    from serving.model import load_version

    v1, v2 = diabetes["v1"], diabetes["v2"]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [str(BIN / "mlops"), "serve", "--port", str(port), "--model", NAME, "--workers", "1"]
    command += ["--poll-seconds", "0.5"]
    since = datetime.now(UTC) - timedelta(seconds=5)
    with running(command, f"{url}/health", dict(os.environ), tmp_path / "serving.log"):
        wait_for(lambda: _served(url).get("version") == v1, 120, f"{NAME} v1 served")
        # Given v2's stored model replaced in the bucket by another valid model (what a writer of the bucket
        # could plant), and v2 made champion
        planted = fit(diabetes["config"], diabetes["train"], Ridge(alpha=50.0))
        s3_client(stack).put_object(
            Bucket=stack.bucket, Key=_model_keys(stack, NAME, v2)["model.skops"], Body=skops.io.dumps(planted)
        )
        mlflow_client(stack).set_registered_model_alias(NAME, "champion", v2)
        # then serving refuses it, says why, and keeps answering with v1
        wait_for(lambda: "refused" in (_served(url).get("last_error") or ""), 120, "serving to refuse v2")
        model = _served(url)
        assert model["version"] == v1 and f"v{v2}" in model["last_error"], model
        assert "stored model.skops has SHA-256" in model["last_error"], model
        rows = diabetes["holdout"].head(5)
        answer = httpx.post(f"{url}/predict", json={"records": _records(diabetes["config"], rows)}, timeout=30)
        assert answer.status_code == 200 and answer.json()["model"] == {"name": NAME, "version": v1}, answer.text
        expected = diabetes["models"][v1].predict(prepare_inputs(rows, diabetes["config"]))
        got = np.array([p["prediction"] for p in answer.json()["predictions"]])
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-9)
    # and every other loader refuses it too, before deserialising
    with pytest.raises(UntrustedArtifactError, match=f"{NAME} v{v2}: stored model.skops"):
        load_model(NAME, v2, stack)
    with pytest.raises(ModelLoadError, match="refused") as refused:
        load_version(mlflow_client(stack), NAME, v2, stack)
    assert refused.value.refused

    # and the refusal was emitted as an event on the model (what the alert automation notifies)
    # (serving emits it from its own process after saying why: it may arrive after the test's own loaders' events)
    def from_serving() -> list:
        return [e for e in _refused_events(since) if e.payload["where"] == "serving"]

    wait_for(from_serving, 60, "the mlops.model.refused event from serving")
    [event] = from_serving()
    assert event.payload["model"] == NAME and event.payload["version"] == v2
    mlflow_client(stack).set_registered_model_alias(NAME, "champion", v1)


def _served(url: str) -> dict:
    return httpx.get(f"{url}/model", timeout=10).json()


def _refused_events(since: datetime) -> list:
    from prefect.client.orchestration import get_client

    from adapters.alerts import REFUSED_EVENT, _read_events, model_resource_id

    with get_client(sync_client=True) as client:
        return _read_events(client, [REFUSED_EVENT], [model_resource_id(NAME)], since)


def _log_and_register(stack, name: str, model, **log_options) -> str:
    """Log `model` with mlflow.sklearn directly (as code before the digests did) and register it."""
    import mlflow

    from adapters.clients import use_tracking_server

    use_tracking_server(stack)
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name(name)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(name)
    with mlflow.start_run(experiment_id=experiment_id) as run:
        mlflow.sklearn.log_model(model, name="model", **log_options)
    return str(mlflow.register_model(f"runs:/{run.info.run_id}/model", name).version)


def _trust(name: str, version: str) -> subprocess.CompletedProcess:
    command = [str(BIN / "mlops"), "models", "trust", name, version]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)


def test_a_pickled_version_is_never_unpickled_and_cannot_be_trusted(stack, tmp_path, monkeypatch):
    from adapters.registry import load_model

    marker = tmp_path / "marker"
    # Given a version whose stored model is a pickle that runs code when it is loaded (requirements given:
    # MLflow would otherwise load it to infer them)
    options = {"serialization_format": "cloudpickle", "pip_requirements": ["scikit-learn"]}
    version = _log_and_register(stack, PICKLED, Planted(), **options)
    assert "model.pkl" in _model_keys(stack, PICKLED, version)
    monkeypatch.setenv(MARKER, str(marker))  # from now on, unpickling it would write this file
    # then it is refused for its missing digests
    with pytest.raises(UntrustedArtifactError, match="no recorded artifact digest"):
        load_model(PICKLED, version, stack)
    # and, digests or not, for its format
    client = mlflow_client(stack)
    for key, value in {MODEL_DIGEST_TAG: "0" * 64, MLMODEL_DIGEST_TAG: "0" * 64, FORMAT_TAG: "cloudpickle"}.items():
        client.set_model_version_tag(PICKLED, version, key, value)
    with pytest.raises(UntrustedArtifactError, match="format 'cloudpickle'"):
        load_model(PICKLED, version, stack)
    # and `mlops models trust` refuses it, naming why
    for key in (MODEL_DIGEST_TAG, MLMODEL_DIGEST_TAG, FORMAT_TAG):
        client.delete_model_version_tag(PICKLED, version, key)
    result = _trust(PICKLED, version)
    assert result.returncode == 1 and "cannot be checked without running it" in result.stderr, result.stderr
    assert not marker.exists()


def test_an_earlier_skops_version_loads_once_trusted(stack, diabetes):
    from adapters.registry import load_model
    from core.transformers import skops_trusted_types

    # Given a version logged without digests (as code before them did)
    model = diabetes["models"][diabetes["v1"]]
    version = _log_and_register(stack, EARLIER, model, skops_trusted_types=skops_trusted_types(model))
    with pytest.raises(UntrustedArtifactError, match="mlops models trust"):
        load_model(EARLIER, version, stack)
    # when it is trusted
    result = _trust(EARLIER, version)
    assert result.returncode == 0 and "digests recorded" in result.stdout, result.stdout + result.stderr
    # then its digests are those of the stored files, and it loads and predicts as the fitted model
    tags = mlflow_client(stack).get_model_version(EARLIER, version).tags
    keys = _model_keys(stack, EARLIER, version)
    assert tags[MODEL_DIGEST_TAG] == hashlib.sha256(_s3_bytes(stack, keys["model.skops"])).hexdigest()
    rows = prepare_inputs(diabetes["holdout"], diabetes["config"])
    assert np.array_equal(load_model(EARLIER, version, stack).predict(rows), model.predict(rows))
    # and trusting it again only checks
    again = _trust(EARLIER, version)
    assert again.returncode == 0 and "already recorded, and the stored files match" in again.stdout, again.stdout
