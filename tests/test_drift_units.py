"""Pure units of monitoring's report and prediction-log window: the report shows the verdict's own figures."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd
import pytest

from core.data.dataset import load_local_dataset_config
from core.data.synthetic import DriftSpec, generate_month
from core.monitoring.drift import DriftThresholds
from core.monitoring.drift_analysis import reference_sample

THRESHOLDS = DriftThresholds()


@pytest.fixture(scope="module")
def credit():
    return load_local_dataset_config("credit-risk")


@pytest.fixture(scope="module")
def regression():
    """A Ridge pipeline on the diabetes data: fitted on the first 300 patients, the reference from them."""
    from sklearn.linear_model import Ridge

    from tests.task_types import diabetes_config, diabetes_frame, fit

    config, frame = diabetes_config("diabetes-units"), diabetes_frame()
    train = frame.iloc[:300]
    model = fit(config, train, Ridge(alpha=0.1))
    return config, frame, model, reference_sample(train, model, config, 5000, 0)


# ------------------------------------------------------------------- one source of truth: report = verdict


def _panels(page: str) -> list[dict[str, str]]:
    """The `data-*` attributes of every distribution panel of an HTML report."""
    from html.parser import HTMLParser

    found: list[dict[str, str]] = []

    class Parser(HTMLParser):
        def handle_starttag(self, tag, attrs):
            values = dict(attrs)
            if tag == "div" and values.get("class") == "panel":
                found.append({k.removeprefix("data-"): v for k, v in values.items() if k.startswith("data-")})

    Parser().feed(page)
    return found


@pytest.fixture(scope="module")
def credit_champion(credit):
    """A logistic regression on four credit-risk months (numeric and categorical features), with its reference."""
    from sklearn.linear_model import LogisticRegression

    from core.monitoring.drift_analysis import Champion
    from tests.task_types import fit

    config = credit
    train = pd.concat([generate_month(i, 1500, 3) for i in range(4)], ignore_index=True)
    model = fit(config, train, LogisticRegression(max_iter=1000))
    reference = reference_sample(train, model, config, 5000, 0)
    return config, Champion(config.model_name, "7", "run", model, {"roc_auc": 0.8}, reference)


def test_the_html_reports_figures_are_the_verdicts_and_its_plots_use_the_same_bins(credit_champion):
    from core.monitoring.drift import psi_from_shares
    from core.monitoring.drift_analysis import Window, analyse_window
    from core.monitoring.drift_report import DISTRIBUTIONS, distribution_panels, report_html

    config, champion = credit_champion
    # Given an unchanged month and a drifted one (numeric and categorical features moved)
    frames = {
        "partition": generate_month(5, 2000, 3),
        "prediction-log": generate_month(5, 2000, 3, drift=DriftSpec(5, 1.0)),
    }
    windows = [Window(name, "s", frame, config.id_column) for name, frame in frames.items()]
    results = [analyse_window(w, champion, config, None, THRESHOLDS) for w in windows]
    assert not results[0].triggered and results[1].drifted
    page = report_html(champion, windows, results, config)
    panels = _panels(page)
    # then every figure of every panel is exactly the verdict's (full precision), in the verdict's order
    expected = [f for r in results for f in [*r.features, r.prediction]]
    assert [p["column"] for p in panels] == [f.name for f in expected]
    for shown, figure in zip(panels, expected, strict=True):
        assert float(shown["psi"]) == figure.psi and float(shown["p-value"]) == figure.p_value
        assert float(shown["statistic"]) == figure.statistic and float(shown["effect"]) == figure.effect
        assert shown["test"] == figure.test and shown["kind"] == figure.kind
        assert shown["drifted"] == ("yes" if figure.drifted else "no")
    assert {p["column"] for p in panels if p["drifted"] == "yes"} >= {"annual_income", "employment_type"}
    assert f"{DISTRIBUTIONS}: partition" in page and f"{DISTRIBUTIONS}: prediction-log" in page
    assert page.count("data:image/png;base64,") == len(expected)
    # and the plotted bins are the ones PSI was computed on: their PSI is the verdict's PSI
    for window, result in zip(windows, results, strict=True):
        plotted = distribution_panels(champion, window.frame, result, config)
        assert [p.drift for p in plotted] == [*result.features, result.prediction]
        for panel in plotted:
            assert psi_from_shares(panel.bins.reference, panel.bins.current) == panel.drift.psi
            assert len(panel.bins.labels) == len(panel.bins.reference) == len(panel.bins.current)


def test_a_window_too_small_for_a_verdict_has_no_plots_and_says_not_judged(credit_champion):
    from core.monitoring.drift_analysis import Window, analyse_window
    from core.monitoring.drift_report import report_html

    config, champion = credit_champion
    small = Window("partition", "s", generate_month(5, 50, 3), config.id_column)
    result = analyse_window(small, champion, config, None, THRESHOLDS)
    page = report_html(champion, [small], [result], config)
    assert not result.judged and _panels(page) == [] and "fewer than the 200 needed" in page
    assert "not judged" in page and ">yes<" not in page


def test_the_regression_report_has_no_classification_figures_anywhere(regression):
    from core.monitoring.drift_analysis import Champion, Window, analyse_window
    from core.monitoring.drift_report import report_html

    config, frame, model, reference = regression
    champion = Champion("d", "1", "run", model, {"rmse": 40.0}, reference)
    window = Window("partition", "s", frame, "patient_id")
    result = analyse_window(window, champion, config, frame[["patient_id", "progression"]], THRESHOLDS)
    page = report_html(champion, [window], [result], config)
    assert [p["column"] for p in _panels(page)] == [*config.feature_names, "prediction"]
    assert "ROC AUC" not in page and "proba_" not in page and "<td>RMSE</td>" in page


def test_numeric_bin_labels_name_the_bins_numeric_counts_fills():
    from core.monitoring.drift import edge_labels, numeric_bins

    bins = numeric_bins(np.array([1.0, 2, 3, 4, 5, np.nan]), np.array([0.0, 2.5, 9, np.nan]), bins=4)
    assert bins.labels == ["<= 2", "(2, 3]", "(3, 4]", "> 4", "missing"]
    assert bins.current.tolist() == [1, 1, 0, 1, 1] and bins.reference.tolist() == [2, 1, 1, 1, 1]
    assert edge_labels(np.array([])) == ["any value", "missing"]


# ------------------------------------------------------------------- the prediction log's layout and window


def test_the_prediction_log_reads_exactly_the_last_n_date_folders():
    from core.monitoring.prediction_log import day_prefix, log_dates, object_key, window_start

    now = datetime(2026, 3, 2, 5, 30, tzinfo=UTC)
    # N days are today and the N-1 dates before, and the window starts at midnight of the oldest
    assert [f"{d}" for d in log_dates(now, 3)] == ["2026-03-02", "2026-03-01", "2026-02-28"]
    assert window_start(now, 1) == datetime(2026, 3, 2, tzinfo=UTC)
    assert window_start(now, 3) == datetime(2026, 2, 28, tzinfo=UTC)
    with pytest.raises(ValueError, match="at least 1"):
        log_dates(now, 0)
    # the writer's keys are under the reader's date folders
    key = object_key("m", now, "abc")
    assert key == "predictions/serving/m/date=2026-03-02/053000-abc.parquet"
    assert key.startswith(day_prefix("m", log_dates(now, 1)[0]))


def test_prediction_log_window_keeps_the_window_and_adds_the_label_key(credit):
    from core.monitoring.drift_analysis import prediction_log_window
    from core.monitoring.prediction_log import LOG_KEY

    config = credit
    now = datetime(2026, 3, 2, 5, 30, tzinfo=UTC)
    rows = generate_month(0, 4, 1)
    # Given a file whose rows were predicted today, yesterday 00:30, and (written late) the day before at
    # 23:30 (within 48 hours, but not in the last 2 dates) and three days ago
    at = [now, now - timedelta(hours=29), now - timedelta(hours=30), now - timedelta(days=3)]
    logged = rows.assign(request_id=["r0", "r1", "r2", "r3"], record_id=["a", None, "c", "d"], predicted_at=at)
    window = prediction_log_window([logged], "src", now, 2, config)
    # then only the rows of the two dates are kept
    assert len(window.frame) == 2 and window.key == LOG_KEY and window.source == "src"
    assert window.frame[LOG_KEY].tolist() == ["a", "r1"]
    empty = prediction_log_window([], "src", now, 2, config)
    assert len(empty.frame) == 0 and list(empty.frame.columns) == config.feature_names
