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
import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, NamedTuple

import pandas as pd
from jinja2 import Environment, StrictUndefined

from core.decision import Decision, GateResult, Gates, HoldoutEvidence, configured_bounds
from core.fairness import FairnessReport
from core.metrics import LOWER_IS_BETTER, improvement
from core.significance import DeltaInterval
from core.slices import SliceMetric, slice_drop

if TYPE_CHECKING:
    from core.review import Review


# What each metric is, as the card's legend says it (multiclass: how it is averaged over the classes).
METRIC_NAMES = {
    "roc_auc": "ROC AUC",
    "pr_auc": "PR AUC (average precision)",
    "f1": "F1 score",
    "log_loss": "log loss",
    "brier": "Brier score",
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
}
MACRO_METRICS = frozenset({"roc_auc", "pr_auc", "f1"})
# What a permutation importance measures, per scikit-learn scorer the review used.
IMPORTANCE_MEANING = {
    "roc_auc": "the drop in ROC AUC",
    "roc_auc_ovr": "the drop in macro one-vs-rest ROC AUC",
    "neg_root_mean_squared_error": "the increase in RMSE (in the target's units)",
}
_DEFAULT_SCORING = {"binary": "roc_auc", "multiclass": "roc_auc_ovr", "regression": "neg_root_mean_squared_error"}


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
    """The `top_k` first rows of `core.explain.permutation_importances`, for the card."""
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


# --- one set of formatted rows, used by both renderers ---


def _num(value: float | None, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:+.4f}" if signed else f"{value:.4f}"


def _when(moment: datetime) -> str:
    if moment.tzinfo is None:
        return moment.isoformat(sep=" ", timespec="seconds")
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _direction(metric: str) -> str:
    return "lower is better" if metric in LOWER_IS_BETTER else "higher is better"


def _metric_name(metric: str, task: str) -> str:
    """What the metric is, in words, for the task (macro averages named for multiclass)."""
    if task == "multiclass" and metric in MULTICLASS_METRIC_NAMES:
        return MULTICLASS_METRIC_NAMES[metric]
    return METRIC_NAMES.get(metric, metric)


def _metric_label(metric: str, card: ModelCard) -> str:
    """The metric table's first cell: `roc_auc (primary)`, `f1 (macro)`, `rmse (primary)`."""
    qualifiers = ["macro"] if card.task_type == "multiclass" and metric in MACRO_METRICS else []
    if metric == card.primary_metric:
        qualifiers.append("primary")
    return f"{metric} ({', '.join(qualifiers)})" if qualifiers else metric


def _metric_rows(card: ModelCard) -> list[list[str]]:
    intervals = {i.metric: i for i in card.intervals}
    rows = []
    for metric, value in card.candidate_metrics.items():
        champion = card.champion_metrics.get(metric) if card.champion_metrics else None
        interval = intervals.get(metric)
        if interval is not None:
            ci = f"{_num(interval.low, True)} to {_num(interval.high, True)} ({interval.confidence:.0%})"
            delta, verdict = _num(interval.delta, True), "yes" if interval.significant else "no"
        else:
            ci = verdict = ""
            delta = "" if champion is None else _num(improvement(metric, value, champion), True)
        rows.append([_metric_label(metric, card), _num(value), _num(champion), delta, ci, verdict])
    return rows


def _metric_legend(card: ModelCard) -> str:
    """One line naming each metric of the table and its direction, for the card's task."""
    task = card.task_type
    named = "; ".join(
        f"{metric}: {_metric_name(metric, task)}, {_direction(metric)}" for metric in card.candidate_metrics
    )
    return (
        f"{task.capitalize()} metrics on the frozen holdout ({named}). Improvement is signed so positive means better."
    )


def _primary(card: ModelCard) -> str:
    """The decision's metric, what it is and its direction, e.g. `rmse: RMSE (...), lower is better`."""
    metric = card.primary_metric
    return f"{metric}: {_metric_name(metric, card.task_type)}, {_direction(metric)}"


def _slice_note(card: ModelCard) -> str:
    """How the slices were measured and compared, for the card's task."""
    metric, task = card.slice_metric, card.task_type
    note = (
        f"Each slice on {metric} ({_metric_name(metric, task)}, {_direction(metric)}); drop: how much worse "
        "the candidate is than the champion on the same rows (positive: worse)"
    )
    if card.slice_max_drop is not None:
        note += f", limit {card.slice_max_drop:g}"
    if metric in ("rmse", "mae"):
        note += f" (in the target's units, as {metric} is)"
    note += "."
    if task == "multiclass":
        note += " A slice lacking one of the classes is not measured: macro one-vs-rest metrics are undefined there."
    elif task == "regression":
        note += " A regression slice needs only enough rows to be measured."
    return note


def _slice_rows(card: ModelCard) -> list[list[str]]:
    champions = {(s.column, s.value): s for s in card.slices_champion}
    seen = set()
    rows = []
    metric = card.slice_metric
    for cand in card.slices_candidate:
        seen.add((cand.column, cand.value))
        champ = champions.get((cand.column, cand.value))
        cand_value = cand.metrics.get(metric) if cand.metrics else None
        champ_value = champ.metrics.get(metric) if champ is not None and champ.metrics else None
        if cand_value is None:
            status, drop = f"not measured: {cand.note}", ""
        elif champ is None:
            status, drop = "no champion to compare", ""
        elif champ_value is None:
            status, drop = f"not measured for the champion: {champ.note}", ""
        else:
            change = slice_drop(metric, cand_value, champ_value)
            drop = _num(change)
            limit = card.slice_max_drop
            if limit is None:
                status = "measured"
            elif change > limit and not math.isclose(change, limit):
                status = f"FAIL: drop {change:.4f} > {limit:.4f}"
            else:
                status = "ok"
        rows.append([cand.name, str(cand.n_rows), _num(cand_value), _num(champ_value), drop, status])
    for champ in card.slices_champion:
        if (champ.column, champ.value) not in seen:
            value = champ.metrics.get(metric) if champ.metrics else None
            rows.append([champ.name, str(champ.n_rows), "n/a", _num(value), "", "no candidate rows"])
    return rows


_BINARY_FAIRNESS_HEADER = ["group", "rows", "selection rate", "TPR", "FPR", "note"]
_REGRESSION_FAIRNESS_HEADER = ["group", "rows", "MAE", "RMSE", "mean prediction", "mean target", "note"]


def _fairness_summary(report: FairnessReport) -> str:
    """The line under a fairness heading: the differences, or why they do not apply."""
    if report.task == "regression":
        gaps = report.differences
        return (
            f"Largest difference between groups: MAE {_num(gaps.get('mae'))}, RMSE {_num(gaps.get('rmse'))}, "
            f"mean prediction {_num(gaps.get('mean_prediction'))}. Demographic parity and equalized odds: "
            f"not applicable for regression: {report.not_applicable}."
        )
    if report.not_applicable is not None:
        return f"Demographic parity and equalized odds: not applicable: {report.not_applicable}."
    summary = (
        f"Demographic parity difference {_num(report.demographic_parity_difference)}; "
        f"equalized odds difference {_num(report.equalized_odds_difference)}."
    )
    if report.task == "multiclass":
        summary = (
            f"Class {report.positive_label} against the rest (selection: predicted {report.positive_label}). " + summary
        )
    return summary


def _fairness_rows(report: FairnessReport) -> list[list[str]]:
    if report.task == "regression":
        names = ("mae", "rmse", "mean_prediction", "mean_target")
        return [
            [group, str(int(values["n_rows"])), *(_num(values.get(n)) for n in names), report.excluded.get(group, "")]
            for group, values in report.by_group.items()
        ]
    return [
        [
            group,
            str(int(values["n_rows"])),
            _num(values["selection_rate"]),
            _num(values["tpr"]),
            _num(values["fpr"]),
            report.excluded.get(group, ""),
        ]
        for group, values in report.by_group.items()
    ]


def _fairness_sections(card: ModelCard) -> list[dict[str, Any]]:
    sections = []
    champion = f"champion v{card.champion_version}" if card.champion_version else "champion"
    for who, report in [("candidate", r) for r in card.fairness] + [(champion, r) for r in card.fairness_champion]:
        header = _REGRESSION_FAIRNESS_HEADER if report.task == "regression" else _BINARY_FAIRNESS_HEADER
        sections.append(
            {
                "feature": f"{report.label} ({who})",
                "summary": _fairness_summary(report),
                # kept for callers reading the binary numbers directly
                "dp": _num(report.demographic_parity_difference),
                "eo": _num(report.equalized_odds_difference),
                "header": header,
                "rows": _fairness_rows(report),
            }
        )
    return sections


def _fairness_none(card: ModelCard) -> str | None:
    """Why there is no fairness section, when there is none."""
    if card.fairness:
        return None
    return "Not measured: the dataset config names no sensitive features."


def _cold_start(card: ModelCard) -> dict[str, Any] | None:
    """The evidence a cold start was judged on: holdout size, rows per class, intervals against limits."""
    evidence = card.holdout
    if evidence is None:
        return None
    summary = f"No champion to compare with: judged on the frozen holdout alone, {evidence.n_rows} rows"
    if evidence.class_counts:
        summary += " (per class: " + ", ".join(f"{c}: {n}" for c, n in evidence.class_counts.items()) + ")"
    summary += (
        ". Each metric with an absolute limit is judged on the pessimistic bound of its bootstrap interval "
        "(the lower bound of a score, the upper bound of a loss or error)."
    )
    size = next((g for g in card.gates if g.gate == "holdout_size"), None)
    if size is not None:
        summary += f" Holdout size: {'passed' if size.passed else 'FAILED'} ({size.detail})."
    if not evidence.intervals:
        summary += " No bootstrap interval: no metric with a limit applies, or the holdout is empty or misses a class."
    bounds = {metric: (bound, kind) for metric, bound, kind in card.gate_bounds}
    rows = []
    for interval in evidence.intervals:
        lower_is_better = interval.metric in LOWER_IS_BETTER
        pessimistic = interval.pessimistic(lower_is_better)
        side = "upper" if lower_is_better else "lower"
        limit, result = "", ""
        if interval.metric in bounds:
            bound, kind = bounds[interval.metric]
            passed = pessimistic >= bound if kind == "min" else pessimistic <= bound
            limit = f"{'at least' if kind == 'min' else 'at most'} {_num(bound)}"
            result = "ok" if passed else "FAIL"
        rows.append(
            [
                _metric_label(interval.metric, card),
                _num(interval.value),
                f"{_num(interval.low)} to {_num(interval.high)} ({interval.confidence:.0%}, "
                f"{interval.n_resamples} resamples)",
                f"{_num(pessimistic)} ({side})",
                limit,
                result,
            ]
        )
    return {
        "summary": summary,
        "header": ["metric", "holdout", "interval", "bound judged", "limit", "result"],
        "rows": rows,
    }


def _importance_note(card: ModelCard) -> str:
    scoring = card.importance_scoring or _DEFAULT_SCORING.get(card.task_type, "roc_auc")
    meaning = IMPORTANCE_MEANING.get(scoring, f"the drop in {scoring}")
    return f"Permutation importance on the holdout: {meaning} when the feature's values are shuffled."


def _view(card: ModelCard) -> dict[str, Any]:
    """Everything the templates show, already formatted as text."""
    window = f"{card.training_window[0]} to {card.training_window[1]}" if card.training_window else "n/a"
    facts = [
        ("Model", card.model_name),
        ("Task", card.task_type),
        ("Primary metric", _primary(card)),
        ("Candidate version", card.candidate_version or "not registered (dry run)"),
        ("Compared with champion", f"v{card.champion_version}" if card.champion_version else "none (cold start)"),
        ("Data version", card.data_version),
        ("Training window", window),
        ("Rows", f"{card.rows_train} train, {card.rows_holdout} holdout"),
        ("Code version", card.code_version),
        ("Created at", _when(card.created_at)),
    ]
    links = [
        (label, url)
        for label, url in (("MLflow run", card.mlflow_run_url), ("Prefect flow run", card.prefect_flow_run_url))
        if url
    ]
    return {
        "card": card,
        "title": f"Model card: {card.model_name} {'v' + card.candidate_version if card.candidate_version else ''}",
        "verdict": card.verdict.upper(),
        "facts": facts,
        "links": [(label, url, bool(re.match(r"https?://", url))) for label, url in links],
        "gates": [["PASS" if g.passed else "FAIL", g.gate, g.detail] for g in card.gates],
        "metric_header": ["metric", "candidate", "champion", "improvement", "interval", "significant"],
        "metrics": _metric_rows(card),
        "metric_legend": _metric_legend(card),
        "cold_start": _cold_start(card),
        "slice_title": f"Slices ({card.slice_metric}, {_direction(card.slice_metric)})",
        "slice_note": _slice_note(card),
        "slice_header": [
            "slice",
            "rows",
            f"candidate {card.slice_metric}",
            f"champion {card.slice_metric}",
            "drop",
            "status",
        ],
        "slices": _slice_rows(card),
        "fairness": _fairness_sections(card),
        "fairness_none": _fairness_none(card),
        "importance_note": _importance_note(card),
        "importance_header": ["feature", "importance", "std"],
        "importances": [[i.feature, _num(i.importance_mean), _num(i.importance_std)] for i in card.feature_importances],
    }


# --- Markdown ---


def _cell(text: str) -> str:
    """A Markdown table cell: pipes escaped, one line, and no text a renderer could take for an HTML tag."""
    text = text.replace("|", "\\|").replace("\n", " ")
    return re.sub(r"<(?=[A-Za-z/!?])", "&lt;", text)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


def render_markdown(card: ModelCard) -> str:
    """The card as Markdown (Prefect artifact, MLflow run description, a file next to the model)."""
    view = _view(card)
    lines = [f"# {view['title'].strip()}", "", f"**Verdict: {view['verdict']}**; {_cell(card.outcome)}", ""]
    lines += [f"- **{label}:** {_cell(value)}" for label, value in view["facts"]]
    lines += [f"- **{label}:** {_cell(url)}" for label, url, _ in view["links"]]
    lines += ["", "## Why", "", *[f"- {_cell(reason)}" for reason in card.reasons]]
    if view["gates"]:
        lines += ["", "## Gates", "", *_table(["result", "gate", "detail"], view["gates"])]
    lines += ["", "## Holdout metrics", "", _cell(view["metric_legend"]), ""]
    lines += _table(view["metric_header"], view["metrics"])
    if view["cold_start"]:
        cold = view["cold_start"]
        lines += ["", "## Cold start evidence", "", _cell(cold["summary"])]
        if cold["rows"]:
            lines += ["", *_table(cold["header"], cold["rows"])]
    if view["slices"]:
        lines += ["", f"## {view['slice_title']}", "", _cell(view["slice_note"]), ""]
        lines += _table(view["slice_header"], view["slices"])
    for section in view["fairness"]:
        lines += ["", f"## Fairness: {_cell(section['feature'])}", "", _cell(section["summary"])]
        if section["rows"]:
            lines += ["", *_table(section["header"], section["rows"])]
    if view["fairness_none"]:
        lines += ["", "## Fairness", "", view["fairness_none"]]
    if view["importances"]:
        lines += ["", "## What the model relies on", "", _cell(view["importance_note"]), ""]
        lines += _table(view["importance_header"], view["importances"])
    return "\n".join(lines) + "\n"


# --- HTML ---

_HTML = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{{ title }}</title>
<style>
body { font-family: system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
table { border-collapse: collapse; margin: 0.5rem 0 1.5rem; }
th, td { border: 1px solid #ccc; padding: 0.25rem 0.6rem; text-align: left; }
th { background: #f3f3f3; }
.verdict { font-size: 1.2rem; font-weight: bold; }
.PROMOTE, .PASS, .ok { color: #1b7a1b; }
.REJECT, .FAIL { color: #b00020; font-weight: bold; }
dl { display: grid; grid-template-columns: 14rem 1fr; gap: 0.15rem 1rem; }
dt { font-weight: bold; }
dd { margin: 0; overflow-wrap: anywhere; }
</style>
</head>
<body>
<h1>{{ title }}</h1>
<p class="verdict">Verdict: <span class="{{ verdict }}">{{ verdict }}</span>; {{ card.outcome }}</p>
<dl>
{% for label, value in facts %}<dt>{{ label }}</dt><dd>{{ value }}</dd>
{% endfor %}{% for label, url, clickable in links %}<dt>{{ label }}</dt><dd>
{%- if clickable %}<a href="{{ url }}">{{ url }}</a>{% else %}{{ url }}{% endif %}</dd>
{% endfor %}</dl>
<h2>Why</h2>
<ul>
{% for reason in card.reasons %}<li>{{ reason }}</li>
{% endfor %}</ul>
{% macro table(header, rows, status_column=none) -%}
<table>
<tr>{% for h in header %}<th>{{ h }}</th>{% endfor %}</tr>
{% for row in rows %}<tr>{% for cell in row %}<td
{%- if loop.index0 == status_column %} class="{{ cell.split(':')[0] }}"{% endif %}>{{ cell }}</td>{% endfor %}</tr>
{% endfor %}</table>
{%- endmacro %}
{% if gates %}<h2>Gates</h2>
{{ table(["result", "gate", "detail"], gates, 0) }}
{% endif %}<h2>Holdout metrics</h2>
<p>{{ metric_legend }}</p>
{{ table(metric_header, metrics) }}
{% if cold_start %}<h2>Cold start evidence</h2>
<p>{{ cold_start.summary }}</p>
{% if cold_start.rows %}{{ table(cold_start.header, cold_start.rows, 5) }}
{% endif %}{% endif %}{% if slices %}<h2>{{ slice_title }}</h2>
<p>{{ slice_note }}</p>
{{ table(slice_header, slices, 5) }}
{% endif %}{% for section in fairness %}<h2>Fairness: {{ section.feature }}</h2>
<p>{{ section.summary }}</p>
{% if section.rows %}{{ table(section.header, section.rows) }}
{% endif %}{% endfor %}{% if fairness_none %}<h2>Fairness</h2>
<p>{{ fairness_none }}</p>
{% endif %}{% if importances %}<h2>What the model relies on</h2>
<p>{{ importance_note }}</p>
{{ table(importance_header, importances) }}
{% endif %}</body>
</html>
"""


def render_html(card: ModelCard) -> str:
    """The card as one self-contained HTML page (inline style, no scripts, no external resources)."""
    environment = Environment(autoescape=True, undefined=StrictUndefined, keep_trailing_newline=True)
    return environment.from_string(_HTML).render(**_view(card))


def make_card(
    *,
    model_name: str,
    candidate_version: str | None,
    decision: Decision,
    outcome: str,
    data_version: str,
    training_window: tuple[str, str] | None,
    rows_train: int,
    rows_holdout: int,
    review: Review,
    code_version: str,
    slice_max_drop: float | None,
    task: str | None = None,
) -> ModelCard:
    """The card of one decision, from what the run computed (pure: no I/O).

    `task` (`DatasetConfig.task`) defaults to the one the review found (`Review.task`); the cold start
    evidence is `Review.holdout`, shown against the limits recorded in `Decision.gates`.
    """
    gate_bounds = configured_bounds(Gates.model_validate(decision.gates)) if decision.gates else []
    return ModelCard(
        model_name=model_name,
        candidate_version=candidate_version,
        champion_version=decision.champion_version,
        verdict=decision.verdict,
        outcome=outcome,
        reasons=list(decision.reasons),
        data_version=data_version,
        training_window=training_window,
        rows_train=rows_train,
        rows_holdout=rows_holdout,
        candidate_metrics=decision.candidate_metrics,
        code_version=code_version,
        created_at=datetime.now(UTC),
        champion_metrics=decision.champion_metrics,
        intervals=list(review.intervals),
        primary_metric=decision.primary_metric,
        slices_candidate=list(review.candidate.slices),
        slices_champion=list(review.champion.slices) if review.champion else [],
        slice_metric=decision.primary_metric,
        slice_max_drop=slice_max_drop,
        fairness=list(review.candidate.fairness),
        fairness_champion=list(review.champion.fairness) if review.champion else [],
        gates=list(decision.checks),
        feature_importances=importances_from_frame(review.importances) if not review.importances.empty else [],
        task=str(task) if task is not None else review.task,
        holdout=review.holdout,
        gate_bounds=[(metric, float(bound), kind) for metric, bound, kind in gate_bounds],
        importance_scoring=review.importance_scoring,
    )
