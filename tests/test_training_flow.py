"""The retraining flow end to end on the real stack: cold start, a weak challenger, bad inputs."""

from __future__ import annotations

import io
import os

import pandas as pd
import pytest

from adapters.clients import S3Location, mlflow_client, s3_client, use_tracking_server
from core.evaluation.decision import Gates
from core.modeling.search import ModelFamily, SearchSpec
from flows.training import TrainingParams, training

pytestmark = [pytest.mark.integration, pytest.mark.slow]

FAST_SEARCH = SearchSpec(trials_per_family=2, cv_folds=3)
# A search space too weak to matter: one shallow-tree configuration.
WEAK_SEARCH = SearchSpec(families=[ModelFamily.decision_tree], trials_per_family=1, cv_folds=2)


def _versions(settings, name: str) -> list:
    return mlflow_client(settings).search_model_versions(f"name='{name}'")


def _champion(settings, name: str) -> str:
    return mlflow_client(settings).get_model_version_by_alias(name, "champion").version


@pytest.fixture(scope="module")
def first_run(stack, default_data):
    # Given the default data and an empty registry, when the flow runs for the first time
    state = training(TrainingParams(search=FAST_SEARCH), return_state=True)
    assert state.is_completed(), state.message
    return state.result()


def test_cold_start_promotes_and_records_everything(stack, first_run):
    client = mlflow_client(stack)
    # then the candidate is registered and becomes champion under the cold-start rule
    assert first_run.promoted
    assert any("cold start" in reason for reason in first_run.decision.reasons)
    assert _champion(stack, "credit-risk") == first_run.candidate_version
    version = client.get_model_version("credit-risk", first_run.candidate_version)
    assert version.tags["decision"] == "promote"
    assert version.tags["data_version"] == first_run.data_version
    assert float(version.tags["candidate.roc_auc"]) > 0.7
    # and the run carries metrics, plots, the decision and the validation report
    run = client.get_run(first_run.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["decision"] == "promote"
    assert {"holdout_roc_auc", "holdout_pr_auc", "holdout_f1", "holdout_log_loss", "holdout_brier"} <= set(
        run.data.metrics
    )
    # and its calibration: the holdout's ECE (gated), what the calibration step chose and the CV Brier behind it
    assert 0 <= run.data.metrics["holdout_ece"] <= Gates().max_calibration_error
    assert run.data.params["calibration.method"] in ("none", "sigmoid", "isotonic")
    assert run.data.metrics["calibration.brier_cv_after"] <= run.data.metrics["calibration.brier_cv_before"]
    assert run.data.tags["calibration.reason"].startswith("shipped")
    assert any(c.gate == "max_calibration_error" and c.passed for c in first_run.decision.checks)
    artifacts = {a.path for a in client.list_artifacts(first_run.run_id, "plots")}
    assert artifacts == {
        f"plots/{n}"
        for n in ("confusion_matrix.png", "roc_curve.png", "pr_curve.png", "calibration.png", "feature_importance.png")
    }
    assert client.list_artifacts(first_run.run_id, "decision")
    # and the stack's serving API (it follows credit-risk) confirmed it serves the new champion
    assert f"serves v{first_run.candidate_version}" in run.data.tags["serving_check"]
    import httpx

    served = httpx.get(f"{stack.serving_url}/model", timeout=10).json()
    assert served["version"] == first_run.candidate_version
    # and the artifacts physically live in the S3 bucket
    keys = s3_client(stack).list_objects_v2(Bucket=stack.bucket, Prefix="mlflow/")
    assert keys.get("KeyCount", 0) > 0


def test_registered_model_serves_raw_rows(stack, first_run, default_data):
    import mlflow.pyfunc

    use_tracking_server(stack)  # the fluent API below (load_model) reads the global tracking URI
    model = mlflow.pyfunc.load_model("models:/credit-risk@champion")
    assert model.metadata.signature is not None
    body = s3_client(stack).get_object(
        Bucket=stack.bucket, Key=S3Location.parse(default_data).child("month=2025-01/part-0.parquet").key
    )["Body"]
    rows = pd.read_parquet(io.BytesIO(body.read())).head(20)
    features = rows.drop(columns=["default", "application_id", "application_date"])
    predictions = model.predict(features)
    assert len(predictions) == 20
    assert set(pd.Series(predictions).unique()) <= {0, 1}


def test_weak_challenger_is_not_promoted_and_champion_stays(stack, first_run):
    # Given a champion, when a run searches a deliberately weak space
    state = training(TrainingParams(search=WEAK_SEARCH), return_state=True)
    assert state.is_completed(), state.message
    outcome = state.result()
    # then it is registered with its reasons but not promoted, and the champion is unchanged
    assert not outcome.promoted
    assert outcome.decision.champion_version == first_run.candidate_version
    assert any("does not beat the champion" in r for r in outcome.decision.reasons)
    assert _champion(stack, "credit-risk") == first_run.candidate_version
    version = mlflow_client(stack).get_model_version("credit-risk", outcome.candidate_version)
    assert version.tags["decision"] == "reject"
    assert float(version.tags["champion.roc_auc"]) > float(version.tags["candidate.roc_auc"])


def test_dry_run_registers_nothing(stack, first_run):
    before = len(_versions(stack, "credit-risk"))
    # force: the champion's own params and data, which would otherwise stop as "nothing new" before training
    state = training(TrainingParams(search=FAST_SEARCH, dry_run=True, force=True), return_state=True)
    assert state.is_completed(), state.message
    assert state.result().candidate_version is None
    assert len(_versions(stack, "credit-risk")) == before
    assert _champion(stack, "credit-risk") == first_run.candidate_version


def test_strict_gates_block_even_a_good_model(stack, first_run):
    gates = Gates(min_roc_auc=0.999)
    state = training(TrainingParams(search=FAST_SEARCH, gates=gates), return_state=True)
    assert state.is_completed(), state.message
    outcome = state.result()
    assert not outcome.promoted
    assert any("gate failed: roc_auc" in r for r in outcome.decision.reasons)
    assert _champion(stack, "credit-risk") == first_run.candidate_version


# --- bad inputs: each fails at load or validation, with the problem named, and registers nothing ---


def _good_frame(default_data, stack) -> pd.DataFrame:
    location = S3Location.parse(default_data).child("month=2025-02/part-0.parquet")
    body = s3_client(stack).get_object(Bucket=location.bucket, Key=location.key)["Body"].read()
    return pd.read_parquet(io.BytesIO(body))


def _put(stack, key: str, body: bytes) -> str:
    s3_client(stack).put_object(Bucket=stack.bucket, Key=key, Body=body)
    return f"s3://{stack.bucket}/{key}"


def _parquet(frame: pd.DataFrame) -> bytes:
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    return buffer.getvalue()


def _bad_case(case: str, frame: pd.DataFrame, stack) -> tuple[str, str]:
    """Write the bad snapshot for `case`; returns (source, text the failure must contain)."""
    prefix = f"bad/{case}"
    if case == "missing_file":
        return f"s3://{stack.bucket}/{prefix}/nothing-here/", "no parquet files found"
    if case == "empty_file":
        return _put(stack, f"{prefix}/part-0.parquet", b""), "file is empty"
    if case == "missing_target":
        return _put(stack, f"{prefix}/part-0.parquet", _parquet(frame.drop(columns=["default"]))), "'default'"
    if case == "text_in_numeric":
        frame = frame.assign(age=["forty"] * len(frame))
        return _put(stack, f"{prefix}/part-0.parquet", _parquet(frame)), "'age'"
    if case == "all_null":
        frame = frame.assign(annual_income=float("nan"))
        return _put(stack, f"{prefix}/part-0.parquet", _parquet(frame)), "'annual_income'"
    if case == "single_class":
        frame = frame.assign(default=0)
        return _put(stack, f"{prefix}/part-0.parquet", _parquet(frame)), "'default'"
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case", ["missing_file", "empty_file", "missing_target", "text_in_numeric", "all_null", "single_class"]
)
def test_bad_input_fails_clearly_and_registers_nothing(case, stack, default_data, dataset_yaml):
    # Given a snapshot broken in one way, under its own model name
    source, expected = _bad_case(case, _good_frame(default_data, stack), stack)
    model_name = f"bad-{case.replace('_', '-')}"
    config = dataset_yaml(name=model_name, model_name=model_name, source=source)
    # when the flow runs on it
    state = training(TrainingParams(dataset=config, search=FAST_SEARCH), return_state=True)
    # then it fails, the message names the problem and its place, and the registry has nothing
    assert state.is_failed()
    assert expected in state.message, state.message
    assert _versions(stack, model_name) == []
    assert mlflow_client(stack).search_registered_models(f"name='{model_name}'") == []


def test_promotion_against_a_stale_champion_changes_nothing(stack, first_run):
    from adapters.promotion import PromotionConflict, promote_version

    versions = sorted(int(v.version) for v in _versions(stack, "credit-risk"))
    challenger = str(versions[-1])
    champion = _champion(stack, "credit-risk")
    # Given a decision made when the champion was another version, promotion refuses and changes nothing
    with pytest.raises(PromotionConflict, match="stale champion"):
        promote_version("credit-risk", challenger, expected_champion="999")
    assert _champion(stack, "credit-risk") == champion


def test_python_module_entry_point_runs_the_flow(stack, first_run):
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "mlops", "train", "--dry-run", "--trials", "1"],
        check=False,
        capture_output=True,
        text=True,
        timeout=600,
        env=os.environ | {"PREFECT_API_URL": stack.prefect_api_url},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "decision:" in result.stdout


def test_mlflow_models_serve_answers_raw_rows(stack, first_run, default_data):
    import json
    import subprocess
    import sys
    import time
    from pathlib import Path

    import httpx

    from tests.ports import free_port

    # Given the champion served by MLflow's own server, from the registry alias
    port = free_port()
    path = f"{Path(sys.executable).parent}:{os.environ['PATH']}"
    mlflow_bin = str(Path(sys.executable).parent / "mlflow")
    server = subprocess.Popen(
        [mlflow_bin, "models", "serve", "-m", "models:/credit-risk@champion", "--env-manager", "local",
         "-h", "127.0.0.1", "-p", str(port)],
        # its scoring server is started as `uvicorn`, looked up on PATH
        # MLflow's own loader trusts the types the artifact lists: allowed here, for this version training built
        env=os.environ | {"MLFLOW_TRACKING_URI": stack.mlflow_tracking_uri, "PATH": path}
        | {"MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "true"},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/ping", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(1)
        rows = _good_frame(default_data, stack).head(3)
        features = rows.drop(columns=["default", "application_id", "application_date"])
        records = json.loads(features.to_json(orient="records"))
        records[0]["annual_income"] = None  # a missing value, as clients send them
        # when raw rows are posted, then each gets a class
        answer = httpx.post(f"http://127.0.0.1:{port}/invocations", json={"dataframe_records": records}, timeout=30)
        assert answer.status_code == 200, answer.text
        assert len(answer.json()["predictions"]) == 3
    finally:
        server.terminate()
        server.wait(timeout=30)
