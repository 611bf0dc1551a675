"""The serving API with several worker processes against the real stack: each process follows the champion,
a swap under load drops no request and reaches every process, metrics and the prediction log cover them all,
and a worker killed with SIGKILL is replaced."""

from __future__ import annotations

import io
import os
import signal
import threading
import time

import httpx
import pandas as pd
import pytest

from adapters.clients import s3_client
from adapters.promotion import promote_version, revert_promotion
from mlops.stack import running
from tests.ports import free_port
from tests.test_serving import FAST_SEARCH, WEAK_SEARCH, _bin, _config, _records, _rows, _train
from tests.waiting import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MODEL = "workers-test"
WORKERS = 2


@pytest.fixture(scope="module")
def versions(stack, default_data, tmp_path_factory) -> dict[str, str]:
    """v1 (champion, cold start), v2 (registered only)."""
    config = _config(tmp_path_factory, MODEL)
    first = _train(config, FAST_SEARCH)
    second = _train(config, WEAK_SEARCH)
    assert first.promoted and not second.promoted
    return {"first": first.candidate_version, "second": second.candidate_version}


@pytest.fixture(scope="module")
def server(stack, versions, tmp_path_factory):
    port = free_port()
    command = [_bin("mlops"), "serve", "--port", str(port), "--model", MODEL, "--poll-seconds", "0.5"]
    command += ["--workers", str(WORKERS)]
    environment = os.environ | {"MLOPS_SERVING_LOG_FLUSH_SECONDS": "1"}
    log_file = tmp_path_factory.mktemp("workers") / "serving.log"
    with running(command, f"http://127.0.0.1:{port}/health", environment, log_file):
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: len(_served(url)) == WORKERS, 90, f"{WORKERS} processes to load their model")
        yield url


def _served(url: str) -> dict[int, str]:
    """pid -> version of every live worker process, as /model reports it (empty from a process still loading)."""
    answer = httpx.get(f"{url}/model", timeout=10)
    assert answer.status_code in (200, 503), answer.text
    return {w["pid"]: w["version"] for w in answer.json()["workers"]} if answer.status_code == 200 else {}


def _health_pids(url: str, calls: int = 40) -> dict[int, set[str | None]]:
    """Which processes answered `calls` /health requests (each on a new connection), with the versions they said."""
    seen: dict[int, set[str | None]] = {}
    for _ in range(calls):
        health = httpx.get(f"{url}/health", timeout=10).json()
        seen.setdefault(health["pid"], set()).add(health["version"])
    return seen


def _counter(url: str, line_start: str) -> float:
    """The value of one sample of /metrics (0 when absent)."""
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith(line_start + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_every_process_serves_and_says_which_it_is(stack, versions, server):
    # Given the server started with two workers: two processes answer, each with its pid and the champion
    seen = _health_pids(server)
    assert len(seen) == WORKERS, seen
    assert all(versions_said == {versions["first"]} for versions_said in seen.values()), seen
    assert os.getpid() not in seen
    # and /model lists the same processes, each serving the champion
    assert _served(server) == dict.fromkeys(seen, versions["first"])


def test_metrics_are_summed_across_processes(stack, default_data, server):
    # Given the request count before, and a known number of requests spread over both processes
    counted = 'mlops_serving_requests_total{path="/predict",status="200"}'
    before = _counter(server, counted)
    body = {"records": _records(_rows(stack, default_data, 2))}
    sent, pids = 40, set()
    for _ in range(sent):
        with httpx.Client(timeout=30) as http:  # a new connection each time: the kernel spreads them
            assert http.post(f"{server}/predict", json=body).status_code == 200
            pids.add(http.get(f"{server}/health").json()["pid"])
    assert len(pids) == WORKERS, pids
    # then /metrics, whichever process answers, counts every one of them (and every record)
    for _ in range(4):
        assert _counter(server, counted) - before == sent


def test_prediction_log_is_complete_across_processes(stack, default_data, server):
    # Given requests with known ids, answered by both processes
    ids = [f"workers-log-{i}" for i in range(30)]
    body = {"records": _records(_rows(stack, default_data, 1))}
    for request_id in ids:
        with httpx.Client(timeout=30) as http:
            answer = http.post(f"{server}/predict", json=body, headers={"x-request-id": request_id})
            assert answer.status_code == 200, answer.text
    client = s3_client(stack)

    def logged() -> set[str]:
        listing = client.list_objects_v2(Bucket=stack.bucket, Prefix=f"predictions/serving/{MODEL}/")
        frames = [
            pd.read_parquet(io.BytesIO(client.get_object(Bucket=stack.bucket, Key=o["Key"])["Body"].read()))
            for o in listing.get("Contents", [])
        ]
        return set(pd.concat(frames)["request_id"]) if frames else set()

    # then every one of them is in S3, once each process has flushed
    wait_for(lambda: set(ids) <= logged(), 30, "every request in the prediction log")


def test_swap_under_load_drops_nothing_and_reaches_every_process(stack, default_data, versions, server):
    # Given clients sending requests without pause
    body = {"records": _records(_rows(stack, default_data, 5))}
    old, new = versions["first"], versions["second"]
    seen: list[tuple[float, int, str | None]] = []
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            with httpx.Client(timeout=30) as http:  # reconnect now and then, so both processes are hit
                for _ in range(20):
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
        # when another version becomes champion (no /reload: each process finds it by polling)
        promotion = promote_version(MODEL, new, old)
        wait_for(lambda: set(_served(server).values()) == {new}, 60, f"every process to serve v{new}")
        switched = time.monotonic()
        time.sleep(1.5)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    try:
        # then no request failed, answers moved from the old version to the new one and stayed there
        assert seen and all(status == 200 for _, status, _ in seen), [s for s in seen if s[1] != 200][:5]
        assert {version for _, _, version in seen} == {old, new}
        assert all(version == new for at, _, version in seen if at > switched + 0.1)
        # and each process, asked directly, serves the new version
        pids = _health_pids(server)
        assert len(pids) == WORKERS and all(said == {new} for said in pids.values()), pids
    finally:
        revert_promotion(promotion, "test: back to the first champion")
    # and /reload (what a promotion calls) brings every process back at once, not at their next poll
    answer = httpx.post(f"{server}/reload", timeout=60).json()
    assert answer["version"] == old and {w["version"] for w in answer["workers"]} == {old}, answer
    assert len(answer["workers"]) == WORKERS


def test_a_killed_worker_is_replaced_and_forgotten(stack, versions, server):
    # Given the two worker processes
    before = _served(server)
    victim = min(before)
    # when one is killed outright
    os.kill(victim, signal.SIGKILL)
    # then another takes its place and loads the champion; the dead one is no longer listed
    after: dict[int, str] = {}

    def replaced() -> bool:
        after.clear()
        after.update(_served(server))
        return len(after) == WORKERS and victim not in after

    wait_for(replaced, 90, "a replacement worker")
    assert set(after.values()) == {versions["first"]}, after
    wait_for(lambda: set(_health_pids(server, 10)) == set(after), 30, "both live processes to answer /health")
