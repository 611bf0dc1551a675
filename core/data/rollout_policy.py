"""How a model's candidates reach live traffic: a dataset config's `operations.rollout` (see `core.rollout`).

Here, beside the dataset config it belongs to, so that a config is checked when it is read; the rollout's logic lives
in `core.rollout`. No I/O.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Mode = Literal["direct", "shadow", "canary"]


class RolloutPolicy(BaseModel):
    """How a model's candidates reach traffic, and the gates a rollout's live evidence must clear."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    mode: Mode = Field(
        "direct",
        title="Rollout mode",
        description="direct: promote at once (as before); shadow: the challenger scores every request beside the "
        "champion, which answers; canary: a share of the records is answered by the challenger.",
    )
    canary_share: float = Field(0.1, gt=0, lt=1, title="Canary share", description="Share of records (canary).")
    min_records: int = Field(
        500, ge=1, title="Minimum records", description="Records the challenger scored before any decision."
    )
    min_seconds: int = Field(3600, ge=0, title="Minimum duration (s)", description="Before any promotion.")
    max_seconds: int = Field(
        7 * 86_400, ge=60, title="Maximum duration (s)", description="Still undecided then: rolled back."
    )
    on_new_candidate: Literal["wait", "replace"] = Field(
        "wait",
        title="A new candidate during a rollout",
        description="wait: it is registered, not rolled out (the next run tries again); replace: it takes over.",
    )
    latency_budget_ms: float = Field(
        500.0,
        gt=0,
        title="Latency budget (ms)",
        description="A challenger call slower than this, or an error, cuts the challenger off at once.",
    )
    max_p99_ratio: float | None = Field(
        2.0, gt=0, title="Maximum p99 ratio", description="Challenger's p99 call time over the champion's."
    )
    min_agreement: float | None = Field(
        0.8,
        ge=0,
        le=1,
        title="Minimum agreement",
        description="Share of records where both give the same class (a regressor: within `agreement_tolerance`).",
    )
    agreement_tolerance: float = Field(
        0.25,
        gt=0,
        title="Regression agreement tolerance",
        description="Two values agree within this many standard deviations of the champion's outputs.",
    )
    max_output_psi: float | None = Field(
        0.25,
        gt=0,
        title="Maximum output shift (PSI)",
        description="PSI of the challenger's outputs against the champion's on the same records.",
    )
    max_estimated_drop: float | None = Field(
        0.02,
        ge=0,
        title="Maximum estimated drop",
        description="Estimated primary metric (no labels) worse than the champion's by more than this: rolled back "
        "(relative for RMSE and MAE).",
    )
    min_labelled: int = Field(
        200, ge=10, title="Minimum labelled records", description="For the realised comparison (paired interval)."
    )
    max_realised_drop: float = Field(
        0.01,
        ge=0,
        title="Maximum realised drop",
        description="Promoted only when the paired interval's lower end of (challenger - champion) is above "
        "minus this; rolled back when its upper end is below it.",
    )
    check_seconds: int = Field(
        900, ge=10, title="Check interval (s)", description="How often `rollout/<model>` judges the evidence."
    )
    require_labels: bool = Field(
        False, title="Require labels", description="Promote only with a realised comparison on labelled records."
    )

    def merged(self, changes: dict[str, Any] | None) -> RolloutPolicy:
        """This policy with `changes` (a run's overrides) applied, validated."""
        return RolloutPolicy.model_validate(self.model_dump() | (changes or {}))
