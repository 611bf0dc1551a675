"""Model card: one page that answers "why is this model in production?".

A `ModelCard` holds the decision and everything behind it (the data and code it came from, the metrics
with their intervals, the slices, fairness, the gates, what the model relies on, where the runs are);
`render_markdown` and `render_html` turn it into text for MLflow, Prefect artifacts or a browser. Both
renderers format the same table rows, so they always show the same numbers.

The card reads right for each task type (`task`): the metric table names the task's metrics (RMSE, MAE
and R² for regression; macro averages marked `(macro)` for multiclass), the primary metric is stated
with its direction (lower is better for RMSE, MAE, log loss and Brier), slices are on the primary metric,
fairness shows what applies (rates and differences for binary, the same one class against the rest for
multiclass, per-group errors for regression with demographic parity and equalised odds "not applicable"
and why), and a cold start shows the evidence it was judged on (holdout rows, rows per class, each gated
metric's bootstrap interval and the bound checked against its limit).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, NamedTuple

import pandas as pd

from core.evaluation.decision import Decision, GateResult, Gates, HoldoutEvidence, configured_bounds
from core.evaluation.fairness import FairnessReport
from core.evaluation.significance import DeltaInterval
from core.evaluation.slices import SliceMetric

if TYPE_CHECKING:
    from core.evaluation.review import Review


# What each metric is, as the card's legend says it (multiclass: how it is averaged over the classes).
METRIC_NAMES = {
    "roc_auc": "ROC AUC",
    "pr_auc": "PR AUC (average precision)",
    "f1": "F1 score",
    "log_loss": "log loss",
    "brier": "Brier score",
    "ece": "expected calibration error (10 equal-width bins of the positive class's probability)",
    "rmse": "RMSE (root mean squared error, in the target's units)",
    "mae": "MAE (mean absolute error, in the target's units)",
    "r2": "R² (share of the target's variance explained)",
}
MULTICLASS_METRIC_NAMES = {
    "roc_auc": "ROC AUC, macro average of one class vs the rest",
    "pr_auc": "PR AUC (average precision), macro average of one class vs the rest",
    "f1": "F1 score, macro average over the classes",
    "log_loss": "log loss over all classes",
    "brier": "Brier score over all classes (halved, so two classes give the binary score)",
    "ece": "expected calibration error of the top label (10 equal-width bins of the highest probability)",
}
MACRO_METRICS = frozenset({"roc_auc", "pr_auc", "f1"})
# What a permutation importance measures, per scikit-learn scorer the review used.
IMPORTANCE_MEANING = {
    "roc_auc": "the drop in ROC AUC",
    "roc_auc_ovr": "the drop in macro one-vs-rest ROC AUC",
    "neg_root_mean_squared_error": "the increase in RMSE (in the target's units)",
}


class FeatureImportance(NamedTuple):
    """Permutation importance of one raw feature."""

    feature: str
    importance_mean: float
    importance_std: float


@dataclass(frozen=True)
class ModelCard:
    """Everything needed to answer "why is this model in production?" (or why it is not).

    Attributes:
        model_name: Registered model name.
        candidate_version: Registered version of the candidate, None if not registered (dry run).
        champion_version: Champion version the candidate was compared with, None at cold start.
        verdict: `promote` or `reject`.
        outcome: What actually happened (`tasks.promotion.describe_outcome`).
        reasons: The decision's reasons, in order.
        data_version: Content version of the data snapshot.
        training_window: First and last time value of the training rows, None without a time column.
        rows_train: Training rows.
        rows_holdout: Holdout rows.
        candidate_metrics: The candidate's holdout metrics.
        code_version: Git commit of the code that trained the model.
        created_at: When the card was made.
        champion_metrics: The champion's metrics on the same holdout, None at cold start.
        intervals: Paired bootstrap intervals of the improvement, per metric.
        primary_metric: The metric the decision is made on.
        slices_candidate: The candidate's slice metrics.
        slices_champion: The champion's slice metrics on the same rows.
        slice_metric: Metric the slice gate compares.
        slice_max_drop: Largest drop the slice gate tolerates, None if there is no slice gate.
        fairness: Fairness reports of the candidate, one per sensitive feature.
        fairness_champion: The champion's fairness reports on the same rows (empty at cold start).
        gates: Each gate's result.
        feature_importances: The most important raw features, most important first.
        mlflow_run_url: The training run in MLflow.
        prefect_flow_run_url: The flow run in Prefect.
        task: `binary`, `multiclass` or `regression`; None: told from the metrics (RMSE: regression,
            otherwise binary).
        holdout: What a cold start was judged on (`Review.holdout`); None with a champion.
        gate_bounds: Every configured absolute limit as (metric, bound, `min` or `max`), to show each cold
            start interval against its limit.
        importance_scoring: The scikit-learn scorer of the permutation importances (None: the task's default).
        inference: How serving runs the model: the compiled form's parity line (None: not compiled).
        calibration: How the probabilities were calibrated, and why (`SearchResult.calibration_summary`; None:
            no calibration step, e.g. a regressor).
        data_manifest: The S3 URI of the data version's frozen manifest (set when the card is published).
        training: What ran where, on how many rows (`TrainingRecord.card_rows`: the engine, the model search, the
            final fit and why it saw fewer than every training row); empty: not recorded.
        monitoring_page: The S3 URI of the model's monitoring page over time (`core.monitoring.model_page.page_uri`,
            set when the card is published; the first monitoring run creates the page).
    """

    model_name: str
    candidate_version: str | None
    champion_version: str | None
    verdict: str
    outcome: str
    reasons: list[str]
    data_version: str
    training_window: tuple[str, str] | None
    rows_train: int
    rows_holdout: int
    candidate_metrics: dict[str, float]
    code_version: str
    created_at: datetime
    champion_metrics: dict[str, float] | None = None
    intervals: list[DeltaInterval] = field(default_factory=list)
    primary_metric: str = "roc_auc"
    slices_candidate: list[SliceMetric] = field(default_factory=list)
    slices_champion: list[SliceMetric] = field(default_factory=list)
    slice_metric: str = "roc_auc"
    slice_max_drop: float | None = None
    fairness: list[FairnessReport] = field(default_factory=list)
    fairness_champion: list[FairnessReport] = field(default_factory=list)
    gates: list[GateResult] = field(default_factory=list)
    feature_importances: list[FeatureImportance] = field(default_factory=list)
    mlflow_run_url: str | None = None
    prefect_flow_run_url: str | None = None
    task: str | None = None
    holdout: HoldoutEvidence | None = None
    gate_bounds: list[tuple[str, float, str]] = field(default_factory=list)
    importance_scoring: str | None = None
    inference: str | None = None
    feature_join: str | None = None  # counts of the feature store's point-in-time join (JoinReport.summary)
    calibration: str | None = None
    holdout_split: str | None = None  # which holdout and CV folds were used, and why (`Split.why`)
    allowed_leaks: dict[str, str] = field(default_factory=dict)  # flagged features trained on: feature -> reason
    data_manifest: str | None = None  # where the data version's frozen manifest is (`lineage.manifest_uri`)
    training: dict[str, str] = field(default_factory=dict)  # label -> text (`TrainingRecord.card_rows`)
    monitoring_page: str | None = None  # where the model's page over time is (`model_page.page_uri`)

    @property
    def task_type(self) -> str:
        """The task: as set, or told from the metrics (a regressor's card has RMSE)."""
        if self.task:
            return str(self.task)
        return "regression" if "rmse" in self.candidate_metrics else "binary"

    def to_json(self) -> str:
        """The card as JSON (an MLflow artifact next to the rendered page)."""
        return json.dumps(asdict(self), indent=2, sort_keys=True, default=str)


def importances_from_frame(importances: pd.DataFrame, top_k: int = 10) -> list[FeatureImportance]:
    """The `top_k` first rows of `core.modeling.explain.permutation_importances`, for the card."""
    return [
        FeatureImportance(str(row.feature), float(row.importance_mean), float(row.importance_std))
        for row in importances.head(top_k).itertuples(index=False)
    ]


def time_window(values: pd.Series) -> tuple[str, str] | None:
    """First and last non-null value of a time column as ISO text, None when there is none."""
    values = values.dropna()
    if values.empty:
        return None
    low, high = (v.isoformat() if hasattr(v, "isoformat") else str(v) for v in (values.min(), values.max()))
    return low, high


@dataclass(frozen=True)
class CardFacts:
    """What one training run decided and what came of it: everything its model card is made from.

    `task` (`DatasetConfig.task`) defaults to the one the review found (`Review.task`); `feature_join` is the
    feature store's point-in-time join summary, when the model has a feature service.
    """

    model_name: str
    candidate_version: str | None
    decision: Decision
    outcome: str
    data_version: str
    training_window: tuple[str, str] | None
    rows_train: int
    rows_holdout: int
    review: Review
    code_version: str
    slice_max_drop: float | None
    task: str | None = None
    feature_join: str | None = None
    calibration: str | None = None  # SearchResult.calibration_summary
    holdout_split: str | None = None
    allowed_leaks: dict[str, str] = field(default_factory=dict)
    training: dict[str, str] = field(default_factory=dict)  # SearchResult.record_card: what ran where


def make_card(facts: CardFacts) -> ModelCard:
    """The card of one decision, from what the run computed (pure: no I/O).

    The cold start evidence is `Review.holdout`, shown against the limits recorded in `Decision.gates`.
    """
    decision, review, task = facts.decision, facts.review, facts.task
    gate_bounds = configured_bounds(Gates.model_validate(decision.gates)) if decision.gates else []
    return ModelCard(
        model_name=facts.model_name,
        candidate_version=facts.candidate_version,
        champion_version=decision.champion_version,
        verdict=decision.verdict,
        outcome=facts.outcome,
        reasons=list(decision.reasons),
        data_version=facts.data_version,
        training_window=facts.training_window,
        rows_train=facts.rows_train,
        rows_holdout=facts.rows_holdout,
        candidate_metrics=decision.candidate_metrics,
        code_version=facts.code_version,
        created_at=datetime.now(UTC),
        champion_metrics=decision.champion_metrics,
        intervals=list(review.intervals),
        primary_metric=decision.primary_metric,
        slices_candidate=list(review.candidate.slices),
        slices_champion=list(review.champion.slices) if review.champion else [],
        slice_metric=decision.primary_metric,
        slice_max_drop=facts.slice_max_drop,
        fairness=list(review.candidate.fairness),
        fairness_champion=list(review.champion.fairness) if review.champion else [],
        gates=list(decision.checks),
        feature_importances=importances_from_frame(review.importances) if not review.importances.empty else [],
        task=str(task) if task is not None else review.task,
        holdout=review.holdout,
        gate_bounds=[(metric, float(bound), kind) for metric, bound, kind in gate_bounds],
        importance_scoring=review.importance_scoring,
        inference=review.inference,
        feature_join=facts.feature_join,
        calibration=facts.calibration,
        holdout_split=facts.holdout_split,
        allowed_leaks=dict(facts.allowed_leaks),
        training=dict(facts.training),
    )
