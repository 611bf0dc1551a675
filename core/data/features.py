"""Feature preparation: one preprocessing definition shared by training, evaluation and serving."""

from __future__ import annotations

import pandas as pd
from sklearn.compose import ColumnTransformer
from sklearn.impute import SimpleImputer
from sklearn.model_selection import KFold, StratifiedKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler, TargetEncoder

from core.data.dataset import CategoricalEncoding, DatasetConfig, FeatureType, TaskType
from core.transformers import CalendarEncoder, QuantileClipper


def prepare_inputs(frame: pd.DataFrame, config: DatasetConfig) -> pd.DataFrame:
    """Select the model's input columns with stable dtypes (numeric as float64, categorical as object).

    Date/time inputs (datetime features, and the time column with `time_features`) become ISO-8601 text, as a
    prediction request carries them; the pipeline's `CalendarEncoder` reads their calendar parts.
    Casting here keeps the model signature the same whether or not a snapshot had nulls.
    """
    X = frame[config.input_columns].copy()
    for column in config.numeric_features:
        X[column] = pd.to_numeric(X[column], errors="raise").astype("float64")
    for column in config.categorical_features:
        X[column] = X[column].astype("object").where(X[column].notna(), None)
    for column in config.calendar_columns:
        X[column] = iso_text(X[column])
    return X


def iso_text(values: pd.Series) -> pd.Series:
    """Date/time values as ISO-8601 text (object dtype, None for a null); text is kept as it is."""
    if not pd.api.types.is_datetime64_any_dtype(values.dtype):
        return values.astype("object").where(values.notna(), None)
    text = values.map(lambda v: v.isoformat(), na_action="ignore")
    return text.astype("object").where(values.notna(), None)


def prepare_target(frame: pd.DataFrame, config: DatasetConfig) -> pd.Series:
    """The target column (as float64 for regression)."""
    if config.task is TaskType.regression:
        return pd.to_numeric(frame[config.target], errors="raise").astype("float64")
    return frame[config.target]


# Folds of the target encoder's cross-fitting (`TargetEncoder.fit_transform`), scikit-learn's default.
TARGET_ENCODER_FOLDS = 5
_TARGET_TYPES = {TaskType.binary: "binary", TaskType.multiclass: "multiclass", TaskType.regression: "continuous"}


def target_encoded_features(config: DatasetConfig) -> list[str]:
    """Categorical features whose encoding is `target` (`DatasetConfig.encoding_of`), in the config's order."""
    return [
        f.name
        for f in config.features
        if f.type is FeatureType.categorical and config.encoding_of(f) is CategoricalEncoding.target
    ]


def target_encoder(config: DatasetConfig, seed: int) -> TargetEncoder:
    """scikit-learn's `TargetEncoder` for the task, cross-fitted on seeded shuffled folds.

    `fit_transform` (what fitting the pipeline calls) encodes each training row with encodings learnt on the
    other folds, so no row sees its own target; `transform` (serving, validation rows) uses the encodings
    learnt on every training row. A category unseen in training gets the training target's mean (per
    class for multiclass); smoothing is scikit-learn's empirical Bayes estimate (`smooth="auto"`).
    """
    splitter = StratifiedKFold if config.task.is_classification else KFold
    cv = splitter(n_splits=TARGET_ENCODER_FOLDS, shuffle=True, random_state=seed)
    return TargetEncoder(target_type=_TARGET_TYPES[config.task], smooth="auto", cv=cv)


def build_preprocessor(config: DatasetConfig, seed: int = 0) -> ColumnTransformer:
    """Imputation, outlier clipping and scaling for numeric columns; imputation and an encoding for categories.

    Categories are one-hot encoded (unknown ones at prediction time as all zeros, `handle_unknown="ignore"`),
    except those whose encoding is `target` (`DatasetConfig.encoding_of`: many distinct values), which
    `target_encoder` turns into one number per feature (one per class for multiclass) named like the
    feature (`<feature>_<class>` for multiclass); `seed` seeds its cross-fitting folds.
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
    calendar = Pipeline(
        [
            ("parts", CalendarEncoder(tuple(p.value for p in config.calendar_parts))),
            ("impute", SimpleImputer(strategy="constant", fill_value=0.0, add_indicator=True)),
        ]
    )
    targeted = target_encoded_features(config)
    by_target = Pipeline(
        [
            ("impute", SimpleImputer(strategy="constant", fill_value="__missing__")),
            ("encode", target_encoder(config, seed)),
        ]
    )
    return ColumnTransformer(
        [
            ("numeric", numeric, config.numeric_features),
            ("categorical", categorical, [c for c in config.categorical_features if c not in targeted]),
            *([("target", by_target, targeted)] if targeted else []),
            *([("calendar", calendar, config.calendar_columns)] if config.calendar_columns else []),
        ],
        remainder="drop",
        verbose_feature_names_out=False,
    )
