"""The Dask engine's pure parts: per-partition summaries merged == one pandas pass, the engine choice,
the evaluated holdout being a subset of the frozen holdout, the raw-rows LightGBM pipeline, the search sample,
the memory estimate and the choice of where the final fit runs, the record of it on the run and the card."""

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
    # The default is auto from 2,000,000 rows; pandas and dask are overrides
    assert CONFIG.engine == "auto" and CONFIG.dask_min_rows == 2_000_000
    assert choose_engine(CONFIG, 1_999_999) == "pandas" and choose_engine(CONFIG, 10**9) == "dask"
    assert choose_engine(CONFIG.model_copy(update={"engine": "pandas"}), 10**9) == "pandas"
    assert choose_engine(CONFIG.model_copy(update={"engine": "dask"}), 10) == "dask"
    # A feature service is joined by the pandas engine only: auto keeps such a model there at any size
    joined = CONFIG.model_copy(update={"feature_service": "credit", "store_features": ["age"]})
    assert choose_engine(joined, 10**9) == "pandas"


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
    model = lightgbm.LGBMClassifier(**lightgbm_kwargs({"n_estimators": 20}, 1))
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
    # An unreadable footer (an empty file): rows unknown, so the pandas engine's loader says what is wrong
    (tmp_path / "part-9.parquet").write_bytes(b"")
    assert count_rows(config, Settings()) is None
    assert choose_snapshot_engine.fn(config.model_copy(update={"dask_min_rows": 1})) == "pandas"


@pytest.mark.parametrize("rows", [12_000, 3_000_000])
def test_the_search_sample_is_training_ids_chosen_by_the_holdout_hash(rows: int) -> None:
    from core.dask_engine.split import EVERY_TRAINING_ROW, fit_sample_threshold, sample_threshold, train_part

    # Given a snapshot of `rows` rows (ids hashed on a 200,000-id stand-in beyond that) and a 3,000-row sample
    config = CONFIG.model_copy(update={"search_sample_rows": 3_000})
    ids = pd.Series(np.arange(min(rows, 200_000))).astype(str)
    buckets = holdout_buckets(ids, config.holdout_salt)
    held = holdout_mask(ids, config.holdout_fraction, config.holdout_salt)
    # when the sample's bucket bound is chosen from the footers' row count
    below = sample_threshold(config, rows)
    sampled = (buckets >= holdout_threshold(config.holdout_fraction)) & (buckets < below)
    # then it holds training ids only, about search_sample_rows of the snapshot's (bucket granularity: 1/10,000)
    assert not (sampled & held).any()
    expected = config.search_sample_rows * len(ids) / rows
    assert abs(sampled.sum() - expected) <= 0.1 * expected + 3 * np.sqrt(expected) + len(ids) / 10_000
    # and a partition's sample is exactly those ids, whatever the partition (deterministic, per row)
    frame = pd.DataFrame({"application_id": ids, "default": 0})
    part = frame.iloc[: len(frame) // 3]
    assert set(train_part(part, config, below)["application_id"]) == set(part["application_id"][sampled[: len(part)]])
    assert len(train_part(frame, config)) == int((~held).sum())  # no bound: every training row
    # A bigger fit sample starts where the search sample starts, so it holds it
    bigger = fit_sample_threshold(config, int((~held).sum()), 2 * int(sampled.sum()))
    assert below <= bigger <= EVERY_TRAINING_ROW
    assert fit_sample_threshold(config, 100, 1_000) == EVERY_TRAINING_ROW
    # A snapshot smaller than the sample: every training row is the sample
    assert sample_threshold(config, 2_000) == EVERY_TRAINING_ROW


def test_the_pandas_engine_search_sample_is_the_lowest_hash_buckets_of_the_training_rows() -> None:
    import hashlib

    from core.data.split import search_sample, split_frame
    from core.data.synthetic import generate_frame

    # Given 5,000 rows split as the flow splits them (3,956 training rows) and a 1,000-row search sample
    config = CONFIG.model_copy(update={"search_sample_rows": 1_000})
    train = split_frame(generate_frame(5_000, seed=3), config).train
    sample = search_sample(train, config)
    # then the sample is the training ids whose keyed blake2b bucket is at most the 1,000th lowest one
    # (recomputed here with hashlib: whole buckets, so a tie at the edge comes along)
    key = config.holdout_salt.encode()
    bucket = {
        i: int.from_bytes(hashlib.blake2b(str(i).encode(), digest_size=8, key=key).digest(), "big") % 10_000
        for i in train[config.id_column]
    }
    edge = sorted(bucket.values())[config.search_sample_rows - 1]
    assert set(sample[config.id_column]) == {i for i, b in bucket.items() if b <= edge}
    assert config.search_sample_rows <= len(sample) <= config.search_sample_rows + 5
    # and the same rows whatever the order the rows come in; the rows themselves, untouched
    shuffled = search_sample(train.sample(frac=1, random_state=0), config)
    assert set(shuffled[config.id_column]) == set(sample[config.id_column])
    pd.testing.assert_frame_equal(
        sample, train[train[config.id_column].isin(sample[config.id_column])].reset_index(drop=True)
    )
    # A table with no more training rows than that is searched whole (the same frame)
    assert search_sample(train, config.model_copy(update={"search_sample_rows": len(train)})) is train


def test_the_dask_engine_searches_the_configured_families_and_lightgbm() -> None:
    from core.dask_engine.fitting import search_spec
    from core.data.dataset import TaskType
    from core.modeling.search import ModelFamily, SearchSpec

    two = SearchSpec(families=[ModelFamily.decision_tree, ModelFamily.logistic_regression])
    assert search_spec(two, TaskType.binary).families == [*two.families, ModelFamily.lightgbm]
    assert search_spec(SearchSpec(), TaskType.regression).families == [
        ModelFamily.ridge,
        ModelFamily.hist_gradient_boosting,
        ModelFamily.lightgbm,
    ]
    once = SearchSpec(families=[ModelFamily.lightgbm, ModelFamily.random_forest])
    assert search_spec(once, TaskType.binary).families == once.families  # never twice


def test_the_fit_place_follows_family_memory_and_sample() -> None:
    from core.dask_engine.fitting import FitPlan, plan_fit
    from core.dask_engine.split import EVERY_TRAINING_ROW

    gib = 2**30
    # LightGBM: every training row on the cluster, whatever the flow's memory
    assert plan_fit(CONFIG, "lightgbm", 8_000_000, 500_000, 1_600, 1 * gib) == FitPlan(
        "dask cluster", EVERY_TRAINING_ROW
    )
    # Another family: in the flow's process when every row fits in half the memory available
    fits = plan_fit(CONFIG, "hist_gradient_boosting", 8_000_000, 500_000, 1_600, 26 * gib)
    assert fits == FitPlan("flow process", EVERY_TRAINING_ROW)
    # else on the largest sample by id hash that fits, said with the numbers
    tight = plan_fit(CONFIG, "hist_gradient_boosting", 8_000_000, 500_000, 1_600, 16 * gib)
    assert tight.where == "flow process" and not tight.reuse
    largest = int(8 * gib / 1_600)  # 5,368,709 rows in half of 16 GiB
    share = (tight.below - holdout_threshold(CONFIG.holdout_fraction)) / (10_000 - 2_000)
    assert share * 8_000_000 <= largest < (share + 1 / 8_000) * 8_000_000
    assert "about 11.9 GiB" in tight.reason and "16.0 GiB available" in tight.reason
    assert f"{largest:,} rows" in tight.reason
    # not even more than the search sample: the search's own fit on the sample is shipped, said so
    starved = plan_fit(CONFIG, "logistic_regression", 8_000_000, 500_000, 1_600, 1 * gib)
    assert starved.reuse and "500,000 rows is shipped" in starved.reason
    # the sample is every training row: the search's refit is the final fit, nothing to add
    assert plan_fit(CONFIG, "lightgbm", 9_000, 9_000, 1_600, 1 * gib) == FitPlan(
        "flow process", EVERY_TRAINING_ROW, reuse=True
    )


def test_the_memory_estimate_bounds_a_measured_fit(tmp_path) -> None:
    """The estimate per row (frame twice, model inputs thrice as float64) against a fit's measured peak."""
    import json
    import subprocess
    import sys

    from core.dask_engine.fitting import fit_bytes_per_row

    assert fit_bytes_per_row(417, 33) == 2 * 417 + 3 * 8 * 33
    script = """
import json, os, resource, sys
import pandas as pd
from core.data.dataset import load_local_dataset_config
from core.data.features import prepare_inputs, prepare_target
from core.data.synthetic import generate_month
from core.modeling.search import build_model
config = load_local_dataset_config("credit-risk")
frame = pd.concat([generate_month(m, 40_000, 3) for m in range(3)], ignore_index=True)
frame_bytes = int(frame.memory_usage(deep=True).sum())
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
model = build_model(config, sys.argv[1], {}, 1).fit(prepare_inputs(frame, config), prepare_target(frame, config))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
json.dump({"rows": len(frame), "frame": frame_bytes, "inputs": int(model[-1].n_features_in_),
           "grown": peak - before}, sys.stdout)
"""
    # 120,000 rows, a decision tree (the families' peaks were alike at 400,000 rows: docs/scale-out.md)
    out = subprocess.run([sys.executable, "-c", script, "decision_tree"], capture_output=True, text=True, check=True)
    measured = json.loads(out.stdout)
    rows = measured["rows"]
    estimate = fit_bytes_per_row(measured["frame"] / rows, measured["inputs"]) * rows
    # the frame was there before the fit: the estimate covers it and what the fit added at its peak
    print(f"measured {(measured['frame'] + measured['grown']) / rows:.0f} B/row, estimate {estimate / rows:.0f} B/row")
    assert measured["frame"] + measured["grown"] <= estimate


def test_the_record_says_what_ran_where_on_the_run_and_the_card() -> None:
    from datetime import UTC, datetime

    from markupsafe import escape

    from core.modeling.training_record import TrainingRecord
    from core.promotion.card import ModelCard
    from core.promotion.card_render import render_html, render_markdown

    record = TrainingRecord(
        "dask",
        8_000_000,
        500_123,
        ("decision_tree", "lightgbm"),
        "flow process",
        5_368_000,
        "flow process",
        "every one of the 8,000,000 training rows would need about 12.0 GiB",
    )
    assert record.tags() == {
        "training.engine": "dask",
        "training.train_rows": "8000000",
        "training.search_rows": "500123",
        "training.search_families": "decision_tree,lightgbm",
        "training.search_where": "flow process",
        "training.fit_rows": "5368000",
        "training.fit_where": "flow process",
        "training.fit_reason": "every one of the 8,000,000 training rows would need about 12.0 GiB",
    }
    rows = record.card_rows()
    assert rows["Model search"].startswith("decision_tree, lightgbm: cross-validated on 500,123 training rows (a ")
    assert (
        rows["Final fit"] == "the chosen configuration on 5,368,000 of the 8,000,000 training rows, in the flow process"
    )
    everything = TrainingRecord("pandas", 9_000, 9_000, ("ridge",), "flow process", 9_000, "flow process")
    assert "training.fit_reason" not in everything.tags()
    assert (
        everything.card_rows()["Final fit"]
        == "the chosen configuration on all 9,000 training rows, in the flow process"
    )
    card = ModelCard(
        "toy",
        None,
        None,
        "reject",
        "dry run",
        ["x"],
        "v1",
        None,
        8_000_000,
        2_000_000,
        {"roc_auc": 0.7},
        "abc",
        datetime.now(UTC),
        training=rows,
    )
    text, html = render_markdown(card), render_html(card)
    assert "## Training: what ran where" in text and "<h2>Training: what ran where</h2>" in html
    for label, value in rows.items():
        assert f"- **{label}:** {value}" in text and f"<dt>{label}</dt><dd>{escape(value)}</dd>" in html
    assert '"training": {' in card.to_json()
