"""Progressive delivery, the pure part: a rollout's policy and state, who answers a record, the evidence, the verdict.

A candidate that clears the offline gates goes to the `challenger` alias instead of `champion` when its model's
rollout mode (dataset config `operations.rollout`, overridable per run) is `shadow` or `canary`:

- **shadow**: the challenger scores every request beside the champion; only the champion answers;
- **canary**: a share of the records is answered by the challenger, sticky by the record's id (the hash of the
  rollout's id and the record's; the request id for a model without an id field), the same in every serving process
  and after a restart; the champion scores those records too, in the shadow log, so every challenger output has the
  champion's beside it.

The rollout flow (`flows/rollout.py`) pairs the two outputs of each record from the prediction logs, measures
(`measure`) and decides (`judge`): promote, roll back or extend. No I/O here.
"""

from __future__ import annotations

from core.data.rollout_policy import Mode, RolloutPolicy
from core.rollout.evidence import (
    Arm,
    Evidence,
    Pairs,
    Realised,
    agreement,
    arm,
    estimated_pair,
    measure,
    output_psi,
    outputs,
    pair_outputs,
    primary_metric,
    realised_comparison,
    since_start,
)
from core.rollout.state import (
    CHALLENGER,
    CUT_OFF_TAG,
    EVENTS_PREFIX,
    ROLLOUT_TAG,
    CutOff,
    EventKind,
    RolloutEvent,
    RolloutState,
    takes_challenger,
    timeline_markdown,
)
from core.rollout.verdict import Action, Verdict, judge

__all__ = [
    "CHALLENGER",
    "CUT_OFF_TAG",
    "EVENTS_PREFIX",
    "ROLLOUT_TAG",
    "Action",
    "Arm",
    "CutOff",
    "EventKind",
    "Evidence",
    "Mode",
    "Pairs",
    "Realised",
    "RolloutEvent",
    "RolloutPolicy",
    "RolloutState",
    "Verdict",
    "agreement",
    "arm",
    "estimated_pair",
    "judge",
    "measure",
    "output_psi",
    "outputs",
    "pair_outputs",
    "primary_metric",
    "realised_comparison",
    "since_start",
    "takes_challenger",
    "timeline_markdown",
]
