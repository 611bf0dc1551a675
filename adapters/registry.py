"""The MLflow registry: aliases, versions, model loading, run metrics. Built from settings, nothing at import."""

from __future__ import annotations

import logging
from typing import Any

from adapters.clients import mlflow_client, use_tracking_server
from adapters.settings import Settings, get_settings

log = logging.getLogger(__name__)

CHAMPION = "champion"
PREVIOUS = "previous"


def champion_version(model_name: str) -> str | None:
    """Version currently holding the `champion` alias, or None (no registered model or no alias)."""
    return aliases_of(mlflow_client(get_settings()), model_name).get(CHAMPION)


def set_alias(client: Any, model_name: str, alias: str, version: str | None) -> None:
    """Point `alias` at `version`; None removes the alias (absent already is fine)."""
    from mlflow.exceptions import MlflowException

    if version is not None:
        client.set_registered_model_alias(model_name, alias, version)
        return
    try:
        client.delete_registered_model_alias(model_name, alias)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise


def aliases_of(client: Any, model_name: str) -> dict[str, str]:
    """Every alias of a registered model and the version it points at (empty when the model does not exist)."""
    from mlflow.exceptions import MlflowException

    try:
        aliases = client.get_registered_model(model_name).aliases
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return {}
        raise
    return {alias: str(version) for alias, version in aliases.items()}


def load_model(model_name: str, version: str, settings: Settings | None = None, where: str = "a flow run") -> Any:
    """A registered version's fitted scikit-learn pipeline, loaded only after its artifact checks.

    The checks are `adapters.model_store.load_registered`'s (recorded digests, skops, the project's types);
    a refusal is alerted (`mlops.model.refused`, naming `where`) and raised as UntrustedArtifactError.
    """
    from adapters.alerts import emit_refused
    from adapters.model_store import load_registered
    from core.modeling.artifacts import UntrustedArtifactError

    try:
        return load_registered(settings or get_settings(), model_name, version).pipeline
    except UntrustedArtifactError as exc:
        log.error("refused %s v%s in %s: %s", model_name, version, where, exc)
        emit_refused(model_name, version, str(exc), where)
        raise


def holdout_metrics(logged: dict[str, float]) -> dict[str, float]:
    """The holdout metrics among a run's logged metrics (`holdout_roc_auc` -> `roc_auc`)."""
    return {k.removeprefix("holdout_"): float(v) for k, v in logged.items() if k.startswith("holdout_")}


def run_holdout_metrics(client: Any, run_id: str | None) -> dict[str, float]:
    """The holdout metrics a training run logged (empty without a run)."""
    return holdout_metrics(client.get_run(run_id).data.metrics) if run_id else {}


def input_schema(model_name: str, version: str, settings: Settings | None = None) -> dict[str, str]:
    """A version's inputs as its logged signature says (what callers send today): column -> numeric | text."""
    from mlflow.models import get_model_info

    from core.modeling.signature import columns_from_signature

    use_tracking_server(settings or get_settings())
    signature = get_model_info(f"models:/{model_name}/{version}").signature
    return {column.name: column.kind for column in columns_from_signature(signature)}
