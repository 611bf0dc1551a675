"""Faults on the serving side, injected for real on the session's stack: nothing answered is lost.

The stack's own serving API (started and restarted by `mlops.stack`) is pointed at a model of this module
for the duration of the module; clients send single-record requests with their own request ids, and each
case compares the ids answered 200 with the rows found in the S3 prediction log (raw objects, and what
monitoring reads after dropping duplicates).
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pandas as pd
import pytest

from adapters.clients import S3Location, s3_client
from adapters.monitoring_store import read_prediction_log
from core.modeling.search import SearchSpec
from flows.training import TrainingParams, training
from mlops import stack as local_stack
from tests.faults import s3_restarting
from tests.waiting import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MODEL = "faults-serving"
FAST_SEARCH = SearchSpec(trials_per_family=1, cv_folds=2)
NON_FEATURES = ["default", "application_id", "application_date"]
CLIENTS = 4
# Each client waits this long between requests: the faults need steady traffic (hundreds of requests a
# second), not a saturated machine, which would slow every other test running meanwhile and grow the spool's
# backlog (64,006 answers in a 30 s S3 outage without a pause) into minutes of uploads.
PAUSE_SECONDS = 0.01


def _serving(settings) -> local_stack.Service:
    return next(s for s in local_stack.services(settings) if s.name == "serving")


def _pid(settings) -> int:
    return int(_serving(settings).pid_file.read_text())


@pytest.fixture(scope="module")
def faults(stack, default_data, tmp_path_factory):
    """The session stack with its serving API following MODEL (a champion trained here); restored after."""
    import yaml

    from core.data.dataset import bundled_config_text

    settings = stack.model_copy(update={"serving_model": MODEL})
    _stop_serving(stack)  # the stack's serving API, following credit-risk
    local_stack.up(settings)  # only serving starts again (the others are healthy), now following MODEL
    raw = yaml.safe_load(bundled_config_text("credit-risk")) | {"name": MODEL, "model_name": MODEL}
    config = tmp_path_factory.mktemp(MODEL) / f"{MODEL}.yaml"
    config.write_text(yaml.safe_dump(raw))
    state = training(TrainingParams(dataset=str(config), search=FAST_SEARCH), return_state=True)
    assert state.is_completed(), state.message
    assert state.result().promoted  # cold start, confirmed by this serving API
    try:
        yield settings
    finally:
        _stop_serving(settings)
        local_stack.up(stack)  # the stack as the session started it (serving following credit-risk)


def _stop_serving(settings) -> None:
    """Stop the stack's serving API (SIGTERM, waited for: it uploads its spool)."""
    pid = local_stack._read_pid(_serving(settings))
    if pid is not None:
        local_stack._stop_pid(pid, timeout=60)


@pytest.fixture(scope="module")
def record(stack, default_data) -> dict:
    location = S3Location.parse(default_data).child("month=2025-03/part-0.parquet")
    body = s3_client(stack).get_object(Bucket=location.bucket, Key=location.key)["Body"].read()
    frame = pd.read_parquet(io.BytesIO(body)).drop(columns=NON_FEATURES).head(1)
    return json.loads(frame.to_json(orient="records"))[0]


class Load:
    """CLIENTS threads posting one record per request (PAUSE_SECONDS apart), each with its own request id, until
    stopped."""

    def __init__(self, url: str, record: dict, prefix: str) -> None:
        self.url, self.record, self.prefix = url, record, prefix
        self.answered: list[str] = []
        self.refused: list[tuple[int, str]] = []  # answered, but not 200
        self.errors: list[str] = []  # no answer (connection refused or reset)
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(n,)) for n in range(CLIENTS)]

    def _client(self, n: int) -> None:
        with httpx.Client(timeout=30) as http:
            i = 0
            while not self._stop.is_set():
                request_id = f"{self.prefix}-{n}-{i}"
                i += 1
                try:
                    answer = http.post(
                        f"{self.url}/predict", json={"records": [self.record]}, headers={"x-request-id": request_id}
                    )
                except httpx.HTTPError as exc:
                    self.errors.append(type(exc).__name__)
                    time.sleep(0.05)
                    continue
                if answer.status_code == 200:
                    self.answered.append(request_id)
                else:
                    self.refused.append((answer.status_code, answer.text[:200]))
                time.sleep(PAUSE_SECONDS)

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()


def _raw_log(settings, prefix: str) -> Counter:
    """How many rows of the S3 prediction log carry each request id starting with `prefix` (every object)."""
    client = s3_client(settings)
    counts: Counter = Counter()
    pages = client.get_paginator("list_objects_v2").paginate(
        Bucket=settings.bucket, Prefix=f"predictions/serving/{MODEL}/"
    )
    for page in pages:
        for item in page.get("Contents", []):
            body = client.get_object(Bucket=settings.bucket, Key=item["Key"])["Body"].read()
            ids = pd.read_parquet(io.BytesIO(body), columns=["request_id"])["request_id"]
            counts.update(i for i in ids if i.startswith(prefix))
    return counts


def _monitoring_log(settings, prefix: str) -> Counter:
    """The same, as monitoring reads it (last 2 days, duplicates dropped)."""
    frames, _ = read_prediction_log(settings, MODEL, 2, datetime.now(UTC))
    ids = pd.concat(frames)["request_id"] if frames else pd.Series([], dtype=object)
    return Counter(i for i in ids if i.startswith(prefix))


def _readable_log(settings, prefix: str) -> Counter:
    """`_raw_log`, or nothing yet while S3 answers a listed object with a server error (a restarted SeaweedFS
    lists objects a moment before their volume serves them)."""
    from botocore.exceptions import ClientError

    try:
        return _raw_log(settings, prefix)
    except ClientError as exc:
        if not s3_restarting(exc):
            raise
        return Counter()


def _all_logged(settings, answered: list[str], prefix: str, timeout: float = 240) -> tuple[Counter, Counter]:
    """Wait until every answered id is in the log; the raw and the deduplicated counts.

    The bound is generous: after a 30 s outage under load the spool's backlog is uploaded while the load goes
    on (without the clients' pause, 90 s once ended with 56,515 of 64,006 answers in S3 on a busy 2-core
    machine).
    """
    deadline = time.monotonic() + timeout
    while not set(answered) <= set(raw := _readable_log(settings, prefix)):
        if time.monotonic() > deadline:
            found = len(set(answered) & set(raw))
            raise AssertionError(f"after {timeout}s, {found} of {len(answered)} answered predictions are in the S3 log")
        time.sleep(1)
    return raw, _monitoring_log(settings, prefix)


def _report(case: str, answered: list[str], raw: Counter, read: Counter, **extra: object) -> None:
    """One line per case, for the report (pytest -s shows it)."""
    twice = sum(1 for n in raw.values() if n > 1)
    unanswered = len(set(raw) - set(answered))
    print(
        f"\n[{case}] answered {len(answered)}, in the log {sum(raw.values())} rows of {len(raw)} ids "
        f"(stored twice {twice}, logged but never answered {unanswered}), monitoring reads {sum(read.values())}; "
        + ", ".join(f"{k} {v}" for k, v in extra.items())
    )


def test_sigkill_of_serving_under_load_loses_no_answered_prediction(faults, record):
    url = faults.local_serving_url
    pid = _pid(faults)
    # Given clients sending requests steadily
    with Load(url, record, "kill") as load:
        wait_for(lambda: len(load.answered) >= 200, 120, "200 answered requests")
        # when the serving process is SIGKILLed (its spool holds what S3 has not confirmed yet)
        os.kill(pid, signal.SIGKILL)
        killed_at = time.monotonic()
        # and `stack up` is run at once
        local_stack.up(faults)
        restarted = time.monotonic() - killed_at
        answered_before = len(load.answered)
        wait_for(lambda: len(load.answered) > answered_before + 20, 60, "answers from the restarted server")
    # (ready once every worker process serves the champion: one may answer while the other still loads it)
    assert _pid(faults) != pid
    wait_for(lambda: httpx.get(f"{url}/ready").status_code == 200, 60, "the restarted server to be ready")
    # then every answered prediction is in the S3 log exactly once, as monitoring reads it
    raw, read = _all_logged(faults, load.answered, "kill")
    _report(
        "sigkill",
        load.answered,
        raw,
        read,
        restart_s=round(restarted, 2),
        no_answer=len(load.errors),
        **{"503": len(load.refused)},
    )
    # (the restarted server answers 503 until it has loaded the champion: not answered, so not logged)
    assert all(status == 503 and "no model loaded yet" in text for status, text in load.refused), load.refused[:3]
    assert all(read[i] == 1 for i in load.answered), [i for i in load.answered if read[i] != 1][:5]
    assert all(raw[i] >= 1 for i in load.answered)
    assert len(load.errors) > 0  # the kill did cut requests off (the fault happened under load)


def test_s3_down_for_30_seconds_fails_no_request_and_logs_every_prediction_once(faults, record):
    url = faults.local_serving_url
    s3 = next(s for s in local_stack.services(faults) if s.name == "s3")
    with Load(url, record, "s3down") as load:
        wait_for(lambda: len(load.answered) >= 50, 60, "50 answered requests")
        # Given S3 stopped under load
        local_stack._stop_pid(local_stack._read_pid(s3))
        assert not local_stack._healthy(s3.health_url)
        during = len(load.answered)
        time.sleep(30)
        during = len(load.answered) - during
        spooled = float(
            next(
                line.split()[-1]
                for line in httpx.get(f"{url}/metrics").text.splitlines()
                if line.startswith(f'mlops_serving_prediction_spool_bytes{{model="{MODEL}"}} ')
            )
        )
        # when it comes back
        local_stack.up(faults)
        answered_before = len(load.answered)
        wait_for(lambda: len(load.answered) > answered_before + 20, 60, "answers after S3 is back")
    # then no request failed, and every prediction is logged once S3 is back
    assert not load.refused and not load.errors, (load.refused[:3], load.errors[:3])
    assert during > 0 and spooled > 0  # answered while S3 was down, held in the spool
    raw, read = _all_logged(faults, load.answered, "s3down")
    _report("s3-down-30s", load.answered, raw, read, answered_while_down=during, spool_bytes_at_30s=int(spooled))
    assert all(raw[i] == 1 for i in load.answered), [i for i in load.answered if raw[i] != 1][:5]
    assert all(read[i] == 1 for i in load.answered)
    metrics = httpx.get(f"{url}/metrics").text
    assert f'mlops_serving_prediction_log_rows_total{{model="{MODEL}",result="failed"}}' in metrics
    assert f'mlops_serving_prediction_log_rows_total{{model="{MODEL}",result="dropped"}}' not in metrics


def test_stack_up_from_the_cli_restarts_serving_killed_a_moment_before(faults):
    """The reported failure: `kill -9` of serving, then `mlops stack up` within a second."""
    env = os.environ | {"MLOPS_SERVING_MODEL": MODEL}
    mlops = str(Path(sys.executable).parent / "mlops")
    # Given serving started by a `mlops stack up` process that has exited (so this test is not its parent)
    _stop_serving(faults)
    subprocess.run([mlops, "stack", "up"], env=env, check=True, capture_output=True, timeout=300)
    pid = _pid(faults)
    assert int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1]) != os.getpid()
    # when it is SIGKILLed and `mlops stack up` runs at once
    os.kill(pid, signal.SIGKILL)
    time.sleep(0.2)
    state = local_stack._state(pid)  # "Z" while PID 1 has not reaped it: what used to pass for "starting"
    started = time.monotonic()
    result = subprocess.run([mlops, "stack", "up"], check=False, env=env, capture_output=True, text=True, timeout=300)
    took = time.monotonic() - started
    # then it starts serving again, with a new process
    assert result.returncode == 0, result.stdout + result.stderr
    assert _pid(faults) != pid
    wait_for(lambda: httpx.get(f"{faults.local_serving_url}/ready").status_code == 200, 60, "the model to load")
    print(f"\n[cli-restart] killed pid state before `up`: {state or 'gone'}; `mlops stack up` took {took:.1f}s")


def test_stack_down_during_traffic_loses_no_answered_prediction(faults, record, stack):
    url = faults.local_serving_url
    spool = Path(faults.state_dir).resolve() / "spool" / MODEL
    with Load(url, record, "down") as load:
        wait_for(lambda: len(load.answered) >= 100, 60, "100 answered requests")
        # when the whole stack is stopped under traffic
        started = time.monotonic()
        stopped = local_stack.down(faults)
        took = time.monotonic() - started
    # then serving went first, and had uploaded its spool before S3 stopped: nothing is left on disk
    assert stopped[0] == "serving" and "s3" in stopped
    assert not list(spool.rglob("*.jsonl")), list(spool.rglob("*.jsonl"))
    # and after the stack is back, every answered prediction is in the log exactly once
    local_stack.up(stack)
    raw, read = _all_logged(faults, load.answered, "down")
    _report("stack-down", load.answered, raw, read, down_s=round(took, 1), no_answer=len(load.errors))
    assert not load.refused, load.refused[:3]
    assert all(raw[i] == 1 for i in load.answered), [i for i in load.answered if raw[i] != 1][:5]
    assert all(read[i] == 1 for i in load.answered)
