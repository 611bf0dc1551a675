"""The serving API under uvicorn against the real stack: answers, bad input, switching, broken models, logs."""

from __future__ import annotations

import io
import json
import os
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest

from adapters.clients import S3Location, mlflow_client, s3_client, use_tracking_server
from adapters.promotion import promote_version, revert_promotion
from adapters.serving_api import wait_for_serving
from core.modeling.search import ModelFamily, SearchSpec
from flows.training import TrainingParams, training
from mlops.stack import running
from tests.ports import free_port
from tests.serving_helpers import corrupt_version
from tests.waiting import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MODEL = "serving-test"
FAST_SEARCH = SearchSpec(trials_per_family=1, cv_folds=2)
WEAK_SEARCH = SearchSpec(families=[ModelFamily.decision_tree], trials_per_family=1, cv_folds=2)
NON_FEATURES = ["default", "application_id", "application_date"]


def _config(tmp_path_factory, name: str) -> str:
    import yaml

    from core.data.dataset import bundled_config_text

    raw = yaml.safe_load(bundled_config_text("credit-risk")) | {"name": name, "model_name": name}
    path = tmp_path_factory.mktemp(name) / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def _train(config: str, search: SearchSpec, **changes) -> object:
    state = training(TrainingParams(dataset=config, search=search, **changes), return_state=True)
    assert state.is_completed(), state.message
    return state.result()


@pytest.fixture(scope="module")
def versions(stack, default_data, tmp_path_factory) -> dict[str, str]:
    """v1 (champion, cold start), v2 (a weaker model, registered only)."""
    config = _config(tmp_path_factory, MODEL)
    first = _train(config, FAST_SEARCH)
    second = _train(config, WEAK_SEARCH)
    assert first.promoted and not second.promoted
    return {"first": first.candidate_version, "second": second.candidate_version, "config": config}


def _bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def _serve(stack, tmp_path_factory, name: str, **env: str):
    port = free_port()
    command = [_bin("mlops"), "serve", "--port", str(port), "--model", MODEL, "--poll-seconds", "0.5"]
    environment = os.environ | {"MLOPS_SERVING_LOG_FLUSH_SECONDS": "1"} | env
    log_file = tmp_path_factory.mktemp(name) / "serving.log"
    return port, running(command, f"http://127.0.0.1:{port}/health", environment, log_file)


@pytest.fixture(scope="module")
def server(stack, versions, tmp_path_factory):
    port, context = _serve(stack, tmp_path_factory, "serving")
    with context:
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: httpx.get(f"{url}/ready").status_code == 200, 60, "the server to load its model")
        yield url


def _champion(stack) -> str:
    return mlflow_client(stack).get_model_version_by_alias(MODEL, "champion").version


def _rows(stack, default_data, n: int) -> pd.DataFrame:
    location = S3Location.parse(default_data).child("month=2025-03/part-0.parquet")
    body = s3_client(stack).get_object(Bucket=location.bucket, Key=location.key)["Body"].read()
    return pd.read_parquet(io.BytesIO(body)).drop(columns=NON_FEATURES).head(n)


def _records(frame: pd.DataFrame) -> list[dict]:
    return json.loads(frame.to_json(orient="records"))


def test_predictions_match_the_model_loaded_directly(stack, default_data, versions, server):
    import mlflow.pyfunc

    from core.data.dataset import load_local_dataset_config
    from core.data.features import prepare_inputs

    # Given 40 raw rows, one of them with a missing value
    frame = _rows(stack, default_data, 40)
    frame.loc[frame.index[3], "annual_income"] = None
    records = _records(frame)
    champion = _champion(stack)
    model = mlflow.pyfunc.load_model(f"models:/{MODEL}/{champion}").get_raw_model()
    expected = model.predict_proba(prepare_inputs(frame, load_local_dataset_config(versions["config"])))
    # when they are posted in our format, in MLflow's, and at MLflow's path
    for path, key in (("/predict", "records"), ("/predict", "dataframe_records"), ("/invocations", "records")):
        answer = httpx.post(f"{server}{path}", json={key: records}, timeout=30)
        # then each record gets the class and probabilities the model gives in-process
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["model"] == {"name": MODEL, "version": champion}
        assert body["request_id"] == answer.headers["x-request-id"]
        got = np.array([[p["probabilities"]["0"], p["probabilities"]["1"]] for p in body["predictions"]])
        np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-12)
        assert [p["class"] for p in body["predictions"]] == list(model.classes_[expected.argmax(axis=1)])


def _one(stack, default_data) -> dict:
    return _records(_rows(stack, default_data, 1))[0]


@pytest.mark.parametrize(
    ("case", "status", "where"),
    [
        ("missing_field", 422, "records[1].age"),
        ("wrong_type", 422, "records[0].loan_amount"),
        ("number_as_text", 422, "records[0].region"),
        ("empty_batch", 422, "records"),
        ("not_json", 422, "body"),
        ("wrong_shape", 422, "body"),
        ("oversized_batch", 413, "records"),
        ("id_not_scalar", 422, "records[1].application_id"),
    ],
)
def test_bad_input_is_named_and_the_server_keeps_answering(case, status, where, stack, default_data, server):
    good = _one(stack, default_data)
    bodies = {
        "missing_field": {"records": [good, {k: v for k, v in good.items() if k != "age"}]},
        "wrong_type": {"records": [good | {"loan_amount": "a lot"}]},
        "number_as_text": {"records": [good | {"region": 3}]},
        "empty_batch": {"records": []},
        "wrong_shape": [good],
        "oversized_batch": {"records": [good] * 10_001},
        "id_not_scalar": {"records": [good | {"application_id": "A1"}, good | {"application_id": {"id": 2}}]},
    }
    if case == "not_json":
        answer = httpx.post(f"{server}/predict", content=b'{"records": [', timeout=30)
    else:
        answer = httpx.post(f"{server}/predict", json=bodies[case], timeout=60)
    assert answer.status_code == status, answer.text
    messages = [d["msg"] for d in answer.json()["detail"]]
    assert any(m.startswith(where) or where in m for m in messages), messages
    # and the server still answers good requests
    assert httpx.post(f"{server}/predict", json={"records": [good]}, timeout=30).status_code == 200


def test_unknown_category_is_handled_as_in_training(stack, default_data, server):
    good = _one(stack, default_data)
    answer = httpx.post(f"{server}/predict", json={"records": [good | {"region": "atlantis"}]}, timeout=30)
    assert answer.status_code == 200, answer.text
    assert sum(answer.json()["predictions"][0]["probabilities"].values()) == pytest.approx(1.0)


def test_health_ready_model_and_metrics(stack, versions, server):
    assert httpx.get(f"{server}/health").json()["following"] == f"{MODEL}@champion"
    assert httpx.get(f"{server}/ready").status_code == 200
    model = httpx.get(f"{server}/model").json()
    run = mlflow_client(stack).get_run(model["run_id"])
    assert model["name"] == MODEL and model["version"] == _champion(stack)
    assert model["task"] == "binary" and model["classes"] == [0, 1]
    assert model["metrics"]["roc_auc"] == pytest.approx(run.data.metrics["holdout_roc_auc"])
    assert model["promoted_at"]  # tagged by the promotion
    assert {c["name"] for c in model["inputs"]} >= {"age", "region"}
    text = httpx.get(f"{server}/metrics").text
    for name in (
        f'mlops_serving_requests_total{{model="{MODEL}",path="/predict",status="200"}}',
        "mlops_serving_request_seconds_bucket",
        "mlops_serving_errors_total",
        f'mlops_serving_model_version{{model="{MODEL}"}} {float(model["version"])}',
        f'mlops_serving_reloads_total{{model="{MODEL}",result="success"}}',
        "mlops_serving_batch_rows_bucket",
    ):
        assert name in text, name


def test_predictions_are_logged_to_s3(stack, default_data, server):
    # Given a few requests with known ids, and a batch whose records carry the dataset's id column
    # (application_id: not a feature, so not scored, but logged so that late labels can join)
    ids = [f"log-test-{i}" for i in range(3)]
    for request_id in ids:
        answer = httpx.post(
            f"{server}/predict", json={"records": [_one(stack, default_data)]}, headers={"x-request-id": request_id}
        )
        assert answer.status_code == 200
    assert httpx.get(f"{server}/model").json()["id_field"] == "application_id"
    batch = _records(_rows(stack, default_data, 3))
    batch = [batch[0] | {"application_id": "A-1"}, batch[1] | {"application_id": 2}, batch[2]]
    answer = httpx.post(f"{server}/predict", json={"records": batch}, headers={"x-request-id": "log-test-batch"})
    assert answer.status_code == 200, answer.text
    client = s3_client(stack)

    def logged() -> pd.DataFrame:
        listing = client.list_objects_v2(Bucket=stack.bucket, Prefix=f"predictions/serving/{MODEL}/")
        frames = [
            pd.read_parquet(io.BytesIO(client.get_object(Bucket=stack.bucket, Key=o["Key"])["Body"].read()))
            for o in listing.get("Contents", [])
        ]
        return pd.concat(frames) if frames else pd.DataFrame(columns=["request_id"])

    # then within the flush interval they are in S3 with inputs, outputs and the model version
    wait_for(lambda: {*ids, "log-test-batch"} <= set(logged()["request_id"]), 30, "the prediction log")
    rows = logged().set_index("request_id").loc[ids]
    assert set(rows["model_version"]) == {_champion(stack)}
    assert {"age", "region", "predicted", "proba_0", "proba_1", "predicted_at"} <= set(rows.columns)
    # each record of the batch with its own id (as text), in order; none where it sent none
    in_batch = logged().set_index("request_id").loc[["log-test-batch"]]
    assert in_batch["record_id"].tolist()[:2] == ["A-1", "2"] and pd.isna(in_batch["record_id"].iloc[2])
    assert "application_id" not in in_batch.columns


def test_new_champion_is_served_under_load_without_failed_requests(stack, default_data, versions, server):
    # Given clients sending requests without pause
    body = {"records": _records(_rows(stack, default_data, 5))}
    old, new = versions["first"], versions["second"]
    assert _champion(stack) == old
    seen: list[tuple[float, int, str | None]] = []
    stop = threading.Event()

    def client() -> None:
        with httpx.Client(timeout=30) as http:
            while not stop.is_set():
                try:
                    answer = http.post(f"{server}/predict", json=body)
                    version = answer.json()["model"]["version"] if answer.status_code == 200 else None
                    seen.append((time.monotonic(), answer.status_code, version))
                except httpx.HTTPError as exc:
                    seen.append((time.monotonic(), 0, type(exc).__name__))

    threads = [threading.Thread(target=client) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(1.5)
        # when another version becomes champion
        promotion = promote_version(MODEL, new, old)
        wait_for(lambda: httpx.get(f"{server}/health").json()["version"] == new, 60, f"v{new} to be served")
        switched = time.monotonic()
        time.sleep(1.5)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    # then no request failed, answers moved from the old version to the new one and stayed there
    assert seen and all(status == 200 for _, status, _ in seen), [s for s in seen if s[1] != 200][:5]
    assert {version for _, _, version in seen} == {old, new}
    assert all(version == new for at, _, version in seen if at > switched + 0.5)
    revert_promotion(promotion, "test: back to the first champion")
    wait_for(lambda: httpx.get(f"{server}/health").json()["version"] == old, 60, f"v{old} to be served again")


def test_broken_champion_keeps_the_old_model_serving_and_the_promotion_is_reverted(
    stack, default_data, versions, server
):
    # Given a third version whose stored model is corrupt
    broken = _train(versions["config"], WEAK_SEARCH, seed=3).candidate_version
    corrupt_version(stack, MODEL, broken)
    old = _champion(stack)
    good = {"records": [_one(stack, default_data)]}
    # when it is promoted, the serving API cannot load it: it says why and keeps serving the old model
    promotion = promote_version(MODEL, broken, old)
    check = wait_for_serving(server, MODEL, broken, timeout=10)
    assert check.checked and not check.ok
    # (a corrupt upload is not the file training recorded: refused before anything is deserialised)
    assert f"did not serve v{broken}" in check.detail and "refused" in check.detail, check.detail
    assert "stored model.skops has SHA-256" in check.detail, check.detail
    answer = httpx.post(f"{server}/predict", json=good, timeout=30)
    assert answer.status_code == 200 and answer.json()["model"]["version"] == old
    assert httpx.get(f"{server}/ready").status_code == 200
    assert f'mlops_serving_reloads_total{{model="{MODEL}",result="failure"}}' in httpx.get(f"{server}/metrics").text
    # and reverting the promotion (what the training flow does) puts the old champion back, tagged why
    revert_promotion(promotion, check.detail)
    assert _champion(stack) == old
    assert "did not serve" in mlflow_client(stack).get_model_version(MODEL, broken).tags["rolled_back"]


def test_prediction_log_outage_never_fails_a_request(stack, default_data, versions, tmp_path_factory):
    # Given a server whose S3 endpoint is down (nothing listens there) and whose spool holds 4 KiB
    port, context = _serve(
        stack,
        tmp_path_factory,
        "no-s3",
        AWS_ENDPOINT_URL_S3=f"http://127.0.0.1:{free_port()}",
        MLOPS_SERVING_SPOOL_MAX_BYTES="4096",  # per process: one process, so the bound is reached predictably
        MLOPS_SERVING_WORKERS="1",
    )
    with context:
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: httpx.get(f"{url}/ready").status_code == 200, 60, "the server to load its model")
        # when more predictions are requested than the spool holds, then all of them are answered
        for _ in range(20):
            answer = httpx.post(f"{url}/predict", json={"records": [_one(stack, default_data)]}, timeout=30)
            assert answer.status_code == 200, answer.text
        # and the failed log writes are counted, with the rows kept for a later try
        wait_for(
            lambda: (
                f'mlops_serving_prediction_log_rows_total{{model="{MODEL}",result="failed"}}'
                in httpx.get(f"{url}/metrics").text
            ),
            60,
            "a failed log write to be counted",
        )
        # and those beyond the bound are counted as dropped and reported as an error
        metrics = httpx.get(f"{url}/metrics").text
        dropped = next(
            float(line.split()[-1])
            for line in metrics.splitlines()
            if line.startswith(f'mlops_serving_prediction_log_rows_total{{model="{MODEL}",result="dropped"}}')
        )
        assert 0 < dropped < 20, dropped
    log = "".join(p.read_text() for p in tmp_path_factory.getbasetemp().glob("no-s3*/serving.log"))
    assert "ERROR" in log and "spool full" in log and "NOT logged" in log


def test_a_full_spool_under_the_refuse_policy_answers_nothing_it_has_not_logged(
    stack, default_data, versions, tmp_path_factory
):
    # Given a server whose S3 endpoint is down, whose spool holds 4 KiB, under `serving_spool_full=refuse`
    state = tmp_path_factory.mktemp("refuse-state")
    port, context = _serve(
        stack,
        tmp_path_factory,
        "refuse",
        AWS_ENDPOINT_URL_S3=f"http://127.0.0.1:{free_port()}",
        MLOPS_SERVING_SPOOL_MAX_BYTES="4096",
        MLOPS_SERVING_SPOOL_FULL="refuse",
        MLOPS_SERVING_WORKERS="1",
        MLOPS_STATE_DIR=str(state),  # its own spool folder, to read back
    )
    answered, refused = [], []
    with context:
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: httpx.get(f"{url}/ready").status_code == 200, 60, "the server to load its model")
        # when more predictions are requested than the spool holds
        body = {"records": [_one(stack, default_data)]}
        for i in range(30):
            request_id = f"refuse-{i}"
            answer = httpx.post(f"{url}/predict", json=body, headers={"x-request-id": request_id}, timeout=30)
            assert answer.status_code in (200, 503), answer.text
            if answer.status_code == 503:
                assert answer.headers["retry-after"] == "5" and "could not be logged" in answer.json()["detail"]
            (answered if answer.status_code == 200 else refused).append(request_id)
    # then the first ones are answered, the rest refused with 503 and Retry-After
    assert answered and refused, (answered, refused)
    assert answered == [f"refuse-{i}" for i in range(len(answered))]
    # and every answered prediction is in the spool, and no refused one is
    logged = set()
    for segment in (state / "spool" / MODEL).glob("*/*.jsonl"):
        for line in segment.read_text().splitlines():
            logged.update(json.loads(line)["rid"])
    assert set(answered) <= logged and not set(refused) & logged, (answered, refused, sorted(logged))


def test_training_reverts_a_promotion_the_serving_api_does_not_confirm(
    stack, default_data, tmp_path_factory, monkeypatch
):
    # Given a serving API that is configured but down, and a model with no champion yet
    name = "serving-unconfirmed"
    config = _config(tmp_path_factory, name)
    monkeypatch.setenv("MLOPS_SERVING_URL", f"http://127.0.0.1:{free_port()}")
    # when training would promote (cold start)
    state = training(TrainingParams(dataset=config, search=FAST_SEARCH, serving_timeout_seconds=3), return_state=True)
    # then the run fails saying why, and the promotion is undone: no champion, the version is tagged
    assert state.is_failed()
    assert "reverted" in state.message and "did not serve" in state.message, state.message
    client = mlflow_client(stack)
    assert "champion" not in client.get_registered_model(name).aliases
    (version,) = client.search_model_versions(f"name='{name}'")
    assert "unreachable" in version.tags["rolled_back"]
    assert version.tags["promoted"] == "false"


def test_explain_returns_per_feature_contributions(stack, default_data, server):
    record = _one(stack, default_data)
    answer = httpx.post(f"{server}/predict?explain=true", json={"records": [record]}, timeout=30)
    assert answer.status_code == 200, answer.text
    contributions = answer.json()["predictions"][0]["contributions"]
    assert answer.json()["predictions"][0]["explained"] == {"output": "probability", "class": 1}
    assert set(contributions) == set(record)
    assert any(abs(v) > 0 for v in contributions.values())
    # a record equal to the stored baseline has nothing to explain: every contribution is zero
    model = httpx.get(f"{server}/model").json()
    import mlflow.artifacts

    use_tracking_server(stack)  # the fluent API below (load_model) reads the global tracking URI
    baseline = json.loads(mlflow.artifacts.load_text(f"runs:/{model['run_id']}/explain/baseline.json"))[0]
    same = httpx.post(f"{server}/predict?explain=true", json={"records": [baseline]}, timeout=30).json()
    assert all(v == pytest.approx(0, abs=1e-12) for v in same["predictions"][0]["contributions"].values())


def _chunked(body: bytes, size: int = 65536):
    """A request body sent with `transfer-encoding: chunked` (no content-length), `size` bytes at a time."""
    for start in range(0, len(body), size):
        yield body[start : start + size]


def test_a_chunked_body_over_the_limit_is_cut_off_with_413(stack, default_data, tmp_path_factory):
    # Given a server with a 64 KiB body limit
    port, context = _serve(stack, tmp_path_factory, "small-body", MLOPS_SERVING_MAX_BODY_BYTES=str(64 * 1024))
    with context:
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: httpx.get(f"{url}/ready").status_code == 200, 60, "the server to load its model")
        record = _one(stack, default_data)
        big = json.dumps({"records": [record] * 2000}).encode()  # ~1 MB, under the record limit
        assert len(big) > 64 * 1024
        # when it is sent chunked (no content-length) and with a content-length
        chunked = httpx.post(f"{url}/predict", content=_chunked(big), headers={"content-type": "application/json"})
        declared = httpx.post(f"{url}/predict", content=big, headers={"content-type": "application/json"})
        # then both are refused with 413 naming the limit; a small chunked body is answered
        for answer in (chunked, declared):
            assert answer.status_code == 413, answer.text
            assert "over the limit of 65536" in answer.json()["detail"][0]["msg"]
        assert "transfer-encoding" not in declared.request.headers
        assert chunked.request.headers["transfer-encoding"] == "chunked"
        small = json.dumps({"records": [record]}).encode()
        answer = httpx.post(
            f"{url}/predict", content=_chunked(small, 100), headers={"content-type": "application/json"}
        )
        assert answer.status_code == 200, answer.text


def test_the_serving_token_guards_predict_and_reload_and_is_never_logged(stack, default_data, tmp_path_factory):
    token = "serving-token-do-not-log-4821"
    port, context = _serve(stack, tmp_path_factory, "token", MLOPS_SERVING_TOKEN=token)
    with context:
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: httpx.get(f"{url}/ready").status_code == 200, 60, "the server to load its model")
        body = {"records": [_one(stack, default_data)]}
        good = {"authorization": f"Bearer {token}"}
        # without the token, or with a wrong one, /predict, /invocations and /reload are 401, saying what is needed
        for path in ("/predict", "/invocations", "/reload"):
            for headers in ({}, {"authorization": "Bearer wrong"}):
                answer = httpx.post(f"{url}{path}", json=body, headers=headers, timeout=30)
                assert answer.status_code == 401, (path, answer.text)
                assert "Authorization: Bearer" in answer.json()["detail"] and token not in answer.text
                assert answer.headers["www-authenticate"] == "Bearer"
        # with it they are answered; health, ready and metrics stay open
        assert httpx.post(f"{url}/predict", json=body, headers=good, timeout=30).status_code == 200
        assert httpx.post(f"{url}/reload", headers=good, timeout=30).status_code == 200
        assert httpx.get(f"{url}/ready").status_code == 200
        # and the promotion's serving check sends it (it would report the refused /reload otherwise)
        from pydantic import SecretStr

        check = wait_for_serving(url, MODEL, _champion(stack), timeout=10, token=SecretStr(token))
        assert check.checked and check.ok, check.detail
    logs = "".join(p.read_text() for p in tmp_path_factory.getbasetemp().glob("token*/serving.log"))
    assert logs and token not in logs


def test_reload_without_a_token_is_refused_from_a_non_loopback_client(stack, tmp_path_factory):
    import socket

    # Given a server bound to this machine's non-loopback address (no token)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:  # UDP connect: no packet is sent
        probe.connect(("198.51.100.1", 9))  # a documentation address: only picks the outgoing interface
        address = probe.getsockname()[0]
    if address.startswith("127."):
        pytest.fail(f"this machine has no non-loopback address to test from ({address})")
    port = free_port()
    # (--insecure: beyond loopback without a token it would refuse to start)
    command = [_bin("mlops"), "serve", "--host", address, "--port", str(port), "--model", MODEL, "--insecure"]
    log_file = tmp_path_factory.mktemp("remote") / "serving.log"
    with running(command, f"http://{address}:{port}/health", dict(os.environ), log_file):
        # when a client reaches it through that address, /reload is refused, saying why
        answer = httpx.post(f"http://{address}:{port}/reload", timeout=30)
        assert answer.status_code == 403, answer.text
        assert "only from loopback" in answer.json()["detail"] and address in answer.json()["detail"]


def test_when_the_champion_alias_is_gone_the_api_stops_presenting_its_model(stack, default_data, versions, server):
    client = mlflow_client(stack)
    old = _champion(stack)
    body = {"records": [_one(stack, default_data)]}
    assert httpx.post(f"{server}/predict", json=body, timeout=30).status_code == 200
    # Given the champion alias deleted (what reverting a cold start leaves)
    client.delete_registered_model_alias(MODEL, "champion")
    try:
        # then within a poll every worker process drops it: the API is not ready, and /predict and /model say why
        # instead of answering with v{old} (until the last process has polled, /ready says how many still serve)
        def none_serving() -> bool:
            return httpx.get(f"{server}/ready").json()["processes"]["serving"] == 0

        wait_for(none_serving, 30, "every process to drop it")
        ready = httpx.get(f"{server}/ready").json()["detail"]
        assert "not set in the registry" in ready and f"v{old}" in ready
        answer = httpx.post(f"{server}/predict", json=body, timeout=30)
        assert answer.status_code == 503 and "not set in the registry" in answer.json()["detail"], answer.text
        assert httpx.get(f"{server}/model").status_code == 503
        assert httpx.get(f"{server}/health").json()["version"] is None
        assert f'mlops_serving_model_version{{model="{MODEL}"}} 0.0' in httpx.get(f"{server}/metrics").text
    finally:
        # and when the alias is back, it serves again
        client.set_registered_model_alias(MODEL, "champion", old)
    wait_for(lambda: httpx.get(f"{server}/ready").status_code == 200, 60, "the API to serve again")
    assert httpx.post(f"{server}/predict", json=body, timeout=30).json()["model"]["version"] == old


def test_hostile_bodies_leave_health_and_valid_requests_answered(stack, default_data, versions, server):
    from bench.hostile import hostile_body

    record = _one(stack, default_data)
    bad = hostile_body(record, 2_000)  # 2,000 records with 50 wrong fields each
    hostile: list[tuple[int, int, bool]] = []  # status, errors named, Retry-After sent
    stop = threading.Event()

    def attacker() -> None:
        with httpx.Client(timeout=60, headers={"content-type": "application/json"}) as http:
            while not stop.is_set():
                answer = http.post(f"{server}/predict", content=bad)
                errors = len(answer.json()["detail"]) if answer.status_code == 422 else 0
                hostile.append((answer.status_code, errors, "retry-after" in answer.headers))

    # Given 8 clients posting, without pause, bodies whose every record is wrong
    threads = [threading.Thread(target=attacker) for _ in range(8)]
    for thread in threads:
        thread.start()
    health, valid = [], []
    try:
        wait_for(lambda: len(hostile) >= 8, 120, "the hostile bodies to be answered")
        # when a ninth client asks /health and sends valid requests meanwhile
        with httpx.Client(timeout=30) as http:
            for _ in range(40):
                started = time.perf_counter()
                assert http.get(f"{server}/health").status_code == 200
                health.append(time.perf_counter() - started)
                valid.append(http.post(f"{server}/predict", json={"records": [record]}).status_code)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    # then each hostile body got a 422 naming at most 50 errors (or a 503 with Retry-After when the checks
    # were full), every valid request a 200, and /health answered at once (its checks never wait on a body's)
    assert all((status == 422 and 0 < errors <= 50) or (status == 503 and later) for status, errors, later in hostile)
    assert max(errors for _, errors, _ in hostile) == 50
    assert valid == [200] * 40
    assert sorted(health)[len(health) // 2] < 0.1, sorted(health)  # the median, on a machine other tests share
    # and a batch over the explain limit is refused before any explaining
    many = {"records": [record] * 101}
    answer = httpx.post(f"{server}/predict?explain=true", json=many, timeout=30)
    assert answer.status_code == 413 and "explaining 101 records is over the limit of 100" in answer.text


# --- fuzzing the request bodies on the real server ----------------------------------------------------

FUZZ_EXAMPLES = 400  # bodies per run (docs/tests.md gives the counts of the last run)


def _fuzz_bodies(inputs: list[dict], id_field: str | None):
    """Hypothesis strategy of request bodies around the model's inputs: good records, and records with wrong
    types, missing and extra fields, odd ids and odd numbers; odd shapes; bytes that are not JSON."""
    from hypothesis import strategies as st

    finite = st.one_of(
        st.integers(-(2**53), 2**53), st.floats(allow_nan=False, allow_infinity=False), st.just(-0.0), st.just(1e308)
    )
    odd_numbers = st.one_of(st.integers(-(2**70), 2**70), st.floats())  # NaN and infinities: not JSON
    texts = st.text(max_size=8)
    junk = st.one_of(st.none(), st.booleans(), odd_numbers, texts, st.lists(st.integers(), max_size=2), st.just({}))
    good_values = {c["name"]: st.one_of(finite if c["type"] == "numeric" else texts, st.none()) for c in inputs}
    good = st.fixed_dictionaries(good_values)
    if id_field:
        good = st.tuples(good, st.one_of(texts, st.integers(-(2**62), 2**62), st.none())).map(
            lambda pair: pair[0] | {id_field: pair[1]}
        )

    @st.composite
    def spoiled(draw):
        """A good record with a few fields wrong, left out or added."""
        record = dict(draw(good))
        for name in draw(st.lists(st.sampled_from([*good_values, *([id_field] if id_field else [])]), max_size=3)):
            if draw(st.booleans()):
                record.pop(name, None)
            else:
                record[name] = draw(st.one_of(junk, st.integers(-(2**65), 2**65)))
        return record | draw(st.dictionaries(st.text(max_size=4), junk, max_size=2))

    goods = st.lists(good, min_size=1, max_size=4)
    records = st.lists(st.one_of(good, spoiled(), junk), max_size=4)

    def dumped(payload) -> bytes:
        return json.dumps(payload).encode()  # NaN and infinities are written as JS literals: not JSON

    shaped = st.one_of(
        st.fixed_dictionaries({"records": goods}),
        st.fixed_dictionaries({"dataframe_records": goods}),
        st.fixed_dictionaries({"records": records}),
        st.fixed_dictionaries({"records": st.one_of(junk, records)}, optional={"dataframe_records": records}),
        st.one_of(records, junk, st.dictionaries(texts, junk, max_size=2)),
    ).map(dumped)
    broken = st.tuples(shaped, st.integers(0, 40), st.sampled_from([b"", b"\xff", b"}", b"\xc3", b"[" * 3])).map(
        lambda cut: cut[0][: cut[1]] + cut[2] + cut[0][cut[1] :]
    )
    return st.one_of(shaped, shaped, shaped, broken)


def test_fuzzed_bodies_never_fail_and_the_server_answers_as_the_step_by_step_checks(stack, versions, server):
    from collections import Counter

    from hypothesis import HealthCheck, given, settings

    from serving.forms import BadRequest, parse_records, record_ids, validate_records
    from serving.model import load_version

    # the served model, loaded here too: the step-by-step checks (what names errors) and its scores
    described = httpx.get(f"{server}/model", timeout=30).json()
    model = load_version(mlflow_client(stack), MODEL, described["version"], stack)
    statuses: Counter = Counter()

    # derandomized: the same bodies every run (a fuzz run that fails is reproducible, never flaky)
    @settings(
        max_examples=FUZZ_EXAMPLES,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        database=None,
        derandomize=True,
    )
    @given(_fuzz_bodies(described["inputs"], described["id_field"]))
    def check(body: bytes) -> None:
        answer = httpx.post(f"{server}/predict", content=body, headers={"content-type": "application/json"})
        statuses[answer.status_code] += 1
        # no body makes the server fail
        assert answer.status_code in {200, 413, 422}, (body[:300], answer.text[:300])
        try:
            key, raw = parse_records(body, 10_000)
            records = validate_records(model, key, raw)
            ids = record_ids(model, key, raw)
        except BadRequest as refused:
            # a body the checks refuse is refused by the server, with the same status
            assert answer.status_code == refused.status, (body[:300], answer.text[:300], refused.errors[:2])
            return
        # a body the checks accept is answered, with the model's own scores of the checked records
        assert answer.status_code == 200, (body[:300], answer.text[:300])
        expected = model.scores(model.columns_of(records))
        got = [[p["probabilities"][str(c)] for c in model.classes] for p in answer.json()["predictions"]]
        np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-12)
        assert len(ids or records) == len(records)

    check()
    print(f"\n[fuzz] {sum(statuses.values())} bodies: " + ", ".join(f"{k}: {v}" for k, v in sorted(statuses.items())))
    assert statuses[200] > 100 and statuses[422] > 100  # the strategy reaches both answers often
