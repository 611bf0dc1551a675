"""Big snapshots on a Dask cluster: row count, full-data checks, the split, LightGBM on Dask.

dask.dataframe reads the snapshot's partitions (S3 through s3fs with the configured endpoint, or a local
folder) on the cluster's workers; the flow's process only ever holds a sample (for Great Expectations),
the evaluated holdout (at most about `max_holdout_rows` rows) and a few thousand training rows (the model's
signature and explanation baseline). Nothing here runs at import; the client is made on first use.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Any

import pandas as pd

from adapters.cluster import cluster_address, s3_storage_options
from adapters.settings import Settings
from adapters.snapshots import SUFFIXES, DataLoadError
from core.big_checks import Stats, evaluation_threshold, merge_stats, partition_stats
from core.big_model import (
    BigSplit,
    assemble,
    categorical_indices,
    empty_encoded,
    encode_partition,
    encoded_columns,
    fitted_encoder,
    lightgbm_kwargs,
)
from core.dataset import DatasetConfig
from core.split import holdout_buckets, holdout_threshold

log = logging.getLogger(__name__)

_clients: dict[str, Any] = {}  # one client per scheduler address for the process (made on first use)
_TRAIN_SAMPLE_ROWS = 5_000


@dataclass(frozen=True)
class BigSnapshot:
    """A snapshot read by the Dask engine: where its files are, its row count and content version (no data)."""

    source: str
    files: tuple[str, ...]
    rows: int
    data_version: str


def dask_client(settings: Settings) -> Any:
    """A client of the configured cluster, or of a local one (`dask_workers` processes, loopback) when none is set."""
    from distributed import Client, LocalCluster

    address = cluster_address(settings) or "local"
    client = _clients.get(address)
    if client is not None and client.status == "running":
        return client
    if address == "local":
        cluster = LocalCluster(
            n_workers=max(settings.dask_workers, 1),
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address="127.0.0.1:0",
            memory_limit=settings.dask_worker_memory,
        )
        client = Client(cluster, set_as_default=False)
    else:
        client = Client(address, set_as_default=False)
    _clients[address] = client
    log.info("Dask cluster %s: %d worker(s)", address, len(client.scheduler_info()["workers"]))
    return client


def _filesystem(source: str, settings: Settings) -> Any:
    import fsspec

    if source.startswith("s3://"):
        return fsspec.filesystem("s3", **s3_storage_options(settings))
    return fsspec.filesystem("file")


def _paths(source: str, fmt: str, fs: Any) -> list[str]:
    if fmt != "parquet":
        raise DataLoadError(f"{source}: the dask engine reads Parquet partitions, not {fmt}")
    bare = source.removeprefix("s3://")
    if bare.endswith(SUFFIXES[fmt]):
        return [bare] if fs.exists(bare) else []
    return sorted(p for p in fs.find(bare) if p.endswith(SUFFIXES[fmt]))


def _uri(source: str, path: str) -> str:
    return f"s3://{path}" if source.startswith("s3://") else path


def count_rows(config: DatasetConfig, settings: Settings) -> int | None:
    """Rows of the snapshot from the Parquet footers only (no data read); None for CSV."""
    import pyarrow.parquet as pq

    if config.format != "parquet":
        return None
    fs = _filesystem(config.source, settings)
    paths = _paths(config.source, config.format, fs)
    total = 0
    for path in paths:
        with fs.open(path, "rb") as handle:
            total += pq.ParquetFile(handle).metadata.num_rows
    return total


def open_big_snapshot(config: DatasetConfig, settings: Settings) -> BigSnapshot:
    """List the partitions, count the rows (footers) and version the content (ETags or mtimes and sizes).

    The data version hashes each file's name (relative to the source), size and ETag (S3: the content's
    MD5 for a single-part upload) without reading the data; it is not the pandas engine's content hash.
    """
    import pyarrow.parquet as pq

    if config.feature_service:
        raise DataLoadError(f"dataset {config.name!r}: the dask engine does not join feature services (yet)")
    fs = _filesystem(config.source, settings)
    paths = _paths(config.source, config.format, fs)
    if not paths:
        raise DataLoadError(f"{config.source}: no {config.format} files found")
    digest, rows = hashlib.sha256(), 0
    prefix = config.source.removeprefix("s3://")
    for path in paths:
        info = fs.info(path)
        tag = str(info.get("ETag") or info.get("mtime") or "")
        digest.update(f"{path.removeprefix(prefix)}\0{info.get('size')}\0{tag}\n".encode())
        with fs.open(path, "rb") as handle:
            rows += pq.ParquetFile(handle).metadata.num_rows
    snapshot = BigSnapshot(config.source, tuple(_uri(config.source, p) for p in paths), rows, digest.hexdigest()[:16])
    log.info(
        "big snapshot %s: %d rows in %d file(s), data version %s",
        config.source,
        rows,
        len(paths),
        snapshot.data_version,
    )
    return snapshot


def read_frame(snapshot: BigSnapshot, settings: Settings) -> Any:
    """The snapshot as a lazy dask DataFrame (one partition per file or row group), read on the workers."""
    import dask.dataframe as dd

    options = s3_storage_options(settings) if snapshot.source.startswith("s3://") else None
    return dd.read_parquet(list(snapshot.files), storage_options=options)


def _stats_of(frame: pd.DataFrame, config: DatasetConfig) -> Stats:
    return partition_stats(frame, config)


def full_data_stats(snapshot: BigSnapshot, config: DatasetConfig, settings: Settings, sample_rows: int, seed: int):
    """On the cluster: every partition's summary (merged by a tree reduction), duplicated ids, and a sample.

    Returns (merged stats, column names, duplicated id count, sample as pandas).
    """
    from dask import delayed

    client = dask_client(settings)
    frame = read_frame(snapshot, settings)
    columns = [str(c) for c in frame.columns]
    parts = [delayed(_stats_of)(p, config) for p in frame.to_delayed()]
    while len(parts) > 1:  # pairwise tree: no single task sees more than two summaries
        parts = [delayed(merge_stats)(a, b) for a, b in zip(parts[::2], parts[1::2], strict=False)] + (
            [parts[-1]] if len(parts) % 2 else []
        )
    duplicated: Any = 0
    if config.id_column in columns:
        ids = frame[config.id_column].dropna()
        duplicated = ids.count() - ids.drop_duplicates(split_out=max(frame.npartitions // 2, 1)).count()
    fraction = min(1.0, sample_rows / max(snapshot.rows, 1))
    sample = frame.sample(frac=fraction, random_state=seed) if fraction < 1 else frame
    # One graph of delayed objects (mixing them with expressions reorders the results in dask 2026.8)
    duplicated = duplicated.to_delayed() if hasattr(duplicated, "to_delayed") else delayed(duplicated)
    wanted = [parts[0], duplicated, delayed(pd.concat)(sample.to_delayed())]
    stats, duplicated, sample_frame = client.compute(wanted, sync=True)
    return stats, columns, int(duplicated), sample_frame.reset_index(drop=True)


def _buckets(frame: pd.DataFrame, config: DatasetConfig) -> pd.Series:
    return pd.Series(holdout_buckets(frame[config.id_column], config.holdout_salt), index=frame.index)


def _holdout_part(frame: pd.DataFrame, config: DatasetConfig, below: int) -> pd.DataFrame:
    return frame.loc[_buckets(frame, config).to_numpy() < below]


def _train_part(frame: pd.DataFrame, config: DatasetConfig) -> pd.DataFrame:
    return frame.loc[_buckets(frame, config).to_numpy() >= holdout_threshold(config.holdout_fraction)]


def _train_stats(frame: pd.DataFrame, config: DatasetConfig) -> dict[str, Any]:
    buckets = _buckets(frame, config).to_numpy()
    held = buckets < holdout_threshold(config.holdout_fraction)
    train = frame.loc[~held]
    out: dict[str, Any] = {"train": int((~held).sum()), "holdout": int(held.sum()), "low": None, "high": None}
    if config.time_column and len(train):
        times = train[config.time_column].dropna()
        if len(times):
            out["low"], out["high"] = str(times.min()), str(times.max())
    return out


def _merge_counts(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    lows = [v for v in (a["low"], b["low"]) if v is not None]
    highs = [v for v in (a["high"], b["high"]) if v is not None]
    return {
        "train": a["train"] + b["train"],
        "holdout": a["holdout"] + b["holdout"],
        "low": min(lows) if lows else None,
        "high": max(highs) if highs else None,
    }


def split_big(snapshot: BigSnapshot, config: DatasetConfig, settings: Settings) -> BigSplit:
    """The frozen holdout by id hash per partition (the same ids as `core.split`), its evaluated subset collected.

    Only ids below `evaluation_threshold` (a subset of the holdout of about `max_holdout_rows` rows) come to
    this process; the counts and the training window are computed on the cluster.
    """
    from dask import delayed

    client = dask_client(settings)
    frame = read_frame(snapshot, settings)
    below = evaluation_threshold(config, snapshot.rows)
    holdout = frame.map_partitions(_holdout_part, config, below, meta=frame._meta)
    counts = [delayed(_train_stats)(p, config) for p in frame.to_delayed()]
    while len(counts) > 1:
        counts = [delayed(_merge_counts)(a, b) for a, b in zip(counts[::2], counts[1::2], strict=False)] + (
            [counts[-1]] if len(counts) % 2 else []
        )
    sample = (
        frame.partitions[0]
        .map_partitions(_train_part, config, meta=frame._meta)
        .head(_TRAIN_SAMPLE_ROWS, npartitions=1, compute=False)
    )
    wanted = [delayed(pd.concat)(holdout.to_delayed()), counts[0], delayed(pd.concat)(sample.to_delayed())]
    holdout_frame, totals, train_sample = client.compute(wanted, sync=True)
    holdout_frame = holdout_frame.reset_index(drop=True)
    for part, rows, name in (
        (train_sample, totals["train"], "training"),
        (holdout_frame, len(holdout_frame), "holdout"),
    ):
        if rows == 0 or part[config.target].nunique() < 2:
            kind = "classes" if config.task.is_classification else "distinct values"
            raise ValueError(f"the {name} part has fewer than two {kind} of {config.target!r}; need more data")
    window = (totals["low"], totals["high"]) if totals["low"] is not None else None
    log.info(
        "split on the cluster: %d training rows, %d holdout rows, %d of them evaluated (ids below bucket %d)",
        totals["train"],
        totals["holdout"],
        len(holdout_frame),
        below,
    )
    return BigSplit(
        holdout_frame, train_sample.reset_index(drop=True), totals["train"], totals["holdout"], window, below
    )


def _categories(frame: Any, config: DatasetConfig, client: Any) -> dict[str, list[str]]:
    """Each categorical feature's categories: the config's, else counted on the cluster (LightGBM's codes)."""
    known = {f.name: [str(c) for c in f.categories] for f in config.features if f.categories is not None}
    unknown = [c for c in config.categorical_features if c not in known]
    if unknown:
        found = client.compute([frame[c].dropna().astype(str).unique() for c in unknown], sync=True)
        known |= {c: sorted(map(str, values)) for c, values in zip(unknown, found, strict=True)}
    return known


def train_lightgbm(
    snapshot: BigSnapshot, split: BigSplit, config: DatasetConfig, settings: Settings, seed: int
) -> tuple[Any, dict[str, Any]]:
    """LightGBM's Dask estimator on every training row, then `to_local()` inside the raw-rows pipeline.

    The encoded training frame is `persist()`ed before X and y are taken from it (LightGBM #6920); it is
    released after the fit. Returns (pipeline, the estimator's parameters).
    """
    from distributed import wait
    from lightgbm import DaskLGBMClassifier, DaskLGBMRegressor

    client = dask_client(settings)
    frame = read_frame(snapshot, settings)
    categories = _categories(frame, config, client)
    fitted = fitted_encoder(config, categories, split.train)
    meta = empty_encoded(config, frame._meta[config.target].dtype)
    train = frame.map_partitions(_train_part, config, meta=frame._meta).map_partitions(
        encode_partition, config, fitted, meta=meta
    )
    kwargs = lightgbm_kwargs(config, seed)
    estimator_class = DaskLGBMClassifier if config.task.is_classification else DaskLGBMRegressor
    with client.as_current():  # `wait` and LightGBM's helpers look for the current client
        train = client.persist(train)
        wait(train)
        X, y = train[encoded_columns(config)], train[config.target]
        estimator = estimator_class(client=client, **kwargs)
        estimator.fit(X, y, categorical_feature=categorical_indices(config))
        # One OpenMP thread when the local model predicts (serving, review): default threads on a busy
        # machine made a one-row prediction take 255 ms instead of a few (the OMP trap)
        local = estimator.to_local().set_params(n_jobs=1)
        del X, y, train  # the last references: the cluster frees the persisted partitions
    log.info("LightGBM on the cluster: %d training rows, %s", split.rows_train, kwargs)
    return assemble(fitted, local), kwargs
