"""Deployments on the real Prefect server with the stack's process worker: schema, schedule, concurrency."""

from __future__ import annotations

import time

import pytest

from mlops.clients import mlflow_client

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


@pytest.fixture(scope="module")
def deployed(stack, default_data):
    from deployments.deploy import deploy_all

    ids = deploy_all(work_pool=stack.work_pool)
    yield ids
    deploy_all(work_pool=stack.work_pool)  # back to the weekly schedule


def _client():
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


def _wait(flow_run_ids: list, timeout: float = 600) -> list:
    deadline = time.monotonic() + timeout
    with _client() as client:
        while True:
            runs = [client.read_flow_run(i) for i in flow_run_ids]
            if all(r.state and r.state.type.value in TERMINAL for r in runs):
                return runs
            if time.monotonic() > deadline:
                raise TimeoutError(f"runs not finished: {[(str(r.id), r.state_name) for r in runs]}")
            time.sleep(2)


def test_parameters_form_has_titles_descriptions_defaults_and_enums(deployed):
    with _client() as client:
        deployment = client.read_deployment(deployed["training"])
    schema = deployment.parameter_openapi_schema
    params = schema["definitions"]["TrainingParams"]["properties"]
    assert params["dataset"]["default"] == "credit-risk" and params["dataset"]["description"]
    assert params["dry_run"]["title"] == "Dry run"
    search = schema["definitions"]["SearchSpec"]["properties"]
    assert search["trials_per_family"]["default"] == 4 and "description" in search["trials_per_family"]
    assert set(schema["definitions"]["ModelFamily"]["enum"]) >= {"logistic_regression", "hist_gradient_boosting"}
    gates = schema["definitions"]["Gates"]["properties"]
    assert "roc_auc" in gates["primary_metric"]["enum"]
    assert deployment.work_pool_name == "mlops-process"
    assert deployment.schedules and deployment.schedules[0].schedule.cron == "0 3 * * 1"
    # no secret in what the UI shows
    assert "test-secret-key-do-not-log" not in deployment.model_dump_json()


def test_redeploy_is_idempotent(stack, deployed):
    from deployments.deploy import deploy_all

    again = deploy_all(work_pool=stack.work_pool)
    assert again == deployed
    with _client() as client:
        names = [d.name for d in client.read_deployments() if d.name == "training"]
    assert names == ["training"]


def test_scheduled_run_is_picked_up_by_the_worker_and_completes(stack, deployed):
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    from deployments.deploy import deploy_all

    # Given a short interval schedule
    deploy_all(training_interval=3600, work_pool=stack.work_pool)
    deadline = time.monotonic() + 120
    with _client() as client:
        while True:
            runs = client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployed["training"]]))
            )
            scheduled = [r for r in runs if r.auto_scheduled]
            if scheduled or time.monotonic() > deadline:
                break
            time.sleep(2)
    assert scheduled, "the server scheduled no run"
    first = min(scheduled, key=lambda r: r.expected_start_time)
    # then the worker picks the due run up and it completes
    [finished] = _wait([first.id])
    assert finished.state.type.value == "COMPLETED", finished.state.message


def test_concurrent_runs_never_promote_against_a_stale_champion(stack, deployed):
    from prefect.deployments import run_deployment

    # Given two runs started at once with different seeds (so both could beat the champion)
    runs = [
        run_deployment(
            "training/training",
            parameters={"params": {"seed": seed, "search": {"trials_per_family": 2}}},
            timeout=0,
        )
        for seed in (101, 202)
    ]
    finished = _wait([r.id for r in runs])
    assert [r.state.type.value for r in finished] == ["COMPLETED", "COMPLETED"], [r.state.message for r in finished]
    # then every promotion names, as the champion it beat, the version that was champion just before it:
    # no two promotions were decided against the same champion
    client = mlflow_client(stack)
    versions = client.search_model_versions("name='credit-risk'")
    promoted = [v for v in versions if v.tags.get("promoted") == "true"]
    beaten = [v.tags["decision.champion_version"] for v in promoted]
    assert len(beaten) == len(set(beaten)), beaten
    # and the lock that serialises decide-and-promote exists with one slot
    with _client() as prefect:
        assert prefect.read_global_concurrency_limit_by_name("promotion-credit-risk").limit == 1
