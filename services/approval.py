"""Human approval before a promotion: the run pauses on a Prefect form until a person answers or time runs out."""

from __future__ import annotations

import logging

from prefect.input import RunInput
from pydantic import Field

log = logging.getLogger(__name__)


class ApprovalInput(RunInput):
    """The form a reviewer fills in to resume a paused training run."""

    approve: bool = Field(title="Approve the promotion", description="Tick to promote; leave unticked to reject.")
    reviewer: str = Field(min_length=1, max_length=200, title="Your name", description="Recorded with the decision.")
    comment: str = Field("", max_length=2000, title="Comment", description="Why (recorded with the decision).")
