"""The bundled feature repository: an applicant's history, for the `credit-risk-history` model.

A Feast repository in Feast's usual layout: `mlops features apply --repo examples/feature_repo` (or
`mlops models add` with a config naming it in `feature_repo`) parses this folder with Feast's own repo
parsing and registers every object below in the stack's registry. Training and serving then read them
from the registry by the feature service's name; they never import this file.

- entity `application`: join key `application_id` (the bundled dataset's id column);
- feature view `applicant_history`: running aggregates of the applicant's past account events, as the
  generator writes them (`mlops data generate`), TTL three years (the events go back two);
- feature service `credit_risk_history`: what the `credit-risk-history` model needs.

The history table is read where the generator writes it, `s3://<bucket>/features/applicant_history/
history.parquet`: the bucket comes from `MLOPS_BUCKET` (default `mlops`), the S3 endpoint from
`FEAST_S3_ENDPOINT_URL`, which the stack exports before it parses a repository (credentials: `AWS_*`).
"""

from __future__ import annotations

import os
from datetime import timedelta

from feast import Entity, FeatureService, FeatureView, Field, FileSource
from feast.types import Float64, Int64
from feast.value_type import ValueType

BUCKET = os.environ.get("MLOPS_BUCKET", "mlops")
HISTORY_PATH = f"s3://{BUCKET}/features/applicant_history/history.parquet"

application = Entity(
    name="application",
    join_keys=["application_id"],
    value_type=ValueType.STRING,
    description="An applicant's application.",
)

applicant_history_source = FileSource(
    name="applicant_history_source",
    path=HISTORY_PATH,
    timestamp_field="event_timestamp",
    s3_endpoint_override=os.environ.get("FEAST_S3_ENDPOINT_URL") or None,
)

applicant_history = FeatureView(
    name="applicant_history",
    entities=[application],
    ttl=timedelta(days=3 * 365),
    schema=[
        Field(name="prev_applications", dtype=Int64),
        Field(name="past_delinquencies", dtype=Int64),
        Field(name="last_utilization", dtype=Float64),
        Field(name="mean_utilization_3", dtype=Float64),
    ],
    source=applicant_history_source,
    online=True,
    description="Aggregates of the applicant's account events up to each event (core.data.feature_history).",
)

credit_risk_history = FeatureService(
    name="credit_risk_history",
    features=[applicant_history],
    description="Features of the credit-risk-history model.",
)
