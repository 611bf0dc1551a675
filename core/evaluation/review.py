"""Review a candidate like a careful reviewer, before the decision: everything `decide` needs besides metrics.

On the same frozen holdout rows as the champion (never used for model selection: the search uses
cross-validation on training rows), it computes the paired bootstrap intervals of the improvement,
metrics per slice and fairness differences for both models, and the operational gates (model size,
single-record latency, input schema compatibility with the serving API). It also measures what the
candidate relies on (permutation importance) for the run and the model card.

Every task type goes through the same review, on the scores' contract of `tasks.evaluation`
(probabilities for a classifier, predicted values for a regressor, `classes == []` telling them apart):
slices on the primary metric in its better direction (`core.evaluation.slices`), fairness as the task allows
(`core.evaluation.fairness`: binary, one-vs-rest per class for multiclass, group errors for regression where the
demographic parity and equalised odds limits are reported as not applicable), latency of `predict_proba`
for a classifier and `predict` for a regressor, and permutation importance scored by ROC AUC (binary),
macro one-vs-rest ROC AUC (multiclass) or RMSE (regression).
"""

from __future__ import annotations

import json
import logging
import pickle
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from core.data.dataset import DatasetConfig, FeatureType, TaskType
from core.data.features import prepare_inputs, prepare_target
from core.evaluation.decision import GateResult, Gates, HoldoutEvidence, configured_bounds, resolve_gates
from core.evaluation.fairness import FairnessReport, fairness_check, fairness_reports, sensitive_groups
from core.evaluation.significance import BootstrapSettings, DeltaInterval, bootstrap_metrics, paired_bootstrap_metrics
from core.evaluation.slices import SliceMetric, slice_gate, slice_metrics, unmeasured_slices
from core.modeling.metrics import CLASSIFICATION_METRICS, REGRESSION_METRICS, model_classes, scoring_for

log = logging.getLogger(__name__)

LATENCY_CALLS = 30

# scikit-learn scorer of the permutation importance, per task (`task_of`).


def task_of(classes: list[Any]) -> str:
    """`binary`, `multiclass` or `regression` (no classes), from a model's classes."""
    if not classes:
        return TaskType.regression.value
    return TaskType.binary.value if len(classes) == 2 else TaskType.multiclass.value


@dataclass(frozen=True)
class ModelResults:
    """One model's results on the holdout rows: slices and fairness."""

    slices: list[SliceMetric]
    fairness: list[FairnessReport]


@dataclass(frozen=True)
class Review:
    """What the reviewer found; `checks` go into the decision, the rest into the run and the model card."""

    checks: list[GateResult]
    candidate: ModelResults
    champion: ModelResults | None = None
    intervals: list[DeltaInterval] = field(default_factory=list)
    importances: pd.DataFrame = field(default_factory=pd.DataFrame, repr=False)
    notes: list[str] = field(default_factory=list)
    holdout: HoldoutEvidence | None = None
    task: str | None = None
    importance_scoring: str | None = None
    # How the candidate is served: the compiled form's parity line (`core.inference.compiled.CompiledCheck.line`).
    inference: str | None = None

    def interval(self, metric: str) -> DeltaInterval | None:
        """The improvement's interval on `metric` (None at cold start)."""
        return next((i for i in self.intervals if i.metric == metric), None)

    def to_json(self) -> str:
        """Gates, intervals, slices, fairness and notes (not the importances: they have their own file)."""
        record = {
            "checks": [c._asdict() for c in self.checks],
            "intervals": [asdict(i) for i in self.intervals],
            "candidate": asdict(self.candidate),
            "champion": None if self.champion is None else asdict(self.champion),
            "notes": self.notes,
            "holdout": None if self.holdout is None else asdict(self.holdout),
            "task": self.task,
            "importance_scoring": self.importance_scoring,
            "inference": self.inference,
        }
        return json.dumps(record, indent=2, default=str)


def input_schema(config: DatasetConfig) -> dict[str, str]:
    """The candidate's inputs as the serving API sees them: column -> numeric | text."""
    schema = {f.name: "numeric" if f.type is FeatureType.numeric else "text" for f in config.features}
    return schema | ({config.time_column: "text"} if config.time_column in config.calendar_columns else {})


def schema_gate(candidate: dict[str, str], champion: dict[str, str] | None, allow_change: bool) -> GateResult:
    """Would callers of the serving API (who send the champion's inputs) break on the candidate?

    A column the candidate needs that callers do not send, or one whose type changes, breaks them; a
    column the candidate no longer uses does not (extra fields are ignored).
    """
    if champion is None:
        return GateResult("input_schema", True, "no champion: nothing to stay compatible with")
    breaking = [f"new required input {name!r}" for name in candidate if name not in champion]
    breaking += [
        f"{name!r} changes from {champion[name]} to {kind}"
        for name, kind in candidate.items()
        if name in champion and champion[name] != kind
    ]
    dropped = sorted(set(champion) - set(candidate))
    detail = "; ".join(breaking) if breaking else "compatible with the champion's inputs"
    if dropped:
        detail += f" (no longer used: {', '.join(dropped)})"
    if breaking and allow_change:
        return GateResult("input_schema", True, f"allowed by allow_schema_change: {detail}")
    return GateResult("input_schema", not breaking, detail)


def predict_times_ms(model: Any, frame: pd.DataFrame, calls: int) -> list[float]:
    """Milliseconds of each of `calls` prediction calls on `frame`, after one warm-up call.

    A classifier is timed on `predict_proba` (what the serving API calls), a regressor (no `classes_`)
    on `predict`.
    """
    predict = model.predict_proba if model_classes(model) else model.predict
    predict(frame)
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        predict(frame)
        times.append((time.perf_counter() - started) * 1e3)
    return times


def operational_gates(model: Any, one_row: pd.DataFrame, gates: Gates) -> list[GateResult]:
    """Model size (pickled) and median single-record prediction time, against their limits.

    The prediction timed is `predict_proba` for a classifier and `predict` for a regressor.
    """
    from threadpoolctl import threadpool_limits

    results = []
    size_mb = len(pickle.dumps(model, protocol=pickle.HIGHEST_PROTOCOL)) / 2**20
    if gates.max_model_mb is not None:
        passed = size_mb <= gates.max_model_mb
        results.append(GateResult("model_size", passed, f"{size_mb:.2f} MB (limit {gates.max_model_mb:g} MB)"))
    if gates.max_latency_ms is not None:
        with threadpool_limits(1):  # as the serving API calls it
            times = predict_times_ms(model, one_row, LATENCY_CALLS)
        median = statistics.median(times)
        passed = median <= gates.max_latency_ms
        detail = (
            f"median single-record prediction {median:.1f} ms over {LATENCY_CALLS} calls "
            f"(limit {gates.max_latency_ms:g} ms)"
        )
        results.append(GateResult("latency", passed, detail))
    return results


def holdout_evidence(
    y_true: pd.Series, scores: np.ndarray, classes: list[Any], gates: Gates, seed: int
) -> HoldoutEvidence:
    """The holdout's size and the candidate's bootstrap intervals of every gated metric (judged at cold start)."""
    counts = {str(c): int((np.asarray(y_true) == c).sum()) for c in classes}
    applicable = CLASSIFICATION_METRICS if classes else REGRESSION_METRICS
    gated = [metric for metric, _, _ in configured_bounds(gates) if metric in applicable]
    intervals = []
    if gated and len(y_true) and all(counts.values()):
        intervals = bootstrap_metrics(y_true, scores, classes, gated, settings=_bootstrap(gates, seed))
    return HoldoutEvidence(len(y_true), counts, intervals)


def _bootstrap(gates: Gates, seed: int) -> BootstrapSettings:
    return BootstrapSettings(n_resamples=gates.n_resamples, confidence=gates.confidence, seed=seed)


def model_results(holdout: pd.DataFrame, proba: np.ndarray, classes: list[Any], config: DatasetConfig) -> ModelResults:
    """Slice metrics and fairness reports of one model's holdout scores.

    Args:
        holdout: Frozen holdout rows (raw columns).
        proba: The model's scores on them: probabilities (n, classes), or predicted values (n,) for a regressor.
        classes: The model's classes; `[]` for a regressor.
        config: Dataset description (slices, sensitive features).

    Fairness: binary as `fairness_report`, multiclass one class against the rest, regression per-group
    errors with demographic parity and equalised odds marked not applicable (`core.evaluation.fairness`). Groups
    with fewer than the config's `min_group_rows` holdout rows are reported but left out of the differences.
    """
    y_true = prepare_target(holdout, config)
    slices = slice_metrics(holdout, y_true, proba, classes, config.slices, config.min_slice_rows)
    groups = sensitive_groups(holdout, config)
    fairness = fairness_reports(y_true, proba, classes, groups, min_group_rows=config.min_group_rows)
    return ModelResults(slices, fairness)


@dataclass(frozen=True)
class ReviewInputs:
    """The candidate and the scores the review compares, on the frozen holdout rows.

    Attributes:
        candidate: The candidate's fitted pipeline.
        proba: The candidate's scores on `holdout` (from its evaluation: not scored again): probabilities,
            or predicted values for a regressor.
        holdout: Frozen holdout rows (raw columns).
        champion_proba: The champion's scores on the same rows (None at cold start).
        champion_schema: The champion's inputs as logged in its signature (column -> numeric | text).
    """

    candidate: Any
    proba: np.ndarray
    holdout: pd.DataFrame
    champion_proba: np.ndarray | None = None
    champion_schema: dict[str, str] | None = None


def _slices_check(results: ModelResults, champion: ModelResults, gates: Gates, unmeasured: int) -> GateResult:
    """The `slices` gate: no slice's primary metric drops more than `max_slice_drop` against the champion's."""
    failures = slice_gate(results.slices, champion.slices, gates.primary_metric, gates.max_slice_drop)
    measured = len(results.slices) - unmeasured
    detail = "; ".join(failures) or (
        f"no slice drops more than {gates.max_slice_drop:g} in {gates.primary_metric} ({measured} slices measured)"
    )
    return GateResult("slices", not failures, detail)


def explain_candidate(
    candidate: Any,
    holdout: pd.DataFrame,
    config: DatasetConfig,
    seed: int,
    threads: Callable[[], int | None] | None = None,
) -> pd.DataFrame:
    """What the candidate relies on: permutation importances on the holdout rows, by the search's own CV scorer.

    Not a gate: for the run and the model card (`Review.importances`), so a flow may compute it beside the
    decision (`review_candidate(..., explain=False)`); `threads` as `permutation_importances` takes it.
    """
    X, y_true = prepare_inputs(holdout, config), prepare_target(holdout, config)
    return _importances(candidate, X, y_true, seed, threads)


def _importances(
    candidate: Any, X: pd.DataFrame, y_true: pd.Series, seed: int, threads: Callable[[], int | None] | None = None
) -> pd.DataFrame:
    from core.modeling.explain import permutation_importances

    scoring = scoring_for(TaskType(task_of(model_classes(candidate)))).scorer  # the search's own CV scorer
    return permutation_importances(candidate, X, y_true, scoring=scoring, seed=seed, threads=threads)


def review_candidate(
    inputs: ReviewInputs, config: DatasetConfig, gates: Gates, seed: int, *, explain: bool = True
) -> Review:
    """Everything the decision needs beyond the candidate's metrics, on the frozen holdout rows.

    Args:
        inputs: The candidate, its scores and the champion's, on the holdout rows.
        config: Dataset description (slices, sensitive features).
        gates: Thresholds of the review gates (an empty primary metric is filled with the task's default).
        seed: Seeds the bootstrap and the permutations.
        explain: Whether to compute the importances too (`explain_candidate`); without them the review's
            `importances` are empty, for the caller to fill.
    """
    candidate, proba, holdout = inputs.candidate, inputs.proba, inputs.holdout
    champion_proba, champion_schema = inputs.champion_proba, inputs.champion_schema
    y_true = prepare_target(holdout, config)
    classes = model_classes(candidate)
    task = task_of(classes)
    if gates.primary_metric is None:  # the flow passes resolved gates; a direct call may not
        gates = resolve_gates(gates, TaskType(task))
    results = model_results(holdout, proba, classes, config)
    checks: list[GateResult] = []
    intervals: list[DeltaInterval] = []
    champion_results = None
    notes = unmeasured_slices(results.slices)
    evidence = None
    if champion_proba is None:
        evidence = holdout_evidence(y_true, proba, classes, gates, seed)
    else:
        champion_results = model_results(holdout, champion_proba, classes, config)
        intervals = paired_bootstrap_metrics(y_true, proba, champion_proba, classes, settings=_bootstrap(gates, seed))
        if gates.max_slice_drop is not None and config.slices:
            checks.append(_slices_check(results, champion_results, gates, len(notes)))
        notes = unmeasured_slices(results.slices, champion_results.slices)
    if gates.max_dp_difference is not None or gates.max_eo_difference is not None:
        checks.append(fairness_check(results.fairness, gates.max_dp_difference, gates.max_eo_difference))
    X = prepare_inputs(holdout, config)
    checks += operational_gates(candidate, X.head(1), gates)
    checks.append(schema_gate(input_schema(config), champion_schema, gates.allow_schema_change))
    scoring = scoring_for(TaskType(task)).scorer  # the search's own CV scorer (`explain_candidate`'s)
    importances = _importances(candidate, X, y_true, seed) if explain else pd.DataFrame()  # `explain_candidate`'s
    for check in checks:
        log.info("gate %s: %s (%s)", check.gate, "passed" if check.passed else "FAILED", check.detail)
    return Review(checks, results, champion_results, intervals, importances, notes, evidence, task, scoring)
