"""What happened after a decision, in one line: promoted, rejected, a failed promotion or an approval's answer."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from core.evaluation.decision import Decision
    from core.promotion.approval import Approval

log = logging.getLogger(__name__)


def describe_outcome(
    decision: Decision,
    dry_run: bool,
    promoted: bool,
    error: Exception | None,
    approval: Approval | None = None,
    rollout: str | None = None,
) -> str:
    """What actually happened after the decision, in one line (`rollout`: what became of it instead of a promotion)."""
    if rollout is not None:
        return rollout
    if promoted:
        approved = f" ({approval.describe()})" if approval is not None else ""
        return f"promoted: the candidate is the new champion{approved}"
    if approval is not None and not approval.approved:
        return f"not promoted, the champion is unchanged: {approval.describe()}"
    if error is not None:
        return f"promotion failed, the champion is unchanged: {type(error).__name__}: {error}"
    if decision.promote and dry_run:
        return "dry run: would have been promoted, nothing was registered"
    return "not promoted: the champion is unchanged"
