"""Alerts through Prefect automations on the real stack, received by a local webhook endpoint.

Each alert arrives exactly once, with its link and its reason: a failed training run (worker), a drift
event (which also starts exactly one training run through the automation; a second check within the
cooldown starts none), a promotion and a rollback. With the endpoint down, Prefect does not deliver the
alert later; the project finds it (`undelivered_alerts`) and sends it again (`redeliver`).
Delivery times (event -> endpoint) are printed (`pytest -s`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from adapters.alerts import (
    CHAMPION_AUTOMATION,
    DRIFT_AUTOMATION,
    DRIFT_EVENT,
    REFUSED_AUTOMATION,
    ROLLOUT_AUTOMATION,
    RUN_FAILED_AUTOMATION,
    WEBHOOK_BLOCK,
    drift_automation_name,
    model_resource_id,
    undelivered_alerts,
)
from adapters.clients import S3Location, mlflow_client, put_bytes
from tests.ports import free_port
from tests.serving_helpers import register_again
from tests.waiting import wait_for, wait_for_runs

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MODEL = "alerts-test"
SEED = 5
MONTHS = 3
ROWS = 1000
SEARCH = {"trials_per_family": 1, "cv_folds": 2}
# The model's training deployment promotes nothing: no holdout is this large. So the drift-triggered run trains
# and evaluates (and registers a rejected candidate) but leaves the champion to the promotion test.
GATES = {"min_holdout_rows": 10**9}
DELIVERY_TIMEOUT = 60
# After the first copy of an alert arrived, how long a second copy is waited for (none may come).
DUPLICATE_WINDOW = 5
DELAYS: list[tuple[str, float]] = []


class Receiver:
    """A webhook endpoint on 127.0.0.1 that records every POST body; it can be stopped and started again."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/hooks/alerts?token=test-webhook-token"
        self.posts: list[tuple[float, str]] = []  # (arrival time, the JSON body's text)
        self._server: ThreadingHTTPServer | None = None

    def start(self) -> None:
        posts = self.posts

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                posts.append((time.time(), json.loads(body)["text"]))
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: object) -> None:
                pass

        ThreadingHTTPServer.allow_reuse_address = True
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def matching(self, *needles: str) -> list[tuple[float, str]]:
        return [(at, text) for at, text in self.posts if all(n in text for n in needles)]

    def one(self, *needles: str) -> tuple[float, str]:
        """The one alert containing every needle, as a receiver that dedupes on the alert id sees it.

        Prefect's trigger consumer is at-least-once: an event it retries (on SQLite, after "database is
        locked") may fire the action again, with the same triggering event. Every message carries that
        event's id as its idempotency key (`alert id: ...`): copies with the same key are one alert; a
        second key is a second alert, and fails.
        """
        wait_for(lambda: self.matching(*needles), DELIVERY_TIMEOUT, f"an alert with {needles}", interval=0.1)
        time.sleep(DUPLICATE_WINDOW)
        found = self.matching(*needles)
        keys = [alert_id(text) for _, text in found]
        assert all(keys), f"an alert without its id: {found}"
        assert len(set(keys)) == 1, f"{len(set(keys))} alerts with {needles}: {found}"
        if len(found) > 1:
            print(f"\n{len(found)} deliveries of alert {keys[0]} (deduped by its id): {needles}")
        return found[0]


ALERT_ID = re.compile(r"^alert id: ([0-9a-f-]{36})$", re.MULTILINE)


def alert_id(text: str) -> str | None:
    """The idempotency key a message carries (its triggering event's id), None when it has none."""
    found = ALERT_ID.search(text)
    return found.group(1) if found else None


def _delay(what: str, occurred: datetime, arrived: float, text: str) -> float:
    seconds = arrived - occurred.timestamp()
    DELAYS.append((what, seconds))
    print(f"\nalert delivery, {what}: {seconds:.2f} s from event to endpoint; the message:\n{text}")
    return seconds


def _client():
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


def _events(name: str, resource_id: str, since: datetime, count: int = 1) -> list:
    """Events whose name starts with `name` on the resource since `since`, once at least `count` are stored
    (the server persists events in batches, a few seconds after they arrive)."""
    from prefect.events.filters import EventFilter, EventNameFilter, EventOccurredFilter, EventResourceFilter

    found: list = []

    def stored() -> bool:
        with _client() as client:
            page = client.read_events(
                filter=EventFilter(
                    occurred=EventOccurredFilter(since=since),
                    event=EventNameFilter(prefix=[name]),
                    resource=EventResourceFilter(id=[resource_id]),
                ),
                limit=50,
            )
        found[:] = page.events
        return len(found) >= count

    wait_for(stored, 30, f"{count} {name} event(s) of {resource_id}", interval=1)
    return found


@pytest.fixture(scope="module")
def receiver(stack) -> Iterator[Receiver]:
    endpoint = Receiver()
    endpoint.start()
    yield endpoint
    endpoint.stop()
    if DELAYS:
        print("\nalert delivery times:", ", ".join(f"{what} {seconds:.2f} s" for what, seconds in DELAYS))


def _raw(stack, name: str, **changes: object) -> dict:
    import yaml

    from core.data.dataset import bundled_config_text

    raw = yaml.safe_load(bundled_config_text("credit-risk")) | {"name": name, "model_name": name}
    return raw | {"source": f"s3://{stack.bucket}/datasets/{MODEL}/"} | changes


def _config(stack, name: str, **changes: object) -> str:
    import yaml

    location = S3Location(stack.bucket, f"configs/{name}.yaml")
    return put_bytes(stack, location, yaml.safe_dump(_raw(stack, name, **changes)).encode(), "application/yaml")


def _deploy(stack) -> dict[str, str]:
    """The model's deployments (`training/alerts-test`, ...) and the automations; flow name -> id."""
    from tests.catalog import deploy_model

    return deploy_model(stack, _raw(stack, MODEL), search=SEARCH, gates=GATES)


@pytest.fixture(scope="module")
def dataset(stack) -> str:
    """A small dataset of its own; its config is the model's catalog entry (in S3, read by the worker)."""
    from mlops.datagen import write_months
    from tests.catalog import put_model

    write_months(stack, _raw(stack, MODEL)["source"], MONTHS, ROWS, seed=SEED)
    return put_model(stack, _raw(stack, MODEL), search=SEARCH, gates=GATES).uri


@pytest.fixture(scope="module")
def failing_dataset(stack, dataset) -> str:
    """The same data, with a row count no snapshot reaches: the run fails at validation."""
    return _config(stack, f"{MODEL}-too-few-rows", min_rows=10**9)


def _training_defaults(dataset: str) -> dict:
    """The model's training deployment's defaults: its catalog entry, and its config's search and gates."""
    return {"params": {"dataset": dataset, "reason": "scheduled", "search": SEARCH, "gates": GATES}}


@pytest.fixture(scope="module")
def alerts(stack, receiver, dataset) -> Iterator[dict[str, str]]:
    """The deployments and automations, notifying the receiver; without the webhook afterwards."""
    os.environ["MLOPS_ALERT_WEBHOOK_URL"] = receiver.url
    try:
        yield _deploy(stack)
    finally:
        del os.environ["MLOPS_ALERT_WEBHOOK_URL"]
        # other modules' runs notify nobody: the alert-only automations and the block go away
        _deploy(stack)


def test_failed_training_run_is_alerted_once_with_its_link_and_error(stack, alerts, receiver, failing_dataset):
    from prefect.deployments import run_deployment

    # Given a run of the model's training deployment on the worker whose data fails validation
    run = run_deployment(
        f"training/{MODEL}", parameters={"params": {"dataset": failing_dataset, "search": SEARCH}}, timeout=0
    )
    [finished] = wait_for_runs([run.id], timeout=300)
    assert finished.state.type.value == "FAILED", finished.state.message
    # then the endpoint gets one alert naming the model (by the run's deployment), the run, its state, its error
    # and its link
    link = f"{stack.prefect_ui_url}/runs/flow-run/{finished.id}"
    arrived, text = receiver.one(link)
    assert text.startswith(f"[mlops] training of {MODEL} run {finished.name} Failed\n"), text
    assert "error: " in text and "data validation failed" in text and finished.state.message in text, text
    _delay("failed run", finished.state.timestamp, arrived, text)


def test_a_refused_model_artifact_is_alerted_once_with_the_version_and_why(stack, alerts, receiver):
    import mlflow
    from sklearn.dummy import DummyClassifier

    from adapters.clients import use_tracking_server
    from adapters.registry import load_model
    from core.modeling.artifacts import UntrustedArtifactError

    # Given a version registered outside training (no artifact digests)
    name = f"{MODEL}-outsider"
    use_tracking_server(stack)
    with mlflow.start_run(experiment_id=mlflow.MlflowClient().create_experiment(name)) as run:
        mlflow.sklearn.log_model(DummyClassifier().fit([[0], [1]], [0, 1]), name="model")
    version = str(mlflow.register_model(f"runs:/{run.info.run_id}/model", name).version)
    # when scoring would load it, it is refused
    with pytest.raises(UntrustedArtifactError):
        load_model(name, version, where="scoring")
    # then one alert names the model, the version, where and why
    _, text = receiver.one(f"[mlops] {name} v{version} refused by scoring")
    assert "reason: " in text and "no recorded artifact digest" in text and "mlops models trust" in text, text


def test_drift_event_starts_one_training_run_and_is_alerted_once(stack, alerts, receiver, dataset):
    from core.monitoring.retraining import RetrainRequest
    from services.retraining import DRIFT_TAG, model_tag, start_retraining

    since = datetime.now(UTC) - timedelta(seconds=5)
    reason = f"drift: 3 of 13 features drifted (alerts test {time.time():.0f})"
    # Given drift found twice in a row, as monitoring reports it
    deployment = f"training/{MODEL}"
    first = start_retraining(RetrainRequest(MODEL, dataset, reason, 60, deployment, summary="3 of 13 features drifted"))
    second = start_retraining(
        RetrainRequest(MODEL, dataset, reason + " again", 60, deployment, summary="still drifted")
    )
    # then the first emits the event and the automation starts one run; the second is held by the cooldown
    assert first.status == "triggered", first.detail
    assert second.status == "cooldown" and second.flow_run_id == first.flow_run_id, second.detail
    with _client() as client:
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags

        tagged = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[DRIFT_TAG, model_tag(MODEL)]))
        )
        [automation] = client.read_automations_by_name(drift_automation_name(MODEL))
    assert [str(r.id) for r in tagged] == [first.flow_run_id]
    assert tagged[0].created_by.type == "AUTOMATION" and tagged[0].created_by.id == automation.id
    # and one event is visible under Events, and one alert with the reason and the deployment's link arrives
    [event] = _events(DRIFT_EVENT, model_resource_id(MODEL), since)
    assert event.payload["reason"] == reason and event.payload["dataset"] == dataset
    arrived, text = receiver.one(f"drift on {MODEL}")
    assert alert_id(text) == str(event.id), text  # the idempotency key is the event that fired it
    assert f"reason: {reason}\n" in text and "3 of 13 features drifted" in text, text
    assert f"{stack.prefect_ui_url}/deployments/deployment/{alerts['training']}" in text, text
    assert f"retraining: deployment {deployment}, dataset {dataset}: " in text, text
    assert "still drifted" not in text and not receiver.matching("still drifted")
    _delay("drift", event.occurred, arrived, text)
    # and the automation started that one run and no other
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    with _client() as client:
        runs = client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[automation.actions[0].deployment_id]))
        )
    started = [r for r in runs if r.created_by and r.created_by.type == "AUTOMATION" and r.created >= since]
    assert [str(r.id) for r in started] == [first.flow_run_id]
    # and the worker runs it with the event's dataset and reason and the deployment's other defaults
    [finished] = wait_for_runs([first.flow_run_id], timeout=400)
    assert finished.state.type.value == "COMPLETED", finished.state.message
    assert finished.parameters["params"] == _training_defaults(dataset)["params"] | {"reason": reason}


def test_promotion_and_rollback_are_alerted_once_each_with_reason_and_model_card(stack, alerts, receiver, dataset):

    from adapters.promotion import promote_version
    from core.evaluation.decision import Gates
    from core.modeling.search import SearchSpec
    from flows.training import TrainingParams, training
    from services.rollback import rollback

    since = datetime.now(UTC) - timedelta(seconds=5)
    # Given a cold start promoted by the training flow (a lenient gate: 600 holdout rows, a one-trial search)
    params = TrainingParams(
        dataset=dataset, search=SearchSpec(**SEARCH), gates=Gates(min_roc_auc=0.55), reason="alerts test: cold start"
    )
    state = training(params, return_state=True)
    assert state.is_completed() and state.result().promoted, state.message
    first = state.result().candidate_version
    # then one alert says so, with the reason, the flow run and the model card, which opens once the run is done
    arrived, text = receiver.one(f"{MODEL}: promotion, champion none -> v{first}")
    assert "reason: alerts test: cold start" in text, text
    assert f"{stack.prefect_ui_url}/runs/flow-run/" in text and f"/#/models/{MODEL}/versions/{first}" in text
    card = next(line for line in text.splitlines() if line.startswith("model card: ")).removeprefix("model card: ")
    assert f"/model-cards/{MODEL}/{first}/model_card.html" in card
    page = httpx.get(card, timeout=10)
    assert page.status_code == 200 and MODEL in page.text
    [promoted] = _events("mlops.champion.promotion", model_resource_id(MODEL), since)
    _delay("promotion (training flow)", promoted.occurred, arrived, text)
    # Given a second version promoted by hand and rolled back
    second = register_again(stack, MODEL, first)
    promote_version(MODEL, second, first, reason="alerts test: v2", actor="tester")
    receiver.one(f"{MODEL}: promotion, champion v{first} -> v{second}", "reason: alerts test: v2", "by: tester at")
    rollback(MODEL, None, "v2 answers nonsense", "tester")
    # then the rollback is alerted once, with the versions, the reason, who and the card of the restored version
    arrived, text = receiver.one(f"{MODEL}: rollback, champion v{second} -> v{first}")
    assert "reason: v2 answers nonsense\nby: tester at " in text, text
    assert f"/model-cards/{MODEL}/{first}/model_card.html" in text
    [rolled] = _events("mlops.champion.rollback", model_resource_id(MODEL), since)
    assert rolled.payload["reason"] == "v2 answers nonsense" and rolled.payload["actor"] == "tester"
    _delay("rollback", rolled.occurred, arrived, text)
    assert mlflow_client(stack).get_registered_model(MODEL).aliases["champion"] == first
    # no message carries the S3 secret (the card link is presigned: an access key id and a signature)
    assert not [text for _, text in receiver.posts if "test-secret-key-do-not-log" in text]


def _dead_letters(stack) -> Path:
    """Where the stack's Prefect server (in-memory messaging) puts messages it gave up on."""
    return stack.state_dir / "prefect" / "dlq"


def _dead_lettered(stack, needle: str) -> bool:
    folder = _dead_letters(stack)
    return folder.exists() and any(needle in path.read_text(errors="replace") for path in folder.iterdir())


def test_alert_missed_while_the_endpoint_is_down_is_not_retried_by_prefect_but_found_and_redelivered(
    stack, alerts, receiver, failing_dataset
):
    from flows.training import TrainingParams, training

    since = datetime.now(UTC) - timedelta(seconds=5)
    # Given the endpoint down while a run fails
    receiver.stop()
    down = time.monotonic()
    state = training(TrainingParams(dataset=failing_dataset, search=SEARCH), return_state=True)
    assert state.is_failed(), state.message
    run_id = str(state.state_details.flow_run_id)
    # when Prefect has tried (a few attempts at once) and given up: the message is dead-lettered on the server
    wait_for(lambda: _dead_lettered(stack, run_id), 60, "the alert's dead letter", interval=0.2)
    # and the endpoint is back after a short outage
    receiver.start()
    outage = time.monotonic() - down
    print(f"\nendpoint down for {outage:.1f} s")
    # then Prefect does not deliver it later: a dead-lettered message is never retried (it stays until removed
    # by hand), and every attempt before it failed while the endpoint was down
    assert receiver.matching(run_id) == [], "Prefect delivered the alert after all"

    # but the firing without a delivery is found, rendered as Prefect would have sent it
    def missed() -> list:
        return [m for m in undelivered_alerts(since, grace=timedelta(0)) if run_id in m.body]

    wait_for(missed, 30, "the missed alert in the events", interval=1)
    found = missed()
    assert len(found) == 1, [(m.automation, m.automation_resource, m.triggering_event.get("id")) for m in found]
    [alert] = found
    assert alert.automation == RUN_FAILED_AUTOMATION and alert.event == "prefect.flow-run.Failed"
    assert f"{stack.prefect_ui_url}/runs/flow-run/{run_id}" in alert.body and "data validation failed" in alert.body
    # and sent again, once, by `mlops alerts resend` (which lists it first with --dry-run); then it is no
    # longer listed
    from typer.testing import CliRunner

    from mlops.cli import app

    # (the command lists a firing once it is older than its grace, 30 s, in which Prefect may still deliver)
    listed = []

    def listed_by_the_command() -> bool:
        listed[:] = [CliRunner().invoke(app, ["alerts", "resend", "--since-minutes", "10", "--dry-run"])]
        return listed[0].exit_code == 0 and RUN_FAILED_AUTOMATION in listed[0].output

    try:
        wait_for(listed_by_the_command, 90, "`mlops alerts resend --dry-run` to list the missed alert", interval=2)
    except AssertionError as error:  # say what the command last answered (one CI run timed out here, unexplained)
        last = listed[0] if listed else None
        answer = f"exit {last.exit_code}: {last.output!r} {last.exception!r}" if last else "never ran"
        raise AssertionError(f"{error}; the last answer: {answer}; missed now: {missed()}") from None
    assert receiver.matching(run_id) == [], "Prefect delivered the alert after all"
    resent = CliRunner().invoke(app, ["alerts", "resend", "--since-minutes", "10"])
    assert resent.exit_code == 0 and "resent 1 alert(s)" in resent.output, resent.output
    _, text = receiver.one(run_id)
    assert text.startswith("[redelivered] [mlops] training run ") and "Failed" in text.splitlines()[0]
    wait_for(lambda: not missed(), 30, "the redelivery to be recorded", interval=1)


def test_deploy_is_idempotent_and_updates_in_place(stack, alerts, receiver, caplog):
    from adapters.settings import Settings
    from deployments.automations import deploy_automations

    drift = drift_automation_name(MODEL)
    names = (RUN_FAILED_AUTOMATION, drift, CHAMPION_AUTOMATION, REFUSED_AUTOMATION, ROLLOUT_AUTOMATION)

    def state() -> dict[str, tuple[str, str, bool]]:
        """Each automation by name (exactly one each): id, last update, enabled; and the block's."""
        found = {}
        with _client() as client:
            for name in names:
                matches = client.read_automations_by_name(name)
                assert len(matches) <= 1, matches
                for automation in matches:
                    raw = client.request("GET", "/automations/{id}", path_params={"id": automation.id}).json()
                    found[name] = (str(automation.id), raw["updated"], automation.enabled)
            for block in client.read_block_documents():
                if block.name == WEBHOOK_BLOCK:
                    found[WEBHOOK_BLOCK] = (str(block.id), str(block.updated), True)
        return found

    before = state()
    assert set(before) == {*names, WEBHOOK_BLOCK} and all(enabled for _, _, enabled in before.values())
    # a second deploy changes nothing: same ids, nothing updated
    again = _deploy(stack)
    assert again == alerts and state() == before
    # and the legacy single drift automation is gone
    with _client() as client:
        assert client.read_automations_by_name(DRIFT_AUTOMATION) == []
    # another webhook URL updates the block in place; the automations are untouched
    from uuid import UUID

    training = {MODEL: UUID(alerts["training"])}
    moved = Settings(alert_webhook_url=receiver.url + "&moved=1")
    with caplog.at_level(logging.DEBUG):
        deploy_automations(training, moved)
    assert "webhook block 'mlops-alerts' updated" in caplog.text and "test-webhook-token" not in caplog.text
    after = state()
    assert after[WEBHOOK_BLOCK][0] == before[WEBHOOK_BLOCK][0] and after[WEBHOOK_BLOCK][1] != before[WEBHOOK_BLOCK][1]
    assert {n: after[n] for n in names} == {n: before[n] for n in names}
    from prefect.blocks.notifications import CustomWebhookNotificationBlock

    block = CustomWebhookNotificationBlock.load(WEBHOOK_BLOCK)
    assert block.secrets.get_secret_value()["webhook_url"].endswith("&moved=1")
    # the URL (with its token) is a secret: the API shows it obfuscated
    with _client() as client:
        document = client.read_block_document_by_name(WEBHOOK_BLOCK, "custom-webhook", include_secrets=False)
    assert "test-webhook-token" not in json.dumps(document.model_dump(mode="json"))
    # without a webhook: the alert-only automations and the block go, the drift automation only retrains
    deploy_automations(training, Settings(alert_webhook_url=None))
    bare = state()
    assert set(bare) == {drift} and bare[drift][0] == before[drift][0]
    with _client() as client:
        [automation] = client.read_automations_by_name(drift)
    assert [a.type for a in automation.actions] == ["run-deployment"]
    # and the webhook back: all of them again, the drift automation updated in place
    deploy_automations(training, Settings(alert_webhook_url=receiver.url))
    restored = state()
    assert set(restored) == set(before) and restored[drift][0] == before[drift][0]
