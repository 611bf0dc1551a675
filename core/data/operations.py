"""How a catalog model is run: its schedules, monitoring, batch scoring, serving and gates (a dataset config section).

The `operations` section of a dataset config is optional: a config without it gets these defaults (weekly
training, daily monitoring of one day of the prediction log, served, no batch scoring, the default gates).
`mlops deploy` turns it into the model's deployments (`training/<model>`, `monitoring/<model>`,
`scoring/<model>`) and the serving API reads `served`.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from cronsim import CronSim, CronSimError
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from core.data.rollout_policy import RolloutPolicy

S3_URI = r"^s3://[^/]+(/.*)?$"
_EPOCH = datetime(2026, 1, 1, tzinfo=UTC)  # any start: CronSim checks the expression when built


def check_cron(value: str | None) -> str | None:
    """A five-field cron expression as Prefect schedules it; ValueError naming what does not parse."""
    if value is None:
        return None
    text = value.strip()
    fields = text.split()
    if len(fields) != 5:
        raise ValueError(f"cron {value!r} does not parse: expected 5 fields (minute hour day month weekday)")
    try:
        CronSim(text, _EPOCH)
    except CronSimError as exc:
        raise ValueError(f"cron {value!r} does not parse: {exc}") from exc
    return text


class Operations(BaseModel):
    """The `operations` section of a dataset config: how its model is trained, monitored, scored and served."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    training_cron: str | None = Field(
        "0 3 * * 1", description="Training schedule (cron, server time zone); null: on demand only."
    )
    training_interval_seconds: int | None = Field(
        None, ge=10, description="Instead of the cron: train every N seconds (tests, demos)."
    )
    monitoring_cron: str | None = Field("0 6 * * *", description="Monitoring schedule (cron); null: on demand only.")
    monitoring_interval_seconds: int | None = Field(None, ge=10, description="Instead of the cron: every N seconds.")
    schedule_anchor: datetime | None = Field(
        None,
        description="With an interval: the time the interval counts from (its first run when in the future); "
        "none: the time of `mlops deploy`.",
    )
    prediction_log_days: int = Field(
        1, ge=0, le=90, description="Days of the serving API's prediction log each monitoring run compares."
    )
    monitoring_partition: str | None = Field(
        None, pattern=S3_URI, description="s3:// URI of recent data monitoring compares as well (null: none)."
    )
    scoring_source: str | None = Field(
        None,
        pattern=S3_URI,
        description="s3:// URI of the data batch scoring predicts; null: no scoring deployment.",
    )
    scoring_cron: str | None = Field(None, description="Batch-scoring schedule (cron); null: on demand.")
    served: bool = Field(True, description="The serving API serves this model's champion at /models/<model>/.")
    search: dict[str, Any] = Field(
        default={},
        description="Model search of this model's training deployment (the SearchSpec fields, e.g. "
        "trials_per_family, families, time_budget_seconds); empty: the defaults.",
    )
    gates: dict[str, Any] = Field(
        default={},
        description="Promotion gates for this model's training deployment (the Gates fields, e.g. min_roc_auc).",
    )
    rollout: RolloutPolicy = Field(
        default_factory=RolloutPolicy,
        description="How a promoted candidate reaches traffic: direct, or a shadow or canary rollout judged on live "
        "traffic by `rollout/<model>` (core.data.rollout_policy.RolloutPolicy's fields).",
    )

    @field_validator("training_cron", "monitoring_cron", "scoring_cron")
    @classmethod
    def _cron(cls, value: str | None) -> str | None:
        return check_cron(value)

    @model_validator(mode="after")
    def _check(self) -> Operations:
        if self.scoring_cron is not None and self.scoring_source is None:
            raise ValueError("scoring_cron needs a scoring_source: there is nothing to score on that schedule")
        return self

    @property
    def trains_on_schedule(self) -> bool:
        """Training has a schedule (cron or interval)."""
        return self.training_cron is not None or self.training_interval_seconds is not None

    @property
    def monitors_on_schedule(self) -> bool:
        """Monitoring has a schedule (cron or interval)."""
        return self.monitoring_cron is not None or self.monitoring_interval_seconds is not None


COMMENTED_DEFAULTS = """\
# How the model is run once it is in the catalog (`mlops models add`, then `mlops deploy`). Optional:
# without this section the model gets these defaults.
operations:                      # schedules, monitoring, scoring, serving, gates
  training_cron: "0 3 * * 1"       # weekly retraining (server time zone); null: on demand only
  # training_interval_seconds: 3600  # instead of the cron: every N seconds
  monitoring_cron: "0 6 * * *"     # daily drift monitoring; null: on demand only
  prediction_log_days: 1           # days of the serving API's prediction log each monitoring run compares
  # monitoring_partition: s3://bucket/new-data/   # recent data compared as well
  # scoring_source: s3://bucket/to-score/         # batch scoring input: creates scoring/<model>
  # scoring_cron: "0 7 * * *"                     # batch scoring schedule (needs scoring_source)
  served: true                     # the serving API serves the champion at /models/<model>/predict
  search: {}                       # model search, e.g. {trials_per_family: 8, time_budget_seconds: 600}
  gates: {}                        # promotion gates, e.g. {min_roc_auc: 0.75, min_delta: 0.002}
  rollout: {mode: direct}          # or shadow / canary judged on live traffic, e.g. {mode: canary, canary_share: 0.1}
"""
