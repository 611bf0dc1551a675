"""Model card: one page that answers "why is this model in production?".

A `ModelCard` holds the decision and everything behind it (the data and code it came from, the metrics
with their intervals, the slices, fairness, the gates, what the model relies on, where the runs are);
`render_markdown` and `render_html` turn it into text for MLflow, Prefect artifacts or a browser. Both
renderers format the same table rows, so they always show the same numbers.
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

from tasks.fairness import FairnessReport
from tasks.promotion import Decision, GateResult, improvement
from tasks.significance import DeltaInterval
from tasks.slices import SliceMetric, slice_drop

if TYPE_CHECKING:
    from tasks.review import Review


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

    def to_json(self) -> str:
        """The card as JSON (an MLflow artifact next to the rendered page)."""
        return json.dumps(asdict(self), indent=2, sort_keys=True, default=str)


def importances_from_frame(importances: pd.DataFrame, top_k: int = 10) -> list[FeatureImportance]:
    """The `top_k` first rows of `tasks.explain.permutation_importances`, for the card."""
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
        name = f"{metric} (primary)" if metric == card.primary_metric else metric
        rows.append([name, _num(value), _num(champion), delta, ci, verdict])
    return rows


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


def _fairness_sections(card: ModelCard) -> list[dict[str, Any]]:
    sections = []
    champion = f"champion v{card.champion_version}" if card.champion_version else "champion"
    for who, report in [("candidate", r) for r in card.fairness] + [(champion, r) for r in card.fairness_champion]:
        rows = [
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
        sections.append(
            {
                "feature": f"{report.feature} ({who})",
                "dp": _num(report.demographic_parity_difference),
                "eo": _num(report.equalized_odds_difference),
                "rows": rows,
            }
        )
    return sections


def _view(card: ModelCard) -> dict[str, Any]:
    """Everything the templates show, already formatted as text."""
    window = f"{card.training_window[0]} to {card.training_window[1]}" if card.training_window else "n/a"
    facts = [
        ("Model", card.model_name),
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
        "slice_header": [
            "slice",
            "rows",
            f"candidate {card.slice_metric}",
            f"champion {card.slice_metric}",
            "drop",
            "status",
        ],
        "slices": _slice_rows(card),
        "fairness_header": ["group", "rows", "selection rate", "TPR", "FPR", "note"],
        "fairness": _fairness_sections(card),
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
    lines += ["", "## Holdout metrics", "", *_table(view["metric_header"], view["metrics"])]
    if view["slices"]:
        lines += ["", f"## Slices ({card.slice_metric})", "", *_table(view["slice_header"], view["slices"])]
    for section in view["fairness"]:
        lines += [
            "",
            f"## Fairness: {_cell(section['feature'])}",
            "",
            f"Demographic parity difference {section['dp']}; equalized odds difference {section['eo']}.",
            "",
            *_table(view["fairness_header"], section["rows"]),
        ]
    if view["importances"]:
        lines += ["", "## What the model relies on", "", *_table(view["importance_header"], view["importances"])]
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
{{ table(metric_header, metrics) }}
{% if slices %}<h2>Slices ({{ card.slice_metric }})</h2>
{{ table(slice_header, slices, 5) }}
{% endif %}{% for section in fairness %}<h2>Fairness: {{ section.feature }}</h2>
<p>Demographic parity difference {{ section.dp }}; equalized odds difference {{ section.eo }}.</p>
{{ table(fairness_header, section.rows) }}
{% endfor %}{% if importances %}<h2>What the model relies on</h2>
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
) -> ModelCard:
    """The card of one decision, from what the run computed (pure: no I/O)."""
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
    )
