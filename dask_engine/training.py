"""LightGBM's Dask estimator on every training row of a big snapshot, then the local model for serving.

The parameters are the model search's choice (its `lightgbm` family, searched on the search sample); the
encoding is `core.dask_engine.model`'s; the encoded training frame is built and held on the cluster's workers,
and only the fitted local model comes back.
"""

from __future__ import annotations

import logging
from typing import Any

from adapters.cluster import dask_client
from adapters.settings import Settings
from core.dask_engine.model import (
    assemble,
    categorical_indices,
    empty_encoded,
    encode_partition,
    encoded_columns,
    fitted_encoder,
    lightgbm_kwargs,
)
from core.dask_engine.split import DaskSplit, train_part
from core.data.dataset import DatasetConfig
from dask_engine.snapshots import DaskSnapshot, read_frame

log = logging.getLogger(__name__)


def _categories(frame: Any, config: DatasetConfig, client: Any) -> dict[str, list[str]]:
    """Each categorical feature's categories: the config's, else counted on the cluster (LightGBM's codes)."""
    known = {f.name: [str(c) for c in f.categories] for f in config.features if f.categories is not None}
    unknown = [c for c in config.categorical_features if c not in known]
    if unknown:
        found = client.compute([frame[c].dropna().astype(str).unique() for c in unknown], sync=True)
        known |= {c: sorted(map(str, values)) for c, values in zip(unknown, found, strict=True)}
    return known


def train_lightgbm(
    snapshot: DaskSnapshot,
    split: DaskSplit,
    config: DatasetConfig,
    settings: Settings,
    params: dict[str, Any],
    seed: int,
) -> tuple[Any, dict[str, Any]]:
    """LightGBM's Dask estimator with `params` on every training row, then `to_local()` in the raw-rows pipeline.

    The encoded training frame is `persist()`ed before X and y are taken from it (unpersisted, a frame read
    from several Parquet files fails LightGBM's fit with "Length of labels differs from the length of
    #data"); it is released after the fit. Returns (pipeline, the estimator's parameters).
    """
    from distributed import wait
    from lightgbm import DaskLGBMClassifier, DaskLGBMRegressor

    client = dask_client(settings)
    frame = read_frame(snapshot, settings)
    categories = _categories(frame, config, client)
    fitted = fitted_encoder(config, categories, split.train)
    meta = empty_encoded(config, frame._meta[config.target].dtype)
    train = frame.map_partitions(train_part, config, meta=frame._meta).map_partitions(
        encode_partition, config, fitted, meta=meta
    )
    kwargs = lightgbm_kwargs(params, seed)
    estimator_class = DaskLGBMClassifier if config.task.is_classification else DaskLGBMRegressor
    with client.as_current():  # `wait` and LightGBM's helpers look for the current client
        train = client.persist(train)
        wait(train)
        X, y = train[encoded_columns(config)], train[config.target]
        estimator = estimator_class(client=client, **kwargs)
        estimator.fit(X, y, categorical_feature=categorical_indices(config))
        # One OpenMP thread when the local model predicts (serving, review): with the default threads on a
        # busy machine a one-row prediction took 255 ms instead of a few
        local = estimator.to_local().set_params(n_jobs=1)
        del X, y, train  # the last references: the cluster frees the persisted partitions
    log.info("LightGBM on the cluster: %d training rows, %s", split.rows_train, kwargs)
    return assemble(fitted, local), kwargs
