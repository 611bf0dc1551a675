"""Human approval before a promotion: the run pauses on a Prefect form until a person answers or time runs out."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from prefect import Task
from prefect.exceptions import FlowPauseTimeout
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput
from pydantic import Field

from core.evaluation.decision import Decision
from core.promotion.approval import Approval, approval_request
from tasks.reports import publish_approval_request

log = logging.getLogger(__name__)


class ApprovalInput(RunInput):
    """The form a reviewer fills in to resume a paused training run."""

    approve: bool = Field(title="Approve the promotion", description="Tick to promote; leave unticked to reject.")
    reviewer: str = Field(min_length=1, max_length=200, title="Your name", description="Recorded with the decision.")
    comment: str = Field("", max_length=2000, title="Comment", description="Why (recorded with the decision).")


def ask_approval(decision: Decision, model_name: str, version: str, run_id: str, timeout: int) -> Approval:
    """Pause the run until a person approves or rejects in the Prefect UI (or the timeout passes)."""
    request = approval_request(decision, model_name, version, run_id)
    publish_approval_request(request)
    try:
        answer = pause_flow_run(
            wait_for_input=ApprovalInput.with_initial_data(description=request),
            timeout=timeout,
            poll_interval=2,
            key=f"approve-{model_name}-v{version}",
        )
    except FlowPauseTimeout:
        return Approval.unanswered(timeout)
    return Approval.from_input(answer)


def steps_after(approval: Approval | None) -> Callable[[Task], Callable[..., Any]]:
    """How the remaining steps run.

    Once an approval pause has expired, Prefect keeps the run paused until it fails and runs none of its
    tasks, so the records are then written by calling the tasks' functions.
    """
    if approval is not None and not approval.answered:
        return lambda step: step.fn
    return lambda step: step
