"""Deployments on the real Prefect server with the stack's process worker: schema, schedule, concurrency."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from adapters.clients import mlflow_client
from tests.waiting import wait_for, wait_for_runs

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# seconds between deploying a schedule and its first run (see the scheduled-run test)
SCHEDULE_LEAD = 45


MODEL = "deployed-credit-risk"


SEARCH = {"trials_per_family": 2}


def _raw(model: str) -> dict:
    """The bundled credit-risk config under a model of its own."""
    import yaml

    from core.data.dataset import bundled_config_text

    return yaml.safe_load(bundled_config_text("credit-risk")) | {"name": model, "model_name": model}


@pytest.fixture(scope="module")
def deployed_dataset(stack, default_data) -> str:
    """The model's catalog entry (its config in S3, read by the worker's runs), apart from other tests' models."""
    from tests.catalog import put_model

    return put_model(stack, _raw(MODEL), search=SEARCH).uri


def _parameters(dataset: str, **changes) -> dict:
    return {"params": {"dataset": dataset, "search": SEARCH} | changes}


@pytest.fixture(scope="module")
def deployed(stack, deployed_dataset):
    from tests.catalog import deploy_model

    ids = deploy_model(stack, _raw(MODEL), search=SEARCH)
    yield ids
    # back to the weekly schedule, which also drops the short schedule's future runs
    deploy_model(stack, _raw(MODEL), search=SEARCH)


def _client():
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


def test_parameters_form_has_titles_descriptions_defaults_and_enums(deployed, deployed_dataset):
    with _client() as client:
        deployment = client.read_deployment(deployed["training"])
    assert deployment.name == MODEL
    # the model's defaults: its catalog entry and the search of its config's operations section
    assert deployment.parameters == {"params": {"dataset": deployed_dataset, "reason": "scheduled", "search": SEARCH}}
    schema = deployment.parameter_openapi_schema
    params = schema["definitions"]["TrainingParams"]["properties"]
    assert params["dataset"]["default"] == "credit-risk" and params["dataset"]["description"]
    assert params["dry_run"]["title"] == "Dry run"
    search = schema["definitions"]["SearchSpec"]["properties"]
    assert search["trials_per_family"]["default"] == 4 and "description" in search["trials_per_family"]
    assert set(schema["definitions"]["ModelFamily"]["enum"]) >= {
        "logistic_regression",
        "ridge",
        "hist_gradient_boosting",
    }
    assert search["time_budget_seconds"]["title"] == "Time budget (s)"
    gates = schema["definitions"]["Gates"]["properties"]
    # optional (empty means the task's default): an enum of every task's metrics, or null
    choices = {v for option in gates["primary_metric"]["anyOf"] for v in option.get("enum", [])}
    assert {"roc_auc", "log_loss", "rmse", "mae", "r2"} <= choices
    assert {"type": "null"} in gates["primary_metric"]["anyOf"]
    assert deployment.work_pool_name == "mlops-process"
    assert deployment.schedules and deployment.schedules[0].schedule.cron == "0 3 * * 1"
    # no secret in what the UI shows
    assert "test-secret-key-do-not-log" not in deployment.model_dump_json()


def test_redeploy_is_idempotent(stack, deployed):
    from tests.catalog import deploy_model

    again = deploy_model(stack, _raw(MODEL), search=SEARCH)
    assert again == deployed
    with _client() as client:
        flows = {f.id: f.name for f in client.read_flows()}
        mine = [d for d in client.read_deployments() if d.name == MODEL]
        names = [f"{flows[d.flow_id]}/{d.name}" for d in mine]
    # one deployment of each of the model's flows (scoring too: the bundled config names a scoring source)
    assert sorted(names) == [f"{flow}/{MODEL}" for flow in ("monitoring", "rollback", "scoring", "training")]
    # each started by the process worker as the run's process itself (no workspace supervisor before it)
    assert [d.job_variables for d in mine] == [{"command": "python -m prefect.engine"}] * len(mine)


def _model_versions(stack) -> list:
    return mlflow_client(stack).search_model_versions(f"name='{MODEL}'")


def test_scheduled_run_is_picked_up_by_the_worker_and_completes(stack, deployed):
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    from tests.catalog import deploy_model

    # Given an hourly schedule whose first run is due shortly. The server only schedules dates that are
    # still ahead when its scheduler reaches the deployment (a 5 s loop for just-updated deployments, 60 s
    # for the rest), so the anchor leaves room for a slow machine: with 5 s, a busy CI machine scheduled
    # the run an hour later and the test waited for it in vain.
    before = len(_model_versions(stack))
    anchor = (datetime.now(UTC) + timedelta(seconds=SCHEDULE_LEAD)).replace(microsecond=0)
    anchor += timedelta(seconds=anchor.minute == anchor.second == 0)  # off the weekly schedule's whole hours
    deploy_model(stack, _raw(MODEL), search=SEARCH, training_interval_seconds=3600, schedule_anchor=anchor.isoformat())
    # when the server's scheduler creates it
    deadline = time.monotonic() + 180
    with _client() as client:
        while True:
            runs = client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployed["training"]]))
            )
            # only runs on this schedule's hourly grid are this one's: another schedule's (the weekly one the
            # deployment had) may still be listed after the update, and once was
            scheduled = [r for r in runs if r.auto_scheduled and _on_grid(r.expected_start_time, anchor, 3600)]
            if scheduled or time.monotonic() > deadline:
                break
            time.sleep(2)
    assert scheduled, "the server scheduled no run"
    first = min(scheduled, key=lambda r: r.expected_start_time)
    assert first.expected_start_time == anchor, (
        f"the scheduler reached the deployment after the anchor {anchor} had passed; the first run is "
        f"due at {first.expected_start_time} (raise SCHEDULE_LEAD)"
    )
    # then the worker picks the due run up, it completes, and a model version is registered
    [finished] = wait_for_runs([first.id])
    assert finished.state.type.value == "COMPLETED", finished.state.message
    assert len(_model_versions(stack)) == before + 1


def _on_grid(when: datetime, anchor: datetime, every_seconds: int) -> bool:
    """Whether `when` is a date of the interval schedule anchored at `anchor` (at or after it)."""
    offset = (when - anchor).total_seconds()
    return offset >= 0 and offset % every_seconds == 0


def _weak_champion(stack, tmp_path) -> str:
    """A champion on two inputs only, made by the training flow and promoted by hand: any full candidate beats it."""
    import yaml

    from adapters.promotion import promote_version
    from adapters.registry import champion_version
    from core.data.dataset import bundled_config_text
    from core.modeling.search import SearchSpec
    from flows.training import TrainingParams, training

    raw = yaml.safe_load(bundled_config_text("credit-risk")) | {"name": MODEL, "model_name": MODEL}
    raw["features"] = [f for f in raw["features"] if f["name"] in {"age", "region"}]
    path = tmp_path / "weak.yaml"
    path.write_text(yaml.safe_dump(raw))
    params = TrainingParams(dataset=str(path), dry_run=False, search=SearchSpec(trials_per_family=1, cv_folds=2))
    state = training(params, return_state=True)
    assert state.is_completed(), state.message
    weak = state.result().candidate_version
    if champion_version(MODEL) != weak:
        promote_version(MODEL, weak, champion_version(MODEL), reason="test: a weak champion", actor="tester")
    return weak


def test_concurrent_runs_never_promote_against_a_stale_champion(stack, deployed, deployed_dataset, tmp_path):
    from prefect.deployments import run_deployment

    # Given a weak champion, and two runs started at once with the same seed: each candidate beats the
    # champion on its own (the gates allow its wider input schema), and the two are the same model
    weak = _weak_champion(stack, tmp_path)
    contended = _parameters(deployed_dataset, gates={"allow_schema_change": True})
    # Each run waits just before taking the promotion lock (test hook) until both are there, so the lock is
    # contended: trained side by side on a busy machine, one run may otherwise finish its turn before the other
    # arrives, and the test would prove nothing about the lock.
    releases = [tmp_path / f"release-{i}" for i in range(2)]
    runs = [
        run_deployment(
            f"training/{MODEL}",
            parameters=contended,
            job_variables={"env": {"MLOPS_TEST_PAUSE_AT": "before-lock", "MLOPS_TEST_PAUSE_FILE": str(release)}},
            timeout=0,
        )
        for release in releases
    ]
    wait_for(lambda: all(Path(f"{r}.reached").exists() for r in releases), 900, "both runs at the lock", interval=1)
    for release in releases:
        release.touch()
    finished = wait_for_runs([r.id for r in runs])
    assert [r.state.type.value for r in finished] == ["COMPLETED", "COMPLETED"], [r.state.message for r in finished]
    # then they ran at the same time
    assert max(r.start_time for r in finished) < min(r.end_time for r in finished), "the runs did not overlap"
    # and one waited on the promotion lock until the other released it (both record their wait)
    client = mlflow_client(stack)
    by_run = {
        r.id: client.search_runs(
            [client.get_experiment_by_name(MODEL).experiment_id], f"tags.prefect_flow_run_id = '{r.id}'"
        )[0].data.tags
        for r in finished
    }
    first, second = sorted(by_run.values(), key=lambda tags: tags["lock.acquired_at"])
    released = datetime.fromisoformat(first["lock.released_at"])
    acquired = datetime.fromisoformat(second["lock.acquired_at"])
    waited = float(second["lock.wait_seconds"])
    print(f"\npromotion lock: the second run waited {waited:.2f} s; the first waited {first['lock.wait_seconds']} s")
    assert acquired >= released, "both runs held the promotion lock at once"
    assert acquired - timedelta(seconds=waited) < released and waited > 1, (first, second)
    # and exactly one promoted: the first, over the weak champion; the second decided against the new champion
    assert (first["promoted"], first["decision"], first["decision.champion_version"]) == ("true", "promote", weak)
    promoted = mlflow_client(stack).get_registered_model(MODEL).aliases["champion"]
    assert second["decision.champion_version"] == str(promoted) and second["decision"] == "reject"
    assert second["promoted"] == "false" and "outcome" in first and "outcome" in second
    # and the lock that serialises decide-and-promote exists with one slot
    with _client() as prefect:
        assert prefect.read_global_concurrency_limit_by_name(f"promotion-{MODEL}").limit == 1


SCORING_MODEL = "deployed-scoring"


def test_scoring_deployment_is_on_demand_and_runs_on_the_worker(stack, deployed, default_data):
    import json

    from prefect.deployments import run_deployment

    from adapters.catalog import entry_uri
    from adapters.clients import S3Location, s3_client
    from core.inference.scoring import default_output
    from core.modeling.search import SearchSpec
    from flows.scoring import ScoringParams
    from flows.training import TrainingParams, training
    from tests.catalog import deploy_model

    # Given a model of its own whose config names a scoring source (one month) and no schedule
    source = f"{default_data}month=2025-06/"
    ids = deploy_model(stack, _raw(SCORING_MODEL), scoring_source=source, training_cron=None, monitoring_cron=None)
    config = entry_uri(stack, SCORING_MODEL)
    # The scoring deployment has no schedule, a form built from ScoringParams, and defaults that validate
    with _client() as client:
        deployment = client.read_deployment(ids["scoring"])
    assert deployment.name == SCORING_MODEL
    assert deployment.schedules == []
    assert deployment.work_pool_name == "mlops-process"
    definition = deployment.parameter_openapi_schema["definitions"]["ScoringParams"]
    assert definition["required"] == ["source"]
    assert definition["properties"]["source"]["title"] == "Source" and definition["properties"]["source"]["description"]
    assert definition["properties"]["chunk_rows"]["default"] == 50_000
    assert definition["properties"]["chunk_rows"]["minimum"] == 100
    assert definition["properties"]["model_version"]["title"] == "Model version"
    assert ScoringParams.model_validate(deployment.parameters["params"]).source == source
    assert deployment.parameters == {"params": {"dataset": config, "source": source}}
    # Given a champion of that model (its config is the catalog entry, read by the worker's run)
    trained = training(
        TrainingParams(dataset=config, search=SearchSpec(trials_per_family=1, cv_folds=2)), return_state=True
    )
    assert trained.is_completed() and trained.result().promoted, trained.message
    # when a run of the deployment is started (its defaults: the month of the config's scoring source)
    run = run_deployment(f"scoring/{SCORING_MODEL}", timeout=0)
    [finished] = wait_for_runs([run.id])
    # then the worker completes it, and the month's predictions and summary are in S3
    assert finished.state.type.value == "COMPLETED", finished.state.message
    version = trained.result().candidate_version
    from adapters.scoring_store import current_output

    summary = S3Location.parse(
        current_output(default_output(stack.bucket, SCORING_MODEL, source, version), stack).summary
    )
    body = s3_client(stack).get_object(Bucket=summary.bucket, Key=summary.key)["Body"].read()
    assert json.loads(body)["rows"] == 2000
    assert json.loads(body)["model_version"] == version


ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"


@pytest.mark.browser
def test_run_from_the_ui_form_with_a_changed_parameter(stack, deployed):
    from playwright.sync_api import sync_playwright
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    assert Path(CHROMIUM).exists(), "Debian's chromium is needed: apt-get install chromium (make browser-deps)"
    before = len(_model_versions(stack))
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-background-networking", "--disable-gpu"]
        )
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        # Given the model's training deployment's page in the Prefect UI
        page.goto(f"{stack.prefect_ui_url}/deployments/deployment/{deployed['training']}")
        page.wait_for_load_state("networkidle")
        page.get_by_text(MODEL).first.wait_for()
        # when a person opens Run > Custom run, changes "Trials per family" in the form and submits
        page.get_by_role("button", name="Run", exact=True).click()
        page.get_by_text("Custom run").click()
        page.wait_for_load_state("networkidle")
        label = page.locator("label", has_text="Trials per family")
        field = label.locator("xpath=ancestor::div[contains(concat(' ', @class, ' '), ' p-label ')][1]//input").first
        field.fill("1")
        page.screenshot(path=str(ARTIFACTS / "ui-custom-run-form.png"), full_page=True)
        submitted = datetime.now(UTC)
        page.get_by_role("button", name="Submit").click()
        page.wait_for_url(lambda url: not url.split("?")[0].endswith("/run"), timeout=30_000)
        # then a run with the changed value exists, the worker completes it, and a model version appears
        deadline = time.monotonic() + 30
        with _client() as client:
            while True:
                runs = client.read_flow_runs(
                    deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployed["training"]]))
                )
                # runs other tests left on the deployment (its schedules) are not this one's
                new = [r for r in runs if not r.auto_scheduled and r.created >= submitted - timedelta(seconds=1)]
                mine = [r for r in new if r.parameters["params"].get("search", {}).get("trials_per_family") == 1]
                if mine or time.monotonic() > deadline:
                    break
                time.sleep(1)
        assert len(mine) == 1, [r.parameters for r in runs]
        [finished] = wait_for_runs([mine[0].id])
        assert finished.state.type.value == "COMPLETED", finished.state.message
        assert len(_model_versions(stack)) == before + 1
        page.goto(f"{stack.prefect_ui_url}/runs/flow-run/{finished.id}")
        page.wait_for_load_state("networkidle")
        page.get_by_text("Completed").first.wait_for()
        page.screenshot(path=str(ARTIFACTS / "ui-finished-run.png"), full_page=True)
        browser.close()
