"""The verdict on a rollout's evidence: promote, roll back or extend, by the policy's gates. No I/O."""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from core.data.rollout_policy import RolloutPolicy
from core.modeling.metrics import LOWER_IS_BETTER
from core.rollout.evidence import Evidence

Action = Literal["promote", "rollback", "extend"]

# ------------------------------------------------------------------------------------------ verdict


@dataclass(frozen=True)
class Verdict:
    """What to do with a rollout now, and why (each gate's outcome: True passed, False failed, None not judged)."""

    action: Action
    reasons: list[str]
    checks: dict[str, bool | None] = field(default_factory=dict)


def _worse_by(metric: str, champion: float, challenger: float) -> float:
    """How much worse the challenger is (positive: worse); relative for lower-is-better metrics."""
    if metric in LOWER_IS_BETTER:
        return (challenger - champion) / abs(champion) if champion else challenger - champion
    return champion - challenger


def _gate_checks(evidence: Evidence, policy: RolloutPolicy) -> tuple[dict[str, bool | None], list[str]]:
    """Each live gate's outcome and the failures' reasons (judged only with enough paired records)."""
    checks: dict[str, bool | None] = {}
    failed: list[str] = []
    enough = evidence.paired >= policy.min_records

    def gate(
        name: str, value: float | None, limit: float | None, passes: Callable[[float, float], bool], why: str
    ) -> None:
        """Judge `passes(value, limit)`; not judged (None) without a limit, a finite value or enough records."""
        if limit is None or value is None or not math.isfinite(value) or not enough:
            checks[name] = None
            return
        checks[name] = passes(value, limit)
        if not checks[name]:
            failed.append(why.format(value=value, limit=limit))

    p99 = evidence.challenger.p99_ms
    gate(
        "latency",
        evidence.p99_ratio,
        policy.max_p99_ratio,
        operator.le,
        f"p99 call time {p99} ms is {{value:.2f}}x the champion's (max {{limit}}x)",
    )
    gate(
        "agreement",
        evidence.agreement,
        policy.min_agreement,
        operator.ge,
        "agreement with the champion {value:.3f} below {limit}",
    )
    gate(
        "output_shift",
        evidence.output_psi,
        policy.max_output_psi,
        operator.le,
        "output shift PSI {value:.3f} above {limit}",
    )
    metric = evidence.estimated_metric
    if metric and {"champion", "challenger"} <= set(evidence.estimated):
        champion, challenger = evidence.estimated["champion"], evidence.estimated["challenger"]
        why = f"estimated {metric} {challenger:.4f} against the champion's {champion:.4f}: worse by more than {{limit}}"
        gate("estimated", _worse_by(metric, champion, challenger), policy.max_estimated_drop, operator.le, why)
    else:
        checks["estimated"] = None
    realised = evidence.realised
    if realised is not None and realised.labelled >= policy.min_labelled:
        ok = realised.high >= -policy.max_realised_drop
        checks["realised"] = ok
        if not ok:
            failed.append(
                f"realised {realised.metric} worse on {realised.labelled} labelled records: (challenger - champion) "
                f"{realised.delta:+.4f}, {realised.confidence:.0%} CI {realised.low:+.4f} to {realised.high:+.4f}"
            )
    else:
        checks["realised"] = None
    return checks, failed


def judge(evidence: Evidence, policy: RolloutPolicy) -> Verdict:
    """Promote, roll back or extend a rollout on its evidence (see `RolloutPolicy` for every gate).

    Rolled back at once when serving cut the challenger off; rolled back when a gate fails on enough records;
    extended while records or time are short, while the realised interval is undecided, or while labels are
    required and missing; rolled back when still undecided after `max_seconds`; else promoted.
    """
    if evidence.cut_off:
        return Verdict("rollback", [f"cut off in serving: {evidence.cut_off}"], {"serving": False})
    checks, failed = _gate_checks(evidence, policy)
    checks["serving"] = True
    if failed:
        return Verdict("rollback", failed, checks)
    waiting = []
    if evidence.paired < policy.min_records:
        waiting.append(f"{evidence.paired} of {policy.min_records} records scored by both so far")
    if evidence.seconds < policy.min_seconds:
        waiting.append(f"{evidence.seconds:.0f} of {policy.min_seconds} s so far")
    realised = evidence.realised
    judged = realised is not None and realised.labelled >= policy.min_labelled
    if policy.require_labels and not judged:
        labelled = realised.labelled if realised is not None else 0
        waiting.append(f"{labelled} of {policy.min_labelled} labelled records so far")
    if judged and realised is not None and realised.low < -policy.max_realised_drop:
        waiting.append(
            f"realised {realised.metric} undecided: (challenger - champion) {realised.delta:+.4f}, "
            f"CI {realised.low:+.4f} to {realised.high:+.4f}"
        )
    if waiting and evidence.seconds >= policy.max_seconds:
        return Verdict("rollback", [f"undecided after {policy.max_seconds} s: " + "; ".join(waiting)], checks)
    if waiting:
        return Verdict("extend", waiting, checks)
    passed = [name for name, ok in checks.items() if ok]
    return Verdict("promote", [f"live gates passed on {evidence.paired} records: {', '.join(sorted(passed))}"], checks)
