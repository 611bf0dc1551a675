"""Names of the bundled feature repository (constants only: its Feast objects live in `examples/feature_repo/`).

The definitions themselves are a Feast repository in Feast's usual layout (`examples/feature_repo/`), parsed
and applied to the stack's registry by `adapters.feature_store.apply_repository`; training and serving read
them back from the registry by feature service name. What other code needs to know without the
repository's code stays here:

- `ENTITY_KEY`: the join key of the entity `application` (the bundled dataset's id column), the column
  the generator writes the history table under;
- `HISTORY_VIEW`, `HISTORY_TTL`: the feature view `applicant_history` and its TTL (three years; the
  generated events go back two);
- `HISTORY_SERVICE`: the feature service of the `credit-risk-history` model;
- `HISTORY_TABLE`: the history table's key under the bucket (where `mlops data generate` writes it and the
  repository's `FileSource` reads it);
- `EXAMPLE_REPO`: where the example repository lives, relative to the project's checkout.
"""

from __future__ import annotations

from datetime import timedelta

ENTITY_KEY = "application_id"
HISTORY_VIEW = "applicant_history"
HISTORY_TTL = timedelta(days=3 * 365)
HISTORY_SERVICE = "credit_risk_history"
HISTORY_TABLE = "features/applicant_history/history.parquet"
EXAMPLE_REPO = "examples/feature_repo"
