"""The Dask engine's pure parts: per-partition summaries merged == one pandas pass, the engine choice,
the evaluated holdout being a subset of the frozen holdout, the raw-rows LightGBM pipeline."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest

from core.dask_engine.checks import combined_report, full_data_failures, merge_stats, partition_stats
from core.dask_engine.choice import choose_engine
from core.dask_engine.split import evaluation_threshold
from core.data.dataset import load_local_dataset_config
from core.data.split import holdout_buckets, holdout_mask, holdout_threshold
from core.data.synthetic import generate_month
from core.data.validation import ValidationReport

CONFIG = load_local_dataset_config("credit-risk")


def _bad_frame(seed: int = 3) -> pd.DataFrame:
    """Bundled rows with planted faults: nulls, values out of range, unknown categories, duplicated ids."""
    frame = generate_month(0, 3000, seed)
    rng = np.random.default_rng(seed)
    frame.loc[rng.choice(len(frame), 900, replace=False), "age"] = np.nan  # 30 % > 20 % tolerance
    frame.loc[rng.choice(len(frame), 7, replace=False), "loan_amount"] = 50.0  # below min 500
    frame.loc[rng.choice(len(frame), 4, replace=False), "credit_utilization"] = 9.0  # above max 1.5
    frame.loc[rng.choice(len(frame), 5, replace=False), "region"] = "atlantis"
    frame.loc[[10, 11, 12], "application_id"] = frame.loc[0, "application_id"]  # 3 extra copies of one id
    return frame


def test_merged_partition_stats_equal_one_pandas_pass() -> None:
    # Given a faulty frame cut into uneven partitions
    frame = _bad_frame()
    cuts = [0, 17, 1100, 1101, 2500, len(frame)]
    parts = [frame.iloc[a:b] for a, b in itertools.pairwise(cuts)]
    # When each partition is summarised and the summaries merged (in two different orders)
    merged = partition_stats(parts[0], CONFIG)
    for part in parts[1:]:
        merged = merge_stats(merged, partition_stats(part, CONFIG))
    reverse = partition_stats(parts[-1], CONFIG)
    for part in reversed(parts[:-1]):
        reverse = merge_stats(partition_stats(part, CONFIG), reverse)
    # Then both equal a direct pandas computation on the whole frame
    assert merged == reverse
    assert merged["rows"] == len(frame)
    for column in ("age", "loan_amount", "region", "application_id"):
        assert merged["nulls"][column] == int(frame[column].isna().sum())
    for feature in CONFIG.features:
        if feature.min is None:
            continue
        values = frame[feature.name].dropna()
        got = merged["numeric"][feature.name]
        assert got["below"] == int((values < feature.min).sum())
        assert got["above"] == int((values > feature.max).sum())
        assert got["min"] == values.min() and got["max"] == values.max()
    assert merged["outside_set"]["region"] == {"atlantis": 5}
    assert merged["target_values"] == {str(k): int(v) for k, v in frame["default"].value_counts().items()}


def test_full_data_failures_name_column_and_counts() -> None:
    frame = _bad_frame()
    stats = partition_stats(frame, CONFIG)
    duplicated = int(frame["application_id"].duplicated().sum())
    checks, failures = full_data_failures(stats, CONFIG, list(frame.columns), duplicated)
    by_column = {(f.expectation, f.column): f.detail for f in failures}
    assert set(by_column) == {
        ("expect_column_values_to_not_be_null", "age"),
        ("expect_column_values_to_be_between", "loan_amount"),
        ("expect_column_values_to_be_between", "credit_utilization"),
        ("expect_column_values_to_be_in_set", "region"),
        ("expect_column_values_to_be_unique", "application_id"),
    }
    assert by_column[("expect_column_values_to_not_be_null", "age")].startswith("900 value(s) (30.0 %) null")
    assert by_column[("expect_column_values_to_be_between", "loan_amount")].startswith("7 value(s)")
    assert "'atlantis'" in by_column[("expect_column_values_to_be_in_set", "region")]
    assert by_column[("expect_column_values_to_be_unique", "application_id")].startswith("3 duplicated")
    # A missing column is named, and too few rows is a failure
    _, missing = full_data_failures(stats, CONFIG.model_copy(update={"min_rows": 10**6}), ["age"], 0)
    assert ("expect_column_to_exist", "region") in {(f.expectation, f.column) for f in missing}
    assert any(f.expectation == "expect_table_row_count_to_be_between" for f in missing)
    # Merged with a (passing) sample report, the run fails on the full-data failures only
    report = combined_report(ValidationReport(True, 10, []), 500, stats, checks, failures)
    assert not report.success and report.n_expectations == 10 + checks
    assert all("[full data, 3000 rows]" in f.detail for f in report.failures)
    clean = generate_month(0, 3000, 4)
    checks, failures = full_data_failures(partition_stats(clean, CONFIG), CONFIG, list(clean.columns), 0)
    assert failures == [] and checks > 20


def test_engine_choice() -> None:
    auto = CONFIG.model_copy(update={"engine": "auto", "dask_min_rows": 1_000_000})
    assert choose_engine(auto, 999_999) == "pandas"
    assert choose_engine(auto, 1_000_000) == "dask"
    assert choose_engine(auto, None) == "pandas"  # CSV: no row count without reading
    assert choose_engine(CONFIG, 10**9) == "pandas"  # the default is the pandas engine
    assert choose_engine(CONFIG.model_copy(update={"engine": "dask"}), 10) == "dask"


@pytest.mark.parametrize("rows", [1_000, 50_000, 10_000_000])
def test_evaluated_holdout_is_a_frozen_holdout_subset(rows: int) -> None:
    config = CONFIG.model_copy(update={"max_holdout_rows": 20_000})
    ids = pd.Series(np.arange(rows if rows <= 50_000 else 200_000)).astype(str)
    buckets = holdout_buckets(ids, config.holdout_salt)
    below = evaluation_threshold(config, rows)
    evaluated = buckets < below
    held = holdout_mask(ids, config.holdout_fraction, config.holdout_salt)
    assert not (evaluated & ~held).any()  # never a training row
    assert below <= holdout_threshold(config.holdout_fraction)
    expected = min(rows * config.holdout_fraction, config.max_holdout_rows)
    assert abs(evaluated.mean() * rows - expected) <= 0.1 * expected + 3 * np.sqrt(expected)


def test_lightgbm_pipeline_takes_raw_rows() -> None:
    import lightgbm
    import skops.io

    from core.dask_engine.model import assemble, categorical_indices, encode_partition, fitted_encoder, lightgbm_kwargs
    from core.transformers import skops_trusted_types

    frame = generate_month(0, 2000, 5)
    categories = {f.name: f.categories for f in CONFIG.features if f.categories}
    fitted = fitted_encoder(CONFIG, categories, frame.head(50))
    encoded = encode_partition(frame, CONFIG, fitted)
    model = lightgbm.LGBMClassifier(**lightgbm_kwargs(CONFIG, 1) | {"n_estimators": 20})
    model.fit(encoded.drop(columns="default"), encoded["default"], categorical_feature=categorical_indices(CONFIG))
    pipeline = assemble(fitted, model)
    raw = frame[CONFIG.feature_names].copy()
    raw.loc[0, "region"] = "atlantis"  # an unknown category: LightGBM's missing value, no error
    proba = pipeline.predict_proba(raw)
    assert proba.shape == (len(raw), 2) and np.allclose(proba.sum(axis=1), 1)
    data = skops.io.dumps(pipeline)
    loaded = skops.io.loads(data, trusted=skops_trusted_types(pipeline))
    assert np.array_equal(loaded.predict_proba(raw), proba)


def test_split_summary_is_what_the_card_showed_before() -> None:
    from core.data.split import split_frame
    from core.promotion.card import time_window

    split = split_frame(generate_month(0, 2000, 6), CONFIG)
    assert split.training_window("application_date") == time_window(split.train["application_date"])
    assert split.training_window(None) is None
    assert (split.rows_train, split.rows_holdout) == (len(split.train), len(split.holdout))


def test_auto_engine_counts_parquet_rows_from_the_footers(tmp_path) -> None:
    from adapters.settings import Settings
    from dask_engine.snapshots import count_rows
    from tasks.dask_training import choose_snapshot_engine

    # Given a local snapshot of three Parquet partitions (1,200 + 800 + 1,000 rows)
    for month, rows in enumerate([1200, 800, 1000]):
        generate_month(month, rows, 5).to_parquet(tmp_path / f"part-{month}.parquet", index=False)
    config = CONFIG.model_copy(update={"source": str(tmp_path), "engine": "auto"})
    # when the rows are counted from the footers, they are what pandas reads
    assert count_rows(config, Settings()) == len(pd.read_parquet(tmp_path)) == 3000
    # and the engine follows the stated threshold on either side of it
    assert choose_snapshot_engine.fn(config.model_copy(update={"dask_min_rows": 3000})) == "dask"
    assert choose_snapshot_engine.fn(config.model_copy(update={"dask_min_rows": 3001})) == "pandas"
