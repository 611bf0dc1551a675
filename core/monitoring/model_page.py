"""The page per model over time: a model's stored monitoring results as time series (pure rendering, no I/O).

Input: the parsed `result.json` of each stored run (`core.monitoring.drift_analysis.result_json`) with when it ran
and where its report is, and the model's champion changes (`core.promotion.history`). Output: one self-contained
HTML page (matplotlib PNGs embedded, like `core/monitoring/drift_report.py`): rows per window, null rates per
feature, PSI per feature, the domain classifier's AUC against its threshold, the estimated performance with its
band next to the realised value, and a table of the runs. Every plot has one series per window (`partition`,
`prediction-log`) and the champion changes as vertical lines labelled with the version. A result stored before a
figure existed (no `estimated`, `multivariate`, `null_rates` or `at`) gives no point for it. The figures plotted
are also in the page as JSON (`<script id="page-data">`), at full precision, for tools and tests.
Reading and storing are `adapters/monitoring_store.py`; `tasks.monitoring.update_model_page` runs both.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from core.monitoring.estimation import LOWER_IS_BETTER
from core.promotion.history import ChampionChange

REPORTS_PREFIX = "reports/monitoring"
PAGE_NAME = "index.html"
MAX_RUNS = 200  # stored results a page reads (the newest); the page says when there are more
FOLDER_TIME = "%Y%m%dT%H%M%SZ"  # how a run's folder name starts (`adapters.monitoring_store.report_folder`)
COLORS = {"partition": "#1f77b4", "prediction-log": "#ff7f0e"}
MORE_COLORS = ("#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22")
FLAG = "#d62728"


def model_prefix(model_name: str) -> str:
    """Where a model's monitoring runs are stored: `reports/monitoring/<model>` (one folder per run below it)."""
    return f"{REPORTS_PREFIX}/{model_name}"


def page_key(model_name: str) -> str:
    """The key of the model's page: `reports/monitoring/<model>/index.html`."""
    return f"{model_prefix(model_name)}/{PAGE_NAME}"


def page_uri(bucket: str, model_name: str) -> str:
    """The S3 URI of the model's page (known before the first monitoring run creates it)."""
    return f"s3://{bucket}/{page_key(model_name)}"


def run_time(result: dict[str, Any], folder: str) -> datetime | None:
    """When a run ran: its `at` (ISO 8601), else the UTC time its folder's name starts with; None without either."""
    at = result.get("at")
    if isinstance(at, str):
        try:
            parsed = datetime.fromisoformat(at)
            return parsed.astimezone(UTC) if parsed.tzinfo else parsed.replace(tzinfo=UTC)
        except ValueError:
            pass
    try:
        return datetime.strptime(folder.rstrip("/").rsplit("/", 1)[-1][:16], FOLDER_TIME).replace(tzinfo=UTC)
    except ValueError:
        return None


@dataclass(frozen=True)
class StoredRun:
    """One stored monitoring run: when it ran, its folder's name, its parsed `result.json`, and its report."""

    at: datetime
    folder: str
    result: dict[str, Any]
    report_uri: str = ""
    report_link: str = ""  # a link a browser can open (presigned)


@dataclass(frozen=True)
class StoredPage:
    """Where the page went: its S3 URI and a link a browser can open (presigned)."""

    uri: str
    link: str


@dataclass(frozen=True)
class Point:
    """One window's figure in one run; `value` is NaN where only the realised value is known."""

    at: datetime
    value: float
    lower: float | None = None  # the band (estimated performance)
    upper: float | None = None
    threshold: float | None = None  # the domain classifier's
    realised: float | None = None  # with labels
    flagged: bool = False  # drifted, or beyond the band on the worse side


Series = dict[str, list[Point]]  # window name -> its points, oldest first


@dataclass(frozen=True)
class Section:
    """One part of the page: its key (its heading and texts are `TEXTS[key]`), its panels (title -> series)."""

    key: str
    panels: dict[str, Series] = field(default_factory=dict)
    note: str = ""  # added to the text


@dataclass(frozen=True)
class Mark:
    """A champion change drawn on every plot."""

    at: datetime
    label: str


# Each section: its heading, what its plot shows, and what is said when no stored run has its figures.
TEXTS = {
    "volume": ("Volume", "Rows per window and run.", "No stored run has windows."),
    "null-rates": (
        "Null rates",
        "Share of missing values per feature.",
        "No missing value in any run, or no stored run has null rates (results stored before they existed).",
    ),
    "feature-drift": (
        "Per-feature drift",
        "PSI per feature and for the champion's predictions; a red ring marks a point the run judged drifted (the "
        "rules are in core/monitoring/drift.py).",
        "No stored run has per-feature figures.",
    ),
    "multivariate": (
        "Multivariate drift",
        "Cross-validated ROC AUC of a classifier telling the window's rows from the reference's (solid line) and its "
        "threshold from permuted labels (dashed); a red ring: drifted.",
        "No stored run has a domain classifier's figures (results stored before it existed, or it was off).",
    ),
    "estimated-performance": (
        "Estimated and realised performance",
        "Performance expected without labels (line), its band from the reference (shaded, and a bar at each run), "
        "the realised value once labels arrived (hollow diamonds); a red ring: beyond the band on the worse side.",
        "No stored run has estimated or realised performance (no labels, and results stored before estimation).",
    ),
}


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _add(panels: dict[str, Series], title: str, window: str, point: Point) -> None:
    panels.setdefault(title, {}).setdefault(window, []).append(point)


def _estimates(at: datetime, window: dict[str, Any], panels: dict[str, Series]) -> None:
    """The estimated metrics of a window; a realised metric without an estimate (older results) as a lone point."""
    name = str(window.get("name", "?"))
    realised = ((window.get("performance") or {}).get("metrics")) or {}
    estimated = window.get("estimated") or {}
    seen = set()
    for m in estimated.get("metrics") or []:
        metric, estimate = str(m.get("metric")), _number(m.get("estimate"))
        lower, upper = _number(m.get("lower")), _number(m.get("upper"))
        if estimate is None:
            continue
        seen.add(metric)
        real = _number(m.get("realised")) if m.get("realised") is not None else _number(realised.get(metric))
        higher = metric in LOWER_IS_BETTER  # worse is higher for an error metric
        worse = (upper is not None and estimate > upper) if higher else (lower is not None and estimate < lower)
        _add(panels, metric, name, Point(at, estimate, lower, upper, realised=real, flagged=worse))
    for metric, value in realised.items():
        if metric not in seen and _number(value) is not None and (metric in panels or not estimated):
            _add(panels, metric, name, Point(at, math.nan, realised=float(value)))


def sections(runs: list[StoredRun]) -> list[Section]:
    """The page's sections, their series taken from the stored results (the numbers as stored)."""
    volume, nulls, drift, multivariate, estimated = {}, {}, {}, {}, {}  # section -> panel title -> series
    pairs = [(r.at, w) for r in sorted(runs, key=lambda r: r.at) for w in r.result.get("windows") or []]
    for at, w in [(at, w) for at, w in pairs if isinstance(w, dict)]:
        name, judged = str(w.get("name", "?")), bool(w.get("judged", True))
        if _number(w.get("rows")) is not None:
            _add(volume, "rows", name, Point(at, float(w["rows"])))
        for feature, share in (w.get("null_rates") or {}).items():
            if _number(share) is not None:
                _add(nulls, str(feature), name, Point(at, float(share)))
        columns = [(str(f.get("name")), f) for f in w.get("features") or []]
        if isinstance(w.get("prediction"), dict):
            columns.append((f"{w['prediction'].get('name')} (prediction)", w["prediction"]))
        for title, f in columns:
            if _number(f.get("psi")) is not None:
                _add(drift, title, name, Point(at, float(f["psi"]), flagged=judged and bool(f.get("drifted"))))
        m = w.get("multivariate")
        if isinstance(m, dict) and _number(m.get("auc")) is not None:
            point = Point(at, float(m["auc"]), threshold=_number(m.get("threshold")), flagged=bool(m.get("drifted")))
            _add(multivariate, "domain classifier ROC AUC", name, point)
        _estimates(at, w, estimated)
    quiet = [f for f, series in nulls.items() if all(p.value == 0 for ps in series.values() for p in ps)]
    nulls = {f: series for f, series in nulls.items() if f not in quiet}
    note = f" Never missing in any run, so not drawn: {', '.join(quiet)}." if quiet else ""
    return [
        Section("volume", volume),
        Section("null-rates", nulls, note),
        Section("feature-drift", drift),
        Section("multivariate", multivariate),
        Section("estimated-performance", estimated),
    ]


def change_marks(changes: list[ChampionChange], runs: list[StoredRun]) -> list[Mark]:
    """The champion changes to draw: those after the first run shown, and the one that made its champion."""
    if not runs:
        return []
    first = min(run.at for run in runs)
    dated = sorted(
        ((parsed, c) for c in changes if (parsed := run_time({"at": c.at}, "")) is not None), key=lambda item: item[0]
    )
    before = [item for item in dated if item[0] <= first][-1:]
    shown = before + [item for item in dated if item[0] > first]
    marks = []
    for at, change in shown:
        version = f"v{change.to_version}" if change.to_version else "no champion"
        marks.append(Mark(at, version if change.kind == "promotion" else f"{version} ({change.kind})"))
    return marks


def _naive(at: datetime) -> datetime:
    return at.astimezone(UTC).replace(tzinfo=None)


def _color(window: str, windows: list[str]) -> str:
    return COLORS.get(window) or MORE_COLORS[windows.index(window) % len(MORE_COLORS)]


def _draw(axes: Any, series: Series, windows: list[str]) -> None:
    for window, points in series.items():
        color = _color(window, windows)
        x = [_naive(p.at) for p in points]
        axes.plot(x, [p.value for p in points], marker="o", ms=3, lw=1.2, color=color, label=window)
        band = [(_naive(p.at), p.lower, p.upper) for p in points if p.lower is not None and p.upper is not None]
        if band:
            bx, low, high = zip(*band, strict=True)
            axes.fill_between(bx, low, high, color=color, alpha=0.18, lw=0, label=f"{window} band")
            axes.vlines(bx, low, high, color=color, alpha=0.35, lw=2)
        limits = [(_naive(p.at), p.threshold) for p in points if p.threshold is not None]
        if limits:
            axes.plot(*zip(*limits, strict=True), ls="--", lw=1, color=color, label=f"{window} threshold")
        real = [(_naive(p.at), p.realised) for p in points if p.realised is not None]
        if real:
            axes.scatter(*zip(*real, strict=True), marker="D", s=22, facecolors="none", edgecolors=color,
                         label=f"{window} realised", zorder=3)  # fmt: skip
        flagged = [(_naive(p.at), p.value) for p in points if p.flagged]
        if flagged:
            axes.scatter(*zip(*flagged, strict=True), s=70, facecolors="none", edgecolors=FLAG, lw=1.5,
                         label="drifted / worse", zorder=4)  # fmt: skip


def plot_png(panels: dict[str, Series], marks: list[Mark], span: tuple[datetime, datetime]) -> bytes:
    """One figure per section: a subplot per panel (time on x), the champion changes on each; PNG bytes."""
    import matplotlib.dates as mdates
    from matplotlib.figure import Figure

    windows = sorted({w for series in panels.values() for w in series})
    columns = 1 if len(panels) == 1 else min(3, len(panels))
    rows = math.ceil(len(panels) / columns)
    width = 10.0 if columns == 1 else 4.4 * columns
    figure = Figure(figsize=(width, 2.5 * rows + 0.5), dpi=80, layout="constrained")
    grid = figure.subplots(rows, columns, squeeze=False).ravel()
    low, high = (_naive(t) for t in span)
    pad = (high - low) * 0.05 if high > low else timedelta(minutes=30)  # one run: an hour's axis around it
    for axes, (title, series) in zip(grid, panels.items(), strict=False):
        _draw(axes, series, windows)
        for mark in marks:  # the champion at the first run, changed before it, is drawn at the left edge
            at, label, side = _naive(mark.at), mark.label, "right"
            if at < low:
                at, label, side = low - pad / 2, f"{label} since {mark.at:%Y-%m-%d}", "left"
            axes.axvline(at, color="#555555", ls=":", lw=1)
            axes.annotate(label, (at, 0.98), xycoords=("data", "axes fraction"), rotation=90, fontsize=7,
                          ha=side, va="top", color="#333333")  # fmt: skip
        axes.set_xlim(low - pad, high + pad)
        locator = mdates.AutoDateLocator(minticks=3, maxticks=8)
        axes.xaxis.set_major_locator(locator)
        axes.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))
        axes.set_title(title[:48], fontsize=9)
        axes.tick_params(labelsize=7)
    for axes in grid[len(panels) :]:
        axes.set_visible(False)
    handles: dict[str, Any] = {}
    for axes in grid[: len(panels)]:
        for handle, label in zip(*axes.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, handle)
    figure.legend(handles.values(), handles.keys(), loc="outside upper center", ncols=min(6, len(handles)),
                  fontsize=7, frameon=False)  # fmt: skip
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _point_json(point: Point) -> dict[str, Any]:
    fields = {"value": point.value, "lower": point.lower, "upper": point.upper, "threshold": point.threshold,
              "realised": point.realised}  # fmt: skip
    shown = {k: v for k, v in fields.items() if v is not None and not (isinstance(v, float) and math.isnan(v))}
    return {"at": point.at.isoformat(), **shown, "flagged": point.flagged}


def _section_html(section: Section, marks: list[Mark], span: tuple[datetime, datetime]) -> str:
    title, text, empty = TEXTS[section.key]
    heading = f"<h2 id='{section.key}'>{html.escape(title)}</h2>"
    if not section.panels:
        return f"{heading}<p class='empty' data-section='{section.key}'>{html.escape(empty)}</p>"
    image = base64.b64encode(plot_png(section.panels, marks, span)).decode()
    labels = html.escape("|".join(mark.label for mark in marks), quote=True)
    return (
        f"{heading}<p>{html.escape(text + section.note)}</p>"
        f"<figure class='plot' data-section='{section.key}' data-panels='{len(section.panels)}' "
        f"data-changes='{labels}'><img alt='{html.escape(title, quote=True)}' "
        f"src='data:image/png;base64,{image}'/></figure>"
    )


def _run_row(run: StoredRun) -> str:
    result = run.result
    verdict = result.get("verdict") or {}
    triggered = bool(verdict.get("triggered"))
    reasons = list(verdict.get("reasons") or []) or [str(verdict.get("summary", ""))]
    if result.get("retraining"):
        reasons.append(f"retraining: {result['retraining']}")
    windows = ", ".join(f"{w.get('name')} {w.get('rows')}" for w in result.get("windows") or [] if isinstance(w, dict))
    link = run.report_link or run.report_uri
    report = f"<a href='{html.escape(link, quote=True)}'>report</a>" if link else ""
    cells = [
        f"{run.at:%Y-%m-%d %H:%M:%S} UTC",
        html.escape(f"v{result['champion']}" if result.get("champion") else ""),
        "<b>RETRAIN</b>" if triggered else "OK",
        "<br>".join(html.escape(r) for r in reasons),
        html.escape(windows),
        f"{report}<br><code>{html.escape(run.report_uri)}</code>" if run.report_uri else report,
    ]
    folder = html.escape(run.folder, quote=True)
    return f"<tr class='run' data-folder='{folder}'><td>" + "</td><td>".join(cells) + "</td></tr>"


def model_page_html(
    model_name: str,
    runs: list[StoredRun],
    changes: list[ChampionChange],
    total: int | None = None,
    updated: datetime | None = None,
    limit: int = MAX_RUNS,
) -> str:
    """The page: a header (the cap, the champion changes), a plot per section, the table of runs (newest first).

    `runs` are the stored runs read (at most `limit`, the newest), `total` how many are stored.
    """
    runs = sorted(runs, key=lambda run: run.at)
    total = len(runs) if total is None else total
    marks = change_marks(changes, runs)
    times = [run.at for run in runs]
    span = (times[0], max([times[-1]] + [mark.at for mark in marks])) if runs else (datetime.now(UTC),) * 2
    parts = [f"<h1>Monitoring of {html.escape(model_name)} over time</h1>"]
    shown = f"the last {len(runs)} of {total} stored runs" if total > len(runs) else f"all {total} stored run(s)"
    parts.append(
        f"<p class='cap'>Showing {shown} (the page reads at most the newest {limit})"
        + (f", updated {updated:%Y-%m-%d %H:%M:%S} UTC" if updated else "")
        + ". One series per window; champion changes are the dotted vertical lines, labelled with the version.</p>"
    )
    if marks:
        parts.append("<p>Champion changes shown: " + ", ".join(
            f"<span class='change'>{mark.at:%Y-%m-%d %H:%M} UTC {html.escape(mark.label)}</span>" for mark in marks
        ) + "</p>")  # fmt: skip
    page_sections = sections(runs) if runs else []
    if not runs:
        parts.append("<p>No monitoring run stored yet.</p>")
    parts += [_section_html(section, marks, span) for section in page_sections]
    if runs:
        header = ["time", "champion", "verdict", "reasons", "rows per window", "report"]
        parts.append("<h2 id='runs'>Runs</h2><p>Newest first; report links are presigned and last 7 days from the "
                     "page's update (the S3 URI under each).</p>")  # fmt: skip
        parts.append("<table border=1 cellpadding=4 class='runs'><tr>" + "".join(f"<th>{h}</th>" for h in header))
        parts.append("</tr>" + "".join(_run_row(run) for run in reversed(runs)) + "</table>")
    data = {
        "model": model_name,
        "runs": [{"at": run.at.isoformat(), "folder": run.folder} for run in runs],
        "changes": [{"at": mark.at.isoformat(), "label": mark.label} for mark in marks],
        "sections": {
            s.key: {t: {w: [_point_json(p) for p in ps] for w, ps in series.items()} for t, series in s.panels.items()}
            for s in page_sections
        },
    }
    blob = json.dumps(data).replace("</", "<\\/")
    return (
        "<html><head><meta charset='utf-8'>"
        f"<title>Monitoring of {html.escape(model_name)}</title>"
        "<style>body{font-family:sans-serif;margin:16px} img{max-width:100%} td{vertical-align:top;font-size:13px}"
        "</style></head><body>"
        + "".join(parts)
        + f"<script type='application/json' id='page-data'>{blob}</script></body></html>"
    )
