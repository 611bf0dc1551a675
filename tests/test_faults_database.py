"""PostgreSQL, the database under Prefect and MLflow, SIGKILLed for real during a training run and a promotion.

Each case asserts a clear failure, nothing half-done once `mlops stack up` has brought the database back (no
champion moved, no history record, no unfinished intent left behind by the next run), and a next run that
succeeds. The runs are subprocesses paused at an exact point (`adapters.locks.pause_at`), as in
tests/test_faults_registry.py, whose helpers these share.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from uuid import UUID

import pytest
from prefect.client.orchestration import get_client

from adapters.clients import mlflow_client
from adapters.history_store import list_changes, list_pending
from mlops import stack as local_stack
from mlops.stack import client_env
from tests.faults import kill_server
from tests.test_faults_registry import (  # noqa: F401 - _no_leftover_runs: the same clean-up, autouse here too
    _config,
    _features,
    _finish,
    _no_leftover_runs,
    _params,
    _state,
    _train,
    _versions,
)
from tests.waiting import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _paused_run(stack, params: str, checkpoint: str, release: Path) -> subprocess.Popen:
    run = _train(stack, params, (checkpoint, release))
    wait_for(lambda: Path(f"{release}.reached").exists() or run.poll() is not None, 600, "the pause point")
    assert run.poll() is None, _finish(run)[1][-3000:]
    return run


def _kill_database_and_fail(stack, run: subprocess.Popen, release: Path) -> None:
    """SIGKILL the stack's PostgreSQL, let the paused run go on; it must fail, its output naming the cause
    (`adapters.clients.database_outage`), not only a server's HTTP 500."""
    kill_server(stack, "postgres")
    release.touch()
    code, out = _finish(run)
    assert code != 0, out[-3000:]
    assert "cannot read its database" in out and "mlops stack up" in out, out[-4000:]


def test_postgres_killed_during_a_training_run(stack, default_data, tmp_path):
    model = "faults-db-run"
    dataset = _config(tmp_path, model)
    release = tmp_path / "release"
    # Given a cold-start run that has trained, evaluated and logged its model, paused before the promotion lock
    run = _paused_run(stack, _params(dataset), "before-lock", release)
    # when PostgreSQL (Prefect's and MLflow's database) is SIGKILLed there and the run goes on, then it fails
    # naming the database as the cause
    _kill_database_and_fail(stack, run, release)
    # and once `stack up` has restarted it, nothing was registered, promoted, recorded or left pending (the pause
    # was before the registration)
    local_stack.up(stack)
    assert mlflow_client(stack).search_model_versions(f"name='{model}'") == []
    assert list_changes(model, stack) == [] and list_pending(model, stack) == []
    # and the next run succeeds and promotes its own candidate, once
    code, out = _finish(_train(stack, _params(dataset)))
    assert code == 0, out[-3000:]
    latest = _versions(stack, model)[-1].version
    assert _state(stack, model) == ({"champion": latest}, [("promotion", None, latest)])


def test_postgres_killed_during_a_promotion_leaves_the_old_champion(stack, default_data, tmp_path):
    from adapters.promotion import promote_version
    from flows.training import TrainingParams, training

    model = "faults-db-promote"
    # Given a weak champion (two inputs), which a candidate on every input beats beyond noise
    weak_dataset = _config(tmp_path, model, features=[f for f in _features() if f["name"] in {"age", "region"}])
    state = training(TrainingParams.model_validate_json(_params(weak_dataset, min_roc_auc=0.5)), return_state=True)
    assert state.is_completed(), state.message
    weak = state.result().candidate_version
    if not state.result().promoted:
        promote_version(model, weak, None, reason="test: a weak champion", actor="tester")
    before = _state(stack, model)
    params = _params(_config(tmp_path, model), allow_schema_change=True)
    release = tmp_path / "release"
    # and a candidate's run paused inside the promotion: lock held, intent stored, alias not moved yet
    run = _paused_run(stack, params, "before-champion-move", release)
    # when PostgreSQL is SIGKILLed there, the run fails naming the database as the cause
    _kill_database_and_fail(stack, run, release)
    # then after `stack up`, the weak champion still holds, with its history unchanged
    local_stack.up(stack)
    assert _state(stack, model) == before
    # and when the killed run's lock lease lapses (revoked here, as the server does to a lease not renewed in
    # time; it would take MLOPS_LOCK_LEASE_SECONDS), the next reader (`mlops history`) drops its intent: the move
    # never happened
    assert len(list_pending(model, stack)) == 1
    leases = json.loads(Path(f"{release}.reached").read_text())["leases"]
    with get_client(sync_client=True) as client:
        for lease in leases.values():
            client.release_concurrency_slots_with_lease(lease_id=UUID(lease))
    history = subprocess.run(
        [str(Path(sys.executable).parent / "mlops"), "history", "--model", model],
        capture_output=True,
        text=True,
        timeout=180,
        env=os.environ | client_env(stack),
        check=False,
    )
    assert history.returncode == 0, history.stderr
    assert list_pending(model, stack) == []
    assert _state(stack, model) == before
    # and the next run (forced: same data, config and code as the failed one) promotes its candidate once
    forced = TrainingParams.model_validate_json(params).model_copy(update={"force": True}).model_dump_json()
    code, out = _finish(_train(stack, forced))
    assert code == 0, out[-3000:]
    assert list_pending(model, stack) == []
    latest = _versions(stack, model)[-1].version
    aliases, moves = _state(stack, model)
    assert aliases == {"champion": latest, "previous": weak}
    assert moves == [*before[1], ("promotion", weak, latest)]
    assert "promoted_at" in mlflow_client(stack).get_model_version(model, latest).tags
