"""The feature store's materialization flow: register the repository, then load the newest values online.

Scheduled daily at 02:00 by the `features` deployment (new monthly data and the history land before it;
the weekly training runs at 03:00), and on demand from the UI (Run) or `mlops features materialize`.
"""

from __future__ import annotations

from datetime import datetime

from prefect import flow
from pydantic import BaseModel, ConfigDict, Field

from adapters.feature_store import Materialized
from tasks.features import apply_features, materialize_features


class MaterializeParams(BaseModel):
    """Parameters of one materialization (shown as a form in the Prefect UI)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    end: datetime | None = Field(
        None, title="Up to", description="Load feature values up to this time (UTC); empty means now."
    )


@flow(name="features", description="Apply the feature repository and materialize it into the online store.")
def materialize(params: MaterializeParams = MaterializeParams()) -> Materialized:  # noqa: B008 - frozen
    """Register the repository (idempotent), then load the newest values up to `params.end` into the online store."""
    apply_features()
    return materialize_features(params.end)
