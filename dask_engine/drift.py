"""Drift statistics of a partition on a Dask cluster: per-file counts over the reference's bins, merged.

The same figures as the single-process path (`core.monitoring.drift_analysis.analyse_window` on the whole frame): each
Parquet file is one partition whose task returns counts over the reference's bins
(`core.monitoring.drift.window_partial`, the model loaded once per worker by `dask_engine.workers.worker_model`),
plus its labelled rows' labels and scores when labels are given; the counts are summed here into the
figures of the whole window (`core.monitoring.drift.partial_drifts`) and judged like any window.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from adapters.cluster import connect
from adapters.settings import Settings
from core.data.dataset import DatasetConfig
from core.data.features import prepare_inputs
from core.modeling.metrics import model_scores
from core.monitoring.drift import (
    DriftThresholds,
    MonitoringError,
    WindowPartial,
    WindowReference,
    merge_partials,
    window_partial,
    window_reference,
)
from core.monitoring.drift_analysis import Champion, Window, WindowFigures, WindowResult, join_labels, judge_window
from dask_engine.snapshots import read_files
from dask_engine.workers import worker_memory, worker_model

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClusterPartition:
    """A partition counted on the cluster: the scheduler's address, the partition's URI and its Parquet files."""

    address: str
    uri: str
    files: tuple[str, ...]


@dataclass(frozen=True)
class DriftJob:
    """What every partition's drift task needs."""

    model_name: str
    model_version: str
    config: DatasetConfig
    reference: WindowReference
    key: str  # the column labels join on
    settings: Settings = field(repr=False)


@dataclass
class DriftPart:
    """One partition's counts, and its labelled rows' labels and model outputs (labels given)."""

    index: int
    partial: WindowPartial
    labels: np.ndarray | None = None
    scores: np.ndarray | None = None


def drift_part(frame: pd.DataFrame, index: int, job: DriftJob, labels: pd.DataFrame | None) -> DriftPart:
    """On a worker: one partition's counts over the reference's bins (and its labelled rows)."""
    model = worker_model(job.model_name, job.model_version, job.settings)
    features = prepare_inputs(frame, job.config)
    if len(features):
        scores = model_scores(model, features)
    else:  # a model cannot score no rows
        classes = job.reference.classes
        scores = np.zeros((0, len(classes))) if classes else np.zeros(0)
    partial = window_partial(features, job.reference, job.config, scores)
    if labels is None:
        return DriftPart(index, partial)
    y = join_labels(frame, job.key, labels, job.config.id_column, job.config.target)
    known = y.notna().to_numpy()
    return DriftPart(index, partial, y[known].to_numpy(), scores[known])


@dataclass(frozen=True)
class WindowCounts:
    """A window's merged counts, its labelled rows (in row order), and the workers' memory."""

    partial: WindowPartial
    labels: np.ndarray | None
    scores: np.ndarray | None
    workers: int
    worker_memory: dict[str, dict[str, float]]
    seconds: float


def drift_on_cluster(
    address: str,
    uris: list[str],
    job: DriftJob,
    labels: pd.DataFrame | None,
) -> WindowCounts:
    """Count a window's Parquet files on the cluster against the reference's bins, merged (see the module).

    Raises:
        MonitoringError: A file lacks a feature column (names the file and the columns).
    """
    from dask import delayed

    started = time.perf_counter()
    frame = read_files(uris, None, job.settings)
    missing = [c for c in job.config.feature_names if c not in frame.columns]
    if missing:
        raise MonitoringError(f"partition {', '.join(uris[:3])} lacks the feature columns {missing}")
    needed = list(dict.fromkeys([*job.config.feature_names, *([job.key] if job.key in frame.columns else [])]))
    frame = frame[needed]
    with connect(address) as client:
        workers = len(client.scheduler_info()["workers"])
        shared = client.scatter(labels, broadcast=True) if labels is not None else None
        tasks = [
            delayed(drift_part, pure=False)(part, index, job, shared) for index, part in enumerate(frame.to_delayed())
        ]
        parts = sorted(client.gather(client.compute(tasks)), key=lambda p: p.index)
        memory = worker_memory(client)
    partial = merge_partials([p.partial for p in parts])
    y = scores = None
    if labels is not None:
        y = np.concatenate([p.labels for p in parts])
        scores = np.concatenate([p.scores for p in parts])
    seconds = time.perf_counter() - started
    log.info(
        "drift counts of %d rows from %d file(s) on %d worker(s) in %.1fs", partial.rows, len(uris), workers, seconds
    )
    return WindowCounts(partial, y, scores, workers, memory, seconds)


def window_result(
    name: str,
    source: str,
    counts: WindowCounts,
    reference: WindowReference,
    holdout: dict[str, float],
    thresholds: DriftThresholds,
) -> WindowResult:
    """The window's verdict from its merged counts: what `analyse_window` (core.monitoring) gives on the whole frame.

    Decay is measured when the counts carry labelled rows (labels were given to `drift_on_cluster`).
    """
    from core.monitoring.decay import labelled_performance
    from core.monitoring.drift import partial_drifts

    if counts.partial.rows == 0:
        return judge_window(WindowFigures(name, source, 0), thresholds)
    features, prediction = partial_drifts(reference, counts.partial, thresholds)
    performance, labelled = None, 0
    if counts.labels is not None and counts.scores is not None:
        labelled = len(counts.labels)
        if labelled >= thresholds.min_labelled_rows:
            performance = labelled_performance(counts.labels, counts.scores, list(reference.classes), holdout)
    figures = WindowFigures(name, source, counts.partial.rows, features, prediction, performance, labelled)
    return judge_window(figures, thresholds)


def analyse_on_cluster(
    cluster: ClusterPartition,
    champion: Champion,
    config: DatasetConfig,
    labels: pd.DataFrame | None,
    thresholds: DriftThresholds,
    settings: Settings,
) -> tuple[Window, WindowResult]:
    """The partition's drift figures from per-file counts merged (the same as on the whole frame).

    The window carries no rows (they stay on the cluster), so the report shows its figures without plots.
    """
    reference = window_reference(champion.reference, config, champion.classes)
    job = DriftJob(champion.model_name, champion.version, config, reference, config.id_column, settings)
    counts = drift_on_cluster(cluster.address, list(cluster.files), job, labels)
    result = window_result("partition", cluster.uri, counts, reference, champion.holdout, thresholds)
    log.info(
        "%s: %s (%d rows on %d worker(s); null rates %s; peak RSS per worker (MB) %s)",
        cluster.uri,
        "; ".join(result.reasons) or result.note,
        counts.partial.rows,
        counts.workers,
        {k: round(v, 4) for k, v in counts.partial.null_rates.items()},
        {w: m["peak_rss_mb"] for w, m in counts.worker_memory.items()},
    )
    window = Window("partition", cluster.uri, pd.DataFrame(columns=config.feature_names), config.id_column)
    return window, result
