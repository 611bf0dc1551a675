"""Feature preparation: one preprocessing definition shared by training, evaluation and serving."""

from __future__ import annotations

import pandas as pd
from sklearn.compose import ColumnTransformer
from sklearn.impute import SimpleImputer
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler

from core.data.dataset import DatasetConfig, TaskType
from core.transformers import QuantileClipper


def prepare_inputs(frame: pd.DataFrame, config: DatasetConfig) -> pd.DataFrame:
    """Select the feature columns with stable dtypes (numeric as float64, categorical as object).

    Casting here keeps the model signature the same whether or not a snapshot had nulls.
    """
    X = frame[config.feature_names].copy()
    for column in config.numeric_features:
        X[column] = pd.to_numeric(X[column], errors="raise").astype("float64")
    for column in config.categorical_features:
        X[column] = X[column].astype("object").where(X[column].notna(), None)
    return X


def prepare_target(frame: pd.DataFrame, config: DatasetConfig) -> pd.Series:
    """The target column (as float64 for regression)."""
    if config.task is TaskType.regression:
        return pd.to_numeric(frame[config.target], errors="raise").astype("float64")
    return frame[config.target]


def build_preprocessor(config: DatasetConfig) -> ColumnTransformer:
    """Imputation, outlier clipping and scaling for numeric columns; imputation and one-hot for categories.

    Unknown categories at prediction time are encoded as all zeros (`handle_unknown="ignore"`).
    """
    numeric = Pipeline(
        [
            ("impute", SimpleImputer(strategy="median", add_indicator=True)),
            ("clip", QuantileClipper()),
            ("scale", StandardScaler()),
        ]
    )
    categorical = Pipeline(
        [
            ("impute", SimpleImputer(strategy="constant", fill_value="__missing__")),
            ("encode", OneHotEncoder(handle_unknown="ignore", min_frequency=20, sparse_output=False)),
        ]
    )
    return ColumnTransformer(
        [
            ("numeric", numeric, config.numeric_features),
            ("categorical", categorical, config.categorical_features),
        ],
        remainder="drop",
        verbose_feature_names_out=False,
    )
