"""The serving token cannot be switched off by accident (pure units; the served API is checked in
`tests/test_serving.py` and below with a real `mlops serve`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import SecretStr, ValidationError

from adapters.settings import Settings, is_loopback
from serving.app import ExposedWithoutTokenError, check_exposure
from serving.request_io import token_problem
from tests.ports import free_port

BIN = Path(sys.executable).parent


@pytest.mark.parametrize("blank", ["", " ", "\t \n"])
def test_an_empty_or_blank_token_is_a_settings_error_not_no_token(blank):
    with pytest.raises(ValidationError, match="MLOPS_SERVING_TOKEN is set but empty or blank"):
        Settings(serving_token=blank)


def test_the_token_is_trimmed_and_compared_trimmed_on_both_sides():
    token = Settings(serving_token="  s3cret \n").serving_token
    assert token.get_secret_value() == "s3cret"
    assert token_problem(token, "Bearer s3cret", "predict") is None
    assert token_problem(token, "  Bearer  s3cret  ", "predict") is None
    assert "none was sent" in token_problem(token, "Bearer", "predict")
    assert "none was sent" in token_problem(token, "Bearer ", "predict")
    assert "the one sent is wrong" in token_problem(token, "Bearer s3cre", "predict")
    assert token_problem(token, "Basic s3cret", "predict") is not None
    assert token_problem(token, None, "reload") is not None


def test_a_blank_token_that_reached_the_check_anyway_never_matches_an_empty_bearer():
    # Settings refuse it; the comparison does not rely on that
    assert token_problem(SecretStr(" "), "Bearer ", "predict") is not None
    assert token_problem(SecretStr(""), "Bearer", "predict") is not None


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.0.0.2", True), ("::1", True), ("localhost", True), ("0.0.0.0", False),
     ("10.1.2.3", False), ("::", False), ("serving.example", False)],
)  # fmt: skip
def test_loopback_is_what_only_this_machine_can_reach(host, loopback):
    assert is_loopback(host) is loopback


def test_binding_beyond_loopback_needs_a_token_or_insecure(caplog):
    check_exposure("127.0.0.1", Settings())
    check_exposure("0.0.0.0", Settings(serving_token="t"))
    with pytest.raises(ExposedWithoutTokenError, match=r"refusing to serve on 0\.0\.0\.0 without MLOPS_SERVING_TOKEN"):
        check_exposure("0.0.0.0", Settings())
    check_exposure("0.0.0.0", Settings(serving_insecure=True))
    assert "WITHOUT a token (--insecure)" in caplog.text


def test_mlops_serve_refuses_an_exposed_start_without_a_token_and_a_blank_token():
    # No stack needed: both are refused before anything is served or loaded
    env = {k: v for k, v in os.environ.items() if k != "MLOPS_SERVING_TOKEN"}
    command = [str(BIN / "mlops"), "serve", "--host", "0.0.0.0", "--port", str(free_port())]
    exposed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert exposed.returncode == 2 and "refusing to serve on 0.0.0.0" in exposed.stderr, exposed.stderr
    blank = subprocess.run(
        command, env=env | {"MLOPS_SERVING_TOKEN": "  "}, capture_output=True, text=True, timeout=120, check=False
    )
    assert blank.returncode == 1 and "empty or blank" in blank.stderr, blank.stderr
