"""Promotion as the training flow carries it out: review, decide, register, ask approval, promote, record.

`review_and_promote` scores the champion on the candidate's holdout, reviews the candidate, decides, registers
it and promotes it, all under the model's promotion lock (a person's approval is awaited outside it), and
confirms that the serving API answers with the new version, or reverts. `record_run` writes the decision, the
model card and the outcome on the run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from threadpoolctl import threadpool_limits

from adapters.locks import Held, hold
from adapters.promotion import Promotion
from adapters.serving_api import ServingCheck, ServingCheckFailed
from core.data.dataset import DatasetConfig
from core.data.rollout_policy import RolloutPolicy
from core.evaluation.decision import ChampionEvidence, Decision, Gates, decide, decision_markdown, decision_tags
from core.evaluation.review import Review, ReviewInputs
from core.modeling.metrics import Evaluation
from core.promotion.approval import Approval, ApprovalTimeout
from core.promotion.card import CardFacts, make_card
from core.promotion.outcome import describe_outcome
from services.approval import ask_approval
from tasks.evaluation import evaluate_candidate
from tasks.loading import check_still_in_catalog
from tasks.promotion import begin_rollout, ensure_promotion_lock, find_champion, load_champion, promote, revert
from tasks.reports import publish_decision, publish_model_card
from tasks.review import champion_schema, review
from tasks.serving_check import check_serving
from tasks.tracking import log_review, record_decision, register_model

log = logging.getLogger(__name__)

PROMOTION_LOCK_TIMEOUT_SECONDS = 3600


def promotion_lock(lock: str, timeout_seconds: float = PROMOTION_LOCK_TIMEOUT_SECONDS) -> AbstractContextManager[Held]:
    """Hold the model's one-slot promotion lock while deciding and promoting.

    So no run promotes against a stale champion (`tasks.promotion.ensure_promotion_lock` makes the lock); the
    `Held` says how long it was waited for.
    """
    return hold(lock, timeout_seconds=timeout_seconds)


def promote_checked(
    model_name: str,
    version: str,
    expected_champion: str | None,
    serving_timeout: float,
    decision: Decision | None = None,
    run_reason: str = "",
) -> tuple[Promotion | None, Exception | None, ServingCheck | None]:
    """Promote, then keep the promotion only once the serving API answers with it (else revert it).

    The champion history records why: the run's reason (`TrainingParams.reason`) and the decision's reasons.
    Returns the promotion that stands (or None), the error that stopped it, and the serving check.
    """
    why = ([f"run reason: {run_reason}"] if run_reason else []) + (decision.reasons if decision else [])
    try:
        promotion = promote(model_name, version, expected_champion, " | ".join(why))
    except Exception as exc:  # recorded by the caller, then the run fails
        return None, exc, None
    serving = check_serving(model_name, version, serving_timeout)
    if serving.ok:
        return promotion, None, serving
    revert(promotion, serving.detail)
    return None, ServingCheckFailed(f"promotion of v{version} reverted: {serving.detail}"), serving


@dataclass(frozen=True)
class ChampionState:
    """The current champion as the decision sees it: holdout metrics and probabilities, inputs, or the error."""

    version: str | None = None
    proba: Any = None
    metrics: dict[str, float] | None = None
    schema: dict[str, str] | None = None
    error: str | None = None


def current_champion(config: DatasetConfig, holdout: Any) -> ChampionState:
    """Find, load and score the champion on the holdout; a failure is recorded (it blocks promotion)."""
    version = find_champion(config.model_name)
    if version is None:
        return ChampionState()
    try:
        model = load_champion(config.model_name, version)
        scored = evaluate_candidate(model, holdout, config, figures=False)
        schema = champion_schema(config.model_name, version)
    except Exception as exc:  # the decision records why; promotion is then blocked
        return ChampionState(version, error=f"{type(exc).__name__}: {exc}")
    return ChampionState(version, scored.proba, scored.metrics, schema)


@task(name="champion-on-holdout", cache_policy=NO_CACHE)
def score_champion(config: DatasetConfig, holdout: Any) -> ChampionState:
    """Prefect task: `current_champion`, submitted by the flow to run beside the search (same rows, same answer).

    With one OpenMP thread in its own thread (`tasks.review.review`'s `beside` says why): the search has the cores.
    """
    with threadpool_limits(1, user_api="openmp"):  # this thread's pool only
        return current_champion(config, holdout)


@dataclass(frozen=True)
class Prejudged:
    """The champion as scored while the candidate trained, and the review made against it.

    Computed outside the promotion lock, so the decision uses them only when the champion is still the same
    version once the lock is held (`review_and_promote`); otherwise everything is done again against the new one.
    """

    champion: ChampionState
    findings: Review


@dataclass(frozen=True)
class Candidate:
    """A trained and evaluated candidate, logged on run `run_id`.

    Attributes:
        run_id: Its MLflow run.
        model: The fitted pipeline.
        model_uri: Where it was logged (what is registered).
        evaluation: Its metrics and scores on `holdout`.
        holdout: The frozen holdout rows.
        version_tags: Tags of the registered version (data version, served form, fingerprint, ...).
        inference: How it is served (the compiled form's parity line).
    """

    run_id: str
    model: Any
    model_uri: str
    evaluation: Evaluation
    holdout: Any
    version_tags: dict[str, str]
    inference: str | None = None


@dataclass(frozen=True)
class PromotionPolicy:
    """How a candidate is judged and promoted (from the run's parameters).

    Attributes:
        gates: The resolved gates.
        seed: Seeds the review's bootstrap and permutations.
        dry_run: Review and decide, but never register or promote.
        require_approval: Wait for a person's answer before promoting.
        approval_timeout_seconds: How long to wait for it.
        serving_timeout_seconds: How long the serving API may take to answer with the new champion.
        reason: Why the run was started (recorded with the promotion).
        dataset: The dataset reference the run was started with (checked still in the catalog before registering).
        rollout: How a promoted candidate reaches traffic (the run's, else the dataset config's): `direct`
            promotes; `shadow` and `canary` make it the challenger, judged live by the rollout flow.
    """

    gates: Gates
    seed: int
    dry_run: bool = False
    require_approval: bool = False
    approval_timeout_seconds: int = 86_400
    serving_timeout_seconds: float = 120
    reason: str = "manual"
    dataset: str = ""
    rollout: RolloutPolicy = field(default_factory=RolloutPolicy)


@dataclass(frozen=True)
class PromotionResult:
    """What the review, the decision and the promotion came to."""

    findings: Review
    decision: Decision
    version: str | None
    promotion: Promotion | None = None
    error: Exception | None = None
    serving: ServingCheck | None = None
    approval: Approval | None = None
    lock_tags: dict[str, str] = field(default_factory=dict)
    rollout: str | None = None  # what became of it instead of a promotion: under rollout, or waiting

    @property
    def promoted(self) -> bool:
        """Whether the candidate is the champion now."""
        return self.promotion is not None

    def outcome(self, dry_run: bool) -> str:
        """What happened after the decision, in one line."""
        return describe_outcome(self.decision, dry_run, self.promoted, self.error, self.approval, self.rollout)

    def tags(self, outcome: str) -> dict[str, str]:
        """The run's tags about the outcome: promoted, the lock's wait, the serving check, the approval."""
        return (
            {"promoted": str(self.promoted).lower(), "outcome": outcome}
            | self.lock_tags
            | ({"serving_check": self.serving.detail} if self.serving else {})
            | ({"rollout": self.rollout} if self.rollout else {})
            | (self.approval.tags() if self.approval else {})
        )

    def raise_failure(self, model_name: str) -> None:
        """Raise what stopped the promotion (the run then fails), or the approval's expiry."""
        if self.error is not None:
            raise self.error
        if self.approval is not None and not self.approval.answered:
            raise ApprovalTimeout(f"{model_name} v{self.version} was not promoted: {self.approval.describe()}")


def review_and_promote(
    candidate: Candidate, config: DatasetConfig, policy: PromotionPolicy, prejudged: Prejudged | None = None
) -> PromotionResult:
    """Review and decide against the current champion, register, and promote when the decision says so.

    One run at a time per model decides and promotes (the promotion lock), so no run promotes against a stale
    champion. With `require_approval` the person is asked outside the lock; the promotion is then a
    compare-and-set against the champion the decision saw, so a champion that changed meanwhile is never
    replaced blindly. A `prejudged` champion and review (made while the candidate trained) are used when the
    champion under the lock is the version they were made against.
    """
    lock = ensure_promotion_lock(config.model_name)
    with promotion_lock(lock) as held:
        champion, findings = _under_lock(prejudged, config, candidate.holdout)
        findings, decision = _review_and_decide(candidate, config, policy, champion, findings)
        log_review(candidate.run_id, findings)
        check_still_in_catalog(policy.dataset, config.model_name)  # removed meanwhile: nothing registered
        version = (
            None
            if policy.dry_run
            else register_model(candidate.model_uri, config.model_name, candidate.run_id, candidate.version_tags)
        )
        result = PromotionResult(findings, decision, version)
        wanted = decision.promote and version is not None
        deliver = partial(_deliver, candidate, config, policy, champion.version, version, decision)
        if wanted and not policy.require_approval:
            result = replace(result, **deliver(policy.reason))
    result = replace(result, lock_tags=held.tags())  # read once released: the wait, when taken and given back
    if not (wanted and policy.require_approval):
        return result
    approval = ask_approval(decision, config.model_name, version, candidate.run_id, policy.approval_timeout_seconds)
    if not approval.approved:
        return replace(result, approval=approval)
    with promotion_lock(lock):
        return replace(result, approval=approval, **deliver(f"{policy.reason}; {approval.describe()}"))


def _deliver(  # noqa: PLR0913 - what a delivery needs, each named
    candidate: Candidate,
    config: DatasetConfig,
    policy: PromotionPolicy,
    champion: str | None,
    version: str | None,
    decision: Decision,
    reason: str,
) -> dict[str, Any]:
    """Promote the candidate (direct, or a cold start: no champion to compare live), or start its rollout."""
    assert version is not None
    if policy.rollout.mode == "direct" or champion is None:
        promote_now = partial(promote_checked, config.model_name, version, champion, policy.serving_timeout_seconds)
        return _promoted(promote_now(decision, reason))
    why = " | ".join([f"run reason: {reason}", *decision.reasons])
    return {"rollout": begin_rollout(config.model_name, version, champion, policy.rollout, candidate.run_id, why)}


def _under_lock(
    prejudged: Prejudged | None, config: DatasetConfig, holdout: Any
) -> tuple[ChampionState, Review | None]:
    """The champion now (and the prejudged review when it is still the champion it was made against)."""
    if prejudged is not None and find_champion(config.model_name) == prejudged.champion.version:
        return prejudged.champion, prejudged.findings
    if prejudged is not None:
        log.info("the champion changed while the candidate trained: scoring and reviewing against the new one")
    return current_champion(config, holdout), None


def review_inputs(candidate: Any, evaluation: Evaluation, holdout: Any, champion: ChampionState) -> ReviewInputs:
    """What the review compares: the candidate's holdout scores and the champion's."""
    return ReviewInputs(candidate, evaluation.proba, holdout, champion.proba, champion.schema)


def _review_and_decide(
    candidate: Candidate,
    config: DatasetConfig,
    policy: PromotionPolicy,
    champion: ChampionState,
    findings: Review | None = None,
) -> tuple[Review, Decision]:
    if findings is None:
        inputs = review_inputs(candidate.model, candidate.evaluation, candidate.holdout, champion)
        findings = review(inputs, config, policy.gates, policy.seed)
    findings = replace(findings, inference=candidate.inference)
    decision = decide(
        candidate.evaluation.metrics,
        ChampionEvidence(champion.metrics, champion.version, champion.error),
        policy.gates,
        findings.interval(policy.gates.primary_metric),
        findings.checks,
        findings.holdout,
    )
    return findings, decision


def _promoted(outcome: tuple[Promotion | None, Exception | None, ServingCheck | None]) -> dict[str, Any]:
    promotion, error, serving = outcome
    return {"promotion": promotion, "error": error, "serving": serving}


def record_run(facts: CardFacts, run_id: str, tags: dict[str, str], step: Callable[[Any], Callable[..., Any]]) -> None:
    """Record the decision and what came of it on the run and the version, then publish the model card.

    `step` runs each recording task (`services.approval.steps_after`: plain functions once an approval expired).
    """
    decision = facts.decision
    markdown = decision_markdown(decision, facts.model_name, facts.candidate_version, facts.data_version, facts.outcome)
    tags = decision_tags(decision, facts.data_version) | tags
    step(record_decision)(run_id, facts.model_name, facts.candidate_version, tags, markdown, decision.to_json())
    step(publish_model_card)(make_card(facts), run_id)
    step(publish_decision)(markdown)
