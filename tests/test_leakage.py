"""Leak checks, the time-aware holdout and calendar features (pure units: no servers).

Planted leaks of every kind are found and named; tables without leaks raise none (a false positive fails
the test as a miss does). The time split and its folds are compared with scikit-learn's `TimeSeriesSplit`,
the calendar encoding with the textbook sine and cosine.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.datasets import load_breast_cancer, load_diabetes, load_digits, load_wine
from sklearn.model_selection import TimeSeriesSplit

from adapters.expectations import validate_frame
from core.data.config_inference import InferenceRequest, infer_config
from core.data.dataset import DatasetConfig
from core.data.leakage import Candidate, find_leaks, named_like
from core.data.split import split_frame, time_folds
from core.data.synthetic import generate_frame
from core.modeling.search import SearchSpec, prepare_search
from core.transformers import CalendarEncoder

RNG = np.random.default_rng(7)
N = 4000


def _candidates(frame: pd.DataFrame, target: str, kinds: dict[str, str] | None = None) -> list[Candidate]:
    kinds = kinds or {}
    return [Candidate(c, kinds.get(c, "numeric")) for c in frame.columns if c != target]


def _bikes() -> pd.DataFrame:
    """Hourly rentals: `casual + registered = cnt` (the table that was promoted at R² 0.9997)."""
    hour = RNG.integers(0, 24, N)
    temp = RNG.normal(20, 6, N)
    casual = np.round(np.clip(10 + 1.5 * temp + RNG.normal(0, 8, N), 0, None))
    registered = np.round(np.clip(60 + 8 * np.sin(hour / 24 * 2 * np.pi) + RNG.normal(0, 15, N), 0, None))
    return pd.DataFrame(
        {"hour": hour, "temp": temp, "humidity": RNG.uniform(0, 1, N), "casual": casual, "registered": registered}
    ).assign(cnt=lambda f: f.casual + f.registered)


def _accounts() -> pd.DataFrame:
    """Three outcomes, one honest feature, and a planted leak of each other kind."""
    y = RNG.integers(0, 3, N)
    opened = pd.Timestamp("2024-01-01") + pd.to_timedelta(RNG.integers(0, 300 * 24, N), unit="h")
    return pd.DataFrame(
        {
            "outcome": y,
            "balance": RNG.normal(size=N) + 0.4 * y,
            "region": RNG.choice(["n", "s", "e", "w"], N),
            "result_code": y * 10.0 + 3,  # a copy: predicts the target alone
            "status": np.where(y == 2, "closed", "open"),  # merges two outcomes: a function of the target
            "outcome_notes_len": RNG.normal(size=N),  # named like the target
            "opened_at": opened,
            "closed_at": opened + pd.to_timedelta(RNG.integers(1, 90, N), unit="D"),  # after the event
            "first_contact": opened - pd.to_timedelta(RNG.integers(1, 90, N), unit="D"),  # before: fine
        }
    )


def test_every_planted_leak_is_found_and_named():
    kinds = {"region": "categorical", "status": "categorical", "closed_at": "datetime", "first_contact": "datetime"}
    frame = _accounts()
    candidates = [c for c in _candidates(frame, "outcome", kinds) if c.name != "opened_at"]
    found = {leak.column: leak for leak in find_leaks(frame, "outcome", True, candidates, "opened_at")}
    assert {c: leak.check for c, leak in found.items()} == {
        "result_code": "predicts_target",
        "status": "function_of_target",
        "outcome_notes_len": "named_like_target",
        "closed_at": "after_event",
    }
    assert "ROC AUC 1.0000" in found["result_code"].detail
    assert "later than opened_at in 100.0% of rows" in found["closed_at"].detail


def test_the_parts_of_a_total_are_named_together():
    found = find_leaks(_bikes(), "cnt", False, _candidates(_bikes(), "cnt"))
    assert [(leak.column, leak.check) for leak in found] == [
        ("casual", "linear_combination"),
        ("registered", "linear_combination"),
    ]
    assert "with registered, a linear combination reproduces 'cnt'" in found[0].detail


def test_a_function_of_a_numeric_target_that_does_not_reveal_it():
    y = RNG.normal(50, 10, N)
    frame = pd.DataFrame({"y": y, "x": y / 10 + RNG.normal(0, 2, N), "distance": np.abs(y - 50)})
    found = find_leaks(frame, "y", False, _candidates(frame, "y"))
    assert [(leak.column, leak.check) for leak in found] == [("distance", "function_of_target")]


@pytest.mark.parametrize(
    ("loader", "classification"),
    [(load_breast_cancer, True), (load_wine, True), (load_digits, True), (load_diabetes, False)],
)
def test_tables_without_leaks_raise_none(loader, classification):
    frame = loader(as_frame=True).frame
    assert find_leaks(frame, "target", classification, _candidates(frame, "target")) == []


def test_the_bundled_credit_table_raises_none():
    frame = generate_frame(20_000, seed=3)
    config = DatasetConfig.model_validate(
        {**_bundled_raw(), "source": "s3://x/credit-risk/"}  # the bundled config's features
    )
    candidates = [Candidate(f.name, f.type.value) for f in config.features]
    assert find_leaks(frame, "default", True, candidates, "application_date") == []


def _bundled_raw() -> dict:
    import yaml

    from core.data.dataset import bundled_config_text

    return yaml.safe_load(bundled_config_text("credit-risk"))


def test_names_like_the_target():
    assert named_like("churn_reason", "churned") and named_like("num_defaults", "default")
    assert named_like("priceBand", "price") and not named_like("price", "price")
    assert not named_like("y_lag", "y") and not named_like("region", "regression_target")


def test_data_init_leaves_leaks_out_saying_why():
    frame = _bikes().assign(ride_id=range(N))
    inferred = infer_config(frame, InferenceRequest(source="/bikes.csv", fmt="csv", target="cnt"))
    assert inferred.config.feature_names == ["hour", "temp", "humidity"]
    assert inferred.left_out["casual"].startswith("casual may leak the target (linear_combination): with registered")
    assert "# left out: registered may leak the target" in inferred.to_yaml()


def test_validation_refuses_a_leak_unless_allowed_with_a_reason():
    frame = _bikes().assign(ride_id=range(N))
    raw = {
        "name": "bikes",
        "model_name": "bikes",
        "source": "/bikes.csv",
        "target": "cnt",
        "task": "regression",
        "id_column": "ride_id",
        "features": [{"name": c, "type": "numeric"} for c in ("hour", "temp", "casual", "registered")],
    }
    report = validate_frame(frame, DatasetConfig.model_validate(raw))
    assert not report.success
    refused = {f.column: f.expectation for f in report.failures}
    assert refused == {"casual": "leakage_check:linear_combination", "registered": "leakage_check:linear_combination"}
    reason = "both counts are known at the end of the hour, when the model runs"
    for feature in raw["features"][2:]:
        feature.update(allow_leak=True, allow_leak_reason=reason)
    allowed = validate_frame(frame, DatasetConfig.model_validate(raw))
    assert allowed.success
    assert allowed.statistics["leak_checks"]["allowed"]["casual"]["reason"] == reason
    with pytest.raises(ValueError, match="allow_leak: true and allow_leak_reason go together"):
        DatasetConfig.model_validate({**raw, "features": [{"name": "hour", "type": "numeric", "allow_leak": True}]})


# ------------------------------------------------------------------------------------------- time split


def _hourly(n: int = 2400) -> pd.DataFrame:
    times = pd.Series(pd.date_range("2024-01-01", periods=n, freq="h"))
    shuffled = times.sample(frac=1, random_state=1).reset_index(drop=True)
    return pd.DataFrame({"id": range(n), "ts": shuffled, "x": RNG.normal(size=n), "y": RNG.integers(0, 2, n)}).assign(
        ts_text=lambda f: f.ts.dt.strftime("%Y-%m-%dT%H:%M:%S")
    )


def _time_config(**extra) -> DatasetConfig:
    raw = {"name": "t", "model_name": "t", "source": "/t.csv", "target": "y", "id_column": "id"}
    return DatasetConfig.model_validate(
        raw | {"time_column": "ts", "features": [{"name": "x", "type": "numeric"}]} | extra
    )


def test_the_holdout_is_the_latest_period_and_the_card_says_why():
    frame = _hourly()
    split = split_frame(frame, _time_config())
    assert split.strategy == "time" and len(split.holdout) == 480
    assert split.train.ts.max() < split.holdout.ts.min()
    assert split.holdout.ts.min() == frame.ts.sort_values().iloc[1920]
    assert split.why.startswith("time: the holdout is the latest 20% of rows by ts (from 2024-03-21T00:00:00+00:00)")
    text = split_frame(frame.assign(ts=frame.ts_text), _time_config())
    assert text.holdout.id.tolist() == split.holdout.id.tolist()  # ISO text splits as datetimes do
    cut = split_frame(frame, _time_config(split={"cutoff": "2024-04-01T00:00:00"}))
    assert len(cut.holdout) == (frame.ts >= "2024-04-01").sum() and "configured cut-off" in cut.why
    random = split_frame(frame, _time_config(split={"strategy": "random"}))
    assert random.strategy == "random" and random.train.ts.max() > random.holdout.ts.min()


def test_time_folds_are_scikit_learns_time_series_split_in_time_order():
    frame = _hourly(2000)
    folds = time_folds(frame.ts, 4)
    order = np.argsort(frame.ts.to_numpy())
    for (train, valid), (ref_train, ref_valid) in zip(folds, TimeSeriesSplit(4).split(order), strict=True):
        assert sorted(order[ref_train]) == train.tolist() and sorted(order[ref_valid]) == valid.tolist()
        assert frame.ts.iloc[train].max() < frame.ts.iloc[valid].min()
    data = prepare_search(frame, _time_config(), SearchSpec(cv_folds=4), seed=0)
    assert [v.tolist() for _, v in data.folds] == [v.tolist() for _, v in folds]


def test_equal_times_stay_on_one_side_of_a_fold():
    times = pd.Series(pd.to_datetime(["2024-01-01"] * 5 + ["2024-01-02"] * 5 + ["2024-01-03"] * 5))
    for train, valid in time_folds(times, 2):
        assert times.iloc[train].max() < times.iloc[valid].min()


def test_a_time_fold_without_a_class_is_refused_by_name():
    frame = _hourly(600).sort_values("ts", ignore_index=True).assign(y=lambda f: (f.index >= 300).astype(int))
    with pytest.raises(ValueError, match=r"time-ordered CV fold 1 of 3 has no 'y' = \['1'\] in its training rows"):
        prepare_search(frame, _time_config(), SearchSpec(cv_folds=3), seed=0)


def test_calendar_parts_are_the_textbook_sine_and_cosine():
    stamps = pd.Series(["2024-03-05T23:30:00", "2024-12-31T00:00:00+02:00", None, "not a date"])
    out = (
        CalendarEncoder(("hour", "weekday", "month", "day_of_year"))
        .fit(stamps.to_frame("t"))
        .transform(stamps.to_frame("t"))
    )
    utc = pd.to_datetime(stamps, utc=True, errors="coerce", format="ISO8601")
    expected = []
    for value, period in ((utc.dt.hour, 24), (utc.dt.weekday, 7), (utc.dt.month - 1, 12), (utc.dt.dayofyear - 1, 366)):
        angle = 2 * np.pi * value.to_numpy(dtype=float, na_value=np.nan) / period
        expected += [np.sin(angle), np.cos(angle)]
    np.testing.assert_allclose(out, np.column_stack(expected), rtol=0, atol=1e-12)
    assert np.isnan(out[2:]).all()  # no date and a bad date: imputed downstream like a null
    assert out[1, 0] == pytest.approx(np.sin(2 * np.pi * 22 / 24))  # +02:00 is 22:00 UTC the day before


def test_calendar_features_reach_the_model_and_drive_it():
    """A target that follows the hour: with the time column's calendar parts the model finds it."""
    from sklearn.metrics import roc_auc_score

    from core.data.features import prepare_inputs
    from core.modeling.search import search_models

    frame = _hourly(3000)
    frame["y"] = (np.sin(2 * np.pi * frame.ts.dt.hour / 24) + 0.3 * RNG.normal(size=len(frame)) > 0).astype(int)
    scores = {}
    for with_time in (True, False):
        config = _time_config(time_features=with_time)
        split = split_frame(frame, config)
        spec = SearchSpec(families=["logistic_regression"], trials_per_family=1)
        model = search_models(split.train, config, spec, seed=0).model
        X = prepare_inputs(split.holdout, config)
        assert ("ts" in X.columns) is with_time
        if with_time:
            assert X["ts"].map(lambda v: isinstance(v, str)).all()  # ISO text, as a request carries it
        scores[with_time] = roc_auc_score(split.holdout.y, model.predict_proba(X)[:, 1])
    assert scores[True] > 0.9
    assert scores[False] < 0.65
