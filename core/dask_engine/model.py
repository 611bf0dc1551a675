"""The Dask engine's model: fixed input encoding + LightGBM, as one scikit-learn pipeline (pure).

The encoding learns nothing from data (categories come from the config or are counted on the cluster; date/time
inputs become their calendar parts, as in the search's pipelines),
so the same fitted encoder is applied to every partition on the cluster and, inside the registered
pipeline, to raw rows in serving and scoring: the registered model takes the same raw frame as any
champion.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from sklearn.compose import ColumnTransformer
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OrdinalEncoder

from core.data.dataset import DatasetConfig
from core.data.features import prepare_inputs
from core.transformers import CalendarEncoder


def encoder(config: DatasetConfig, categories: dict[str, list[str]]) -> ColumnTransformer:
    """Categories to codes, numbers passed through, date/time inputs as their calendar parts.

    Unknown and missing categories become NaN (LightGBM's missing value); date/time inputs become the sine and
    cosine of their calendar parts (`CalendarEncoder`, NaN when missing), as in the search's pipelines.
    """
    columns = config.categorical_features
    parts: list[tuple[str, Any, list[str]]] = []
    if columns:
        parts.append(
            (
                "categorical",
                OrdinalEncoder(
                    categories=[sorted(categories[c]) for c in columns],
                    handle_unknown="use_encoded_value",
                    unknown_value=np.nan,
                    dtype=np.float64,
                ),
                columns,
            )
        )
    parts.append(("numeric", "passthrough", config.numeric_features))
    if config.calendar_columns:
        parts.append(("calendar", CalendarEncoder(_calendar_parts(config)), config.calendar_columns))
    # pandas out: LightGBM sees the same column names on the cluster and inside the registered pipeline
    return ColumnTransformer(parts, remainder="drop", verbose_feature_names_out=False).set_output(transform="pandas")


def fitted_encoder(config: DatasetConfig, categories: dict[str, list[str]], rows: pd.DataFrame) -> ColumnTransformer:
    """The encoder fitted on a few raw rows (it learns only the column layout from them)."""
    return encoder(config, categories).fit(prepare_inputs(rows, config))


def _calendar_parts(config: DatasetConfig) -> tuple[str, ...]:
    return tuple(p.value for p in config.calendar_parts)


def encoded_columns(config: DatasetConfig) -> list[str]:
    """Column names of the encoder's output, in order (categorical codes first, calendar parts last)."""
    calendar = [
        f"{c}_{p}_{f}" for c in config.calendar_columns for p in _calendar_parts(config) for f in ("sin", "cos")
    ]
    return [*config.categorical_features, *config.numeric_features, *calendar]


def encode_partition(frame: pd.DataFrame, config: DatasetConfig, fitted: ColumnTransformer) -> pd.DataFrame:
    """Encoded features (float64) plus the target of one partition of raw rows."""
    if frame.empty:
        return empty_encoded(config, frame[config.target].dtype)
    encoded = fitted.transform(prepare_inputs(frame, config))[encoded_columns(config)].astype("float64")
    encoded[config.target] = frame[config.target].to_numpy()
    return encoded


def empty_encoded(config: DatasetConfig, target_dtype: Any) -> pd.DataFrame:
    """The encoded frame's layout with no rows (Dask's `meta`)."""
    frame = pd.DataFrame({c: pd.Series(dtype="float64") for c in encoded_columns(config)})
    frame[config.target] = pd.Series(dtype=target_dtype)
    return frame


def lightgbm_kwargs(params: dict[str, Any], seed: int) -> dict[str, Any]:
    """The estimator's parameters: the search's chosen ones, seeded and quiet (the same on the cluster and locally)."""
    return {**params, "random_state": seed, "verbose": -1}


def categorical_indices(config: DatasetConfig) -> list[int]:
    """Positions of the categorical codes in the encoded columns (LightGBM's `categorical_feature`)."""
    return list(range(len(config.categorical_features)))


def assemble(fitted: ColumnTransformer, local_model: Any) -> Pipeline:
    """The registered model: raw rows in, the encoder, then the local LightGBM model (`to_local()`)."""
    return Pipeline([("prepare", fitted), ("model", local_model)])
