"""Rollback and champion history on the real stack: CLI, flow, serving API, S3 history, named errors."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from adapters.clients import mlflow_client
from adapters.history_store import list_changes
from adapters.promotion import promote_version, revert_promotion
from core.search import SearchSpec
from flows.rollback import RollbackParams, rollback
from flows.training import TrainingParams, training
from mlops.stack import running
from services.rollback import RollbackError
from services.rollback import rollback as rollback_now
from tests.ports import free_port
from tests.waiting import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MODEL = "rollback-test"


def _bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def _aliases(stack) -> dict[str, str]:
    return {k: str(v) for k, v in mlflow_client(stack).get_registered_model(MODEL).aliases.items()}


@pytest.fixture(scope="module")
def versions(stack, default_data, tmp_path_factory) -> dict[str, str]:
    """v1 (trained, cold-start champion) and v2 (the same model registered again, then promoted)."""
    import mlflow
    import yaml

    from core.dataset import bundled_config_text

    raw = yaml.safe_load(bundled_config_text("credit-risk")) | {"name": MODEL, "model_name": MODEL}
    config = tmp_path_factory.mktemp(MODEL) / f"{MODEL}.yaml"
    config.write_text(yaml.safe_dump(raw))
    state = training(
        TrainingParams(dataset=str(config), search=SearchSpec(trials_per_family=1, cv_folds=2)), return_state=True
    )
    assert state.is_completed(), state.message
    first = state.result()
    assert first.promoted
    run_id = first.run_id
    second = str(mlflow.register_model(f"runs:/{run_id}/model", MODEL, tags={"run_id": run_id}).version)
    promote_version(MODEL, second, first.candidate_version, reason="test: a newer version", actor="tester")
    return {"first": first.candidate_version, "second": second}


@pytest.fixture(scope="module")
def server(stack, versions, tmp_path_factory):
    port = free_port()
    command = [_bin("mlops"), "serve", "--port", str(port), "--model", MODEL, "--poll-seconds", "0.5"]
    log_file = tmp_path_factory.mktemp("rollback-serving") / "serving.log"
    with running(command, f"http://127.0.0.1:{port}/health", dict(os.environ), log_file):
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: httpx.get(f"{url}/ready").status_code == 200, 60, "the server to load its model")
        yield url


def _cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [_bin("mlops"), *args], capture_output=True, text=True, timeout=180, env=os.environ | env, check=False
    )


def _predicted_version(server: str) -> str:
    record = {
        "age": 40.0,
        "annual_income": 50000.0,
        "loan_amount": 10000.0,
        "loan_term_months": 36.0,
        "debt_to_income": 0.3,
        "credit_utilization": 0.5,
        "credit_history_years": 10.0,
        "num_open_accounts": 4.0,
        "num_delinquencies": 0.0,
        "employment_type": "salaried",
        "home_ownership": "rent",
        "loan_purpose": "car",
        "region": "north",
    }
    answer = httpx.post(f"{server}/predict", json={"records": [record]}, timeout=30)
    assert answer.status_code == 200, answer.text
    return answer.json()["model"]["version"]


def test_cli_rollback_moves_the_champion_back_and_the_serving_api_follows(stack, versions, server):
    first, second = versions["first"], versions["second"]
    # Given v2 is champion (v1 previous) and the serving API serves it
    assert _aliases(stack) == {"champion": second, "previous": first}
    wait_for(
        lambda: httpx.get(f"{server}/health").json()["version"] == second, 60, f"v{second} to be served", interval=0.3
    )
    # when an operator rolls back from the shell (the serving API to check is configured)
    result = _cli("rollback", "--model", MODEL, "--reason", "v2 answers nonsense", MLOPS_SERVING_URL=server)
    # then the champion is v1 again, v2 is previous, and the serving API answers with v1
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"champion v{second} -> v{first}" in result.stdout and f"serves v{first}" in result.stdout
    assert _aliases(stack) == {"champion": first, "previous": second}
    assert _predicted_version(server) == first
    tags = mlflow_client(stack).get_model_version(MODEL, second).tags
    assert "v2 answers nonsense" in tags["rolled_back"]


def test_rollback_errors_name_the_problem(stack, versions):
    first = versions["first"]
    with pytest.raises(RollbackError, match="has no version '999'"):
        rollback_now(MODEL, "999", "typo", "tester")
    with pytest.raises(RollbackError, match=f"v{first} is already the champion"):
        rollback_now(MODEL, first, "no-op", "tester")
    with pytest.raises(RollbackError, match="needs a reason"):
        rollback_now(MODEL, None, "  ", "tester")
    with pytest.raises(RollbackError, match="has no champion"):
        rollback_now("no-such-model-anywhere", None, "why", "tester")
    result = _cli("rollback", "--model", MODEL, "--to", "999", "--reason", "typo")
    assert result.returncode == 1 and "has no version '999'" in result.stderr
    assert _aliases(stack)["champion"] == first  # nothing moved


def test_rollback_flow_to_a_given_version_records_the_ui_actor(stack, versions, server, monkeypatch):
    second = versions["second"]
    monkeypatch.setenv("MLOPS_SERVING_URL", server)
    state = rollback(
        RollbackParams(model_name=MODEL, reason="v1 was fine after all", to_version=second), return_state=True
    )
    assert state.is_completed(), state.message
    outcome = state.result()
    assert outcome.change.to_version == second and outcome.serving.checked and outcome.serving.ok
    assert outcome.change.actor.startswith("prefect-ui (flow run ")
    assert _aliases(stack)["champion"] == second
    assert _predicted_version(server) == second


def test_history_failure_never_undoes_a_promotion(stack, versions, monkeypatch, caplog):
    first, second = versions["first"], versions["second"]

    def broken(*args, **kwargs):
        raise ConnectionError("S3 down")

    monkeypatch.setattr("adapters.history_store.put_bytes", broken)
    with caplog.at_level(logging.ERROR, logger="adapters.history_store"):
        promotion = promote_version(MODEL, first, second, reason="while S3 is down")
    assert _aliases(stack)["champion"] == first
    assert "HISTORY NOT RECORDED" in caplog.text
    monkeypatch.undo()
    # and a revert of it is recorded again (S3 back)
    revert_promotion(promotion, "serving did not confirm", actor="tester")
    assert _aliases(stack)["champion"] == second


def test_history_lists_every_change_in_order(stack, versions):
    first, second = versions["first"], versions["second"]
    changes = list_changes(MODEL, stack)
    moves = [(c.kind, c.from_version, c.to_version) for c in changes]
    assert moves == [
        ("promotion", None, first),  # cold start by the training flow
        ("promotion", first, second),
        ("rollback", second, first),  # the CLI
        ("rollback", first, second),  # the flow
        # the promotion while S3 was down is missing, as logged; its revert is there
        ("revert", first, second),
    ]
    cold, _, cli, flow, _ = changes
    assert "cold start" in cold.reason and "run reason: manual" in cold.reason
    assert cli.reason == "v2 answers nonsense" and cli.actor not in {"", "prefect-ui"}
    assert flow.actor.startswith("prefect-ui") and "prefect_flow_run" in flow.links
    assert all(c.metrics.get("roc_auc", 0) > 0.5 and c.run_id for c in changes)
    assert [c.at for c in changes] == sorted(c.at for c in changes)
    # the CLI (a new process: nothing in memory) lists the same, oldest first
    result = _cli("history", "--model", MODEL)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1 + len(changes) and lines[0].split()[:4] == ["at", "kind", "from", "to"]
    assert [line.split()[2] for line in lines[1:]] == ["promotion", "promotion", "rollback", "rollback", "revert"]
