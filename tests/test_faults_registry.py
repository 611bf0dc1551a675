"""Faults injected for real on the stack: MLflow SIGKILLed mid-promotion, the Prefect worker SIGKILLed mid-run.

Each case asserts that nothing is lost and nothing is half-done once the stack is back: the champion, `previous`,
the version tags and the champion history agree, and a rerun does not promote twice.

The training flow runs in a subprocess (with the stack's environment), so the process whose MLflow calls fail
is not the test's. It waits at an exact point of the promotion (`adapters.promotion.pause_at`, enabled by
`MLOPS_TEST_PAUSE_AT`/`MLOPS_TEST_PAUSE_FILE`) while the test kills the server; the kill is a real SIGKILL.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from adapters.clients import mlflow_client
from adapters.history_store import list_changes, list_pending
from mlops import stack as local_stack
from mlops.stack import client_env
from tests.faults import kill_server
from tests.waiting import wait_for, wait_for_runs

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# Fail fast while MLflow is down: no client-side HTTP retries, so the flow's own task retries are what the
# outage meets; three of them 1 s apart (the configured backoff, 2, 5 and 15 s by default) end the run within
# seconds of the outage instead of a minute.
FAST_FAIL = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    "MLOPS_IO_RETRY_DELAYS": "[1, 1, 1]",
}

# seconds from deploying a schedule to its first run (the server's scheduler looks at new deployments every 5 s)
SCHEDULE_LEAD = 30

FLOW = """
import sys
from flows.training import TrainingParams, training
state = training(TrainingParams.model_validate_json(sys.argv[1]), return_state=True)
print("STATE", state.name, state.message)
sys.exit(0 if state.is_completed() else 1)
"""


def _config(tmp_path: Path, model: str, **changes) -> str:
    import yaml

    from core.data.dataset import bundled_config_text

    raw = yaml.safe_load(bundled_config_text("credit-risk")) | {"name": model, "model_name": model} | changes
    path = tmp_path / f"{model}-{len(changes)}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def _params(dataset: str, seed: int = 42, **gates) -> str:
    from core.evaluation.decision import Gates
    from core.modeling.search import SearchSpec
    from flows.training import TrainingParams

    params = TrainingParams(
        dataset=dataset, seed=seed, search=SearchSpec(trials_per_family=1, cv_folds=2), gates=Gates(**gates)
    )
    return params.model_dump_json()


STARTED: list[tuple[subprocess.Popen, Any]] = []


@pytest.fixture(autouse=True)
def _no_leftover_runs():
    """A run still paused when a test fails is ended with it (it would wait 10 minutes for its release)."""
    yield
    while STARTED:
        proc, output = STARTED.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        output.close()


def _train(stack, params: str, pause: tuple[str, Path] | None = None) -> subprocess.Popen:
    """Start the training flow in a subprocess; its output goes to a temporary file (a pipe could fill up)."""
    env = os.environ | client_env(stack) | FAST_FAIL
    if pause:
        env |= {"MLOPS_TEST_PAUSE_AT": pause[0], "MLOPS_TEST_PAUSE_FILE": str(pause[1])}
    output = tempfile.TemporaryFile("w+")  # noqa: SIM115 - closed by the _no_leftover_runs fixture
    proc = subprocess.Popen(
        [sys.executable, "-c", FLOW, params],
        env=env,
        stdout=output,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    STARTED.append((proc, output))
    return proc


def _finish(proc: subprocess.Popen, timeout: float = 600) -> tuple[int, str]:
    """Wait for the run's process; its exit code and output."""
    proc.wait(timeout=timeout)
    [output] = [out for started, out in STARTED if started is proc]
    output.seek(0)
    return proc.returncode, output.read()


def _kill_mlflow(stack) -> int:
    """SIGKILL the stack's MLflow server and its workers (its process group); returns the pid."""
    return kill_server(stack, "mlflow")


def _state(stack, model: str) -> tuple[dict[str, str], list[tuple[str, str | None, str | None]]]:
    aliases = {k: str(v) for k, v in mlflow_client(stack).get_registered_model(model).aliases.items()}
    return aliases, [(c.kind, c.from_version, c.to_version) for c in list_changes(model, stack)]


def _versions(stack, model: str) -> list:
    return sorted(mlflow_client(stack).search_model_versions(f"name='{model}'"), key=lambda v: int(v.version))


def _run_metric(stack, model: str, version: str) -> float:
    client = mlflow_client(stack)
    return client.get_run(client.get_model_version(model, version).tags["run_id"]).data.metrics["holdout_roc_auc"]


def test_mlflow_killed_between_register_and_promote(stack, default_data, tmp_path):
    model = "faults-register"
    dataset = _config(tmp_path, model)
    release = tmp_path / "release"
    # Given a cold-start training run (it will promote) paused after registering, before promoting
    run = _train(stack, _params(dataset), ("before-promote", release))
    wait_for(lambda: Path(f"{release}.reached").exists() or run.poll() is not None, 600, "the pause point")
    assert run.poll() is None, _finish(run)[1][-3000:]
    [candidate] = _versions(stack, model)
    # when MLflow is SIGKILLed there, and the run goes on while it is down
    _kill_mlflow(stack)
    release.touch()
    code, out = _finish(run)
    # then the run fails (it could not promote), and after the restart nothing moved: no champion, no
    # `promoted_at`, no history record, no unfinished intent
    assert code == 1, out[-3000:]
    local_stack.up(stack)
    aliases, moves = _state(stack, model)
    assert aliases == {} and moves == [] and list_pending(model, stack) == []
    assert "promoted_at" not in mlflow_client(stack).get_model_version(model, candidate.version).tags
    # and a rerun promotes once, its own candidate
    code, out = _finish(_train(stack, _params(dataset)))
    assert code == 0, out[-3000:]
    first, rerun = _versions(stack, model)
    assert first.version == candidate.version
    aliases, moves = _state(stack, model)
    assert aliases == {"champion": rerun.version} and moves == [("promotion", None, rerun.version)]
    assert "promoted_at" not in mlflow_client(stack).get_model_version(model, first.version).tags


def test_mlflow_killed_between_promote_and_history(stack, default_data, tmp_path):
    from adapters.promotion import promote_version
    from flows.training import TrainingParams, training

    model = "faults-history"
    # Given a weak champion (two inputs only), which a candidate on every input beats beyond noise
    weak_dataset = _config(tmp_path, model, features=[f for f in _features() if f["name"] in {"age", "region"}])
    state = training(TrainingParams.model_validate_json(_params(weak_dataset, min_roc_auc=0.5)), return_state=True)
    assert state.is_completed(), state.message
    weak = state.result().candidate_version
    if not state.result().promoted:  # the cold-start gates may judge it too weak: it is champion by hand
        promote_version(model, weak, None, reason="test: a weak champion", actor="tester")
    dataset = _config(tmp_path, model)
    params = _params(dataset, allow_schema_change=True)  # the candidate needs more inputs than the champion
    release = tmp_path / "release"
    # and a run paused right after its champion alias moved
    run = _train(stack, params, ("after-champion-move", release))
    wait_for(lambda: Path(f"{release}.reached").exists() or run.poll() is not None, 600, "the pause point")
    assert run.poll() is None, _finish(run)[1][-3000:]
    candidate = _versions(stack, model)[-1].version
    assert mlflow_client(stack).get_registered_model(model).aliases["champion"] == candidate
    # when MLflow is SIGKILLed there: `previous`, the tags and the history record are not written yet
    _kill_mlflow(stack)
    release.touch()
    code, out = _finish(run)
    assert code == 1, out[-3000:]
    assert len(list_pending(model, stack)) == 1  # the intent, in S3, outlived the run
    # then after the restart, the next reader (`mlops history`) finishes the change from its intent
    local_stack.up(stack)
    env = os.environ | client_env(stack)
    history = subprocess.run(
        [str(Path(sys.executable).parent / "mlops"), "history", "--model", model],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
        check=False,
    )
    assert history.returncode == 0, history.stderr
    assert "finished 1 interrupted champion change" in history.stderr
    aliases, moves = _state(stack, model)
    assert aliases == {"champion": candidate, "previous": weak}
    assert moves[-1] == ("promotion", weak, candidate) and moves.count(("promotion", weak, candidate)) == 1
    assert list_pending(model, stack) == []
    tags = mlflow_client(stack).get_model_version(model, candidate).tags
    assert "promoted_at" in tags
    record = list_changes(model, stack)[-1]
    assert record.metrics["roc_auc"] == pytest.approx(_run_metric(stack, model, candidate))
    assert f"v{candidate}" in history.stdout.strip().splitlines()[-1]
    # and a rerun of the same training does not promote again (same model: not better than the champion;
    # forced, since the champion's own fingerprint would otherwise stop it as "nothing new" before training)
    from flows.training import TrainingParams

    forced = TrainingParams.model_validate_json(params).model_copy(update={"force": True}).model_dump_json()
    code, out = _finish(_train(stack, forced))
    assert code == 0, out[-3000:]
    assert _state(stack, model) == (aliases, moves)
    assert mlflow_client(stack).get_model_version(model, _versions(stack, model)[-1].version).tags["decision"] == (
        "reject"
    )


def _features() -> list[dict]:
    import yaml

    from core.data.dataset import bundled_config_text

    return yaml.safe_load(bundled_config_text("credit-risk"))["features"]


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (from /proc), deepest last."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def test_worker_killed_mid_run_is_marked_crashed_and_the_schedule_goes_on(stack, default_data, tmp_path):
    import yaml
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.deployments import run_deployment

    from adapters.catalog import entry_uri
    from core.data.dataset import bundled_config_text
    from deployments.automations import ZOMBIE_AFTER_SECONDS, ZOMBIE_AUTOMATION
    from tests.catalog import deploy_model

    model = "faults-worker"
    raw = yaml.safe_load(bundled_config_text("credit-risk")) | {"name": model, "model_name": model}
    search = {"trials_per_family": 1, "cv_folds": 2}
    ids = deploy_model(stack, raw, search=search)
    parameters = {"params": {"dataset": entry_uri(stack, model), "search": search}}
    with get_client(sync_client=True) as client:
        assert client.read_automations_by_name(ZOMBIE_AUTOMATION)
    # Given a run of the model's training deployment on the worker, running (its first heartbeat is sent as it
    # starts)
    run = run_deployment(f"training/{model}", parameters=parameters, timeout=0)

    def state():
        with get_client(sync_client=True) as client:
            return client.read_flow_run(run.id).state

    wait_for(lambda: state().is_running(), 300, "the run to start", interval=1)
    time.sleep(5)
    # when the worker and everything below it are SIGKILLed (the machine died)
    [worker] = [s for s in local_stack.services(stack) if s.name == "worker"]
    pid = int(worker.pid_file.read_text())
    below = _descendants(pid)
    assert below, "the worker runs no flow-run process"
    for victim in [pid, *below]:
        os.kill(victim, signal.SIGKILL)
    killed = time.monotonic()
    # and the worker is restarted (the machine is back) with a run scheduled shortly, while the killed run's
    # heartbeats are being missed
    local_stack.up(stack)
    anchor = (datetime.now(UTC) + timedelta(seconds=SCHEDULE_LEAD)).replace(microsecond=0)
    deploy_model(stack, raw, search=search, training_interval_seconds=3600, schedule_anchor=anchor.isoformat())
    # then the run is marked Crashed once its heartbeats stop (measured)
    wait_for(lambda: state().is_crashed(), ZOMBIE_AFTER_SECONDS + 240, "the run to be marked Crashed", interval=1)
    crashed = state()
    to_crashed = time.monotonic() - killed
    print(f"\ntime from SIGKILL to Crashed: {to_crashed:.1f} s ({crashed.message})")
    assert "heartbeat" in (crashed.message or "")
    # and the restarted worker runs the next scheduled run, which completes
    deadline = time.monotonic() + 180
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[ids["training"]]))
            )
            scheduled = [r for r in runs if r.auto_scheduled and r.expected_start_time == anchor]
            if scheduled or time.monotonic() > deadline:
                break
            time.sleep(2)
    assert scheduled, "the server scheduled no run after the worker came back"
    [finished] = wait_for_runs([scheduled[0].id])
    assert finished.state.type.value == "COMPLETED", finished.state.message
    assert finished.parameters == {"params": {"reason": "scheduled"} | parameters["params"]}
    deploy_model(stack, raw, search=search)  # back to the weekly schedule
