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


def served_versions(answer: dict) -> set[str | None]:
    """The versions an answer of `/model` or `/reload` says are served.

    One per worker process when it lists them (`workers`), else its own `version` (a single-process API).
    """
    workers = answer.get("workers")
    if workers:
        return {None if w.get("version") is None else str(w["version"]) for w in workers}
    return {None if answer.get("version") is None else str(answer["version"])}


def wait_for_serving(
    url: str, model_name: str, version: str, timeout: float, poll: float = 0.5, token: SecretStr | None = None
) -> ServingCheck:
    """Ask the serving API at `url` to look at the registry, then wait until it serves `version`.

    With several worker processes, every one of them must serve it (`/reload` waits for them and lists
    them, `/model` too), not only the one that happened to answer. Unreachable answers are retried until
    `timeout` (a restart of the API is not a failure). `token` is the serving API's bearer token
    (`MLOPS_SERVING_TOKEN`), sent with /reload.
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
            if not nudged:  # /reload loads the new alias target now, in every process, rather than at the next poll
                nudged = True
                wait = max(min(deadline - time.monotonic(), 30.0), 1.0)
                reload = httpx.post(f"{url}/reload", params={"timeout": wait}, headers=headers, timeout=wait + 5)
                if reload.status_code in {401, 403}:
                    last = f"/reload refused ({reload.status_code}): {reload.json().get('detail')}"
            described = httpx.get(f"{url}/model", timeout=5).json()
            served = served_versions(described)
            if served == {version}:
                seconds = time.monotonic() - started
                processes = len(described.get("workers") or [None])
                detail = f"serving API at {url} serves v{version} in {processes} process(es) ({seconds:.1f}s)"
                return ServingCheck(True, True, detail, seconds)
            last = f"it serves {sorted(map(str, served))}" + (
                f"; its last error: {described.get('last_error') or described.get('error')}"
                if described.get("last_error") or described.get("error")
                else ""
            )
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
