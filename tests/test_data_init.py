"""`mlops data init`: a dataset config inferred from the data, that the data passes and training accepts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from adapters.expectations import validate_frame
from adapters.settings import Settings
from adapters.snapshots import read_snapshot
from core.data.config_inference import (
    ConfigInferenceError,
    InferenceRequest,
    InferenceRules,
    dataset_name,
    format_from_names,
    infer_config,
)
from core.data.dataset import FeatureType, TaskType, load_local_dataset_config, parse_dataset_config
from mlops.cli import app

runner = CliRunner()


def _frame(n: int = 300, seed: int = 0) -> pd.DataFrame:
    """A small table of every kind of column: id, ISO date, ints, floats, text with nulls, flags, free text."""
    rng = np.random.default_rng(seed)
    plan = rng.choice(["basic", "plus", "pro"], n).astype(object)
    plan[rng.random(n) < 0.1] = None
    return pd.DataFrame(
        {
            "customer_id": [f"c{i:05d}" for i in range(n)],
            "signup_date": pd.date_range("2024-01-01", periods=n, freq="D").strftime("%Y-%m-%d"),
            "age": rng.integers(18, 90, n),
            "balance": rng.normal(0, 100, n).round(2),
            "visits": rng.integers(0, 40, n),
            "region_code": rng.integers(1, 5, n),
            "plan": plan,
            "is_member": rng.choice([True, False], n),
            "note": [f"free text {i}" for i in range(n)],
            "churned": rng.choice([0, 1], n),
        }
    )


def _infer(frame: pd.DataFrame, **options):
    return infer_config(
        frame, InferenceRequest(source="/data/churn.csv", fmt="csv", **({"target": "churned"} | options))
    )


def _feature(inferred, name: str):
    return next(f for f in inferred.config.features if f.name == name)


def _invoke(*args: str):
    return runner.invoke(app, ["data", "init", *args])


# --- inference on frames ---


def test_feature_types_numbers_codes_text_and_flags():
    inferred = _infer(_frame())
    config = inferred.config
    assert config.numeric_features == ["age", "balance", "visits", "region_code"]  # integer codes stay numeric
    assert config.categorical_features == ["plan", "is_member"]
    assert _feature(inferred, "plan").categories == ["basic", "plus", "pro"]
    # a true/false column lists no categories (the config lists them as text, which true/false never matches)
    assert _feature(inferred, "is_member").categories is None
    assert "customer_id" not in config.feature_names
    assert "signup_date" not in config.feature_names


def test_numeric_ranges_widen_by_a_tenth_of_the_range_and_keep_zero_for_non_negative_columns():
    frame = pd.DataFrame(
        {
            "id": range(6),
            "counts": [0, 20, 40, 60, 80, 100],  # non-negative: min stays 0 instead of -10
            "signed": [-50, -20, 0, 10, 30, 50],
            "ratio": [0.5, 0.7, 0.9, 1.1, 1.3, 1.5],
            "positive": [10, 12, 14, 16, 18, 20],  # min 9 (above 0): the margin applies
            "y": [0, 1, 0, 1, 0, 1],
        }
    )
    inferred = infer_config(frame, InferenceRequest(source="/d.csv", fmt="csv", target="y"))
    bounds = {f.name: (f.min, f.max) for f in inferred.config.features}
    assert bounds == {"counts": (0, 110), "signed": (-60, 60), "ratio": (0.4, 1.6), "positive": (9, 21)}
    text = inferred.to_yaml()
    assert "widened by 10 % of the observed range" in text
    assert "a column with no negative values keeps min >= 0" in text
    assert "observed 0 .. 100" in text


def test_null_tolerance_is_the_share_seen_plus_a_margin_capped_at_one():
    n = 100
    frame = pd.DataFrame(
        {
            "id": range(n),
            "some_nulls": [None if i < 10 else float(i) for i in range(n)],
            "mostly_nulls": [float(i) if i < 2 else None for i in range(n)],
            "no_nulls": np.arange(n, dtype=float),
            "y": [i % 2 for i in range(n)],
        }
    )
    inferred = infer_config(frame, InferenceRequest(source="/d.csv", fmt="csv", target="y"))
    assert _feature(inferred, "some_nulls").max_null_fraction == 0.15
    assert _feature(inferred, "mostly_nulls").max_null_fraction == 1.0
    assert _feature(inferred, "no_nulls").max_null_fraction is None
    assert inferred.config.max_null_fraction == 0.05
    assert "share of nulls seen + 0.05, rounded up to 2 decimals, capped at 1" in inferred.to_yaml()


def test_text_columns_above_the_category_cap_are_target_encoded_and_ids_or_free_text_left_out():
    n = 1200
    frame = pd.DataFrame(
        {
            "id": range(n),
            "merchant": [f"m{i % 300}" if i % 40 else None for i in range(n)],
            "free_text": [f"t{i}" for i in range(n)],
            "near_unique": [f"u{i % 1100}" for i in range(n)],
            "colour": [["red", "green", "blue"][i % 3] for i in range(n)],
            "x": [i % 7 for i in range(n)],
            # drawn, not i % 2: that would be a function of the merchant (i % 300), which the leak checks flag
            "y": np.random.default_rng(0).integers(0, 2, n),
        }
    )
    inferred = infer_config(frame, InferenceRequest(source="/d.csv", fmt="csv", target="y"))
    assert inferred.config.feature_names == ["merchant", "colour", "x"]
    merchant = _feature(inferred, "merchant")
    assert merchant.type is FeatureType.categorical and merchant.categories is None
    assert merchant.encoding == "target" and inferred.config.encoding_of(merchant) == "target"
    assert inferred.config.encoding_of(_feature(inferred, "colour")) == "one_hot"
    lines = inferred.to_yaml().splitlines()
    merchant_line = next(line for line in lines if "name: merchant" in line)
    assert "encoding: target" in merchant_line
    assert (
        "# text, 300 distinct values: target-encoded (above the cap of 50 for one-hot); categories not listed"
        in merchant_line
    )
    assert parse_dataset_config(inferred.to_yaml(), "test") == inferred.config
    assert (
        "  # left out: free_text has a distinct value in every row (1,200 distinct values in 1,200 values): an id "
        "or free text, too few repeats to learn a category from" in lines
    )
    assert "near_unique has nearly a distinct value per row (1,100 distinct" in inferred.left_out["near_unique"]
    assert "a text column\n#   with more is target-encoded (`encoding: target`" in inferred.to_yaml()
    smaller = infer_config(
        frame, InferenceRequest(source="/d.csv", fmt="csv", target="y"), rules=InferenceRules(max_categories=2)
    )
    colour = _feature(smaller, "colour")
    assert colour.encoding == "target" and colour.categories is None and "colour" not in smaller.left_out
    assert smaller.feature_notes["colour"].startswith("text, 3 distinct values: target-encoded (above the cap of 2")


def test_constant_and_empty_columns_are_left_out():
    frame = _frame().assign(constant=7, empty=None)
    inferred = _infer(frame)
    assert "constant" not in inferred.config.feature_names
    assert "empty" not in inferred.config.feature_names
    assert "single value (7)" in inferred.left_out["constant"]
    assert "only empty values" in inferred.left_out["empty"]


@pytest.mark.parametrize(
    ("values", "task", "classes"),
    [
        ([0, 1] * 50, TaskType.binary, [0, 1]),
        (["no", "yes"] * 50, TaskType.binary, ["no", "yes"]),
        ([True, False] * 50, TaskType.binary, [0, 1]),
        (["c", "a", "b", "a"] * 25, TaskType.multiclass, ["a", "b", "c"]),
        ([3, 1, 2, 5] * 25, TaskType.multiclass, [1, 2, 3, 5]),
        ([float(i % 30) for i in range(100)], TaskType.regression, None),  # 30 whole numbers: more than 20
        ([i / 7 for i in range(100)], TaskType.regression, None),
        ([0.5, 1.5] * 50, TaskType.regression, None),  # not whole numbers
    ],
)
def test_task_and_classes_are_inferred_from_the_target(values, task, classes):
    frame = pd.DataFrame({"id": range(100), "x": np.arange(100) % 9, "y": values})
    inferred = infer_config(frame, InferenceRequest(source="/d.csv", fmt="csv", target="y"))
    assert inferred.config.task is task
    assert inferred.config.classes == classes
    assert "inferred:" in inferred.notes["task"]


def test_a_given_task_is_kept_and_checked():
    frame = pd.DataFrame({"id": range(100), "x": np.arange(100) % 9, "y": [1, 2, 3, 4] * 25})
    assert (
        infer_config(
            frame, InferenceRequest(source="/d.csv", fmt="csv", target="y", task=TaskType.regression)
        ).config.classes
        is None
    )
    with pytest.raises(ConfigInferenceError, match=r"--task binary, but target 'y' has 4 distinct values"):
        infer_config(frame, InferenceRequest(source="/d.csv", fmt="csv", target="y", task=TaskType.binary))
    text = frame.assign(y=["a", "b"] * 50)
    with pytest.raises(ConfigInferenceError, match="--task regression needs a numeric target"):
        infer_config(text, InferenceRequest(source="/d.csv", fmt="csv", target="y", task=TaskType.regression))
    with pytest.raises(ConfigInferenceError, match="use --task binary"):
        infer_config(text, InferenceRequest(source="/d.csv", fmt="csv", target="y", task=TaskType.multiclass))


def test_id_prefers_a_unique_column_named_like_an_id():
    inferred = _infer(_frame().assign(serial=range(300)))  # two unique columns; customer_id is named like an id
    assert inferred.config.id_column == "customer_id"
    assert "also unique: note, serial" in inferred.notes["id_column"]


def test_id_is_the_only_unique_column_whatever_its_name():
    frame = pd.DataFrame({"ref": [f"r{i}" for i in range(50)], "x": [i % 5 for i in range(50)], "y": [0, 1] * 25})
    assert infer_config(frame, InferenceRequest(source="/d.csv", fmt="csv", target="y")).config.id_column == "ref"


def test_unique_measurements_are_not_taken_for_ids():
    frame = pd.DataFrame({"weight": np.linspace(1.01, 9.99, 50), "x": [i % 5 for i in range(50)], "y": [0, 1] * 25})
    with pytest.raises(ConfigInferenceError, match=r"no column of /d.csv is unique per row .* pass --id COLUMN"):
        infer_config(frame, InferenceRequest(source="/d.csv", fmt="csv", target="y"))


def test_several_unique_columns_without_an_id_name_need_id():
    frame = pd.DataFrame({"a": range(50), "b": [f"b{i}" for i in range(50)], "y": [0, 1] * 25})
    with pytest.raises(ConfigInferenceError, match=r"several columns .* \(a, b\) .* pass --id COLUMN"):
        infer_config(frame, InferenceRequest(source="/d.csv", fmt="csv", target="y"))
    assert infer_config(
        frame, InferenceRequest(source="/d.csv", fmt="csv", target="y", id_column="b")
    ).config.feature_names == ["a"]


def test_a_date_column_becomes_the_time_column():
    inferred = _infer(_frame())
    assert inferred.config.time_column == "signup_date"
    assert "ISO dates in text, 2024-01-01 .. 2024-10-26" in inferred.notes["time_column"]
    as_datetime = _frame().assign(signup_date=lambda f: pd.to_datetime(f["signup_date"]))
    assert _infer(as_datetime).config.time_column == "signup_date"
    config = inferred.config
    assert config.split_strategy == "time" and config.time_features
    assert config.calendar_parts == ["weekday", "month", "day_of_year"]  # dates only: no hour
    assert config.input_columns[-1] == "signup_date"
    later = pd.to_datetime(_frame()["signup_date"]) + pd.Timedelta(days=3)
    second = _frame().assign(first_order=lambda f: f["signup_date"], closed_at=later.dt.strftime("%Y-%m-%d"))
    twice = _infer(second)
    assert twice.config.datetime_features == ["first_order"]  # known at signup: its calendar parts are features
    assert (
        "closed_at may leak the target (after_event): later than signup_date in 100.0% of rows"
        in (twice.left_out["closed_at"])
    )


def test_yaml_reads_back_to_the_same_config_and_explains_every_line():
    inferred = _infer(_frame(), name="churn-test")
    text = inferred.to_yaml()
    assert parse_dataset_config(text, "test") == inferred.config
    assert inferred.config.name == inferred.config.model_name == "churn-test"
    assert inferred.config.min_rows == 100
    settings = [line for line in text.splitlines() if line and not line.lstrip().startswith("#")]
    unexplained = [line for line in settings if "  # " not in line and line != "features:"]
    assert not unexplained
    assert "# left out: note has a distinct value in every row (300 distinct values in 300 values)" in text


def test_min_rows_is_half_the_rows_seen_up_to_100():
    assert _infer(_frame(n=60)).config.min_rows == 30
    assert _infer(_frame(n=1000)).config.min_rows == 100


# --- refusals ---


def test_refuses_a_missing_target():
    with pytest.raises(ConfigInferenceError, match=r"target column 'label' is not in /data/churn.csv \(columns: "):
        _infer(_frame(), target="label")


def test_refuses_a_constant_target():
    with pytest.raises(ConfigInferenceError, match=r"target column 'churned' in /data/churn.csv is constant \(1 in"):
        _infer(_frame().assign(churned=1))


def test_refuses_a_target_with_empty_values():
    frame = _frame().astype({"churned": "float64"})
    frame.loc[:4, "churned"] = None
    with pytest.raises(ConfigInferenceError, match=r"target column 'churned' in /data/churn.csv has 5 empty value"):
        _infer(frame)


def test_refuses_a_table_without_a_usable_feature():
    frame = pd.DataFrame({"id": range(100), "constant": 1, "text": [f"t{i}" for i in range(100)], "y": [0, 1] * 50})
    with pytest.raises(ConfigInferenceError, match=r"no usable feature in /d.csv: constant has a single value"):
        infer_config(frame, InferenceRequest(source="/d.csv", fmt="csv", target="y"))


def test_refuses_an_empty_table():
    with pytest.raises(ConfigInferenceError, match=r"/d.csv: the snapshot has no rows"):
        infer_config(pd.DataFrame({"id": [], "y": []}), InferenceRequest(source="/d.csv", fmt="csv", target="y"))


def test_refuses_an_id_that_is_not_unique():
    frame = _frame().assign(account=lambda f: f.index // 2)
    with pytest.raises(ConfigInferenceError, match=r"--id column 'account' is not unique: 300 rows share 150 value"):
        _infer(frame, id_column="account")
    with pytest.raises(ConfigInferenceError, match=r"--id column 'nope' is not in /data/churn.csv"):
        _infer(frame, id_column="nope")


def test_names_and_formats_from_the_source():
    assert dataset_name("s3://mlops/datasets/Churn Data/") == "churn-data"
    assert dataset_name("/data/credit_2024.csv.gz") == "credit_2024"
    assert format_from_names("s", ["a/part-0.parquet", "a/_SUCCESS"]) == "parquet"
    assert format_from_names("s", ["x.CSV"]) == "csv"
    with pytest.raises(ConfigInferenceError, match="both CSV and Parquet files; pass --format"):
        format_from_names("s", ["a.csv", "b.parquet"])
    with pytest.raises(ConfigInferenceError, match="s: no CSV"):
        format_from_names("s", ["readme.txt"])


# --- the command on local files ---


REFERENCE_TABLES = [
    ("load_breast_cancer", TaskType.binary, [0, 1]),
    ("load_wine", TaskType.multiclass, [0, 1, 2]),
    ("load_diabetes", TaskType.regression, None),
]


@pytest.mark.parametrize(("loader", "task", "classes"), REFERENCE_TABLES)
def test_reference_tables_round_trip(tmp_path: Path, loader: str, task: TaskType, classes: list | None):
    import sklearn.datasets

    table = getattr(sklearn.datasets, loader)(as_frame=True).frame
    table.insert(0, "sample_id", np.arange(len(table)) + 10_000)
    csv = tmp_path / f"{loader}.csv"
    table.to_csv(csv, index=False)
    out = tmp_path / "config.yaml"

    result = _invoke(str(csv), "--target", "target", "--out", str(out))

    assert result.exit_code == 0, result.output
    config = load_local_dataset_config(str(out))
    features = [c for c in table.columns if c not in ("sample_id", "target")]
    assert config.feature_names == features
    assert all(f.type is FeatureType.numeric for f in config.features)
    assert (config.task, config.classes, config.id_column) == (task, classes, "sample_id")
    assert (config.source, config.format, config.name) == (str(csv), "csv", loader)
    # the data the config was inferred from passes the project's validation of it
    report = validate_frame(read_snapshot(config.source, config.format, Settings()).frame, config)
    assert report.success, report.summary()


def test_mixed_table_passes_validation_and_nothing_is_written_on_refusal(tmp_path: Path):
    csv = tmp_path / "churn.csv"
    _frame().to_csv(csv, index=False)
    out = tmp_path / "configs" / "churn.yaml"

    result = _invoke(str(csv), "--target", "churned", "--out", str(out))

    assert result.exit_code == 0, result.output
    assert "left out: note has a distinct value in every row (300 distinct values in 300 values)" in result.output
    config = load_local_dataset_config(str(out))
    assert config.categorical_features == ["plan", "is_member"]
    assert config.time_column == "signup_date"
    report = validate_frame(read_snapshot(str(csv), "csv", Settings()).frame, config)
    assert report.success, report.summary()

    before = out.read_text()
    again = _invoke(str(csv), "--target", "churned", "--out", str(out))
    assert again.exit_code == 1
    assert "exists; pass --force" in again.output
    refused = _invoke(str(csv), "--target", "nope", "--out", str(out), "--force")
    assert refused.exit_code == 1
    assert "target column 'nope' is not in" in refused.output
    assert out.read_text() == before
    assert [p.name for p in out.parent.iterdir()] == ["churn.yaml"]  # no temp file left behind
    folder = _invoke(str(csv), "--target", "churned", "--out", str(out.parent))
    assert folder.exit_code == 2
    assert "Invalid value for '--out'" in folder.output


def test_a_folder_of_parquet_partitions(tmp_path: Path):
    frame = _frame(n=400)
    folder = tmp_path / "partitions"
    for month, part in enumerate((frame.iloc[:200], frame.iloc[200:])):
        (folder / f"month={month}").mkdir(parents=True)
        part.to_parquet(folder / f"month={month}" / "part-0.parquet")
    out = tmp_path / "churn.yaml"

    result = _invoke(str(folder), "--target", "churned", "--out", str(out), "--name", "churn")

    assert result.exit_code == 0, result.output
    config = load_local_dataset_config(str(out))
    assert (config.format, config.source, config.name, config.min_rows) == ("parquet", str(folder), "churn", 100)
    report = validate_frame(read_snapshot(str(folder), "parquet", Settings()).frame, config)
    assert report.success, report.summary()


def test_unreadable_sources_are_refused_by_name(tmp_path: Path):
    out = tmp_path / "x.yaml"
    missing = _invoke(str(tmp_path / "nothing.csv"), "--target", "y", "--out", str(out))
    assert missing.exit_code == 1
    assert "nothing.csv: no such file or folder" in missing.output
    empty = tmp_path / "empty.csv"
    empty.write_bytes(b"")
    assert "empty.csv: file is empty" in _invoke(str(empty), "--target", "y", "--out", str(out)).output
    header_only = tmp_path / "header.csv"
    header_only.write_text("id,x,y\n")
    assert (
        "header.csv: the snapshot has no rows" in _invoke(str(header_only), "--target", "y", "--out", str(out)).output
    )
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "notes.txt").write_text("hello")
    assert "no CSV (.csv, .csv.gz) or Parquet" in _invoke(str(folder), "--target", "y", "--out", str(out)).output
    assert not out.exists()


# --- against the real stack ---


@pytest.mark.integration
@pytest.mark.slow
def test_init_from_s3_then_training_takes_the_config_unchanged(stack, tmp_path: Path):
    from adapters.clients import S3Location, put_bytes
    from flows.training import TrainingParams, training

    # Given a CSV snapshot in two partitions on the stack's S3, with a categorical column that has nulls
    rng = np.random.default_rng(3)
    frame = _frame(n=1000, seed=3)
    signal = (frame["age"] - 50) / 20 + (frame["plan"] == "pro") + rng.normal(0, 0.5, len(frame))
    frame["churned"] = (signal > 0.3).astype(int)
    prefix = S3Location(stack.bucket, "datasets/init-churn")
    for index, part in enumerate((frame.iloc[:500], frame.iloc[500:])):
        put_bytes(stack, prefix.child(f"part-{index}.csv"), part.to_csv(index=False).encode(), "text/csv")
    out = tmp_path / "init-churn.yaml"

    # When `mlops data init` reads it by its s3:// prefix
    result = _invoke(f"{prefix.uri}/", "--target", "churned", "--out", str(out))

    # then the config says what the data is
    assert result.exit_code == 0, result.output
    text = out.read_text()
    config = load_local_dataset_config(str(out))
    assert (config.source, config.format, config.name) == (
        f"s3://{stack.bucket}/datasets/init-churn/",
        "csv",
        "init-churn",
    )
    assert (config.task, config.classes, config.id_column, config.time_column) == (
        TaskType.binary,
        [0, 1],
        "customer_id",
        "signup_date",
    )
    plan = next(f for f in config.features if f.name == "plan")
    assert plan.categories == ["basic", "plus", "pro"]
    assert 0.1 < plan.max_null_fraction <= 0.2  # about 10 % null seen, plus the 0.05 margin
    assert "# left out: note has a distinct value in every row (1,000 distinct values in 1,000" in text

    # and the training flow takes the file as it is (dry run: nothing registered)
    params = TrainingParams(
        dataset=str(out),
        dry_run=True,
        search={"families": ["logistic_regression"], "trials_per_family": 1, "cv_folds": 2},
    )
    state = training(params, return_state=True)
    assert state.is_completed(), state.message
    outcome = state.result()
    assert outcome.candidate_version is None
    assert not outcome.promoted
