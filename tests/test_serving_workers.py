"""The serving API at its limits.

Against the real stack, with several worker processes: each process follows the champion, a swap under load
drops no request and reaches every process, metrics and the prediction log cover them all, and a worker
killed with SIGKILL is replaced. As pure units: the one-pass body decoder accepts and rejects exactly what
the step-by-step checks do, and the micro-batcher scores a fast model inline and a slow one in its thread.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import threading
import time

import httpx
import numpy as np
import pandas as pd
import pytest

from adapters.clients import s3_client
from adapters.promotion import promote_version, revert_promotion
from adapters.settings import Settings, get_settings
from core.modeling.signature import Column
from mlops.stack import running
from serving.app import _serving_env
from serving.batching import MicroBatcher
from serving.forms import BadRequest, decode_records, parse_records, record_ids, validate_records
from serving.model import LoadedModel
from serving.runtime import Runtime
from tests.ports import free_port
from tests.test_serving import FAST_SEARCH, WEAK_SEARCH, _bin, _config, _records, _rows, _train
from tests.waiting import wait_for

MODEL = "workers-test"
WORKERS = 2


COLUMNS = [Column("age", "numeric"), Column("loan amount", "numeric"), Column("region", "text")]
GOOD = {"age": 41, "loan amount": 1200.5, "region": "north"}


def _raw(text: str) -> bytes:
    """A body written by hand: `%s` is a good record's opening (its closing brace left to the text)."""
    good = json.dumps(GOOD)[:-1]
    return (text % good if "%s" in text else text).encode("latin-1")


def _schema_model(id_field: str | None = "application_id") -> LoadedModel:
    return LoadedModel("m", "1", None, COLUMNS, [0, 1], id_field=id_field)


@pytest.mark.parametrize(
    "payload",
    [
        {"records": [GOOD]},
        {"dataframe_records": [GOOD, GOOD | {"age": None, "region": None}]},
        {"records": [GOOD | {"unknown": [1, 2], "application_id": "A-1"}, GOOD | {"application_id": 7}]},
        {"records": [GOOD | {"age": 10**30}]},
        {"records": [GOOD, {"age": 3, "region": "x"}]},  # a column missing
        {"records": [GOOD | {"loan amount": "a lot"}]},
        {"records": [GOOD | {"age": True}]},
        {"records": [GOOD | {"region": 3}]},
        {"records": [GOOD | {"application_id": True}]},
        {"records": [GOOD | {"application_id": 1.5}]},
        {"records": [GOOD | {"application_id": {"id": 2}}]},
        {"records": []},
        {"records": None},
        {"records": {"age": 1}},
        {"rows": [GOOD]},
        [GOOD],
        {"records": [GOOD] * 6},  # over the limit of 5
        {"records": [GOOD, "not a record"]},
        # raw bodies: what json.dumps cannot write
        _raw('{"records": [{"age": 1, "loan amount": 2, "region": "\xff"}]}'),  # invalid UTF-8 in a text value
        _raw('{"records": [%s, "unknown": "\xff"}]}'),  # ... in a key nobody reads
        _raw('{"records": [%s, "\xff": 1}]}'),  # ... as a key
        _raw('{"records": [%s, "unknown": ["\xc3"]}]}'),  # a truncated sequence
        _raw('{"records": [{"age": 1, "loan amount": 2, "region": "n\xc3\xb6rth"}]}'),  # good UTF-8: accepted
        _raw('{"records": null, "dataframe_records": [%s}]}'),  # the first key's null is what counts
        _raw('{"dataframe_records": [%s}], "records": null}'),
        _raw('{"records": [%s}], "dataframe_records": null}'),
        _raw('{"records": [%s, "application_id": 18446744073709551616}]}'),  # 2**64: orjson reads a float
        _raw('{"records": [%s, "application_id": -9223372036854775809}]}'),  # -2**63 - 1: a float too
        _raw('{"records": [%s, "application_id": 18446744073709551615}]}'),  # 2**64 - 1: still an integer
        _raw('{"records": [%s, "application_id": -9223372036854775808}]}'),
        _raw('{"records": [%s, "unknown": ' + "[" * 1100 + "]" * 1100 + "}]}"),  # deeper than msgspec recurses
        _raw('{"records": [%s, "unknown": ' + "[" * 500 + "]" * 500 + "}]}"),
    ],
)
def test_one_pass_decoder_agrees_with_the_step_by_step_checks(payload):
    # Given a body, checked by the one-pass decoder and by the step-by-step checks that name errors
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    model, limit = _schema_model(), 5
    fast = model.adapter.decode(body, limit)
    try:
        key, raw = parse_records(body, limit)
        slow: tuple | BadRequest = (validate_records(model, key, raw), record_ids(model, key, raw))
    except BadRequest as exc:
        slow = exc
    # then both accept it or both reject it, and accepted records give the same frame and ids
    assert (fast is None) == isinstance(slow, BadRequest), (fast, slow)
    if fast is not None:
        pd.testing.assert_frame_equal(model.frame(fast[1]), model.frame(slow[0]))
        assert fast[2] == slow[1]


def test_number_beyond_float_range_is_rejected_by_both_checks():
    model = _schema_model()
    body = b'{"records": [{"age": 1e400, "loan amount": 1, "region": "n"}]}'
    assert model.adapter.decode(body, 5) is None
    with pytest.raises(BadRequest, match="number is infinity"):  # the record is parsed as it is checked
        validate_records(model, *parse_records(body, 5))


@pytest.mark.parametrize(
    "body",
    [
        b'{"records": [{"age": 1, "loan amount": 2, "region": "\xff"}]}',  # msgspec: UnicodeDecodeError
        _raw('{"records": [%s, "unknown": ' + "[" * 1100 + "]" * 1100 + "}]}"),  # msgspec: RecursionError
    ],
    ids=["invalid-utf8", "deep"],
)
def test_bodies_msgspec_raises_other_errors_for_are_422s_not_500s(body):
    # neither is one of msgspec's own errors: the step-by-step checks answer
    with pytest.raises(BadRequest, match="not valid JSON") as raised:
        decode_records(_schema_model(), body, 5)
    assert raised.value.status == 422


def test_worker_processes_read_back_the_serving_settings_they_were_given(monkeypatch):
    # Given settings changed from the command line (what `mlops serve --model ... --workers ...` does)
    given = Settings().model_copy(
        update={"serving_model": "other", "serving_alias": "staging", "serving_poll_seconds": 0.7, "serving_workers": 3}
    )
    # when a worker process builds its settings from the environment it inherits
    for key, value in _serving_env(given).items():
        monkeypatch.setenv(key, value)
    read = get_settings()
    # then it has every serving setting the parent had
    serving = {k: v for k, v in given.model_dump().items() if k.startswith("serving_") and k != "serving_url"}
    assert {k: getattr(read, k) for k in serving} == serving


class _Timed:
    """A classifier that notes the thread of each call and takes `seconds`."""

    classes_ = np.array([0, 1])

    def __init__(self, seconds: float) -> None:
        self.seconds, self.threads = seconds, []

    def predict_proba(self, frame: pd.DataFrame) -> np.ndarray:
        self.threads.append(threading.current_thread().name)
        time.sleep(self.seconds)
        return np.tile([0.25, 0.75], (len(frame), 1))


def _batched(seconds: float, calls: int, concurrent: int, inline: bool = True) -> tuple[_Timed, list[int]]:
    pipeline = _Timed(seconds)
    model = LoadedModel("m", "1", pipeline, COLUMNS, [0, 1])
    sizes: list[int] = []

    async def run() -> None:
        batcher = MicroBatcher(on_batch=sizes.append, inline=inline)
        batcher.start()
        try:
            for _ in range(calls):
                scored = await asyncio.gather(*(batcher.score(model, [GOOD], "r") for _ in range(concurrent)))
                assert all(s.scores.tolist() == [[0.25, 0.75]] for s in scored)
        finally:
            await batcher.stop()

    asyncio.run(run())
    return pipeline, sizes


def test_fast_model_is_scored_inline_once_measured_and_slow_one_in_the_thread():
    # a model that answers at once: its first call is measured in the thread, once measured it runs inline
    fast, _ = _batched(0.0, calls=6, concurrent=1)
    assert fast.threads[0].startswith("predict") and fast.threads[-3:] == [threading.current_thread().name] * 3
    # a model that takes 5 ms always goes to the thread
    slow, _ = _batched(0.005, calls=5, concurrent=1)
    assert all(name.startswith("predict") for name in slow.threads)


def test_a_fast_model_stays_in_the_thread_when_the_batcher_may_not_score_inline():
    fast, _ = _batched(0.0, calls=6, concurrent=1, inline=False)
    assert len(fast.threads) == 6 and all(name.startswith("predict") for name in fast.threads)


@pytest.mark.parametrize(
    ("spool", "sync", "syncs"), [(True, "always", True), (True, "batch", False), (False, "", False)]
)
def test_spool_syncing_each_write_is_never_done_on_the_event_loop(tmp_path, monkeypatch, spool, sync, syncs):
    # Given the serving runtime with the spool in each sync mode (and the in-memory log)
    update = {"state_dir": tmp_path, "serving_spool": spool} | ({"serving_spool_sync": sync} if sync else {})
    runtime = Runtime(Settings().model_copy(update=update))
    # then only the `always` mode keeps every model, however fast, off the event loop
    assert runtime.prediction_log.syncs_each_write is syncs and runtime.batcher.inline is not syncs
    if not syncs:
        return
    synced_in: list[str] = []
    fdatasync = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: (synced_in.append(threading.current_thread().name), fdatasync(fd)))
    pipeline = _Timed(0.0)
    model = LoadedModel("m", "1", pipeline, COLUMNS, [0, 1])
    runtime.prediction_log.spool.open()

    async def run() -> None:
        runtime.batcher.start()
        try:
            for _ in range(6):  # one at a time: a fast model, once measured, would be scored inline
                await runtime.batcher.score(model, [GOOD], "r")
        finally:
            await runtime.batcher.stop()

    try:
        asyncio.run(run())
    finally:
        runtime.prediction_log.spool.close()
    # when requests come one at a time, each is scored and synced in the prediction thread
    assert len(pipeline.threads) == 6 and all(name.startswith("predict") for name in pipeline.threads)
    assert len(synced_in) >= 6 and all(name.startswith("predict") for name in synced_in), synced_in


def test_a_new_model_never_inherits_a_freed_model_cost(monkeypatch):
    """Costs are keyed by the model's serial: even a model given the id of a freed one (every id made the
    same here, as CPython may reuse one after a swap) is measured afresh, in the thread."""
    import serving.batching

    monkeypatch.setattr(serving.batching, "id", lambda obj: 1, raising=False)
    pipeline = _Timed(0.0)
    models = [LoadedModel("m", str(v), pipeline, COLUMNS, [0, 1]) for v in (1, 2)]
    assert models[0].serial != models[1].serial
    batcher = MicroBatcher()

    main = threading.current_thread().name

    async def run() -> None:
        batcher.start()
        try:
            for _ in range(20):  # the first model, until measured fast (a busy machine may slow a call)
                await batcher.score(models[0], [GOOD], "r")
                if pipeline.threads[-1] == main:
                    break
            await batcher.score(models[1], [GOOD], "r")
        finally:
            await batcher.stop()

    asyncio.run(run())
    assert pipeline.threads[0].startswith("predict") and pipeline.threads[-2] == main  # the first: inline
    assert pipeline.threads[-1].startswith("predict")  # the second: not rated by the first one's calls


def test_a_full_queue_answers_overloaded_and_queues_nothing_more():
    from serving.batching import Overloaded

    pipeline = _Timed(0.2)
    model = LoadedModel("m", "1", pipeline, COLUMNS, [0, 1])
    outcomes: list = []

    async def run() -> None:
        batcher = MicroBatcher(inline=False, max_queued=2)
        batcher.start()
        try:
            first = asyncio.ensure_future(batcher.score(model, [GOOD], "first"))  # being scored (200 ms)
            await asyncio.sleep(0.05)
            waiting = [asyncio.ensure_future(batcher.score(model, [GOOD], f"w{i}")) for i in range(2)]
            await asyncio.sleep(0)
            try:
                await batcher.score(model, [GOOD], "one too many")
            except Overloaded as exc:
                outcomes.append(exc)
            outcomes.extend(await asyncio.gather(first, *waiting))
        finally:
            await batcher.stop()

    asyncio.run(run())
    overloaded, *scored = outcomes
    assert "2 requests wait for the model already" in str(overloaded) and len(scored) == 3
    assert len(pipeline.threads) == 2  # two calls: the first alone, then the two that waited, batched


def test_checks_off_the_loop_are_bounded_and_a_slow_body_times_out():
    from types import SimpleNamespace

    from adapters.settings import Settings
    from serving.batching import Overloaded

    settings = Settings(serving_max_pending_checks=1, serving_body_timeout_seconds=0.2)
    # a large body's checks wait for the checking thread; one more than the limit is refused at once
    runtime = SimpleNamespace(settings=settings, _checks_pending=1)
    runtime._pending_check = lambda: Runtime._pending_check(runtime)
    with pytest.raises(Overloaded, match="1 large or invalid bodies wait"):
        asyncio.run(Runtime._checked(runtime, 10**6, len, b"x"))
    # a small one is checked on the loop whatever waits
    assert asyncio.run(Runtime._checked(runtime, 10, len, b"xyz")) == 3

    # a body that does not arrive in time is a 408
    async def never() -> dict:
        await asyncio.sleep(60)
        return {}

    with pytest.raises(BadRequest, match=r"body: not received within 0.2 s") as raised:
        asyncio.run(Runtime._receive(SimpleNamespace(settings=settings), never, 10))
    assert raised.value.status == 408


def test_concurrent_requests_to_a_slow_model_are_still_batched():
    slow, sizes = _batched(0.005, calls=3, concurrent=8)
    assert sum(sizes) == 24 and max(sizes) > 1 and len(slow.threads) < 24


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


@pytest.mark.integration
@pytest.mark.slow
def test_every_process_serves_and_says_which_it_is(stack, versions, server):
    # Given the server started with two workers: two processes answer, each with its pid and the champion
    seen = _health_pids(server)
    assert len(seen) == WORKERS, seen
    assert all(versions_said == {versions["first"]} for versions_said in seen.values()), seen
    assert os.getpid() not in seen
    # and /model lists the same processes, each serving the champion
    assert _served(server) == dict.fromkeys(seen, versions["first"])


@pytest.mark.integration
@pytest.mark.slow
def test_metrics_are_summed_across_processes(stack, default_data, server):
    # Given the request count before, and a known number of requests spread over both processes
    counted = f'mlops_serving_requests_total{{model="{MODEL}",path="/predict",status="200"}}'
    timed = f'mlops_serving_request_seconds_count{{model="{MODEL}",path="/predict"}}'  # a histogram's count, summed
    records = f'mlops_serving_predicted_records_total{{model="{MODEL}"}}'
    rows = f'mlops_serving_batch_rows_sum{{model="{MODEL}"}}'
    before = {name: _counter(server, name) for name in (counted, timed, records, rows)}
    body = {"records": _records(_rows(stack, default_data, 2))}
    sent, pids = 40, set()
    for _ in range(sent):
        with httpx.Client(timeout=30) as http:  # a new connection each time: the kernel spreads them
            assert http.post(f"{server}/predict", json=body).status_code == 200
            pids.add(http.get(f"{server}/health").json()["pid"])
    assert len(pids) == WORKERS, pids
    # then /metrics, whichever process answers, counts every one of them (and every record)
    for _ in range(4):
        grown = {name: _counter(server, name) - value for name, value in before.items()}
        assert grown == {counted: sent, timed: sent, records: 2 * sent, rows: 2 * sent}, grown


@pytest.mark.integration
@pytest.mark.slow
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


@pytest.mark.integration
@pytest.mark.slow
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


@pytest.mark.integration
@pytest.mark.slow
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


def _hostile_body(records: int) -> bytes:
    """`records` records with 50 wrong fields each (`bench.hostile.hostile_body` of a good record)."""
    from bench.hostile import hostile_body

    return hostile_body(GOOD, records)


def test_the_checking_process_gives_the_verdict_of_the_checks_here():
    from serving.checks import CheckingProcess, schema_of, verdict

    model = _schema_model()
    bodies = [_hostile_body(2_000), json.dumps({"records": [GOOD] * 3}).encode(), b"{", b'{"records": 7}']
    checking = CheckingProcess()
    checking.start()
    try:
        for body in bodies:
            try:
                decode_records(model, body, 5)
                here = None
            except BadRequest as exc:
                here = (exc.status, exc.errors)
            assert verdict(schema_of(model), body, 5) == here  # the function the process runs

            async def there(body: bytes = body) -> object:
                try:
                    await checking.check(model, body, 5)
                except BadRequest as exc:
                    return exc.status, exc.errors
                return None

            assert asyncio.run(there()) == here  # and through the process
    finally:
        checking.stop()


def test_a_body_of_many_bad_records_is_checked_only_until_fifty_errors():
    model = _schema_model()
    body = _hostile_body(10_000)  # 10,000 records with 50 wrong fields each
    assert len(body) > 5_000_000
    # the step-by-step checks name the first 50 errors, in record order, and stop there
    with pytest.raises(BadRequest) as raised:
        decode_records(model, body, 10_000)
    errors = raised.value.errors
    assert raised.value.status == 422 and len(errors) == 50
    assert [e["loc"][1] for e in errors] == sorted(e["loc"][1] for e in errors) and errors[-1]["loc"][1] == 16
    assert errors[0]["msg"].startswith("records[0].age: Input should be a valid number")
    # and no more work than the first records: the same errors as a body of those records alone
    with pytest.raises(BadRequest) as alone:
        decode_records(model, _hostile_body(17), 10_000)
    assert alone.value.errors == errors
    # a record that is not valid JSON is named once the checks reach it, and only then
    late = b'{"records": [%s, {"age": 1e400, "loan amount": 1, "region": "n"}]}' % json.dumps(GOOD).encode()
    with pytest.raises(BadRequest, match=r"records\[1\]: not valid JSON: number is infinity"):
        decode_records(model, late, 5)


def test_the_records_of_a_body_are_parsed_only_as_far_as_the_checks_go():
    model = _schema_model(id_field=None)
    # Given 400 bad records, then one that is not valid JSON, checked 170 at a time (512 fields of 3 columns)
    key, raw = parse_records(_hostile_body(400)[:-2] + b', {"age": 1e400}]}', 1000)
    assert len(raw) == 401 and key == "records"
    with pytest.raises(BadRequest) as raised:
        validate_records(model, key, raw)
    # then the answer names the first 50 errors (records 0 to 16), and the last record was never parsed
    assert {e["loc"][1] for e in raised.value.errors} == set(range(17))
