"""A validation report: which expectations a snapshot failed, and the error that names them (pure)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

from core.errors import PermanentError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExpectationFailure:
    """One failed expectation, readable without the GX result."""

    expectation: str
    column: str | None
    detail: str

    def __str__(self) -> str:
        where = f" on {self.column!r}" if self.column else ""
        return f"{self.expectation}{where}: {self.detail}"


@dataclass(frozen=True)
class ValidationReport:
    """Outcome of validating one snapshot; `result` is GX's JSON result (samples only, no data copy)."""

    success: bool
    n_expectations: int
    failures: list[ExpectationFailure]
    statistics: dict[str, Any] = field(default_factory=dict)
    result: dict[str, Any] = field(default_factory=dict, repr=False)

    def summary(self) -> str:
        """One line naming every failure."""
        if self.success:
            return f"all {self.n_expectations} expectations passed"
        return f"{len(self.failures)} of {self.n_expectations} expectations failed: " + "; ".join(
            str(f) for f in self.failures
        )

    def to_json(self) -> str:
        """The full report as JSON."""
        return json.dumps(
            {
                "success": self.success,
                "n_expectations": self.n_expectations,
                "summary": self.summary(),
                "failures": [f.__dict__ for f in self.failures],
                "statistics": self.statistics,
                "great_expectations_result": self.result,
            },
            indent=2,
            default=str,
        )

    def to_markdown(self) -> str:
        """A table of failed expectations, or a line saying all passed."""
        if self.success:
            return f"# Data validation: passed\n\nAll {self.n_expectations} expectations passed.\n"
        rows = "\n".join(
            f"| `{f.expectation}` | {f.column or ''} | {f.detail.replace('|', '/')} |" for f in self.failures
        )
        return (
            f"# Data validation: FAILED\n\n{len(self.failures)} of {self.n_expectations} expectations failed.\n\n"
            f"| expectation | column | detail |\n|---|---|---|\n{rows}\n"
        )


def with_leaks(report: ValidationReport, leaks: list[Any], allowed: dict[str, str]) -> ValidationReport:
    """`report` with the leak checks' findings (`core.data.leakage.Leak`).

    A failure for each flagged feature unless the config allows it (`allow_leak: true` with a reason); the
    allowed ones are kept in the statistics.
    """
    refused = [leak for leak in leaks if leak.column not in allowed]
    failures = list(report.failures) + [
        ExpectationFailure(
            f"leakage_check:{leak.check}",
            leak.column,
            f"{leak.detail}; leave the feature out, or mark it `allow_leak: true` with `allow_leak_reason` if it "
            "is known when the model predicts",
        )
        for leak in refused
    ]
    overridden = {
        leak.column: {"check": leak.check, "detail": leak.detail, "reason": allowed[leak.column]}
        for leak in leaks
        if leak.column in allowed
    }
    return ValidationReport(
        success=report.success and not refused,
        n_expectations=report.n_expectations + 1,
        failures=failures,
        statistics=report.statistics | {"leak_checks": {"flagged": len(leaks), "allowed": overridden}},
        result=report.result,
    )


class DataValidationError(PermanentError):
    """A snapshot failed validation; the message lists each failed expectation."""

    def __init__(self, failures: list[ExpectationFailure], report: ValidationReport) -> None:
        self.failures = failures
        self.report = report
        super().__init__(f"data validation failed: {report.summary()}")


def report_from_json(text: str) -> ValidationReport:
    """Rebuild a report written by `ValidationReport.to_json`."""
    raw = json.loads(text)
    return ValidationReport(
        success=raw["success"],
        n_expectations=raw["n_expectations"],
        failures=[ExpectationFailure(**f) for f in raw["failures"]],
        statistics=raw["statistics"],
        result=raw["great_expectations_result"],
    )
