"""Decide and promote: a pure decision from numbers, then a small, atomic change of the registry alias.

Rules (stated once, here):
- Absolute gates: the candidate's holdout metrics must clear every configured threshold.
- Cold start: with no champion, a candidate that clears the gates is promoted.
- Otherwise the champion is scored on the same holdout rows now, and the candidate must beat it on the
  primary metric by at least `min_delta` (in the metric's better direction).
- A champion that cannot be loaded or scored blocks promotion (a person should look), never silently
  hands over.
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict, Field

from mlops.clients import mlflow_client
from mlops.settings import get_settings
from tasks.evaluation import LOWER_IS_BETTER
from tasks.retrying import IO_RETRIES, IO_RETRY_DELAYS, PermanentError, retry_unless_permanent

log = logging.getLogger(__name__)

CHAMPION = "champion"
PREVIOUS = "previous"


class Gates(BaseModel):
    """Thresholds a candidate must pass to be promoted."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    primary_metric: Literal["roc_auc", "pr_auc", "f1", "log_loss", "brier"] = Field(
        "roc_auc", title="Primary metric", description="Metric the candidate must improve over the champion."
    )
    min_delta: float = Field(
        0.0,
        ge=0,
        title="Minimum improvement",
        description="How much better than the champion (on the same holdout) the candidate must be.",
    )
    min_roc_auc: float | None = Field(0.7, ge=0, le=1, title="Minimum ROC AUC")
    min_pr_auc: float | None = Field(None, ge=0, le=1, title="Minimum PR AUC")
    min_f1: float | None = Field(None, ge=0, le=1, title="Minimum F1")
    max_log_loss: float | None = Field(None, gt=0, title="Maximum log loss")
    max_brier: float | None = Field(None, gt=0, title="Maximum Brier score")


@dataclass(frozen=True)
class Decision:
    """Whether to promote, and why, with both models' numbers."""

    promote: bool
    reasons: list[str]
    candidate_metrics: dict[str, float]
    champion_version: str | None = None
    champion_metrics: dict[str, float] | None = None
    primary_metric: str = "roc_auc"
    gates: dict[str, Any] = field(default_factory=dict)

    @property
    def verdict(self) -> str:
        """`promote` or `reject`."""
        return "promote" if self.promote else "reject"

    def to_json(self) -> str:
        """Serialisable record of the decision."""
        return json.dumps(asdict(self) | {"verdict": self.verdict}, indent=2, sort_keys=True)


def _gate_failures(metrics: dict[str, float], gates: Gates) -> list[str]:
    checks = [
        ("roc_auc", gates.min_roc_auc, "min"),
        ("pr_auc", gates.min_pr_auc, "min"),
        ("f1", gates.min_f1, "min"),
        ("log_loss", gates.max_log_loss, "max"),
        ("brier", gates.max_brier, "max"),
    ]
    failures = []
    for metric, bound, kind in checks:
        if bound is None:
            continue
        value = metrics[metric]
        if (kind == "min" and value < bound) or (kind == "max" and value > bound):
            relation = "below the minimum" if kind == "min" else "above the maximum"
            failures.append(f"gate failed: {metric} {value:.4f} is {relation} {bound:.4f}")
    return failures


def improvement(metric: str, candidate: float, champion: float) -> float:
    """Candidate minus champion, signed so that positive always means better."""
    return champion - candidate if metric in LOWER_IS_BETTER else candidate - champion


def decide(
    candidate: dict[str, float],
    champion: dict[str, float] | None,
    champion_version: str | None,
    gates: Gates,
    champion_error: str | None = None,
) -> Decision:
    """The promotion decision: a pure function of the metrics and the gates."""
    reasons = _gate_failures(candidate, gates)
    passed_gates = not reasons
    primary = gates.primary_metric
    if passed_gates:
        reasons.append("all absolute gates passed")
    if champion_error is not None:
        reasons.append(f"current champion v{champion_version} could not be scored: {champion_error}")
        promote = False
    elif champion is None:
        reasons.append("cold start: no champion yet, so a candidate that passes the gates is promoted")
        promote = passed_gates
    else:
        delta = improvement(primary, candidate[primary], champion[primary])
        beats = delta > 0 and delta >= gates.min_delta
        reasons.append(
            f"{primary}: candidate {candidate[primary]:.4f} vs champion v{champion_version} "
            f"{champion[primary]:.4f} (improvement {delta:+.4f}, required > 0 and >= {gates.min_delta:.4f}): "
            f"{'beats' if beats else 'does not beat'} the champion"
        )
        promote = passed_gates and beats
    return Decision(promote, reasons, candidate, champion_version, champion, primary, gates.model_dump())


def describe_outcome(decision: Decision, dry_run: bool, promoted: bool, error: Exception | None) -> str:
    """What actually happened after the decision, in one line."""
    if promoted:
        return "promoted: the candidate is the new champion"
    if error is not None:
        return f"promotion failed, the champion is unchanged: {type(error).__name__}: {error}"
    if decision.promote and dry_run:
        return "dry run: would have been promoted, nothing was registered"
    return "not promoted: the champion is unchanged"


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
        "data_version": data_version,
    }
    tags |= {f"candidate.{k}": f"{v:.6f}" for k, v in decision.candidate_metrics.items()}
    if decision.champion_metrics:
        tags |= {f"champion.{k}": f"{v:.6f}" for k, v in decision.champion_metrics.items()}
    return tags


class PromotionConflict(PermanentError):
    """The champion changed between the decision and the promotion; nothing was changed."""


def champion_version(model_name: str) -> str | None:
    """Version currently holding the `champion` alias, or None (no registered model or no alias)."""
    from mlflow.exceptions import MlflowException

    client = mlflow_client(get_settings())
    try:
        aliases = client.get_registered_model(model_name).aliases
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    version = aliases.get(CHAMPION)
    return None if version is None else str(version)


def promotion_lock_name(model_name: str) -> str:
    """Name of the Prefect global concurrency limit that serialises decide-and-promote per model."""
    return f"promotion-{model_name}"


@task(name="promotion-lock", retries=IO_RETRIES, retry_delay_seconds=IO_RETRY_DELAYS, cache_policy=NO_CACHE)
def ensure_promotion_lock(model_name: str) -> str:
    """Prefect task: make sure the one-slot concurrency limit for this model exists; returns its name."""
    from prefect.client.orchestration import get_client

    name = promotion_lock_name(model_name)
    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(name, limit=1)
    return name


@task(name="find-champion", retries=IO_RETRIES, retry_delay_seconds=IO_RETRY_DELAYS, cache_policy=NO_CACHE)
def find_champion(model_name: str) -> str | None:
    """Prefect task: the current champion's version, if any."""
    return champion_version(model_name)


@task(name="load-champion", retries=IO_RETRIES, retry_delay_seconds=IO_RETRY_DELAYS, cache_policy=NO_CACHE)
def load_champion(model_name: str, version: str) -> Any:
    """Prefect task: the champion's fitted pipeline (sklearn flavour, so it gives probabilities)."""
    import mlflow.sklearn

    mlflow_client(get_settings())
    return mlflow.sklearn.load_model(f"models:/{model_name}/{version}")


@dataclass(frozen=True)
class Promotion:
    """An alias move that happened: enough to undo it exactly."""

    model_name: str
    version: str
    replaced: str | None
    replaced_previous: str | None
    promoted_at: str


def promote_version(model_name: str, version: str, expected_champion: str | None) -> Promotion:
    """Move `champion` to `version` and `previous` to the replaced champion.

    Compare-and-set: if the champion is no longer `expected_champion` (another run promoted since the
    decision), nothing changes and `PromotionConflict` is raised. The champion alias moves in one call;
    if recording `previous` then fails, the champion is put back, so a failure leaves the old champion.
    The version gets a `promoted_at` tag (UTC, ISO 8601), which the serving API reports.
    """
    client = mlflow_client(get_settings())
    current = champion_version(model_name)
    if current != expected_champion:
        raise PromotionConflict(
            f"champion of {model_name!r} is v{current}, not v{expected_champion} as when the decision was "
            "made; not promoting against a stale champion"
        )
    old_previous = client.get_registered_model(model_name).aliases.get(PREVIOUS)
    promoted_at = datetime.now(UTC).isoformat(timespec="seconds")
    client.set_model_version_tag(model_name, version, "promoted_at", promoted_at)
    client.set_registered_model_alias(model_name, CHAMPION, version)
    if current is not None:
        try:
            client.set_registered_model_alias(model_name, PREVIOUS, current)
        except Exception:
            log.exception("recording alias %r failed; restoring champion v%s", PREVIOUS, current)
            client.set_registered_model_alias(model_name, CHAMPION, current)
            raise
    log.info("%s: champion v%s -> v%s", model_name, current, version)
    return Promotion(model_name, version, current, None if old_previous is None else str(old_previous), promoted_at)


def revert_promotion(promotion: Promotion, reason: str) -> None:
    """Undo `promotion`: `champion` and `previous` go back to where they were; the reason is tagged.

    Compare-and-set again: if the champion moved since (another promotion or a rollback), nothing is
    undone and `PromotionConflict` says so. After a cold-start promotion the `champion` alias is removed.
    """
    client = mlflow_client(get_settings())
    name, version = promotion.model_name, promotion.version
    current = champion_version(name)
    if current != version:
        raise PromotionConflict(f"champion of {name!r} is v{current}, not v{version}: not reverting its promotion")
    for alias, target in ((CHAMPION, promotion.replaced), (PREVIOUS, promotion.replaced_previous)):
        if target is None:
            with contextlib.suppress(Exception):  # absent already
                client.delete_registered_model_alias(name, alias)
        else:
            client.set_registered_model_alias(name, alias, target)
    client.delete_model_version_tag(name, version, "promoted_at")
    client.set_model_version_tag(name, version, "rolled_back", reason[:4900])
    log.warning("%s: promotion of v%s reverted (champion back to v%s): %s", name, version, promotion.replaced, reason)


@task(
    name="promote",
    retries=IO_RETRIES,
    retry_delay_seconds=IO_RETRY_DELAYS,
    retry_condition_fn=retry_unless_permanent,
    cache_policy=NO_CACHE,
)
def promote(model_name: str, version: str, expected_champion: str | None) -> Promotion:
    """Prefect task: atomic, compare-and-set promotion (see `promote_version`)."""
    return promote_version(model_name, version, expected_champion)


@task(
    name="revert-promotion",
    retries=IO_RETRIES,
    retry_delay_seconds=IO_RETRY_DELAYS,
    retry_condition_fn=retry_unless_permanent,
    cache_policy=NO_CACHE,
)
def revert(promotion: Promotion, reason: str) -> None:
    """Prefect task: undo a promotion (see `revert_promotion`)."""
    revert_promotion(promotion, reason)
