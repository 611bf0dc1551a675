"""The Feast feature repository: entities, feature views and one feature service per model (definitions only).

Declarative objects, built by a function of where the offline data lives (an S3 URI and its endpoint, or
a local path), so nothing here reads settings or touches storage; `adapters.feature_store` applies them.

- entity `application`: join key `application_id` (the bundled dataset's id column: the applicant behind
  one application, whose history the generator writes);
- feature view `applicant_history`: aggregates of the applicant's past account events
  (`core.feature_history.HISTORY_FEATURES`), TTL three years (events go back two);
- feature service `credit_risk_history`: what the `credit-risk-history` model needs.
"""

from __future__ import annotations

from datetime import timedelta

from core.feature_history import ENTITY_TIMESTAMP

ENTITY_KEY = "application_id"
HISTORY_VIEW = "applicant_history"
HISTORY_TTL = timedelta(days=3 * 365)
# Feature service per model: a model's dataset config names it (`feature_service`).
FEATURE_SERVICES = {"credit_risk_history": [HISTORY_VIEW]}
HISTORY_TABLE = "features/applicant_history/history.parquet"  # under the bucket: the offline source


def definitions(source_path: str, s3_endpoint: str | None) -> list[object]:
    """Every Feast object of the repository, reading the history table at `source_path`."""
    # Imported here: Feast takes seconds to import, and the serving API, the CLI and the flows import this
    # module whether or not a model uses a feature service.
    from feast import Entity, FeatureService, FeatureView, Field, FileSource
    from feast.types import Float64, Int64
    from feast.value_type import ValueType

    application = Entity(
        name="application",
        join_keys=[ENTITY_KEY],
        value_type=ValueType.STRING,
        description="An applicant's application.",
    )
    source = FileSource(
        name="applicant_history_source",
        path=source_path,
        timestamp_field=ENTITY_TIMESTAMP,
        s3_endpoint_override=s3_endpoint if source_path.startswith("s3://") else None,
    )
    history = FeatureView(
        name=HISTORY_VIEW,
        entities=[application],
        ttl=HISTORY_TTL,
        schema=[
            Field(name="prev_applications", dtype=Int64),
            Field(name="past_delinquencies", dtype=Int64),
            Field(name="last_utilization", dtype=Float64),
            Field(name="mean_utilization_3", dtype=Float64),
        ],
        source=source,
        online=True,
        description="Aggregates of the applicant's account events up to each event (core.feature_history).",
    )
    views = {HISTORY_VIEW: history}
    services = [
        FeatureService(name=name, features=[views[v] for v in view_names])
        for name, view_names in FEATURE_SERVICES.items()
    ]
    return [application, source, history, *services]
