"""Monitoring reports: the Markdown summary (Prefect artifact) and the HTML report (stored in S3). Pure rendering.

One source of truth: every drift figure in both reports is the `FeatureDrift` the verdict was made of
(`core/monitoring/drift.py`). The HTML report draws, per feature and for the champion's predictions, the shares of
the reference and of the window over the very bins PSI is computed on (the reference's deciles plus a
bin for missing values; the categories), as matplotlib PNGs embedded in the page, each captioned with
our PSI, test, p-value, effect and verdict. Evidently is not used: its own drift tests and defaults
differed from ours, so its report could disagree with the verdict.
"""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from core.data.dataset import DatasetConfig
from core.data.features import prepare_inputs
from core.modeling.metrics import model_scores
from core.monitoring.decay import metric_label
from core.monitoring.drift import (
    Bins,
    FeatureDrift,
    column_bins,
    feature_values,
    prediction_basis,
    prediction_values,
    task_of,
)
from core.monitoring.drift_analysis import Champion, Verdict, Window, WindowResult, reference_scores
from core.monitoring.model_page import StoredPage

DISTRIBUTIONS = "Feature distributions"  # heading of a window's plots in the HTML report
MAX_BARS = 20  # categories drawn per plot; the rest are one "other" bar (the figures above use them all)


def _verdict_word(drift: FeatureDrift, judged: bool, markdown: bool = False) -> str:
    if not judged:
        return "not judged"
    if drift.drifted:
        return "**yes**" if markdown else "yes"
    return "no"


def _columns(result: WindowResult) -> list[tuple[str, FeatureDrift]]:
    """Every column of a window's result with its display name (the prediction marked as such)."""
    named = [(f.name, f) for f in result.features]
    return named + ([(f"{result.prediction.name} (prediction)", result.prediction)] if result.prediction else [])


def estimate_rows(result: WindowResult) -> list[list[str]]:
    """The estimated-performance table of a window: metric, estimate, band, reference, realised, error, verdict."""
    if result.estimated is None:
        return []
    rows = []
    for m in result.estimated.metrics:
        realised = "" if m.realised is None else f"{m.realised:.4f}"
        error = "" if m.error is None else f"{m.error:+.4f}"
        verdict = "worse" if m.worse else "within"
        rows.append(
            [m.metric, f"{m.estimate:.4f}", f"{m.lower:.4f} - {m.upper:.4f}", f"{m.reference:.4f}", realised, error,
             verdict]
        )  # fmt: skip
    return rows


ESTIMATE_HEADER = ["metric", "estimated", "band", "reference", "realised", "estimate - realised", "vs band"]


def _estimate_lines(result: WindowResult) -> list[str]:
    """Markdown: the estimated performance and the multivariate verdict of a window."""
    lines = []
    if result.estimated is not None:
        est = result.estimated
        lines += ["", f"Estimated performance without labels on {est.rows} rows ({est.method}):", ""]
        lines += ["| " + " | ".join(ESTIMATE_HEADER) + " |", "|" + "---|" * len(ESTIMATE_HEADER)]
        lines += ["| " + " | ".join(row) + " |" for row in estimate_rows(result)]
        if est.labelled_rows:
            lines.append(f"\nrealised on {est.labelled_rows} labelled rows")
    elif result.estimation_note:
        lines += ["", f"- {result.estimation_note}"]
    if result.multivariate is not None:
        lines += ["", f"- multivariate (domain classifier): {result.multivariate.describe()}"]
    return lines


def _estimate_html(result: WindowResult) -> str:
    """HTML: the estimated performance and the multivariate verdict of a window."""
    out = []
    if result.estimated is not None:
        est = result.estimated
        out.append(f"<p>Estimated performance without labels on {est.rows} rows ({html.escape(est.method)}):</p>")
        out.append("<table border=1 cellpadding=4 class='estimated'><tr>")
        out += [f"<th>{html.escape(h)}</th>" for h in ESTIMATE_HEADER]
        out.append("</tr>")
        for row in estimate_rows(result):
            out.append("<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>")
        out.append("</table>")
    elif result.estimation_note:
        out.append(f"<p>{html.escape(result.estimation_note)}</p>")
    if result.multivariate is not None:
        out.append(f"<p class='multivariate'>Multivariate (domain classifier): "
                   f"{html.escape(result.multivariate.describe())}</p>")  # fmt: skip
    return "".join(out)


@dataclass(frozen=True)
class MonitoredModel:
    """The model a monitoring summary is about: its registered name, the champion's version and its classes.

    `classes` (empty for a regressor) names the task and what prediction drift measured; None leaves them out.
    `page` is the model's monitoring page over time (`core/monitoring/model_page.py`), linked when given.
    """

    name: str
    version: str
    classes: list[Any] | None = None
    page: StoredPage | None = None


def summary_markdown(
    model: MonitoredModel,
    windows: list[WindowResult],
    verdict: Verdict,
    report_uri: str,
    report_link: str,
    trigger: str,
) -> str:
    """The Prefect artifact: verdict, a table per window, the link to the full report and to the model's page."""
    classes = None if model.classes is None else list(model.classes)
    lines = [
        f"# Drift monitoring: **{'RETRAIN' if verdict.triggered else 'OK'}**",
        "",
        f"- model: `{model.name}`, champion v{model.version}; report: [report.html]({report_link}) (`{report_uri}`)",
    ]
    if model.page is not None:
        lines.append(f"- over time: [the model's monitoring page]({model.page.link}) (`{model.page.uri}`)")
    if classes is not None:
        lines.append(f"- task: {task_of(classes)}; prediction drift is measured on {prediction_basis(classes)}")
    lines += [f"- retraining: {trigger}", f"- summary: {verdict.summary}", ""]
    for w in windows:
        lines += [f"## {w.name}: {w.rows} rows from `{w.source}`", ""]
        lines += [f"- {reason}" for reason in w.reasons] or [f"- {w.note}"]
        if w.performance is not None:
            lines += ["", "| metric | recent | holdout | change |", "|---|---|---|---|"]
            for metric, value in w.performance.metrics.items():
                holdout = w.performance.holdout.get(metric)
                lines.append(
                    f"| {metric_label(metric, classes)} | {value:.4f} | {'' if holdout is None else f'{holdout:.4f}'} "
                    f"| {w.performance.change(metric)} |"
                )
            lines.append(f"\n{w.performance.rows} labelled rows")
        elif w.labelled_rows:
            lines.append(f"- only {w.labelled_rows} labelled rows: no performance figures")
        lines += _estimate_lines(w)
        lines += [
            "",
            "| column | kind | PSI | test | statistic | p-value | effect | drifted |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, f in _columns(w):
            lines.append(
                f"| {name} | {f.kind} | {f.psi:.3f} | {f.test} | {f.statistic:.3f} | {f.p_value:.2g} | "
                f"{f.effect:.3f} | {_verdict_word(f, w.judged, markdown=True)} |"
            )
        lines.append("")
    return "\n".join(lines) + "\n"


def summary_html(champion: Champion, results: list[WindowResult]) -> str:
    """The HTML report's head: task, per window the reasons, performance and the per-column figures."""
    classes = champion.classes
    out = [
        f"<h1>Drift monitoring of {html.escape(champion.model_name)} v{champion.version}</h1>",
        f"<p>Task: {task_of(classes)}; prediction drift is measured on {html.escape(prediction_basis(classes))}.</p>",
    ]
    for w in results:
        out.append(f"<h2>{html.escape(w.name)}: {w.rows} rows</h2><ul>")
        out += [f"<li>{html.escape(r)}</li>" for r in w.reasons] or [f"<li>{html.escape(w.note)}</li>"]
        out.append("</ul>")
        if w.performance is not None:
            out.append(f"<p>Performance on {w.performance.rows} labelled rows:</p>")
            out.append("<table border=1 cellpadding=4><tr><th>metric</th><th>recent</th><th>holdout</th>")
            out.append("<th>change</th></tr>")
            for metric, value in w.performance.metrics.items():
                holdout = w.performance.holdout.get(metric)
                out.append(
                    f"<tr><td>{html.escape(metric_label(metric, classes))}</td><td>{value:.4f}</td>"
                    f"<td>{'' if holdout is None else f'{holdout:.4f}'}</td>"
                    f"<td>{w.performance.change(metric)}</td></tr>"
                )
            out.append("</table>")
        out.append(_estimate_html(w))
        out.append("<table border=1 cellpadding=4><tr><th>column</th><th>PSI</th><th>test</th>")
        out.append("<th>p-value</th><th>effect</th><th>drifted</th></tr>")
        for name, f in _columns(w):
            out.append(
                f"<tr><td>{html.escape(name)}</td><td>{f.psi:.3f}</td><td>{f.test}</td><td>{f.p_value:.2g}</td>"
                f"<td>{f.effect:.3f}</td><td>{_verdict_word(f, w.judged)}</td></tr>"
            )
        out.append("</table>")
    return "".join(out)


# ---------------------------------------------------------------------------------------------- distributions


@dataclass(frozen=True)
class Panel:
    """One plot of the report: a column's figures (the verdict's own) and the bins they were computed on."""

    title: str
    drift: FeatureDrift
    bins: Bins


def distribution_panels(
    champion: Champion, frame: pd.DataFrame, result: WindowResult, config: DatasetConfig
) -> list[Panel]:
    """A panel per feature of `result` and one for the champion's predictions, with the bins of their PSI.

    The figures are `result`'s (not recomputed); the bins are rebuilt from the same reference and rows
    with the functions PSI uses, so their PSI is the figure shown.
    """
    current = prepare_inputs(frame, config)
    reference = champion.reference
    panels = [
        Panel(
            f.name,
            f,
            column_bins(f.kind, feature_values(reference, f.name, config), feature_values(current, f.name, config)),
        )
        for f in result.features
    ]
    if result.prediction is not None:
        classes = champion.classes
        ref = prediction_values(reference_scores(reference, classes), classes)
        cur = prediction_values(model_scores(champion.model, current), classes)
        bins = column_bins(result.prediction.kind, ref, cur)
        panels.append(Panel(f"{result.prediction.name} (prediction)", result.prediction, bins))
    return panels


def _shown(bins: Bins) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Shares to draw: every bin, or the `MAX_BARS` largest categories and one `other` bar."""
    ref, cur = bins.reference / bins.reference.sum(), bins.current / bins.current.sum()
    if len(bins.labels) <= MAX_BARS:
        return bins.labels, ref, cur
    keep = np.sort(np.argsort(-np.maximum(ref, cur), kind="stable")[: MAX_BARS - 1])
    rest = np.setdiff1d(np.arange(len(ref)), keep)
    labels = [bins.labels[i] for i in keep] + [f"other ({len(rest)})"]
    return labels, np.append(ref[keep], ref[rest].sum()), np.append(cur[keep], cur[rest].sum())


def plot_png(panel: Panel) -> bytes:
    """The reference's and the window's shares per bin as grouped bars (PNG)."""
    from matplotlib.figure import Figure

    labels, ref, cur = _shown(panel.bins)
    figure = Figure(figsize=(max(4.5, 0.45 * len(labels) + 1.5), 2.8), dpi=80, layout="constrained")
    axes = figure.add_subplot()
    x = np.arange(len(labels))
    axes.bar(x - 0.2, ref, 0.4, label="reference", color="#7f7f7f")
    axes.bar(x + 0.2, cur, 0.4, label="window", color="#d62728" if panel.drift.drifted else "#1f77b4")
    axes.set_xticks(x, [label[:24] for label in labels], rotation=45, ha="right", fontsize=7)
    axes.set_ylabel("share", fontsize=8)
    axes.tick_params(axis="y", labelsize=7)
    axes.legend(fontsize=7, frameon=False)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def caption(drift: FeatureDrift, judged: bool) -> str:
    """A panel's figures in words: PSI, the test's statistic and p-value, the effect and the verdict."""
    f = drift
    if f.test == "ks":
        test = f"KS statistic {f.statistic:.3f} (the effect), p = {f.p_value:.2g}"
    else:
        test = f"chi-square {f.statistic:.3f}, p = {f.p_value:.2g}; total-variation distance {f.effect:.3f}"
    return f"PSI {f.psi:.3f}; {test}; drifted: {_verdict_word(f, judged)}"


def panel_html(panel: Panel, judged: bool) -> str:
    """A panel: title, plot and our figures, also as `data-*` attributes (full precision) for tools and tests."""
    f = panel.drift
    image = base64.b64encode(plot_png(panel)).decode()
    attributes = {
        "column": f.name,
        "kind": f.kind,
        "psi": repr(f.psi),
        "test": f.test,
        "statistic": repr(f.statistic),
        "p-value": repr(f.p_value),
        "effect": repr(f.effect),
        "drifted": _verdict_word(f, judged),
    }
    data = " ".join(f'data-{k}="{html.escape(v, quote=True)}"' for k, v in attributes.items())
    return (
        f'<div class="panel" {data} style="display:inline-block;vertical-align:top;margin:4px">'
        f"<h3>{html.escape(panel.title)}</h3>"
        f'<img alt="{html.escape(panel.title, quote=True)}" src="data:image/png;base64,{image}"/>'
        f"<p>{html.escape(caption(f, judged))}</p></div>"
    )


def report_html(
    champion: Champion,
    windows: list[Window],
    results: list[WindowResult],
    config: DatasetConfig,
    retraining: str = "",
    page: StoredPage | None = None,
) -> str:
    """The HTML report: the summary, then per judged window the distributions behind each figure.

    `retraining` (what the verdict means for retraining, when it needs saying) is shown under the summary, and a
    link to the model's page over time (`core/monitoring/model_page.py`) when `page` is given.
    """
    parts = []
    for window, result in zip(windows, results, strict=True):
        heading = f"<h2>{DISTRIBUTIONS}: {html.escape(window.name)}</h2>"
        if len(window.frame) == 0 or not result.judged:
            parts.append(f"{heading}<p>{html.escape(result.note or 'no rows')}: no plots.</p>")
            continue
        panels = distribution_panels(champion, window.frame, result, config)
        parts.append(
            f"{heading}<p>Shares of the reference (the champion's holdout rows) and of this window over the bins "
            "PSI is computed on (the reference's deciles plus missing values; the categories). The figures are "
            "the verdict's.</p>" + "".join(panel_html(panel, result.judged) for panel in panels)
        )
    return (
        "<html><head><meta charset='utf-8'></head><body>"
        f"{summary_html(champion, results)}"
        + (f"<p><b>Retraining</b>: {html.escape(retraining)}</p>" if retraining else "")
        + (
            f"<p class='over-time'>Over time: <a href='{html.escape(page.link, quote=True)}'>the model's monitoring "
            f"page</a> (<code>{html.escape(page.uri)}</code>)</p>"
            if page
            else ""
        )
        + f"{''.join(parts)}</body></html>"
    )


@dataclass(frozen=True)
class StoredReport:
    """Where the report went: S3 URIs and a link a browser can open (presigned, 7 days)."""

    html_uri: str
    json_uri: str
    link: str
