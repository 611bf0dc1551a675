"""What the configured serving API serves, per model, for `mlops models list` (read-only GETs)."""

from __future__ import annotations

import httpx

from adapters.settings import Settings


def served_versions(settings: Settings, timeout: float = 3.0) -> dict[str, str | None] | None:
    """Model name -> the version the serving API (MLOPS_SERVING_URL) answers with; None when it is unreachable.

    Reads `GET /models` (every served model); a model listed without a loaded version maps to None.
    """
    url = settings.serving_url
    if not url:
        return None
    try:
        answer = httpx.get(f"{url.rstrip('/')}/models", timeout=timeout)
        answer.raise_for_status()
        listed = answer.json().get("models") or []
    except (httpx.HTTPError, ValueError, AttributeError):
        return None
    return {
        str(model.get("name")): (None if model.get("version") is None else str(model["version"]))
        for model in listed
        if isinstance(model, dict)
    }
