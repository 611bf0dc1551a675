"""The page per model over time (`core/monitoring/model_page.py`), from hand-made stored results: pure, no servers."""

from __future__ import annotations

import base64
import html
import json
import re
from datetime import UTC, datetime, timedelta

from core.monitoring.model_page import (
    MAX_RUNS,
    StoredPage,
    StoredRun,
    change_marks,
    model_page_html,
    page_uri,
    run_time,
)
from core.promotion.history import ChampionChange

T0 = datetime(2026, 3, 2, 6, 0, tzinfo=UTC)
SECTIONS = {"volume", "null-rates", "feature-drift", "multivariate", "estimated-performance"}


def _feature(name: str, psi: float, drifted: bool, kind: str = "numeric") -> dict:
    return {"name": name, "kind": kind, "psi": psi, "test": "ks", "statistic": 0.05, "p_value": 0.3,
            "effect": 0.05, "drifted": drifted}  # fmt: skip


def _window(
    name: str, rows: int, psi: float, *, drifted: bool = False, auc: float = 0.52, realised: float | None = None
):
    """A window as `result_json` stores it (every key of `WindowResult`, the new ones included)."""
    estimate = 0.80 - psi / 10
    return {
        "name": name,
        "source": f"s3://b/{name}/",
        "rows": rows,
        "features": [_feature("age", psi, drifted), _feature("region", psi / 2, False, "categorical")],
        "prediction": _feature("proba_1", psi / 3, False),
        "performance": None if realised is None else {"rows": rows, "metrics": {"roc_auc": realised}, "holdout": {}},
        "labelled_rows": 0 if realised is None else rows,
        "estimated": {
            "rows": rows,
            "method": "CBPE (calibrated)",
            "metrics": [
                {
                    "metric": "roc_auc",
                    "estimate": estimate,
                    "reference": 0.8,
                    "lower": 0.76,
                    "upper": 0.84,
                    "realised": realised,
                },
                {"metric": "f1", "estimate": 0.61, "reference": 0.6, "lower": 0.55, "upper": 0.65, "realised": None},
            ],
            "labelled_rows": 0 if realised is None else rows,
        },
        "estimation_note": "",
        "multivariate": {
            "auc": auc,
            "threshold": 0.55,
            "permuted": [0.5, 0.55],
            "drifted": auc > 0.55,
            "features": [["age", 0.1]] if auc > 0.55 else [],
            "rows": [1000, rows],
        },
        "null_rates": {"age": psi / 10, "region": 0.0},
        "drifted": drifted,
        "decayed": False,
        "estimated_drop": estimate < 0.76,
        "reasons": ["1/2 features drifted (age), share 50% >= 20%"] if drifted else [],
        "note": "" if drifted else "no threshold crossed",
        "judged": True,
    }


def _run(hours: int, windows: list[dict], champion: str, reasons: list[str] | None = None) -> StoredRun:
    at = T0 + timedelta(hours=hours)
    folder = f"{at:%Y%m%dT%H%M%SZ}-run{hours}"
    verdict = {"triggered": bool(reasons), "reasons": reasons or [], "summary": "; ".join(reasons or ["no drift"])}
    result = {"verdict": verdict, "windows": windows, "model": "churn", "champion": champion, "retraining": "",
              "at": at.isoformat()}  # fmt: skip
    uri = f"s3://b/reports/monitoring/churn/{folder}/report.html"
    return StoredRun(at, folder, result, uri, f"http://s3.test/{folder}/report.html?sig=1")


def _change(hours: float, before: str | None, after: str, kind: str = "promotion") -> ChampionChange:
    at = (T0 + timedelta(hours=hours)).isoformat(timespec="microseconds")
    return ChampionChange(at, "churn", before, after, kind, "test", "tester")  # type: ignore[arg-type]


RUNS = [
    _run(0, [_window("partition", 2000, 0.05), _window("prediction-log", 300, 0.02)], "2"),
    _run(24, [_window("partition", 2100, 0.12, realised=0.79), _window("prediction-log", 350, 0.03)], "2"),
    _run(
        48,
        [_window("partition", 1900, 0.31, drifted=True, auc=0.71), _window("prediction-log", 400, 0.04)],
        "3",
        ["partition: 1/2 features drifted (age), share 50% >= 20%"],
    ),
]
CHANGES = [
    _change(-500, None, "1"),  # before the champion of the first run shown: not drawn
    _change(-100, "1", "2"),  # made the first run's champion: drawn
    _change(36, "2", "3"),
    _change(60, "3", "2", "rollback"),
]


def _plots(page: str) -> dict[str, dict[str, str]]:
    """Each plot's attributes by section."""
    found = {}
    for tag in re.findall(r"<figure class='plot'[^>]*>", page):
        attributes = dict(re.findall(r"data-([a-z-]+)='([^']*)'", tag))
        found[attributes["section"]] = {k: html.unescape(v) for k, v in attributes.items()}
    return found


def _data(page: str) -> dict:
    [blob] = re.findall(r"<script type='application/json' id='page-data'>(.*?)</script>", page, re.S)
    return json.loads(blob)


def test_the_page_has_one_plot_per_section_with_the_champion_changes_on_each():
    # Given three stored runs of two windows and four champion changes
    page = model_page_html("churn", RUNS, CHANGES, updated=T0 + timedelta(hours=49))
    # then every section has one plot (an embedded PNG), and each plot marks the same changes, labelled
    plots = _plots(page)
    assert set(plots) == SECTIONS
    for section, attributes in plots.items():
        assert attributes["changes"] == "v2|v3|v2 (rollback)", section
    images = re.findall(r"src='data:image/png;base64,([^']+)'", page)
    assert len(images) == len(SECTIONS) and all(base64.b64decode(i).startswith(b"\x89PNG") for i in images)
    # panels: one for rows; age's null rate (region never missing: named, not drawn); age, region and the
    # prediction's PSI; the domain classifier; ROC AUC and F1
    assert {k: plots[k]["panels"] for k in SECTIONS} == {
        "volume": "1", "null-rates": "1", "feature-drift": "3", "multivariate": "1", "estimated-performance": "2",
    }  # fmt: skip
    assert "Never missing in any run, so not drawn: region." in page
    assert [m.label for m in change_marks(CHANGES, RUNS)] == ["v2", "v3", "v2 (rollback)"]
    assert "Showing all 3 stored run(s)" in page and f"at most the newest {MAX_RUNS}" in page


def test_the_numbers_on_the_page_are_the_stored_ones():
    data = _data(model_page_html("churn", RUNS, CHANGES))
    sections = data["sections"]
    # one series per window name, a point per run, oldest first, at the run's time
    for window in ("partition", "prediction-log"):
        points = sections["volume"]["rows"][window]
        expected = [next(w for w in r.result["windows"] if w["name"] == window) for r in RUNS]
        assert [p["value"] for p in points] == [w["rows"] for w in expected]
        assert [p["at"] for p in points] == [r.at.isoformat() for r in RUNS]
        assert [p["value"] for p in sections["feature-drift"]["age"][window]] == [
            w["features"][0]["psi"] for w in expected
        ]
        assert [p["value"] for p in sections["feature-drift"]["proba_1 (prediction)"][window]] == [
            w["prediction"]["psi"] for w in expected
        ]
        assert [p["value"] for p in sections["null-rates"]["age"][window]] == [w["null_rates"]["age"] for w in expected]
        multivariate = sections["multivariate"]["domain classifier ROC AUC"][window]
        assert [(p["value"], p["threshold"], p["flagged"]) for p in multivariate] == [
            (w["multivariate"]["auc"], 0.55, w["multivariate"]["drifted"]) for w in expected
        ]
    # drifted points are marked (age in the third run's partition only)
    assert [p["flagged"] for p in sections["feature-drift"]["age"]["partition"]] == [False, False, True]
    # the estimate with its band, the realised value where labels arrived
    roc = sections["estimated-performance"]["roc_auc"]["partition"]
    stored = [r.result["windows"][0]["estimated"]["metrics"][0] for r in RUNS]
    assert [(p["value"], p["lower"], p["upper"]) for p in roc] == [(m["estimate"], 0.76, 0.84) for m in stored]
    assert [p.get("realised") for p in roc] == [None, 0.79, None]
    assert [p["flagged"] for p in roc] == [m["estimate"] < 0.76 for m in stored]
    # the champion changes at their recorded times
    assert [(datetime.fromisoformat(d["at"]), d["label"]) for d in data["changes"]] == [
        (datetime.fromisoformat(c.at), label)
        for c, label in zip(CHANGES[1:], ["v2", "v3", "v2 (rollback)"], strict=True)
    ]


def test_the_table_lists_every_run_newest_first_with_its_verdict_reasons_and_report():
    page = model_page_html("churn", RUNS, CHANGES)
    rows = re.findall(r"<tr class='run' data-folder='([^']+)'><td>(.*?)</td></tr>", page, re.S)
    assert [folder for folder, _ in rows] == [r.folder for r in reversed(RUNS)]
    cells = [html.unescape(body).split("</td><td>") for _, body in rows]
    assert cells[0][0] == "2026-03-04 06:00:00 UTC" and cells[0][1] == "v3" and cells[0][2] == "<b>RETRAIN</b>"
    assert "partition: 1/2 features drifted (age), share 50% >= 20%" in cells[0][3]
    assert cells[0][4] == "partition 1900, prediction-log 400"
    assert f"<a href='{RUNS[2].report_link}'>report</a>" in cells[0][5] and RUNS[2].report_uri in cells[0][5]
    assert [c[2] for c in cells[1:]] == ["OK", "OK"]


def test_results_stored_before_the_new_figures_render_without_them():
    # Given results as stored before estimation, the domain classifier, null rates and `at` existed
    old_keys = ("estimated", "estimation_note", "multivariate", "null_rates", "estimated_drop")
    runs = []
    for run in RUNS[:2]:
        result = {k: v for k, v in run.result.items() if k != "at"}
        result["windows"] = [{k: v for k, v in w.items() if k not in old_keys} for w in result["windows"]]
        at = run_time(result, run.folder)  # from the folder's name
        assert at == run.at
        runs.append(StoredRun(at, run.folder, result, run.report_uri))
    # when the page is rendered, then volume and drift are plotted, the rest says why it is missing
    page = model_page_html("churn", runs, [], total=250)
    plots = _plots(page)
    # the realised ROC AUC of the second run (labels, no estimate) is still shown
    assert set(plots) == {"volume", "feature-drift", "estimated-performance"}
    assert _data(page)["sections"]["estimated-performance"]["roc_auc"]["partition"][0]["realised"] == 0.79
    empty = re.findall(r"<p class='empty' data-section='([a-z-]+)'>", page)
    assert set(empty) == {"null-rates", "multivariate"}
    assert all(p["changes"] == "" for p in plots.values())
    assert "Showing the last 2 of 250 stored runs" in page
    # and a page of no run at all renders too
    assert "No monitoring run stored yet." in model_page_html("churn", [], CHANGES)


def test_a_run_time_is_its_at_else_its_folder_name():
    assert run_time({"at": "2026-03-02T06:00:00+00:00"}, "whatever") == T0
    assert run_time({"at": "2026-03-02T06:00:00"}, "") == T0  # naive: UTC
    assert run_time({}, "reports/monitoring/churn/20260302T060000Z-abc/") == T0
    assert run_time({"at": "not a time"}, "20260302T060000Z-local") == T0
    assert run_time({}, "no-time-here") is None
    assert page_uri("mlops", "churn") == "s3://mlops/reports/monitoring/churn/index.html"


def test_the_summary_and_the_card_link_the_page():
    from core.monitoring.drift_analysis import Verdict
    from core.monitoring.drift_report import MonitoredModel, summary_markdown
    from core.promotion.card import ModelCard
    from core.promotion.card_render import render_html, render_markdown

    page = StoredPage(page_uri("b", "churn"), "http://s3.test/index.html?sig=1")
    verdict = Verdict(False, [], "no drift")
    linked = summary_markdown(MonitoredModel("churn", "3", None, page), [], verdict, "s3://b/r.html", "http://r", "-")
    assert "- over time: [the model's monitoring page](http://s3.test/index.html?sig=1) (`s3://b/" in linked
    assert "over time" not in summary_markdown(MonitoredModel("churn", "3"), [], verdict, "s3://b/r", "http://r", "-")
    card = ModelCard(
        model_name="churn", candidate_version="4", champion_version=None, verdict="promote", outcome="promoted",
        reasons=["cold start"], data_version="abc", training_window=None, rows_train=80, rows_holdout=20,
        candidate_metrics={"roc_auc": 0.8}, code_version="deadbeef", created_at=T0, monitoring_page=page.uri,
    )  # fmt: skip
    line = f"{page.uri} (created by the first monitoring run)"
    assert f"- **Monitoring over time:** {line}" in render_markdown(card) and line in render_html(card)
