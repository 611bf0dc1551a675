"""The model card as Markdown and HTML (one view of the card, two renderings)."""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from jinja2 import Environment, StrictUndefined

from core.data.dataset import TaskType
from core.evaluation.fairness import FairnessReport, excluded_groups_line
from core.evaluation.slices import slice_drop
from core.modeling.metrics import LOWER_IS_BETTER, improvement, scoring_for
from core.promotion.card import (
    IMPORTANCE_MEANING,
    MACRO_METRICS,
    METRIC_NAMES,
    MULTICLASS_METRIC_NAMES,
    ModelCard,
)
from core.promotion.lineage import lineage_command

log = logging.getLogger(__name__)


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
    left_out = excluded_groups_line([report])
    left_out = f" {left_out[0].upper()}{left_out[1:]}." if left_out else ""
    if report.task == "regression":
        gaps = report.differences
        return (
            f"Largest difference between groups: MAE {_num(gaps.get('mae'))}, RMSE {_num(gaps.get('rmse'))}, "
            f"mean prediction {_num(gaps.get('mean_prediction'))}. Demographic parity and equalized odds: "
            f"not applicable for regression: {report.not_applicable}.{left_out}"
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
    return summary + left_out


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
    scoring = card.importance_scoring or scoring_for(TaskType(card.task_type)).scorer
    meaning = IMPORTANCE_MEANING.get(scoring, f"the drop in {scoring}")
    return f"Permutation importance on the holdout: {meaning} when the feature's values are shuffled."


def _lineage(card: ModelCard) -> list[tuple[str, str]]:
    """The static part of the version's lineage (known when the card is made) and the command for the rest."""
    run = card.mlflow_run_url or "this card's MLflow run"
    rows = [
        ("Data version", card.data_version + (f", frozen at {card.data_manifest}" if card.data_manifest else "")),
        ("Training run", run),
        ("Model version", f"v{card.candidate_version}" if card.candidate_version else "not registered (dry run)"),
    ]
    if card.candidate_version:
        live = lineage_command(card.model_name, card.candidate_version)
        rows.append(("Alias history, batch-scoring outputs, prediction-log partitions", live))
    if card.monitoring_page:
        rows.append(("Monitoring over time", f"{card.monitoring_page} (created by the first monitoring run)"))
    return rows


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
        *([("Holdout", card.holdout_split)] if card.holdout_split else []),
        *[
            (f"Leak check overridden: {feature}", f"allow_leak: {reason}")
            for feature, reason in card.allowed_leaks.items()
        ],
        *([("Feature store join", card.feature_join)] if card.feature_join else []),
        ("Code version", card.code_version),
        ("Serving form", card.inference or "not compiled: serving uses the pipeline"),
        *([("Calibration", card.calibration)] if card.calibration else []),
        ("Created at", _when(card.created_at)),
    ]
    links = [
        (label, url)
        for label, url in (("MLflow run", card.mlflow_run_url), ("Prefect flow run", card.prefect_flow_run_url))
        if url
    ]
    return {
        "card": card,
        "lineage": _lineage(card),
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
        "training": list(card.training.items()),
    }


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
    if view["training"]:
        lines += [
            "",
            "## Training: what ran where",
            "",
            *[f"- **{label}:** {_cell(value)}" for label, value in view["training"]],
        ]
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
    lines += ["", "## Lineage", "", *[f"- **{label}:** {value}" for label, value in view["lineage"]]]
    return "\n".join(lines) + "\n"


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
{% if training %}<h2>Training: what ran where</h2>
<dl>
{% for label, value in training %}<dt>{{ label }}</dt><dd>{{ value }}</dd>
{% endfor %}</dl>
{% endif %}{% macro table(header, rows, status_column=none) -%}
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
{% endif %}<h2>Lineage</h2>
<dl>
{% for label, value in lineage %}<dt>{{ label }}</dt><dd>{{ value }}</dd>
{% endfor %}</dl>
</body>
</html>
"""


def render_html(card: ModelCard) -> str:
    """The card as one self-contained HTML page (inline style, no scripts, no external resources)."""
    environment = Environment(autoescape=True, undefined=StrictUndefined, keep_trailing_newline=True)
    return environment.from_string(_HTML).render(**_view(card))
