"""bench.quality without servers: its tables, the rows it keeps outside, the baseline's inputs and the report."""

from __future__ import annotations

from types import SimpleNamespace

import pandas as pd

from bench.quality import ID, TABLES, baseline_inputs, load_table, markdown, split_outside


def test_every_table_loads_from_an_installed_package_with_a_unique_row_id_and_its_target():
    for table in TABLES.values():
        frame = load_table(table)
        assert frame.columns[0] == ID and frame[ID].is_unique, table.name
        assert table.target in frame.columns and frame[table.target].notna().all(), table.name
        assert table.time is None or pd.api.types.is_datetime64_any_dtype(frame[table.time]), table.name


def test_the_outside_rows_are_a_fixed_fifth_disjoint_from_the_snapshot_and_the_latest_for_a_dated_table():
    for name in ("wine", "seattle_weather"):
        table = TABLES[name]
        frame = load_table(table)
        snapshot, outside, _ = split_outside(frame, table)
        assert set(snapshot[ID]).isdisjoint(outside[ID]) and len(snapshot) + len(outside) == len(frame)
        assert abs(len(outside) / len(frame) - 0.2) < 0.01
        assert split_outside(frame, table)[1][ID].tolist() == outside[ID].tolist()  # the same rows every run
    assert outside["date"].min() > snapshot["date"].max()
    wine = split_outside(load_table(TABLES["wine"]), TABLES["wine"])[1]
    assert wine["target"].nunique() == 3  # stratified: every class is scored


def test_the_baseline_gets_dates_as_numbers_and_text_as_the_training_rows_categories():
    config = SimpleNamespace(id_column=ID, target="Miles_per_Gallon")
    frame = load_table(TABLES["cars"])
    X, categories = baseline_inputs(frame, config)
    assert "Name" not in X.columns  # over 255 values: HistGradientBoosting refuses it
    assert X["Origin"].dtype == "category" and pd.api.types.is_float_dtype(X["Year"])
    later = frame.head(2).assign(Origin=["USA", "Mars"])
    X_later, _ = baseline_inputs(later, config, categories)
    assert X_later["Origin"].tolist()[0] == "USA" and pd.isna(X_later["Origin"].tolist()[1])


def test_the_report_names_failures_and_signs_the_gap_for_the_project():
    common = {"origin": "o", "rows": 100, "snapshot_rows": 80, "outside_rows": 20, "outside": "random"}
    scored = common | {
        "table": "t1",
        "task": "regression",
        "metric": "rmse",
        "features": 3,
        "training_rows": 64,
        "left_out": {"c": "c has a single value"},
        "project": {"error": "RuntimeError: boom"},
        "hgb": {"metrics": {"rmse": 2.0, "r2": 0.5}, "seconds": 0.1},
        "flaml": {"metrics": {"rmse": 1.5, "r2": 0.6}, "seconds": 60.0, "budget": 60.0, "model": "lgbm"},
        "winner": "FLAML",
        "project_vs_flaml": None,
    }
    refused = common | {"table": "t2", "error": "data init: ConfigInferenceError: no usable feature"}
    report = {"started": "now", "cpus": 2, "quick": True, "search": "s", "versions": {"flaml": "2.7.0"}}
    text = markdown(report | {"tables": [scored, refused]})
    assert "| t1 | 100 (20) | regression | rmse | failed | 2.0000 | 1.5000 |" in text
    assert "project: RuntimeError: boom" in text and "no usable feature" in text and "smoke run" in text
