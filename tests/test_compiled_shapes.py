"""The compiled-form parity gate's edge cases for every table shape (core/inference/compiled_parity.py `edge_cases`).

Units, no servers. The bug: on a table without a one-hot categorical column (a public 85-column numeric table)
the `ColumnTransformer` keeps its categorical entry, given no columns, unfitted, so reading its encoder's
`categories_` raised, and `compile_and_check` fell back to "checking on the holdout only" (a warning).
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from core.data.dataset import DatasetConfig
from core.data.features import prepare_inputs, prepare_target
from core.inference.compiled import compile_and_check, edge_cases
from core.modeling.search import build_model

FALLBACK = "edge cases could not be built"


def _numeric_table(columns: int, rows: int, seed: int = 0) -> tuple[pd.DataFrame, DatasetConfig]:
    """`columns` numeric features (a few nulls), a binary target, an id: no categorical column at all."""
    rng = np.random.default_rng(seed)
    values = rng.normal(size=(rows, columns))
    values[rng.random(values.shape) < 0.02] = np.nan
    frame = pd.DataFrame(values, columns=[f"f{i:02d}" for i in range(columns)])
    frame["y"] = (np.nan_to_num(values[:, :3]).sum(axis=1) + rng.normal(size=rows) > 0).astype(int)
    frame.insert(0, "row_id", [f"r{i:05d}" for i in range(rows)])
    features = [{"name": c, "type": "numeric"} for c in frame.columns[1:-1]]
    config = DatasetConfig.model_validate(
        {
            "name": "wide",
            "model_name": "wide",
            "source": "/wide.csv",
            "format": "csv",
            "target": "y",
            "task": "binary",
            "id_column": "row_id",
            "features": features,
        }
    )
    return frame, config


def test_a_table_without_categorical_columns_gets_its_edge_cases(caplog):
    """The reported failure: 85 numeric columns, no categorical one (the one-hot entry is given no columns)."""
    frame, config = _numeric_table(85, 1000)
    train, holdout = frame.iloc[:800], prepare_inputs(frame.iloc[800:], config)
    pipeline = build_model(config, "logistic_regression", {"C": 1.0}, 0)
    pipeline.fit(prepare_inputs(train, config), prepare_target(train, config))
    assert pipeline[0].named_transformers_["categorical"] is not None  # kept, with no columns, never fitted

    cases = edge_cases(pipeline, holdout, set())  # raised AttributeError: no attribute 'categories_'
    assert len(cases) > 0 and list(cases.columns) == list(holdout.columns)
    with caplog.at_level(logging.WARNING, logger="core.inference.compiled"):
        check = compile_and_check(pipeline, holdout, set())
    assert FALLBACK not in caplog.text
    assert check.onnx.passed and check.onnx.rows == len(holdout) + len(cases), check.line()
