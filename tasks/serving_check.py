"""Prefect task: after a promotion, wait until the serving API serves the new champion (`adapters.serving_api`)."""

from __future__ import annotations

import logging

from prefect import task
from prefect.cache_policies import NO_CACHE

from adapters.serving_api import ServingCheck, check_configured_serving

log = logging.getLogger(__name__)


@task(name="check-serving", cache_policy=NO_CACHE)
def check_serving(model_name: str, version: str, timeout: float) -> ServingCheck:
    """Prefect task: wait for the configured serving API to serve the promoted version (see `wait_for_serving`).

    Its default model is checked at `/model`, a served catalog model at `/models/<model_name>`; a model the
    API does not serve is not checked (the result says so).
    """
    return check_configured_serving(model_name, version, timeout)
