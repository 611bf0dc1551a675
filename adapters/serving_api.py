"""After a promotion: does the serving API answer with the new champion? If not, the promotion is undone.

"Configured" means `MLOPS_SERVING_URL` is set (the local stack sets it for its worker and the CLI).
The API serves its default model and every served catalog model; a model it does not serve (or follows at
another alias) is not ours to check and is skipped, saying so.
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
    """Ask the serving API at `url` to look at the registry, then wait until it serves `version` of `model_name`.

    The API's default model is read at `/model`; any other model it serves (a served catalog model) at
    `/models/<model_name>`, after `/reload?model=<model_name>` made it re-read the catalog. A model it does not
    serve (not its default, not served in its catalog, or followed at another alias) is not checked, saying
    so. With several worker processes, every one of them must serve it (`/reload` waits for them and lists
    them, `/model` and `/models/<name>` too), not only the one that happened to answer. Unreachable answers
    are retried until `timeout` (a restart of the API is not a failure). `token` is the serving API's bearer
    token (`MLOPS_SERVING_TOKEN`), sent with /reload.
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
            default = following == f"{model_name}@{CHAMPION}"
            if not default and following.partition("@")[0] == model_name:
                detail = f"serving API at {url} follows {following!r}, not {model_name}@{CHAMPION}: not checked"
                return ServingCheck(False, True, detail, time.monotonic() - started)
            if not nudged:  # /reload loads the new alias target now, in every process, rather than at the next poll
                nudged = True
                reload = _reload(url, None if default else model_name, headers, deadline)
                if reload.status_code == 404 and not default:
                    return _not_served(url, model_name, following, reload, started)
                if reload.status_code in {401, 403}:
                    last = f"/reload refused ({reload.status_code}): {reload.json().get('detail')}"
            answer = httpx.get(f"{url}/model" if default else f"{url}/models/{model_name}", timeout=5)
            if answer.status_code == 404 and not default:
                return _not_served(url, model_name, following, answer, started)
            described = answer.json()
            if not default and described.get("alias", CHAMPION) != CHAMPION:
                detail = f"serving API at {url} serves {model_name}@{described['alias']}, not @{CHAMPION}: not checked"
                return ServingCheck(False, True, detail, time.monotonic() - started)
            served = served_versions(described)
            if served == {version}:
                seconds = time.monotonic() - started
                processes = len(described.get("workers") or [None])
                where = "" if default else f" at /models/{model_name}"
                detail = f"serving API at {url} serves v{version}{where} in {processes} process(es) ({seconds:.1f}s)"
                return ServingCheck(True, True, detail, seconds)
            last = _what_is_served(served, described)
        except (httpx.HTTPError, ValueError) as exc:
            last = f"unreachable ({type(exc).__name__}: {exc})"
        if time.monotonic() >= deadline:
            detail = f"serving API at {url} did not serve v{version} of {model_name} within {timeout:.0f}s: {last}"
            return ServingCheck(True, False, detail, time.monotonic() - started)
        time.sleep(poll)


def _reload(url: str, model_name: str | None, headers: dict[str, str], deadline: float) -> httpx.Response:
    """POST /reload (of one model, re-reading the catalog), waiting for every process up to the time left."""
    wait = max(min(deadline - time.monotonic(), 30.0), 1.0)
    params: dict[str, str | float] = {"timeout": wait} | ({"model": model_name} if model_name else {})
    return httpx.post(f"{url}/reload", params=params, headers=headers, timeout=wait + 5)


def _not_served(url: str, model_name: str, following: str, answer: httpx.Response, started: float) -> ServingCheck:
    """The check's answer for a model the serving API does not serve: not checked, saying why."""
    try:
        served = answer.json().get("served")
    except ValueError:
        served = None
    listed = f" (it serves {served})" if served else ""
    detail = (
        f"serving API at {url} does not serve {model_name} (its default model is {following!r} and its catalog "
        f"does not serve {model_name}){listed}: not checked"
    )
    return ServingCheck(False, True, detail, time.monotonic() - started)


def _what_is_served(served: set[str | None], described: dict) -> str:
    """What the API serves instead, with its last load error, for the failure's detail."""
    error = described.get("last_error") or described.get("error")
    return f"it serves {sorted(map(str, served))}" + (f"; its last error: {error}" if error else "")


def check_configured_serving(model_name: str, version: str, timeout: float) -> ServingCheck:
    """Wait for the configured serving API (MLOPS_SERVING_URL) to serve `version`; unconfigured: not checked."""
    settings = get_settings()
    url = settings.serving_url
    if not url:
        return ServingCheck(False, True, "no serving API configured (MLOPS_SERVING_URL): not checked", 0.0)
    check = wait_for_serving(url, model_name, version, timeout, token=settings.serving_token)
    (log.info if check.ok else log.error)("%s", check.detail)
    return check
