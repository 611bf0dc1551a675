"""Outages of the store: a brief one is ridden out by retries, a lasting one fails with a clear message."""

from __future__ import annotations

import signal
import threading

import pytest

from core.data.dataset import load_local_dataset_config
from mlops import stack as local_stack
from tests.conftest import TEST_MONTHS, TEST_ROWS_PER_MONTH
from tests.faults import kill_server

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _stop_s3(stack) -> None:
    kill_server(stack, "s3", signal.SIGTERM)


@pytest.fixture
def load_flow():
    from prefect import flow

    from tasks.loading import load_snapshot

    @flow(name="load-only")
    def load_only():
        return load_snapshot(load_local_dataset_config("credit-risk"))

    return load_only


def test_brief_s3_outage_is_ridden_out_by_retries(stack, default_data, load_flow):
    # Given S3 goes down and comes back a few seconds later
    _stop_s3(stack)
    restart = threading.Timer(3.0, local_stack.up, args=(stack,))
    restart.start()
    try:
        # when a run loads the snapshot meanwhile, then the retries carry it through
        state = load_flow(return_state=True)
        assert state.is_completed(), state.message
        assert state.result().n_rows == TEST_MONTHS * TEST_ROWS_PER_MONTH
    finally:
        restart.join()
        local_stack.up(stack)


def test_lasting_s3_outage_fails_with_a_clear_message(stack, default_data, load_flow):
    # Given S3 stays down for longer than the retries last
    _stop_s3(stack)
    try:
        state = load_flow(return_state=True)
        # then the run fails, naming the store and the way to check it
        assert state.is_failed()
        assert f"S3 at {stack.s3_endpoint_url} is unreachable" in state.message
        assert "mlops stack status" in state.message
    finally:
        local_stack.up(stack)
