"""After a promotion: does the serving API answer with the new champion? If not, the promotion is undone.

"Configured" means `MLOPS_SERVING_URL` is set (the local stack sets it for its worker and the CLI).
A serving API that follows another model or alias is not ours to check and is skipped, saying so.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import httpx
from pydantic import SecretStr

from adapters.registry import CHAMPION
from adapters.settings import get_settings
from core.errors import PermanentError

log = logging.getLogger(__name__)


class ServingCheckFailed(PermanentError):
    """The serving API did not switch to the promoted version in time; the promotion was reverted."""


@dataclass(frozen=True)
class ServingCheck:
    """What the check found: `checked` is False when no serving API of this model is configured."""

    checked: bool
    ok: bool
    detail: str
    seconds: float


def wait_for_serving(
    url: str, model_name: str, version: str, timeout: float, poll: float = 0.5, token: SecretStr | None = None
) -> ServingCheck:
    """Ask the serving API at `url` to look at the registry, then wait until it serves `version`.

    Unreachable answers are retried until `timeout` (a restart of the API is not a failure). `token` is
    the serving API's bearer token (`MLOPS_SERVING_TOKEN`), sent with /reload.
    """
    headers = {"Authorization": f"Bearer {token.get_secret_value()}"} if token is not None else {}
    url = url.rstrip("/")
    started = time.monotonic()
    deadline = started + timeout
    last, nudged = "no answer yet", False
    while True:
        try:
            health = httpx.get(f"{url}/health", timeout=5).raise_for_status().json()
            following = str(health.get("following", ""))
            if following != f"{model_name}@{CHAMPION}":
                detail = f"serving API at {url} follows {following!r}, not {model_name}@{CHAMPION}: not checked"
                return ServingCheck(False, True, detail, time.monotonic() - started)
            if health.get("version") == version:
                seconds = time.monotonic() - started
                return ServingCheck(True, True, f"serving API at {url} serves v{version} ({seconds:.1f}s)", seconds)
            last = f"it serves v{health.get('version')}" + (
                f"; its last error: {health['error']}" if health.get("error") else ""
            )
            if not nudged:  # /reload loads the new alias target now rather than at the next poll
                nudged = True
                reload = httpx.post(f"{url}/reload", headers=headers, timeout=max(deadline - time.monotonic(), 1))
                if reload.status_code in {401, 403}:
                    last = f"/reload refused ({reload.status_code}): {reload.json().get('detail')}"
                continue
        except (httpx.HTTPError, ValueError) as exc:
            last = f"unreachable ({type(exc).__name__}: {exc})"
        if time.monotonic() >= deadline:
            detail = f"serving API at {url} did not serve v{version} within {timeout:.0f}s: {last}"
            return ServingCheck(True, False, detail, time.monotonic() - started)
        time.sleep(poll)


def check_configured_serving(model_name: str, version: str, timeout: float) -> ServingCheck:
    """Wait for the configured serving API (MLOPS_SERVING_URL) to serve `version`; unconfigured: not checked."""
    settings = get_settings()
    url = settings.serving_url
    if not url:
        return ServingCheck(False, True, "no serving API configured (MLOPS_SERVING_URL): not checked", 0.0)
    check = wait_for_serving(url, model_name, version, timeout, token=settings.serving_token)
    (log.info if check.ok else log.error)("%s", check.detail)
    return check
