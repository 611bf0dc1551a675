"""The retraining flow: load, validate, split, train, evaluate, then promote only if it is safe.

This module wires tasks and handles state: the rules live in `core/` (search, metrics, decision, review),
the I/O in `adapters/`, the Prefect tasks in `tasks/`, promotion and approval in `services/`.
Run it ad hoc with `mlops train` (or `python -m mlops train`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

from prefect import Task, flow
from prefect.runtime import flow_run
from pydantic import BaseModel, ConfigDict, Field

from core.approval import Approval, ApprovalTimeout
from core.big_model import BigSplit
from core.card import make_card
from core.dataset import DatasetConfig
from core.decision import Decision, Gates, decide, decision_markdown, decision_tags, resolve_gates
from core.fingerprint import Comparison, Fingerprint, compare, nothing_new_markdown
from core.outcome import describe_outcome
from core.review import Review
from core.search import SearchSpec
from core.split import Split
from core.validation import DataValidationError
from services.approval import ask_approval, steps_after
from services.promotion import current_champion, promote_checked, promotion_lock
from tasks.big_training import (
    check_big_snapshot,
    choose_snapshot_engine,
    load_big_snapshot,
    split_big_snapshot,
    train_big_candidate,
)
from tasks.compile import compile_candidate
from tasks.evaluation import evaluate_candidate
from tasks.features import join_features
from tasks.loading import check_still_in_catalog, load_dataset_config, load_snapshot
from tasks.monitoring import log_reference
from tasks.promotion import ensure_promotion_lock
from tasks.reports import publish_decision, publish_model_card, store_validation_report
from tasks.review import review
from tasks.split import split_snapshot
from tasks.tracking import (
    ChampionRecord,
    champion_record,
    end_run,
    fingerprint_run,
    git_commit,
    log_evaluation,
    log_model,
    log_review,
    record_decision,
    register_model,
    start_run,
)
from tasks.training import train_candidate
from tasks.validation import check_snapshot


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


def _record(
    run_id: str,
    params: TrainingParams,
    config: DatasetConfig,
    split: Split | BigSplit,
    data_version: str,
    version: str | None,
    decision: Decision,
    findings: Review,
    outcome: str,
    tags: dict[str, str],
    step: Callable[[Task], Callable[..., Any]],
    feature_join: str | None = None,
) -> None:
    """Record the decision and what came of it on the run and the version, then publish the model card."""
    markdown = decision_markdown(decision, config.model_name, version, data_version, outcome)
    tags = decision_tags(decision, data_version) | tags
    step(record_decision)(run_id, config.model_name, version, tags, markdown, decision.to_json())
    card = make_card(
        model_name=config.model_name,
        candidate_version=version,
        decision=decision,
        outcome=outcome,
        data_version=data_version,
        training_window=split.training_window(config.time_column),
        rows_train=split.rows_train,
        rows_holdout=split.rows_holdout,
        review=findings,
        code_version=git_commit(),
        slice_max_drop=params.gates.max_slice_drop,
    )
    card = replace(card, feature_join=feature_join)
    step(publish_model_card)(card, run_id)
    step(publish_decision)(markdown)


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
def training(params: TrainingParams = TrainingParams()) -> TrainingOutcome:  # noqa: B008, PLR0915 - frozen default; a table of contents
    """Retrain the dataset's model and promote it when it passes the gates and beats the champion."""
    config = load_dataset_config(params.dataset)
    gates = resolve_gates(params.gates, config.task)  # the task's default primary metric, or a clear error
    # Same data listing, config, params and code as the champion: nothing to learn; stop before reading the data.
    fingerprint, champion = fingerprint_run(config, params.model_dump(mode="json")), champion_record(config.model_name)
    same = compare(fingerprint, champion.fingerprint, config.model_name, champion.version)
    if same.unchanged and not params.force:
        return _nothing_new(params, config, gates, fingerprint, champion, same)
    big = choose_snapshot_engine(config) == "dask"  # `engine` in the dataset config; auto counts Parquet rows
    if big:  # partitions stay on the Dask cluster: GX on a sample plus full-data checks computed there
        snapshot, join = load_big_snapshot(config), None
        report = check_big_snapshot(snapshot, config, params.seed)
    else:
        snapshot = load_snapshot(config)
        # With a feature service, the store's features as of each row's time; lost rows are counted, not hidden.
        frame, join = join_features(snapshot.frame, config) if config.feature_service else (snapshot.frame, None)
        report = check_snapshot(frame, config, snapshot.data_version, join)
    report_json = report.to_json()
    store_validation_report(config.name, snapshot.data_version, report_json, report.to_markdown())
    if not report.success:
        raise DataValidationError(report.failures, report)

    run_id = start_run(
        config,
        params.model_dump(mode="json") | {"data_version": snapshot.data_version, "source": config.source},
        {
            "data_version": snapshot.data_version,
            "prefect_flow_run_id": str(flow_run.get_id()),
            "dry_run": str(params.dry_run).lower(),
            "trigger_reason": params.reason,
            "fingerprint.comparison": same.note(params.force),
        }
        | fingerprint.tags(),
    )
    approval: Approval | None = None
    try:
        if big:  # the frozen holdout by id hash per partition; LightGBM's Dask estimator on every training row
            split = split_big_snapshot(snapshot, config)
            search = train_big_candidate(snapshot, split, config, params.seed)
        else:
            split = split_snapshot(frame, config)
            search = train_candidate(split.train, config, params.search, params.seed)
        evaluation = evaluate_candidate(search.model, split.holdout, config)
        log_evaluation(run_id, search, evaluation.metrics, evaluation.figures, report_json)
        model_uri = log_model(run_id, search.model, split.train, config)
        log_reference(run_id, search.model, split.holdout, config, params.seed)  # monitoring's baseline (holdout rows)
        compiled = compile_candidate(run_id, search.model, split.holdout, config, params.seed)  # how it is served

        lock = ensure_promotion_lock(config.model_name)
        promotion, promotion_error, serving = None, None, None
        # Decide and promote one run at a time per model, so no run promotes against a stale champion.
        with promotion_lock(lock) as held:
            champion = current_champion(config, split.holdout)
            findings = replace(
                review(
                    search.model,
                    evaluation.proba,
                    split.holdout,
                    config,
                    gates,
                    params.seed,
                    champion.proba,
                    champion.schema,
                ),
                inference=compiled.line(),
            )
            decision = decide(
                evaluation.metrics,
                champion.metrics,
                champion.version,
                gates,
                champion.error,
                findings.interval(gates.primary_metric),
                findings.checks,
                findings.holdout,
            )
            log_review(run_id, findings)
            # id_column: the record field the serving API logs with each prediction, so labels can join
            version_tags = (
                {
                    "data_version": snapshot.data_version,
                    "id_column": config.id_column,
                    "task": config.task.value,  # what serving and scoring answer (a value, or class probabilities)
                }
                | compiled.tags()  # the form serving uses (onnx only when its parity check passed)
                | fingerprint.tags()  # what it was trained from: a later run with the same one has nothing new
                | ({"feature_service": config.feature_service} if config.feature_service else {})  # serving looks up
            )
            check_still_in_catalog(params.dataset, config.model_name)  # removed meanwhile: nothing registered
            version = None if params.dry_run else register_model(model_uri, config.model_name, run_id, version_tags)
            wanted = decision.promote and version is not None
            promote_now = partial(
                promote_checked, config.model_name, version, champion.version, params.serving_timeout_seconds, decision
            )
            if wanted and not params.require_approval:
                promotion, promotion_error, serving = promote_now(params.reason)
        if wanted and params.require_approval:
            # Wait for a person outside the lock; the promotion is then a compare-and-set against the
            # champion the decision saw, so a champion that changed meanwhile is never replaced blindly.
            approval = ask_approval(decision, config.model_name, version, run_id, params.approval_timeout_seconds)
            if approval.approved:
                with promotion_lock(lock):
                    promotion, promotion_error, serving = promote_now(f"{params.reason}; {approval.describe()}")
        promoted = promotion is not None
        outcome = describe_outcome(decision, params.dry_run, promoted, promotion_error, approval)
        tags = (
            {"promoted": str(promoted).lower(), "outcome": outcome}
            | held.tags()  # the promotion lock's wait, too
            | ({"serving_check": serving.detail} if serving else {})
            | (approval.tags() if approval else {})
        )
        _record(
            run_id,
            params,
            config,
            split,
            snapshot.data_version,
            version,
            decision,
            findings,
            outcome,
            tags,
            steps_after(approval),
            join.summary() if join else None,
        )
        if promotion_error is not None:
            raise promotion_error
        if approval is not None and not approval.answered:
            raise ApprovalTimeout(f"{config.model_name} v{version} was not promoted: {approval.describe()}")
    except BaseException:
        steps_after(approval)(end_run)(run_id, "FAILED")  # a record of the failure, even after an expired pause
        raise
    end_run(run_id, "FINISHED")
    previous = promotion.replaced if promotion is not None else None
    return TrainingOutcome(run_id, snapshot.data_version, decision, version, promoted, previous)
