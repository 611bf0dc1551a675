"""Optional human approval before a promotion: the flow pauses and a person answers in the Prefect UI.

The paused run shows a form built from `services.approval.ApprovalInput` (Prefect UI -> the flow run ->
Resume); the answer, who gave it and when are recorded on the run and the model version, and in the card.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from core.evaluation.decision import Decision


class ApprovalTimeout(RuntimeError):
    """Nobody answered the approval request in time, so nothing was promoted.

    The run then fails, as Prefect fails every run whose pause expired.
    """


@dataclass(frozen=True)
class Approval:
    """A reviewer's answer (or the lack of one)."""

    approved: bool
    reviewer: str
    comment: str
    at: str
    answered: bool = True

    @classmethod
    def from_input(cls, answer: Any) -> Approval:
        """From the submitted form."""
        return cls(answer.approve, answer.reviewer, answer.comment, _now())

    @classmethod
    def unanswered(cls, timeout_seconds: int) -> Approval:
        """No answer within the timeout: a rejection nobody gave, recorded as such."""
        return cls(False, "", f"no answer within {timeout_seconds} s", _now(), answered=False)

    @property
    def verdict(self) -> str:
        """approved, rejected or no_answer."""
        if not self.answered:
            return "no_answer"
        return "approved" if self.approved else "rejected"

    def describe(self) -> str:
        """One line for the outcome and the card."""
        if not self.answered:
            return f"not approved: {self.comment} (gave up at {self.at})"
        return f"{self.verdict} by {self.reviewer} at {self.at}" + (f": {self.comment}" if self.comment else "")

    def tags(self) -> dict[str, str]:
        """Tags recorded on the run and the model version."""
        return {
            "approval.decision": self.verdict,
            "approval.reviewer": self.reviewer,
            "approval.comment": self.comment[:4900],
            "approval.at": self.at,
        }


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def approval_request(decision: Decision, model_name: str, version: str, run_id: str) -> str:
    """What the reviewer sees above the form: the decision the pipeline made, its reasons and gates."""
    reasons = "\n".join(f"- {reason}" for reason in decision.reasons)
    gates = "\n".join(f"- {'pass' if c.passed else 'FAIL'} `{c.gate}`: {c.detail}" for c in decision.checks)
    return (
        f"## Approve promotion of `{model_name}` v{version}?\n\n"
        f"The pipeline would promote it over champion `{decision.champion_version or 'none'}`.\n\n{reasons}\n\n"
        f"### Gates\n\n{gates}\n\n"
        f"Plots, intervals, slices and fairness: MLflow run `{run_id}` (`plots/`, `review/review.json`). "
        "The model card is published once you answer."
    )
