"""Data tests: the generator's properties and the validation's verdicts on good and broken snapshots."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from adapters.expectations import validate_frame, validate_rows
from core.data.dataset import load_local_dataset_config
from core.data.synthetic import DriftSpec, generate_frame, generate_month, generate_months
from core.data.validation import DataValidationError

CONFIG = load_local_dataset_config("credit-risk")


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    return generate_frame(6000, seed=3, n_months=3)


# --- generator ---


def test_generator_is_deterministic_and_months_are_independent():
    assert generate_month(2, 500, seed=1).equals(generate_month(2, 500, seed=1))
    assert generate_months(3, 500, seed=1)["2025-03"].equals(generate_month(2, 500, seed=1))
    assert not generate_month(2, 500, seed=1).equals(generate_month(2, 500, seed=2))


def test_ids_are_unique_across_months(frame):
    assert frame["application_id"].is_unique


def test_generated_data_passes_the_bundled_expectations(frame):
    report = validate_frame(frame, CONFIG)
    assert report.success, report.summary()


def test_class_balance_missing_values_and_outliers(frame):
    assert 0.10 <= frame["default"].mean() <= 0.20
    assert 0.02 < frame["annual_income"].isna().mean() < 0.08
    assert frame["employment_type"].isna().any()
    assert frame["annual_income"].max() > 20 * frame["annual_income"].median()


def test_drift_knob_shifts_later_months_only():
    drift = DriftSpec(start_month=2, strength=1.0)
    assert generate_month(1, 3000, seed=1, drift=drift).equals(generate_month(1, 3000, seed=1))
    drifted, plain = generate_month(2, 3000, seed=1, drift=drift), generate_month(2, 3000, seed=1)
    assert drifted["annual_income"].median() < 0.85 * plain["annual_income"].median()
    assert drifted["credit_utilization"].mean() > plain["credit_utilization"].mean() + 0.05


def test_signal_needs_a_real_model():
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.metrics import roc_auc_score
    from sklearn.tree import DecisionTreeClassifier

    data = generate_frame(24000, seed=5)
    X = pd.get_dummies(data[CONFIG.feature_names], dummy_na=True).astype(float).fillna(-1)
    y, train = data["default"], np.arange(len(data)) < 18000
    boosted = HistGradientBoostingClassifier(random_state=0).fit(X[train], y[train])
    stump = DecisionTreeClassifier(max_depth=1).fit(X[train], y[train])
    auc_boosted = roc_auc_score(y[~train], boosted.predict_proba(X[~train])[:, 1])
    auc_stump = roc_auc_score(y[~train], stump.predict_proba(X[~train])[:, 1])
    assert 0.7 < auc_boosted < 0.95
    assert auc_boosted > auc_stump + 0.05


# --- validation: each broken snapshot fails, naming the expectation and the column ---


@pytest.mark.parametrize(
    ("breakage", "expected"),
    [
        (lambda f: f.drop(columns=["default"]), "expect_column_to_exist on 'default': column is missing"),
        (lambda f: f.assign(age="forty"), "expect_column_values_to_be_in_type_list on 'age'"),
        (lambda f: f.assign(annual_income=np.nan), "expect_column_values_to_not_be_null on 'annual_income'"),
        (lambda f: f.assign(default=0), "expect_column_unique_value_count_to_be_between on 'default'"),
        (lambda f: f.assign(age=f["age"].where(f.index > 5, 150.0)), "expect_column_values_to_be_between on 'age'"),
        (lambda f: f.assign(region="mars"), "expect_column_values_to_be_in_set on 'region'"),
        (lambda f: f.assign(application_id="same"), "expect_column_values_to_be_unique on 'application_id'"),
        (lambda f: f.head(50), "50 rows, need at least 1000"),
        (lambda f: f.head(0), "0 rows"),
    ],
    ids=["missing-target", "text-in-numeric", "all-null", "single-class", "out-of-range", "unknown-category",
         "duplicate-ids", "too-few-rows", "empty"],
)  # fmt: skip
def test_broken_snapshot_fails_with_a_named_expectation(frame, breakage, expected):
    report = validate_frame(breakage(frame.copy()), CONFIG)
    assert not report.success
    assert expected in report.summary()
    error = DataValidationError(report.failures, report)
    assert expected in str(error)
    assert "FAILED" in report.to_markdown()


def test_report_holds_samples_not_the_data(frame):
    report = validate_frame(frame.assign(region="mars"), CONFIG)
    assert len(report.to_json()) < 200_000
    assert "mars" in report.to_json()


def test_frame_without_columns_fails_cleanly():
    report = validate_frame(pd.DataFrame(), CONFIG)
    assert not report.success and "no columns" in report.summary()


def _one_row(column: str, value: object, row: int = 4321):
    def breakage(f: pd.DataFrame) -> pd.DataFrame:
        f[column] = f[column].astype(object) if isinstance(value, str) and f[column].dtype != object else f[column]
        f.loc[row, column] = value
        return f

    return breakage


def _failed(report) -> set[tuple[str, str | None]]:
    return {(f.expectation, f.column) for f in report.failures}


@pytest.mark.parametrize(
    ("breakage", "expected"),
    [
        (lambda f: f, None),
        (_one_row("age", 150.0), ("expect_column_values_to_be_between", "age")),
        (_one_row("region", "mars"), ("expect_column_values_to_be_in_set", "region")),
        (_one_row("default", np.nan), ("expect_column_values_to_not_be_null", "default")),
        (lambda f: f.assign(application_id=f["application_id"].where(f.index != 4321, f["application_id"][0])),
         ("expect_column_values_to_be_unique", "application_id")),
        (lambda f: f.assign(age="forty"), ("expect_column_values_to_be_in_type_list", "age")),
    ],
    ids=["clean", "out-of-range", "unknown-category", "null-target", "duplicate-id", "text-in-numeric"],
)  # fmt: skip
def test_above_the_gx_sample_every_row_is_still_checked(frame, breakage, expected):
    # Given a snapshot of 6,000 rows, GX checking 1,000 of them, and one bad row (or a bad column, or none)
    config = CONFIG.model_copy(update={"validation_sample_rows": 1_000})
    broken = breakage(frame.copy())
    # when it is validated as the flow validates a snapshot in memory
    report = validate_rows(broken, config, seed=0)
    # then it fails on the same expectations and columns as GX on every row (the reference), or passes like it
    reference = validate_frame(broken, CONFIG)
    assert report.success == reference.success == (expected is None)
    assert _failed(report) == _failed(reference)
    assert report.n_expectations > reference.n_expectations  # GX's on the sample plus the full-data checks
    if expected is not None:
        # and the full-data checks name it with every row counted, whether or not the sample held the bad row
        full = [f for f in report.failures if (f.expectation, f.column) == expected and "[full data" in f.detail]
        assert full and "6000 rows" in full[0].detail, report.failures
    if expected == ("expect_column_values_to_be_between", "age"):  # one case is enough (each GX run costs ~1 s)
        # A snapshot no bigger than the sample: GX on every row, as before
        whole = validate_rows(broken, CONFIG)
        assert (whole.n_expectations, whole.failures) == (reference.n_expectations, reference.failures)


# --- loading: formats, partitions, data version ---


def test_local_csv_folder_and_parquet_file_load_with_a_content_version(tmp_path):
    from adapters.settings import Settings
    from adapters.snapshots import DataLoadError, read_snapshot

    data = generate_frame(1200, seed=9, n_months=2)
    folder = tmp_path / "csv"
    (folder / "month=1").mkdir(parents=True)
    (folder / "month=2").mkdir()
    data.iloc[:600].to_csv(folder / "month=1" / "part.csv", index=False)
    data.iloc[600:].to_csv(folder / "month=2" / "part.csv", index=False)
    settings = Settings()
    first = read_snapshot(str(folder), "csv", settings)
    assert first.n_rows == 1200 and len(first.files) == 2
    # the same content read again has the same version; a changed byte gives a new one
    assert read_snapshot(str(folder), "csv", settings).data_version == first.data_version
    data.iloc[600:].assign(age=30).to_csv(folder / "month=2" / "part.csv", index=False)
    assert read_snapshot(str(folder), "csv", settings).data_version != first.data_version

    single = tmp_path / "one.parquet"
    data.to_parquet(single, index=False)
    assert read_snapshot(str(single), "parquet", settings).n_rows == 1200

    with pytest.raises(DataLoadError, match="no such file or folder"):
        read_snapshot(str(tmp_path / "missing"), "parquet", settings)
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(DataLoadError, match=r"empty\.csv: file is empty"):
        read_snapshot(str(tmp_path / "empty.csv"), "csv", settings)
