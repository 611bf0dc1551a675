"""The rollback flow: put the champion back on the previous (or a given) version, from the Prefect UI.

This module wires tasks; the compare-and-set and the history live in `services/rollback.py`.
The same action from a shell: `mlops rollback --reason TEXT [--to VERSION] [--force]`.
"""

from __future__ import annotations

from prefect import flow
from prefect.runtime import flow_run
from pydantic import BaseModel, ConfigDict, Field

from services.rollback import RollbackOutcome, check_rollback_serving, publish_rollback, rollback_champion


class RollbackParams(BaseModel):
    """Parameters of one rollback (shown as a form in the Prefect UI)."""

    # Versions typed as numbers (3) are taken as their text ("3").
    model_config = ConfigDict(frozen=True, extra="forbid", coerce_numbers_to_str=True)

    model_name: str = Field(
        "credit-risk", min_length=1, title="Model", description="Registered model whose champion is rolled back."
    )
    reason: str = Field(
        min_length=3,
        max_length=1000,
        title="Reason",
        description="Why (required): recorded in the champion history and on the rolled-back version.",
    )
    to_version: str | None = Field(
        None,
        pattern=r"^[0-9]+$",
        title="To version",
        description="Version to make champion again; empty means the version holding the `previous` alias.",
    )
    force: bool = Field(
        False,
        title="Force",
        description="Roll back even to a version the gates rejected or that was never champion (recorded).",
    )
    actor: str = Field("prefect-ui", min_length=1, title="Actor", description="Who asks (recorded with the run name).")
    serving_timeout_seconds: float = Field(
        60,
        gt=0,
        le=3600,
        title="Serving check timeout (s)",
        description="How long to wait for the serving API "
        "(MLOPS_SERVING_URL) to serve the restored version; a miss is reported, the rollback stands.",
    )


@flow(
    name="rollback",
    description="Move the `champion` alias back to the previous (or a given) version, recording who, why and when.",
    persist_result=False,
)
def rollback(params: RollbackParams) -> RollbackOutcome:
    """Roll the champion back, record the change, then check that the serving API follows it."""
    actor = f"{params.actor} (flow run {flow_run.get_name()})" if flow_run.get_id() else params.actor
    change = rollback_champion(params.model_name, params.to_version, params.reason, actor, params.force)
    serving = check_rollback_serving(params.model_name, change.to_version, params.serving_timeout_seconds)
    publish_rollback(change, serving)
    return RollbackOutcome(change, serving)
