"""The retraining flow: load, validate, split, train, evaluate, then promote only if it is safe.

This module wires tasks and handles state: the rules live in `core/` (search, metrics, decision, review),
the I/O in `adapters/`, the Prefect tasks in `tasks/`, promotion and approval in `services/`.
Run it ad hoc with `mlops train` (or `python -m mlops train`).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, replace
from typing import Any

from prefect import flow
from prefect.runtime import flow_run
from pydantic import BaseModel, ConfigDict, Field

from core.dask_engine.split import DaskSplit
from core.data.dataset import DatasetConfig
from core.data.fingerprint import Comparison, Fingerprint, compare, nothing_new_markdown
from core.data.rollout_policy import RolloutPolicy
from core.data.split import Split
from core.evaluation.decision import Decision, Gates, resolve_gates
from core.modeling.search import SearchSpec
from core.promotion.card import CardFacts
from services.approval import steps_after
from services.promotion import (
    Candidate,
    Prejudged,
    PromotionPolicy,
    PromotionResult,
    record_run,
    review_and_promote,
    review_inputs,
    score_champion,
)
from tasks.compile import compile_check, log_compiled
from tasks.dask_training import choose_snapshot_engine
from tasks.data_versions import frozen_fingerprint, log_run_inputs
from tasks.evaluation import evaluate_candidate
from tasks.loading import load_dataset_config
from tasks.monitoring import log_reference
from tasks.preparation import PreparedData, fit_candidate, prepare_data, split_data
from tasks.reports import publish_decision
from tasks.review import explain, explained, review
from tasks.tracking import (
    ChampionRecord,
    champion_record,
    end_run,
    explain_outage,
    fingerprint_run,
    git_commit,
    log_evaluation,
    log_importances,
    log_model,
    record_decision,
    start_run,
)
from tasks.warmup import warm_imports


class TrainingParams(BaseModel):
    """Parameters of one retraining run (shown as a form in the Prefect UI)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    dataset: str = Field(
        "credit-risk",
        title="Dataset",
        description="A bundled dataset name (credit-risk), a local YAML path or an s3:// URI of a dataset config.",
    )
    search: SearchSpec = Field(default_factory=SearchSpec, title="Search", description="Model search budget.")
    gates: Gates = Field(default_factory=Gates, title="Gates", description="Promotion thresholds.")
    dry_run: bool = Field(False, title="Dry run", description="Train and evaluate, but never register or promote.")
    seed: int = Field(42, title="Seed", description="Seeds sampling, folds and models, for reproducible runs.")
    data_version: str | None = Field(
        None,
        max_length=64,
        title="Data version",
        description="Train on this frozen data version of the model (`mlops data versions MODEL` lists them) "
        "instead of the source as it is now; empty: read the source (and freeze it).",
    )
    reason: str = Field(
        "manual",
        max_length=500,
        title="Reason",
        description="Why this run was started (e.g. scheduled, drift: ...); recorded on the run and in the history.",
    )
    require_approval: bool = Field(
        False,
        title="Require approval",
        description="Pause before promoting until a person approves or rejects in the Prefect UI (flow run -> Resume).",
    )
    approval_timeout_seconds: int = Field(
        86_400, ge=10, le=7 * 86_400, title="Approval timeout (s)", description="No answer by then: not promoted."
    )
    force: bool = Field(
        False,
        title="Force retraining",
        description="Train even when the data, dataset config, parameters and code are the champion's "
        "(otherwise such a run records 'nothing new' and stops).",
    )
    serving_timeout_seconds: float = Field(
        120,
        gt=0,
        le=3600,
        title="Serving check timeout (s)",
        description="After a promotion, how long the serving API (MLOPS_SERVING_URL) may take to serve the new "
        "champion before the promotion is reverted.",
    )
    rollout: RolloutPolicy | None = Field(
        None,
        title="Rollout",
        description="How a candidate that passes reaches traffic: direct, shadow or canary (judged live by "
        "`rollout/<model>`); empty: the dataset config's `operations.rollout`.",
    )


@dataclass(frozen=True)
class TrainingOutcome:
    """What a run did."""

    run_id: str
    data_version: str
    decision: Decision
    candidate_version: str | None
    promoted: bool
    previous_champion: str | None
    nothing_new: str | None = None  # why nothing was trained (same fingerprint as the champion's), else None


def _nothing_new(
    params: TrainingParams,
    config: DatasetConfig,
    gates: Gates,
    run: Fingerprint,
    champion: ChampionRecord,
    why: Comparison,
) -> TrainingOutcome:
    """Record on an MLflow run and the Prefect run that nothing new was trained, and why; promote nothing."""
    data_version = champion.data_version or run.data
    run_id = start_run(
        config,
        params.model_dump(mode="json") | {"data_version": data_version, "source": config.source},
        {"prefect_flow_run_id": str(flow_run.get_id()), "trigger_reason": params.reason} | run.tags(),
    )
    decision = Decision(False, [why.reason], {}, champion.version, champion.metrics, gates.primary_metric)
    markdown = nothing_new_markdown(config.model_name, why, run, data_version)
    tags = {"decision": "nothing_new", "decision.reasons": why.reason, "outcome": why.reason, "promoted": "false"}
    record_decision(
        run_id,
        config.model_name,
        None,
        tags | {"decision.champion_version": str(champion.version), "data_version": data_version},
        markdown,
        decision.to_json(),
    )
    publish_decision(markdown)
    end_run(run_id, "FINISHED")
    return TrainingOutcome(run_id, data_version, decision, None, False, None, nothing_new=why.reason)


@flow(
    name="training",
    description="Retrain, evaluate on a frozen holdout, promote only when it is safe.",
    # Everything worth keeping goes to MLflow and S3 explicitly; no Prefect result lands in a local folder.
    persist_result=False,
)
def training(params: TrainingParams = TrainingParams()) -> TrainingOutcome:  # noqa: B008 - a frozen default
    """Retrain the dataset's model and promote it when it passes the gates and beats the champion."""
    config = load_dataset_config(params.dataset)
    gates = resolve_gates(params.gates, config.task)  # the task's default primary metric, or a clear error
    # Same data listing, config, params and code as the champion: nothing to learn; stop before reading the data.
    # The champion's record and the engine (Parquet footers only) beside the listing: none waits on another.
    champion_lookup = champion_record.submit(config.model_name)
    engine = choose_snapshot_engine.submit(config, params.data_version or None)  # the UI form may send ""
    fingerprint, champion = _fingerprint(params, config), champion_lookup.result()
    same = compare(fingerprint, champion.fingerprint, config.model_name, champion.version)
    if same.unchanged and not params.force:
        return _nothing_new(params, config, gates, fingerprint, champion, same)
    # Frozen as a data version, then validated: in memory beside the search (nothing is registered before
    # `data.report` says the data passed), on the cluster first (DataValidationError here).
    data = prepare_data(config, params.seed, params.data_version or None, engine.result())
    run_id = start_run(config, _run_params(params, data, config), _run_tags(params, data, same, fingerprint))
    result: PromotionResult | None = None
    try:
        # What `mlops reproduce` retrains from; beside the work below, like every step that only writes a record.
        inputs_logged = log_run_inputs.submit(run_id, config, params.model_dump(mode="json"))
        split = split_data(data, config)
        champion = score_champion.submit(config, split.holdout)  # the champion's holdout scores, beside the search
        warm_imports()  # what the steps after the search import, beside it (not beside the reads before it)
        search = fit_candidate(data, split, config, params.search, params.seed)
        report = data.report  # the validation beside the search passed (else DataValidationError)
        evaluation = evaluate_candidate(search.model, split.holdout, config)
        beside = threading.Event()  # set while the steps below compute beside the importances (no gate)
        beside.set()
        importances = explain.submit(search.model, split.holdout, config, params.seed, beside=beside)
        inputs = review_inputs(search.model, evaluation, split.holdout, champion.result())
        findings = review.submit(inputs, config, gates, params.seed, beside=True)  # beside the logging below
        records = [
            inputs_logged,
            log_evaluation.submit(run_id, search, evaluation.metrics, evaluation.figures, report.to_json()),
            # monitoring's baseline: holdout rows with the outputs the evaluation computed on them
            log_reference.submit(run_id, search.model, split.holdout, config, params.seed, evaluation.proba),
        ]
        compiling = compile_check.submit(search.model, split.holdout, config, params.seed)  # how it is served
        model_uri, digests = log_model(run_id, search.model, split.train, config)  # loaders check the digests
        compiled = compiling.result()
        records.append(log_compiled.submit(run_id, compiled))
        tags = _version_tags(config, data, compiled.tags() | fingerprint.tags() | digests.tags())
        candidate = Candidate(run_id, search.model, model_uri, evaluation, split.holdout, tags, compiled.line())
        for record in records:  # a record that failed fails the run before anything is registered
            record.result()
        prejudged = Prejudged(champion.result(), findings.result())  # used if the champion is the same under the lock
        beside.clear()  # reviewed, compiled and logged: the importances may take every core
        result = review_and_promote(candidate, config, _policy(params, gates, config), prejudged)
        result = replace(result, findings=replace(result.findings, importances=explained(importances)))
        steps_after(result.approval)(log_importances)(run_id, result.findings.importances)
        outcome = result.outcome(params.dry_run)
        facts = replace(
            _card_facts(params, config, split, data, result, outcome), calibration=search.calibration_summary
        )
        facts = replace(facts, training=search.record_card)  # what ran where, on how many rows
        record_run(facts, run_id, result.tags(outcome), steps_after(result.approval))
        result.raise_failure(config.model_name)
    except BaseException as error:  # a record of the failure, even after an expired pause
        explain_outage()  # when the cause is the stack's database, say so first
        steps_after(result.approval if result else None)(end_run)(run_id, "FAILED")
        data.raise_if_invalid(error)  # bad data, not the symptom they caused in the search
        raise
    end_run(run_id, "FINISHED")
    previous = result.promotion.replaced if result.promotion is not None else None
    return TrainingOutcome(run_id, data.data_version, result.decision, result.version, result.promoted, previous)


def _fingerprint(params: TrainingParams, config: DatasetConfig) -> Fingerprint:
    """What the run depends on: the source's listing, or the frozen data version it was given."""
    if params.data_version:
        return frozen_fingerprint(config, params.model_dump(mode="json"), params.data_version)
    return fingerprint_run(config, params.model_dump(mode="json"))


def _run_params(params: TrainingParams, data: PreparedData, config: DatasetConfig) -> dict[str, Any]:
    return params.model_dump(mode="json") | {"data_version": data.data_version, "source": config.source}


def _run_tags(params: TrainingParams, data: PreparedData, same: Comparison, fingerprint: Fingerprint) -> dict[str, str]:
    return {
        "data_version": data.data_version,
        "prefect_flow_run_id": str(flow_run.get_id()),
        "dry_run": str(params.dry_run).lower(),
        "trigger_reason": params.reason,
        "fingerprint.comparison": same.note(params.force),
    } | fingerprint.tags()


def _version_tags(config: DatasetConfig, data: PreparedData, form_and_fingerprint: dict[str, str]) -> dict[str, str]:
    """The registered version's tags.

    What serving and scoring need (the id column each logged prediction carries so labels can join, the task,
    the served form: onnx only when its parity check passed, the feature service to look up) and what it was
    trained from (a later run with the same fingerprint has nothing new).
    """
    return (
        {"data_version": data.data_version, "id_column": config.id_column, "task": config.task.value}
        | form_and_fingerprint
        | ({"feature_service": config.feature_service} if config.feature_service else {})
    )


def _policy(params: TrainingParams, gates: Gates, config: DatasetConfig) -> PromotionPolicy:
    return PromotionPolicy(
        gates=gates,
        seed=params.seed,
        dry_run=params.dry_run,
        require_approval=params.require_approval,
        approval_timeout_seconds=params.approval_timeout_seconds,
        serving_timeout_seconds=params.serving_timeout_seconds,
        reason=params.reason,
        dataset=params.dataset,
        rollout=params.rollout or config.operations.rollout,
    )


def _card_facts(
    params: TrainingParams,
    config: DatasetConfig,
    split: Split | DaskSplit,
    data: PreparedData,
    result: PromotionResult,
    outcome: str,
) -> CardFacts:
    return CardFacts(
        model_name=config.model_name,
        candidate_version=result.version,
        decision=result.decision,
        outcome=outcome,
        data_version=data.data_version,
        training_window=split.training_window(config.time_column),
        rows_train=split.rows_train,
        rows_holdout=split.rows_holdout,
        review=result.findings,
        code_version=git_commit(),
        slice_max_drop=params.gates.max_slice_drop,
        feature_join=data.join.summary() if data.join else None,
        holdout_split=split.why,
        allowed_leaks={f.name: f.allow_leak_reason or "" for f in config.features if f.allow_leak},
    )
