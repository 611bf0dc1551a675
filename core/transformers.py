"""Custom scikit-learn transformers that trained models carry.

Kept free of Prefect/MLflow imports: a saved model needs this module importable where it is loaded
(serving, batch scoring), and skops must be told to trust it (see `skops_trusted_types`).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, OneToOneFeatureMixin, TransformerMixin
from sklearn.utils.validation import check_is_fitted, validate_data


class QuantileClipper(OneToOneFeatureMixin, TransformerMixin, BaseEstimator):
    """Clip each numeric column to quantiles learned at fit time (outlier clipping).

    Args:
        lower: Lower quantile in [0, 0.5).
        upper: Upper quantile in (0.5, 1].
    """

    def __init__(self, lower: float = 0.005, upper: float = 0.995) -> None:
        self.lower = lower
        self.upper = upper

    def fit(self, X, y=None):
        """Learn the per-column clipping bounds, ignoring NaN."""
        if not 0 <= self.lower < self.upper <= 1:
            raise ValueError(f"need 0 <= lower < upper <= 1, got lower={self.lower}, upper={self.upper}")
        X = validate_data(self, X, ensure_all_finite="allow-nan", dtype=np.float64)
        self.lower_bounds_ = np.nanquantile(X, self.lower, axis=0)
        self.upper_bounds_ = np.nanquantile(X, self.upper, axis=0)
        return self

    def transform(self, X):
        """Clip values into the learned bounds; NaN stays NaN."""
        check_is_fitted(self)
        X = validate_data(self, X, ensure_all_finite="allow-nan", dtype=np.float64, reset=False)
        return np.clip(X, self.lower_bounds_, self.upper_bounds_)


# Period of each calendar part, and how it is read from a timestamp (0-based, so the cycle starts at 0).
CALENDAR_PERIODS = {"hour": 24.0, "weekday": 7.0, "month": 12.0, "day_of_year": 366.0}


def calendar_values(stamps: pd.Series, part: str) -> np.ndarray:
    """One calendar part of UTC timestamps as float64, NaN where there is no timestamp.

    Hour 0-23, weekday 0-6 from Monday, month 0-11, day of year 0-365.
    """
    values = {
        "hour": lambda: stamps.dt.hour,
        "weekday": lambda: stamps.dt.weekday,
        "month": lambda: stamps.dt.month - 1,
        "day_of_year": lambda: stamps.dt.dayofyear - 1,
    }[part]()
    return values.to_numpy(dtype="float64", na_value=np.nan)


class CalendarEncoder(TransformerMixin, BaseEstimator):
    """Date/time columns as the cyclic calendar parts a model can use: sine and cosine of each part.

    Each input column holds datetime values or ISO-8601 text (what a prediction request carries); naive times
    are read as UTC, values that are not dates become NaN (imputed downstream, as a null is). Hour 23 and
    hour 0, December and January, Sunday and Monday are neighbours on the circle, as they are in time.

    Args:
        parts: Calendar parts, each of `CALENDAR_PERIODS`.
    """

    def __init__(self, parts: tuple[str, ...] = ("hour", "weekday", "month", "day_of_year")) -> None:
        self.parts = parts

    def fit(self, X, y=None):
        """Remember the input columns; nothing is learnt."""
        unknown = [p for p in self.parts if p not in CALENDAR_PERIODS]
        if unknown:
            raise ValueError(f"unknown calendar parts {unknown}; known: {list(CALENDAR_PERIODS)}")
        frame = pd.DataFrame(X)
        self.feature_names_in_ = np.asarray([str(c) for c in frame.columns], dtype=object)
        self.n_features_in_ = frame.shape[1]
        return self

    def transform(self, X):
        """(rows, 2 * parts * columns) float64: sin and cos of each part of each column."""
        check_is_fitted(self)
        frame = pd.DataFrame(X)
        if frame.shape[1] != self.n_features_in_:
            raise ValueError(f"expected {self.n_features_in_} date/time columns, got {frame.shape[1]}")
        blocks = []
        for column in frame.columns:
            values = frame[column]
            if pd.api.types.is_datetime64_any_dtype(values.dtype):
                stamps = pd.to_datetime(values, utc=True)
            else:
                text = values.astype("object").where(values.notna(), None)
                stamps = pd.to_datetime(text, utc=True, errors="coerce", format="ISO8601")
            for part in self.parts:
                angle = 2 * np.pi * calendar_values(stamps, part) / CALENDAR_PERIODS[part]
                blocks += [np.sin(angle), np.cos(angle)]
        return np.column_stack(blocks) if blocks else np.empty((len(frame), 0))

    def get_feature_names_out(self, input_features=None):
        """`<column>_<part>_sin`, `<column>_<part>_cos` per column and part."""
        check_is_fitted(self)
        columns = self.feature_names_in_ if input_features is None else input_features
        return np.asarray([f"{c}_{p}_{f}" for c in columns for p in self.parts for f in ("sin", "cos")], dtype=object)


# Modules whose types we trust inside our own pipelines (MLflow 3 saves sklearn models with skops,
# which refuses any type it is not told to trust).
# `mlops.transformers.` is where the clipper lived before the layout moved it to `core/`.
TRUSTED_MODULE_PREFIXES = ("sklearn.", "numpy.", "scipy.", "core.transformers.", "mlops.transformers.")
# The Dask engine's models: a local LightGBM model (its Booster keeps an OrderedDict).
TRUSTED_MODULE_PREFIXES += ("lightgbm.basic.Booster", "lightgbm.sklearn.", "collections.OrderedDict")


def skops_trusted_types(model: object) -> list[str]:
    """The types skops must trust to load `model`; raises if one comes from an unexpected module."""
    import skops.io

    types = skops.io.get_untrusted_types(data=skops.io.dumps(model))
    unexpected = [t for t in types if not t.startswith(TRUSTED_MODULE_PREFIXES)]
    if unexpected:
        raise TypeError(f"model contains types from untrusted modules: {unexpected}")
    return sorted(types)
