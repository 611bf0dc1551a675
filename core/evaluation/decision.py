"""The promotion decision, a pure function of numbers: gates, the cold-start rule, the champion comparison.

Rules (stated once, here):
- Absolute gates: the candidate's holdout metrics must clear every configured threshold of its task.
- Calibration gate (classification): the holdout's expected calibration error (`ece`,
  `core.modeling.calibration`) must be at most `max_calibration_error`, judged on the point estimate
  (ECE is biased upwards on a finite holdout already, so no bootstrap bound is taken).
- Review gates (computed in `core.evaluation.review`): slices, fairness, model size, latency, input schema.
- Cold start: no champion; the holdout must be big enough and every absolute gate must hold on the
  pessimistic bound of the metric's bootstrap interval.
- Otherwise the lower bound of the paired bootstrap interval of the improvement on the primary metric
  must be above 0 and at least `min_delta`.
- A champion that cannot be loaded or scored blocks promotion.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field

from core.data.dataset import TaskType
from core.modeling.metrics import LOWER_IS_BETTER, metrics_for

if TYPE_CHECKING:
    from core.evaluation.significance import DeltaInterval, MetricInterval

log = logging.getLogger(__name__)


class Gates(BaseModel):
    """Thresholds a candidate must pass to be promoted."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    primary_metric: Literal["roc_auc", "pr_auc", "f1", "log_loss", "brier", "rmse", "mae", "r2"] | None = Field(
        None,
        title="Primary metric",
        description="Metric the candidate must improve over the champion; empty for the task's default "
        "(roc_auc for binary and multiclass, macro-averaged; rmse for regression).",
    )
    min_delta: float = Field(
        0.0,
        ge=0,
        title="Minimum improvement",
        description="The lower bound of the improvement's confidence interval (same holdout rows, paired "
        "bootstrap) must be above 0 and at least this.",
    )
    confidence: float = Field(
        0.95, ge=0.5, le=0.999, title="Confidence", description="Coverage of the improvement's interval."
    )
    n_resamples: int = Field(
        1000, ge=100, le=20_000, title="Bootstrap resamples", description="Paired bootstrap resamples."
    )
    min_roc_auc: float | None = Field(0.7, ge=0, le=1, title="Minimum ROC AUC")
    min_pr_auc: float | None = Field(None, ge=0, le=1, title="Minimum PR AUC")
    min_f1: float | None = Field(None, ge=0, le=1, title="Minimum F1")
    max_log_loss: float | None = Field(None, gt=0, title="Maximum log loss")
    max_brier: float | None = Field(None, gt=0, title="Maximum Brier score")
    max_calibration_error: float | None = Field(
        0.1,
        gt=0,
        le=1,
        title="Maximum calibration error",
        description="Classification only: the holdout's expected calibration error (10 equal-width bins of the "
        "positive class's probability; the top label's for multiclass) must be at most this; empty for no "
        "calibration gate. The default is generous: a model whose probabilities are 10 points off on average "
        "is not one to read probabilities from.",
    )
    max_rmse: float | None = Field(None, gt=0, title="Maximum RMSE", description="Regression only.")
    max_mae: float | None = Field(None, gt=0, title="Maximum MAE", description="Regression only.")
    min_r2: float | None = Field(
        0.0,
        le=1,
        title="Minimum R²",
        description="Regression only; 0 is a model that predicts the mean, so the default asks for better.",
    )
    min_holdout_rows: int = Field(
        100,
        ge=1,
        title="Minimum holdout rows",
        description="With fewer frozen holdout rows nothing is promoted: the holdout is too small to judge.",
    )
    min_holdout_per_class: int = Field(
        10,
        ge=1,
        title="Minimum holdout rows per class",
        description="Classification: every class needs this many holdout rows for a promotion.",
    )
    max_slice_drop: float | None = Field(
        0.05,
        ge=0,
        title="Maximum slice drop",
        description="Largest drop of the primary metric against the champion on any slice large enough to "
        "measure (dataset config `slices`); empty for no slice gate.",
    )
    max_dp_difference: float | None = Field(
        None,
        ge=0,
        le=1,
        title="Maximum demographic parity difference",
        description="Fairness gate on each sensitive feature (reported always; gated only when set).",
    )
    max_eo_difference: float | None = Field(
        None, ge=0, le=1, title="Maximum equalised odds difference", description="Fairness gate, as above."
    )
    max_model_mb: float | None = Field(500.0, gt=0, title="Maximum model size (MB)")
    max_latency_ms: float | None = Field(
        200.0, gt=0, title="Maximum latency (ms)", description="Median single-record prediction time."
    )
    allow_schema_change: bool = Field(
        False,
        title="Allow input schema change",
        description="Promote even when the candidate's inputs would break callers of the serving API.",
    )


DEFAULT_PRIMARY = {TaskType.binary: "roc_auc", TaskType.multiclass: "roc_auc", TaskType.regression: "rmse"}


def resolve_gates(gates: Gates, task: TaskType) -> Gates:
    """The gates with the task's default primary metric filled in; a metric of another task is refused.

    Raises:
        ValueError: The primary metric does not apply to the task (e.g. roc_auc for a regression).
    """
    primary = gates.primary_metric or DEFAULT_PRIMARY[task]
    allowed = metrics_for(task)
    if primary not in allowed:
        raise ValueError(
            f"gates.primary_metric {primary!r} does not apply to a {task.value} task: use one of {list(allowed)}"
        )
    return gates.model_copy(update={"primary_metric": primary})


class GateResult(NamedTuple):
    """One gate of the promotion: its name, whether it passed, and the numbers behind it."""

    gate: str
    passed: bool
    detail: str


@dataclass(frozen=True)
class Decision:
    """Whether to promote, and why, with both models' numbers and every gate's result."""

    promote: bool
    reasons: list[str]
    candidate_metrics: dict[str, float]
    champion_version: str | None = None
    champion_metrics: dict[str, float] | None = None
    primary_metric: str | None = "roc_auc"
    gates: dict[str, Any] = field(default_factory=dict)
    interval: dict[str, Any] | None = None
    checks: list[GateResult] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        """`promote` or `reject`."""
        return "promote" if self.promote else "reject"

    def to_json(self) -> str:
        """Serialisable record of the decision."""
        record = asdict(self) | {"verdict": self.verdict, "checks": [c._asdict() for c in self.checks]}
        return json.dumps(record, indent=2, sort_keys=True)


def configured_bounds(gates: Gates) -> list[tuple[str, float, Literal["min", "max"]]]:
    """Every absolute threshold that is set: (metric, bound, min or max)."""
    bounds: list[tuple[str, float | None, Literal["min", "max"]]] = [
        ("roc_auc", gates.min_roc_auc, "min"),
        ("pr_auc", gates.min_pr_auc, "min"),
        ("f1", gates.min_f1, "min"),
        ("log_loss", gates.max_log_loss, "max"),
        ("brier", gates.max_brier, "max"),
        ("rmse", gates.max_rmse, "max"),
        ("mae", gates.max_mae, "max"),
        ("r2", gates.min_r2, "min"),
    ]
    return [(metric, bound, kind) for metric, bound, kind in bounds if bound is not None]


def _relation(kind: str, passed: bool) -> str:
    if kind == "min":
        return "is at least" if passed else "is below the minimum"
    return "is at most" if passed else "is above the maximum"


def absolute_gates(
    metrics: dict[str, float], gates: Gates, intervals: Sequence[MetricInterval] | None = None
) -> list[GateResult]:
    """Each configured threshold that applies to the task, on the candidate's holdout metrics, passed or not.

    With `intervals` (cold start) a threshold is judged on the pessimistic bound of the metric's bootstrap
    interval (the lower bound of a score, the upper bound of a loss), not on the point estimate.
    """
    by_metric = {i.metric: i for i in intervals or []}
    results = []
    for metric, bound, kind in configured_bounds(gates):
        if metric not in metrics:  # a gate of the other kind of task (e.g. min_roc_auc on a regression)
            continue
        if intervals is None:
            value = metrics[metric]
            passed = value >= bound if kind == "min" else value <= bound
            detail = f"{metric} {value:.4f} {_relation(kind, passed)} {bound:.4f}"
        else:
            if metric not in by_metric:  # fail closed: nothing to judge the model on
                detail = f"{metric}: no bootstrap interval (the holdout is empty or misses a class)"
                results.append(GateResult(f"{kind}_{metric}", False, detail))
                continue
            interval = by_metric[metric]
            value = interval.pessimistic(metric in LOWER_IS_BETTER)
            side = "upper" if metric in LOWER_IS_BETTER else "lower"
            passed = value >= bound if kind == "min" else value <= bound
            detail = (
                f"{metric} {interval.confidence:.0%} CI {side} bound {value:.4f} (point {interval.value:.4f}, "
                f"{interval.n_resamples} bootstrap resamples) {_relation(kind, passed)} {bound:.4f}"
            )
        results.append(GateResult(f"{kind}_{metric}", passed, detail))
    return results


def calibration_gate(metrics: dict[str, float], gates: Gates) -> list[GateResult]:
    """The `max_calibration_error` gate on the holdout's ECE: [] when it is off or the metrics have no `ece`.

    A regressor's metrics have no `ece`, nor do metrics computed without it (`compute_metrics` alone).
    """
    bound = gates.max_calibration_error
    if bound is None or "ece" not in metrics:
        return []
    value = metrics["ece"]
    passed = value <= bound  # NaN (no holdout rows) fails
    detail = f"expected calibration error (ece) {value:.4f} on the holdout {_relation('max', passed)} {bound:.4f}"
    return [GateResult("max_calibration_error", passed, detail)]


@dataclass(frozen=True)
class HoldoutEvidence:
    """What a cold start is judged on: how big the holdout is and the candidate's bootstrap intervals.

    Attributes:
        n_rows: Frozen holdout rows.
        class_counts: Holdout rows per class (classification); empty for regression.
        intervals: The candidate's bootstrap intervals of every metric with an absolute gate.
    """

    n_rows: int
    class_counts: dict[str, int]
    intervals: list[MetricInterval]


def holdout_size_gate(evidence: HoldoutEvidence, gates: Gates) -> GateResult:
    """Is the holdout big enough to judge a model without a champion to compare with?"""
    problems = []
    if evidence.n_rows < gates.min_holdout_rows:
        problems.append(f"{evidence.n_rows} holdout rows < min_holdout_rows {gates.min_holdout_rows}")
    small = {c: n for c, n in evidence.class_counts.items() if n < gates.min_holdout_per_class}
    if small:
        listed = ", ".join(f"{c}: {n}" for c, n in small.items())
        problems.append(f"classes with fewer than min_holdout_per_class {gates.min_holdout_per_class} rows ({listed})")
    if problems:
        return GateResult("holdout_size", False, "; ".join(problems))
    per_class = (
        f"; at least {min(evidence.class_counts.values())} per class (minimum {gates.min_holdout_per_class})"
        if evidence.class_counts
        else ""
    )
    return GateResult(
        "holdout_size", True, f"{evidence.n_rows} holdout rows (minimum {gates.min_holdout_rows}){per_class}"
    )


@dataclass(frozen=True)
class ChampionEvidence:
    """The champion as the decision sees it.

    Attributes:
        metrics: Its metrics on the candidate's holdout rows (None at cold start or when it could not be scored).
        version: Its registered version, if there is one.
        error: Why it could not be scored (blocks promotion).
    """

    metrics: dict[str, float] | None = None
    version: str | None = None
    error: str | None = None


NO_CHAMPION = ChampionEvidence()


def decide(
    candidate: dict[str, float],
    incumbent: ChampionEvidence,
    gates: Gates,
    interval: DeltaInterval | None = None,
    checks: Sequence[GateResult] = (),
    holdout: HoldoutEvidence | None = None,
) -> Decision:
    """The promotion decision: a pure function of the metrics, the intervals and the gates.

    The reasons say one consistent thing: a rule is stated as applying only when it decided the outcome.

    Args:
        candidate: The candidate's holdout metrics.
        incumbent: The champion's metrics on the same rows, its version, or why it could not be scored.
        gates: Thresholds (`primary_metric` empty means the task's default, told by the metrics' kind).
        interval: Paired bootstrap interval of the improvement on the primary metric (needed with a champion).
        checks: Review gates (slices, fairness, size, latency, schema) already evaluated.
        holdout: The holdout's size and the candidate's bootstrap intervals (needed at cold start).
    """
    if gates.primary_metric is None:
        gates = resolve_gates(gates, TaskType.regression if "rmse" in candidate else TaskType.binary)
    cold_start = incumbent.metrics is None and incumbent.error is None
    if cold_start and holdout is None:
        raise ValueError("judging a cold start needs the holdout evidence (size and bootstrap intervals)")
    results = [
        *absolute_gates(candidate, gates, holdout.intervals if cold_start and holdout else None),
        *calibration_gate(candidate, gates),
        *checks,
    ]
    if cold_start and holdout is not None:
        results.insert(0, holdout_size_gate(holdout, gates))
    failed = [r for r in results if not r.passed]
    reasons = [
        f"gate failed: {r.detail}" if r.gate.startswith(("min_", "max_")) else f"gate failed: {r.gate}: {r.detail}"
        for r in failed
    ]
    if not failed:
        reasons.append(f"all {len(results)} absolute and review gates passed ({', '.join(r.gate for r in results)})")
    if incumbent.error is not None:
        reasons.append(f"current champion v{incumbent.version} could not be scored: {incumbent.error}; not promoted")
        promote = False
    elif cold_start:
        promote = not failed
        reasons.append(_cold_start_reason(len(failed)))
    else:
        beats, reason = _beats_champion(interval, gates, incumbent.version)
        results.append(beats)
        reasons.append(reason)
        promote = not failed and beats.passed
        if beats.passed and failed:
            reasons.append(f"not promoted: it beats the champion, but {len(failed)} gate(s) failed")
    return Decision(
        promote,
        reasons,
        candidate,
        incumbent.version,
        incumbent.metrics,
        gates.primary_metric,
        gates.model_dump(),
        None if interval is None else asdict(interval),
        results,
    )


def _cold_start_reason(failed: int) -> str:
    if failed:
        return f"cold start: no champion yet; not promoted because {failed} gate(s) failed"
    return (
        "cold start: no champion yet; the holdout is large enough and every absolute gate holds on the "
        "pessimistic bound of its bootstrap interval, so the candidate is promoted"
    )


def _beats_champion(
    interval: DeltaInterval | None, gates: Gates, champion_version: str | None
) -> tuple[GateResult, str]:
    """The `beats_champion` gate (the improvement's lower bound is > 0 and >= min_delta) and its reason."""
    primary = gates.primary_metric
    if interval is None or interval.metric != primary:
        raise ValueError(f"comparing with a champion needs the paired interval of {primary}")
    beats = interval.low > 0 and interval.low >= gates.min_delta
    reason = (
        f"{primary}: candidate {interval.candidate:.4f} vs champion v{champion_version} {interval.champion:.4f}, "
        f"improvement {interval.delta:+.4f} with {interval.confidence:.0%} CI [{interval.low:+.4f}, "
        f"{interval.high:+.4f}]; the lower bound must be > 0 and >= {gates.min_delta:.4f}: "
        f"{'beats' if beats else 'does not beat'} the champion"
        + ("" if beats or interval.delta <= 0 else " beyond noise")
    )
    return GateResult("beats_champion", beats, interval.describe()), reason


def decision_markdown(
    decision: Decision, model_name: str, candidate_version: str | None, data_version: str, outcome: str
) -> str:
    """A readable summary (Prefect artifact, MLflow run text)."""
    lines = [
        f"# Promotion decision: **{decision.verdict.upper()}**",
        "",
        f"**Outcome:** {outcome}",
        "",
        f"- model: `{model_name}`; candidate version: `{candidate_version or 'not registered (dry run)'}`",
        f"- current champion: `{decision.champion_version or 'none'}`; data version: `{data_version}`",
        f"- primary metric: `{decision.primary_metric}`",
        "",
        "## Reasons",
        *[f"- {reason}" for reason in decision.reasons],
        "",
        "## Gates",
        "| gate | result | detail |",
        "|---|---|---|",
        *[f"| {c.gate} | {'pass' if c.passed else '**FAIL**'} | {c.detail} |" for c in decision.checks],
        "",
        "## Holdout metrics",
        "| metric | candidate | champion |",
        "|---|---|---|",
    ]
    for metric, value in decision.candidate_metrics.items():
        champ = decision.champion_metrics.get(metric) if decision.champion_metrics else None
        lines.append(f"| {metric} | {value:.4f} | {'' if champ is None else f'{champ:.4f}'} |")
    return "\n".join(lines) + "\n"


def decision_tags(decision: Decision, data_version: str) -> dict[str, str]:
    """Tags recorded on the model version and the run."""
    tags = {
        "decision": decision.verdict,
        "decision.reasons": " | ".join(decision.reasons)[:4900],
        "decision.champion_version": decision.champion_version or "none",
        "decision.primary_metric": decision.primary_metric,
        "decision.failed_gates": ",".join(c.gate for c in decision.checks if not c.passed) or "none",
        "data_version": data_version,
    }
    if decision.interval is not None:
        tags |= {f"decision.delta_{k}": f"{decision.interval[k]:.6f}" for k in ("delta", "low", "high")}
    tags |= {f"candidate.{k}": f"{v:.6f}" for k, v in decision.candidate_metrics.items()}
    if decision.champion_metrics:
        tags |= {f"champion.{k}": f"{v:.6f}" for k, v in decision.champion_metrics.items()}
    return tags
