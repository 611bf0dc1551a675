"""One serving API for every served catalog model, against the real stack.

Models of three tasks (a Ridge regressor, a three-class and a two-class logistic regression, the last with calendar
features of its time column and of a date, and a target-encoded category) are fitted with the project's pipeline
and registered as training does (`tests.test_task_types._register`), a fourth registered model has its stored
artifact corrupted. The regressor is the API's default model; the others are put in the model catalog
(`adapters.catalog`). Then `mlops serve` with two worker processes: every model answers at its own paths with its
own pipeline's predictions (computed here, from the registry), `/models` lists them, the broken one answers 503
alone, a model added to or removed from the catalog gains or loses its routes within the poll interval, metrics
carry the model, and each model's predictions land in its own log.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import uuid
from contextlib import suppress
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from sklearn.linear_model import LogisticRegression, Ridge

from adapters.catalog import delete_entry, get_entry, put_entry
from adapters.monitoring_store import read_prediction_log
from adapters.serving_api import wait_for_serving
from core.data.dataset import DatasetConfig
from core.data.features import prepare_inputs
from mlops.stack import running
from tests.ports import free_port
from tests.serving_helpers import corrupt_version
from tests.task_types import diabetes_config, diabetes_frame, fit, multiclass_config, multiclass_frame
from tests.test_task_types import _records, _register
from tests.waiting import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DEFAULT = "sm-diabetes"  # the API's default model (a regressor), not in the catalog
LEVELS = "sm-levels"  # multiclass, in the catalog
FLAG = "sm-flag"  # binary, in the catalog
BROKEN = "sm-broken"  # in the catalog, its stored model corrupted
LATE = "sm-late"  # registered, put in the catalog by a test
WORKERS = 2
CATALOG_POLL = 1.0


def _binary_config(name: str) -> DatasetConfig:
    """Binary, with what a time-aware table brings.

    The time column's and a date's calendar parts, and a merchant of 400 values (target-encoded).
    """
    raw = multiclass_config(name).model_dump(mode="json") | {"target": "flag", "task": "binary", "classes": [0, 1]}
    extra = [
        {"name": "first_seen", "type": "datetime"},
        {"name": "merchant", "type": "categorical", "encoding": "target"},
    ]
    raw |= {"time_column": "seen_at", "time_features": True, "features": raw["features"] + extra}
    return DatasetConfig.model_validate(raw)


def _binary_frame(rows: int) -> pd.DataFrame:
    frame = multiclass_frame(rows, seed=1)
    frame["flag"] = (frame["level"] == "high").astype("int64")
    rng = np.random.default_rng(1)
    frame["seen_at"] = pd.Timestamp("2025-01-01") + pd.to_timedelta(rng.integers(0, 90 * 24 * 60, rows), unit="min")
    frame["first_seen"] = (frame["seen_at"] - pd.to_timedelta(rng.integers(0, 400, rows), unit="D")).dt.strftime(
        "%Y-%m-%d"
    )
    frame["merchant"] = [f"m{i}" for i in rng.integers(0, 400, rows)]
    return frame.drop(columns=["level"])


def _model(stack, config: DatasetConfig, frame: pd.DataFrame, estimator, split: int) -> dict:
    train, holdout = frame.iloc[:split], frame.iloc[split:].reset_index(drop=True)
    model = fit(config, train, estimator)
    version = _register(stack, config, model, train, holdout)
    return {"config": config, "frame": holdout, "version": version}


def _catalog(stack, config: DatasetConfig) -> None:
    put_entry(stack, config, yaml.safe_dump(config.model_dump(mode="json")), replace=True)


@pytest.fixture(scope="module")
def models(stack) -> dict[str, dict]:
    """The registered champions (config, holdout rows, version); every one but the default in the catalog."""
    diabetes = diabetes_frame()
    made = {
        DEFAULT: _model(stack, diabetes_config(DEFAULT), diabetes, Ridge(alpha=0.1), 300),
        LEVELS: _model(
            stack, multiclass_config(LEVELS), multiclass_frame(1500), LogisticRegression(max_iter=500), 1200
        ),
        FLAG: _model(stack, _binary_config(FLAG), _binary_frame(1500), LogisticRegression(max_iter=500), 1200),
        BROKEN: _model(stack, diabetes_config(BROKEN), diabetes, Ridge(alpha=1.0), 300),
        LATE: _model(stack, diabetes_config(LATE), diabetes, Ridge(alpha=3.0), 300),
    }
    corrupt_version(stack, BROKEN, made[BROKEN]["version"])
    for name in (LEVELS, FLAG, BROKEN):
        _catalog(stack, made[name]["config"])
    yield made
    for name in made:
        if get_entry(stack, name) is not None:
            delete_entry(stack, name)


def _serve(tmp_path_factory, name: str, workers: int, **env: str):
    port = free_port()
    command = [str(Path(sys.executable).parent / "mlops"), "serve", "--port", str(port), "--model", DEFAULT]
    command += ["--workers", str(workers), "--poll-seconds", "0.5"]
    environment = os.environ | {
        "MLOPS_SERVING_LOG_FLUSH_SECONDS": "1",
        "MLOPS_SERVING_CATALOG_POLL_SECONDS": str(CATALOG_POLL),
    }
    log_file = tmp_path_factory.mktemp(name) / "serving.log"
    url = f"http://127.0.0.1:{port}"
    return url, running(command, f"{url}/health", environment | env, log_file)


def _listed(url: str) -> dict[str, dict]:
    """`GET /models` by model name."""
    return {m["name"]: m for m in httpx.get(f"{url}/models", timeout=10).json()["models"]}


def _everywhere(url: str, name: str, version: str, workers: int) -> bool:
    """Every one of `workers` processes serves `version` of `name`, as `/models` says."""
    model = _listed(url).get(name)
    return model is not None and [w["version"] for w in model["workers"]] == [version] * workers


# A fresh server loads its default model, then the catalog's (one of them broken) one after another: on a
# loaded 2-core machine that took over 90 s once. The bound is generous; a timeout shows what /models says.
LOAD_TIMEOUT = 240


def _wait_served(url: str, name: str, version: str, workers: int) -> None:
    try:
        wait_for(lambda: _everywhere(url, name, version, workers), LOAD_TIMEOUT, f"{name} v{version} everywhere")
    except AssertionError as error:
        raise AssertionError(f"{error}; /models says {name}: {_listed(url).get(name)}") from None


@pytest.fixture(scope="module")
def server(stack, models, tmp_path_factory):
    url, context = _serve(tmp_path_factory, "serving-models", WORKERS)
    with context:
        for name in (DEFAULT, LEVELS, FLAG):
            version = models[name]["version"]
            _wait_served(url, name, version, WORKERS)
        yield url


def _expected(name: str, made: dict, frame: pd.DataFrame) -> tuple[np.ndarray, list]:
    """The registered version's own predictions (values, or probabilities in class order) and its classes."""
    import mlflow.sklearn

    pipeline = mlflow.sklearn.load_model(f"models:/{name}/{made['version']}")
    inputs = prepare_inputs(frame, made["config"])
    if made["config"].task == "regression":
        return pipeline.predict(inputs), []
    return pipeline.predict_proba(inputs), list(pipeline.classes_)


def _got(body: dict, classes: list) -> np.ndarray:
    if not classes:
        return np.array([p["prediction"] for p in body["predictions"]])
    return np.array([[p["probabilities"][str(c)] for c in classes] for p in body["predictions"]])


def _assert_answers_as_its_pipeline(url: str, name: str, made: dict, paths: list[str]) -> None:
    frame = made["frame"].head(25).copy()
    frame.iloc[2, frame.columns.get_loc(made["config"].feature_names[0])] = None  # a missing value, imputed
    expected, classes = _expected(name, made, frame)
    records = _records(made["config"], frame)
    for path in paths:
        for key in ("records", "dataframe_records"):
            answer = httpx.post(f"{url}{path}", json={key: records}, timeout=30)
            assert answer.status_code == 200, (path, answer.text)
            body = answer.json()
            assert body["model"] == {"name": name, "version": made["version"]}
            np.testing.assert_allclose(_got(body, classes), expected, rtol=1e-12, atol=1e-12)
            if classes:
                assert [p["class"] for p in body["predictions"]] == [classes[i] for i in expected.argmax(axis=1)]


def test_every_served_model_answers_with_its_own_pipeline(server, models):
    # Given the default regressor and the multiclass and binary catalog models, each at its own paths
    for name in (DEFAULT, LEVELS, FLAG):
        paths = [f"/models/{name}/predict", f"/models/{name}/invocations"]
        # then each answers what its registered pipeline predicts in this process
        _assert_answers_as_its_pipeline(server, name, models[name], paths)
    # and /predict, /invocations still serve the default model
    _assert_answers_as_its_pipeline(server, DEFAULT, models[DEFAULT], ["/predict", "/invocations"])
    assert httpx.get(f"{server}/model").json()["name"] == DEFAULT


def test_models_lists_what_is_served_with_versions_per_process(server, models):
    answer = httpx.get(f"{server}/models", timeout=10).json()
    listed = {m["name"]: m for m in answer["models"]}
    assert answer["default"] == DEFAULT and answer["models"][0]["name"] == DEFAULT
    assert {DEFAULT, LEVELS, FLAG, BROKEN} <= set(listed)
    tasks = {DEFAULT: "regression", LEVELS: "multiclass", FLAG: "binary"}
    for name, task in tasks.items():
        model = listed[name]
        assert (model["version"], model["alias"], model["task"]) == (models[name]["version"], "champion", task)
        assert model["inference"] == "pipeline" and model["last_error"] is None
        assert len(model["workers"]) == WORKERS and {w["version"] for w in model["workers"]} == {model["version"]}
    described = httpx.get(f"{server}/models/{LEVELS}", timeout=10).json()
    assert described["name"] == LEVELS and described["classes"] == ["high", "low", "mid"]
    assert described["version"] == models[LEVELS]["version"] and len(described["workers"]) == WORKERS


def test_a_model_that_cannot_load_answers_503_alone_and_unknown_names_404(server, models):
    record = _records(models[FLAG]["config"], models[FLAG]["frame"].head(1))
    broken = _records(models[BROKEN]["config"], models[BROKEN]["frame"].head(1))
    # Given the catalog model whose stored artifact is corrupt: it answers 503 saying why
    answer = httpx.post(f"{server}/models/{BROKEN}/predict", json={"records": broken}, timeout=30)
    # (a corrupt upload is not the file training recorded: refused before anything is deserialised)
    assert answer.status_code == 503 and "refused" in answer.json()["detail"], answer.text
    listed = _listed(server)[BROKEN]
    assert listed["version"] is None and "stored model.skops has SHA-256" in listed["last_error"]
    assert httpx.get(f"{server}/models/{BROKEN}", timeout=10).status_code == 503
    # while the others keep answering
    assert httpx.post(f"{server}/models/{FLAG}/predict", json={"records": record}, timeout=30).status_code == 200
    assert httpx.post(f"{server}/predict", json={"records": broken}, timeout=30).status_code == 200
    # and a name nobody serves is a 404 naming it and listing the served ones
    for path in ("/models/no-such-model/predict", "/models/no-such-model/invocations"):
        answer = httpx.post(f"{server}{path}", json={"records": record}, timeout=30)
        assert answer.status_code == 404 and "'no-such-model'" in answer.json()["detail"], answer.text
        assert {DEFAULT, LEVELS, FLAG, BROKEN} <= set(answer.json()["served"])
    assert httpx.get(f"{server}/models/no-such-model", timeout=10).status_code == 404


def _sample(url: str, name: str, **labels: str) -> float:
    """The value of one /metrics sample with these labels (every other label ignored, values summed); 0 if none."""
    total = 0.0
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def test_metrics_carry_the_model_label_summed_over_processes(server, models):
    # Given the counts before, and known requests to two models, each spread over both processes
    sent = {LEVELS: 7, FLAG: 5}
    path = "/models/{name}/predict"  # the path label: one series per model, whatever the name

    def counts(name: str) -> tuple[float, float]:
        requests = _sample(server, "mlops_serving_requests_total", model=name, path=path, status="200")
        return requests, _sample(server, "mlops_serving_predicted_records_total", model=name)

    before = {name: counts(name) for name in sent}
    for name, count in sent.items():
        body = {"records": _records(models[name]["config"], models[name]["frame"].head(3))}
        for _ in range(count):
            with httpx.Client(timeout=30) as http:  # a new connection each time: the kernel spreads them
                assert http.post(f"{server}/models/{name}/predict", json=body).status_code == 200
    # then each model's requests and records are counted under its own label, across both processes
    for name, count in sent.items():
        requests, records = counts(name)
        assert (requests - before[name][0], records - before[name][1]) == (count, 3 * count)
        version = float(models[name]["version"])
        assert _sample(server, "mlops_serving_model_version", model=name) == version
    forms = _sample(server, "mlops_serving_inference_form", model=LEVELS, form="pipeline")
    assert forms == WORKERS  # one series per live process
    assert _sample(server, "mlops_serving_reloads_total", model=BROKEN, result="failure") >= WORKERS


def test_each_model_logs_its_predictions_under_its_own_prefix(stack, server, models):
    # Given requests with known ids to two models
    sent = {name: [f"{name}-{uuid.uuid4().hex[:8]}-{i}" for i in range(4)] for name in (LEVELS, FLAG)}
    for name, ids in sent.items():
        body = {"records": _records(models[name]["config"], models[name]["frame"].head(2))}
        for request_id in ids:
            answer = httpx.post(f"{server}/models/{name}/predict", json=body, headers={"x-request-id": request_id})
            assert answer.status_code == 200
    # then each model's spool is its own folder, and its rows land in its own S3 prefix, as monitoring reads it

    def logged(name: str) -> set[str]:
        frames, _ = read_prediction_log(stack, name, 1, datetime.now(UTC))
        return set(pd.concat(frames)["request_id"]) if frames else set()

    for name, ids in sent.items():
        assert (stack.state_dir / "spool" / name).is_dir()
        wait_for(lambda n=name, i=ids: set(i) <= logged(n), 60, f"{name}'s predictions in its log")
        other = next(n for n in sent if n != name)
        assert not set(sent[other]) & logged(name)
        rows = pd.concat(read_prediction_log(stack, name, 1, datetime.now(UTC))[0])
        assert len(rows[rows["request_id"].isin(ids)]) == 2 * len(ids)
        assert set(rows.loc[rows["request_id"].isin(ids), "model_version"]) == {models[name]["version"]}


def test_a_model_added_to_the_catalog_is_served_and_a_removed_one_is_404(stack, server, models):
    late = models[LATE]
    body = {"records": _records(late["config"], late["frame"].head(2))}
    path = f"{server}/models/{LATE}/predict"
    assert httpx.post(path, json=body, timeout=30).status_code == 404
    # Given a model put in the catalog: within the poll interval it is served, in every process
    _catalog(stack, late["config"])
    _wait_served(server, LATE, late["version"], WORKERS)
    _assert_answers_as_its_pipeline(server, LATE, late, [f"/models/{LATE}/predict"])
    ids = [f"late-{uuid.uuid4().hex[:8]}-{i}" for i in range(3)]
    for request_id in ids:
        assert httpx.post(path, json=body, headers={"x-request-id": request_id}, timeout=30).status_code == 200
    # when it is removed from the catalog, its routes answer 404 naming it, in every process
    delete_entry(stack, LATE)

    def gone() -> bool:
        answers = [httpx.post(path, json=body, timeout=30) for _ in range(6)]
        return all(a.status_code == 404 and f"'{LATE}'" in a.json()["detail"] for a in answers)

    wait_for(gone, 10 * CATALOG_POLL + 10, f"{LATE}'s routes to go")
    assert LATE not in _listed(server)
    # and what it logged before is uploaded (its log is flushed when it stops)
    frames = lambda: read_prediction_log(stack, LATE, 1, datetime.now(UTC))[0]  # noqa: E731
    wait_for(lambda: frames() and set(ids) <= set(pd.concat(frames())["request_id"]), 60, f"{LATE}'s log")
    # the default model and the other catalog models are untouched
    assert _everywhere(server, LEVELS, models[LEVELS]["version"], WORKERS)


def test_the_serving_check_covers_catalog_models_and_skips_others(stack, server, models):
    # Given a new version of a catalog model, made champion (what a promotion does)
    made = models[LEVELS]
    frame = multiclass_frame(1500)
    new = _model(stack, made["config"], frame, LogisticRegression(C=0.05, max_iter=500), 1200)
    # then the serving check waits until every process serves it at /models/<name>
    check = wait_for_serving(server, LEVELS, new["version"], timeout=60)
    assert check.checked and check.ok, check.detail
    assert f"/models/{LEVELS}" in check.detail and f"{WORKERS} process(es)" in check.detail
    assert _everywhere(server, LEVELS, new["version"], WORKERS)
    _assert_answers_as_its_pipeline(server, LEVELS, new, [f"/models/{LEVELS}/predict"])
    # the default model is checked at /model as before
    default = wait_for_serving(server, DEFAULT, models[DEFAULT]["version"], timeout=30)
    assert default.checked and default.ok, default.detail
    # and a model the API does not serve is not checked, saying so
    skipped = wait_for_serving(server, "sm-not-served", "1", timeout=30)
    assert not skipped.checked and skipped.ok and "does not serve sm-not-served" in skipped.detail


class _Relay:
    """A TCP relay to the stack's S3 that the test can cut: S3 becomes unreachable for one server only."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
                upstream = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                return
            self.sockets += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=_pipe, args=(source, sink), daemon=True).start()

    def cut(self) -> None:
        """Refuse new connections and close the open ones."""
        self.listener.close()
        for sock in self.sockets:
            with suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
                sock.close()


def _pipe(source: socket.socket, sink: socket.socket) -> None:
    with suppress(OSError):
        while data := source.recv(65536):
            sink.sendall(data)
    with suppress(OSError):
        sink.shutdown(socket.SHUT_WR)


def test_an_unreachable_catalog_keeps_every_served_model(stack, models, tmp_path_factory):
    # Given a server (one process) whose S3 goes through a relay, serving the catalog models
    relay = _Relay(stack.s3_port)
    url, context = _serve(tmp_path_factory, "catalog-outage", 1, AWS_ENDPOINT_URL_S3=f"http://127.0.0.1:{relay.port}")
    with context:
        _wait_served(url, FLAG, models[FLAG]["version"], 1)
        assert httpx.get(f"{url}/models", timeout=10).json()["catalog_error"] is None
        # when S3 becomes unreachable
        relay.cut()
        # then the next catalog read fails (the API says so) and every model is still served
        wait_for(lambda: httpx.get(f"{url}/models", timeout=10).json()["catalog_error"], 60, "a failed catalog read")
        assert {DEFAULT, LEVELS, FLAG, BROKEN} <= set(_listed(url))
        body = {"records": _records(models[FLAG]["config"], models[FLAG]["frame"].head(2))}
        assert httpx.post(f"{url}/models/{FLAG}/predict", json=body, timeout=30).status_code == 200
        # and a /reload (which reads the catalog too) keeps them as well
        assert httpx.post(f"{url}/reload", params={"model": FLAG}, timeout=60).status_code == 200
        assert {DEFAULT, LEVELS, FLAG, BROKEN} <= set(_listed(url))
