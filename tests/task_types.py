"""Small datasets of the other task types for tests: regression (scikit-learn's diabetes) and multiclass.

Each comes as a raw frame (id column, features, target) with a dataset config describing it, so tests can
fit the project's own pipeline (`tasks.training.make_pipeline`) on it and register it like a champion.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from core.data.dataset import DatasetConfig

DIABETES_NUMERIC = ["age", "bmi", "bp", "s1", "s2", "s3", "s4", "s5", "s6"]
MULTICLASS_LABELS = np.array(["low", "mid", "high"], dtype=object)


def diabetes_frame() -> pd.DataFrame:
    """scikit-learn's diabetes data (442 patients): `patient_id`, numeric features, `sex` as text, `progression`."""
    from sklearn.datasets import load_diabetes

    data = load_diabetes(as_frame=True)
    frame = data.data.copy()
    frame["sex"] = np.where(frame["sex"] > 0, "m", "f").astype(object)
    frame["progression"] = data.target.astype("float64")
    frame.insert(0, "patient_id", [f"p{i:04d}" for i in range(len(frame))])
    return frame


def diabetes_config(name: str, source: str = "s3://mlops/datasets/diabetes/") -> DatasetConfig:
    """A regression dataset config for `diabetes_frame` whose model is registered as `name`."""
    features: list[dict[str, Any]] = [{"name": c, "type": "numeric"} for c in DIABETES_NUMERIC]
    features.append({"name": "sex", "type": "categorical", "categories": ["f", "m"]})
    return DatasetConfig.model_validate(
        {
            "name": name,
            "model_name": name,
            "source": source,
            "target": "progression",
            "task": "regression",
            "id_column": "patient_id",
            "features": features,
        }
    )


def multiclass_frame(rows: int = 6000, seed: int = 0) -> pd.DataFrame:
    """Three classes (`low`, `mid`, `high`) from `make_classification`: `row_id`, x0..x4, `segment` (text), `level`."""
    from sklearn.datasets import make_classification

    X, y = make_classification(
        n_samples=rows,
        n_features=5,
        n_informative=4,
        n_redundant=0,
        n_classes=3,
        n_clusters_per_class=1,
        class_sep=1.0,
        random_state=seed,
    )
    frame = pd.DataFrame(X, columns=[f"x{i}" for i in range(5)])
    frame["segment"] = np.random.default_rng(seed).choice(["a", "b", "c"], rows).astype(object)
    frame["level"] = MULTICLASS_LABELS[y]
    frame.insert(0, "row_id", np.arange(rows))
    return frame


def multiclass_config(name: str, source: str = "s3://mlops/datasets/levels/") -> DatasetConfig:
    """A multiclass dataset config for `multiclass_frame` whose model is registered as `name`."""
    features: list[dict[str, Any]] = [{"name": f"x{i}", "type": "numeric"} for i in range(5)]
    features.append({"name": "segment", "type": "categorical"})
    return DatasetConfig.model_validate(
        {
            "name": name,
            "model_name": name,
            "source": source,
            "target": "level",
            "task": "multiclass",
            "classes": list(MULTICLASS_LABELS),
            "id_column": "row_id",
            "features": features,
        }
    )


def fit(config: DatasetConfig, frame: pd.DataFrame, estimator: Any) -> Any:
    """The project's pipeline (preprocessing + `estimator`) fitted on `frame`."""
    from core.data.features import prepare_inputs, prepare_target
    from core.modeling.search import make_pipeline

    return make_pipeline(config, estimator).fit(prepare_inputs(frame, config), prepare_target(frame, config))
