"""The feature store's materialization flow: load the newest values of every registered view into the online store.

Scheduled daily at 02:00 by the `features` deployment (new monthly data and the history land before it;
the weekly training runs at 03:00), and on demand from the UI (Run) or `mlops features materialize`. It
reads the definitions from the registry only, so a worker needs no repository code; a local run may
name a repository folder to apply first (`repo`).
"""

from __future__ import annotations

from datetime import datetime

from prefect import flow
from pydantic import BaseModel, ConfigDict, Field

from core.data.feature_history import Materialized
from tasks.features import apply_features, materialize_features


class MaterializeParams(BaseModel):
    """Parameters of one materialization (shown as a form in the Prefect UI)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    end: datetime | None = Field(
        None, title="Up to", description="Load feature values up to this time (UTC); empty means now."
    )
    repo: str | None = Field(
        None,
        title="Apply repository first",
        description="A Feast repository folder to apply before materializing (local runs: the folder must be on "
        "the machine running the flow); empty means materialize what the registry holds.",
    )


@flow(name="features", description="Materialize the registered feature views into the online store.")
def materialize(params: MaterializeParams = MaterializeParams()) -> Materialized:  # noqa: B008 - frozen
    """Load the newest values up to `params.end` into the online store; apply `params.repo` first when given."""
    if params.repo:
        apply_features(params.repo)
    return materialize_features(params.end)
