"""Drift statistics of a partition on a Dask cluster: per-file counts over the reference's bins, merged.

The same figures as the single-process path (`core.monitoring.drift_analysis.analyse_window` on the whole frame): each
partition (a Parquet file, or several small files that dask reads as one when only some columns are read) is a task
that returns counts over the reference's bins
(`core.monitoring.drift.window_partial`, the model loaded once per worker by `dask_engine.workers.worker_model`),
plus its labelled rows' labels and scores when labels are given; the counts are summed here into the
figures of the whole window (`core.monitoring.drift.partial_drifts`) and judged like any window.

Estimated performance and multivariate drift too (`core.monitoring.estimation_partials`): each task adds its
rows' sums for the estimates (the champion's performance estimator is scattered to every worker once, not put in
each task) and its candidates for a seeded random sample of the window's rows (at a rate set from the files' row
counts, read from their Parquet footers); here the sums are added and judged by the local path's
`judge_estimates`, and the `MAX_ROWS` candidates of smallest key are told from the reference by
`domain_classifier_drift`. Every figure is a sum or a uniform sample, whatever the partitions.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace

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
    drift_features,
    merge_partials,
    window_partial,
    window_reference,
)
from core.monitoring.drift_analysis import (
    NO_REFERENCE_LABELS,
    Champion,
    Window,
    WindowFigures,
    WindowResult,
    join_labels,
    judge_window,
    with_estimator,
)
from core.monitoring.estimation import BandRule, PerformanceEstimator, realised_metrics
from core.monitoring.estimation_partials import (
    EstimationPartial,
    estimated_from_partial,
    estimation_partial,
    merge_estimations,
    merge_samples,
    partition_sample,
    sample_rate,
)
from core.monitoring.multivariate import MAX_ROWS, domain_classifier_drift
from dask_engine.snapshots import parquet_rows, read_files
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
    seed: int = 0  # the rows sampled for the domain classifier (with each partition's index)


@dataclass
class DriftPart:
    """One partition's counts, and what else was asked for (labels, an estimator, a sample).

    Its labelled rows' labels and model outputs, its sums for the estimates, its rows sampled for the domain
    classifier.
    """

    index: int
    partial: WindowPartial
    labels: np.ndarray | None = None
    scores: np.ndarray | None = None
    estimation: EstimationPartial | None = None
    sample: tuple[pd.DataFrame, np.ndarray] | None = None  # candidate rows and their keys (`partition_sample`)


def drift_part(
    frame: pd.DataFrame,
    index: int,
    job: DriftJob,
    labels: pd.DataFrame | None,
    estimator: PerformanceEstimator | None = None,
    sample: tuple[float, int] | None = None,
) -> DriftPart:
    """On a worker: one partition's counts over the reference's bins (and its labelled rows, sums, sample).

    `sample`: (rate, rows) of `partition_sample`, the candidates for the window's sample.
    """
    model = worker_model(job.model_name, job.model_version, job.settings)
    features = prepare_inputs(frame, job.config)
    if len(features):
        scores = model_scores(model, features)
    else:  # a model cannot score no rows
        classes = job.reference.classes
        scores = np.zeros((0, len(classes))) if classes else np.zeros(0)
    partial = window_partial(features, job.reference, job.config, scores)
    columns = drift_features(job.config)  # what the estimates and the domain classifier see, as on the local path
    estimation = None if estimator is None else estimation_partial(estimator, features[columns], scores)
    candidates = None if sample is None else partition_sample(features[columns], *sample, job.seed, index)
    part = DriftPart(index, partial, estimation=estimation, sample=candidates)
    if labels is None:
        return part
    y = join_labels(frame, job.key, labels, job.config.id_column, job.config.target)
    known = y.notna().to_numpy()
    part.labels, part.scores = y[known].to_numpy(), scores[known]
    return part


@dataclass(frozen=True)
class WindowCounts:
    """A window's merged counts, its labelled rows (in row order), and the workers' memory.

    With an estimator, the merged sums for the estimates (`estimation`); with a sample asked for, the rows sampled
    for the domain classifier (`sample`, at most the rows asked for, in partition and row order).
    """

    partial: WindowPartial
    labels: np.ndarray | None
    scores: np.ndarray | None
    workers: int
    worker_memory: dict[str, dict[str, float]]
    seconds: float
    estimation: EstimationPartial | None = None
    sample: pd.DataFrame | None = field(default=None, repr=False)


def drift_on_cluster(
    address: str,
    uris: list[str],
    job: DriftJob,
    labels: pd.DataFrame | None,
    estimator: PerformanceEstimator | None = None,
    sample_rows: int = 0,
) -> WindowCounts:
    """Count a window's Parquet files on the cluster against the reference's bins, merged (see the module).

    `estimator`: also sum each partition's share of the estimates (the estimator is scattered to every worker once).
    `sample_rows`: also sample that many of the window's rows (uniformly, seeded by `job.seed`) for the domain
    classifier.

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
    sample = (sample_rate(parquet_rows(uris, job.settings), sample_rows), sample_rows) if sample_rows > 0 else None
    with connect(address) as client:
        workers = len(client.scheduler_info()["workers"])
        shared = client.scatter(labels, broadcast=True) if labels is not None else None
        fitted = client.scatter(estimator, broadcast=True) if estimator is not None else None
        tasks = [
            delayed(drift_part, pure=False)(part, index, job, shared, fitted, sample)
            for index, part in enumerate(frame.to_delayed())
        ]
        parts = sorted(client.gather(client.compute(tasks)), key=lambda p: p.index)
        memory = worker_memory(client)
    partial = merge_partials([p.partial for p in parts])
    y = scores = None
    if labels is not None:
        y = np.concatenate([p.labels for p in parts])
        scores = np.concatenate([p.scores for p in parts])
    estimation = None if estimator is None else merge_estimations([p.estimation for p in parts])
    rows = None if sample is None else merge_samples([p.sample for p in parts if p.sample is not None], sample_rows)
    seconds = time.perf_counter() - started
    log.info(
        "drift counts of %d rows from %d file(s) (%d partition(s)) on %d worker(s) in %.1fs%s%s",
        partial.rows,
        len(uris),
        len(parts),
        workers,
        seconds,
        "" if estimation is None else "; sums for the estimates",
        "" if rows is None else f"; {len(rows)} rows sampled for the domain classifier",
    )
    return WindowCounts(partial, y, scores, workers, memory, seconds, estimation, rows)


def window_result(
    name: str,
    source: str,
    counts: WindowCounts,
    reference: WindowReference,
    champion: Champion,
    thresholds: DriftThresholds,
) -> WindowResult:
    """The window's verdict from its merged counts: what `analyse_window` (core.monitoring) gives on the whole frame.

    Decay (against `champion.holdout`) is measured when the counts carry labelled rows (labels were given to
    `drift_on_cluster`); performance is estimated when they carry the estimates' sums and the champion has its
    estimator (realised beside it once decay is measured, as locally); multivariate drift when
    `thresholds.multivariate` and they carry a sample (told from `champion.reference`). The null rates are the
    merged counts'.
    """
    from core.monitoring.decay import labelled_performance
    from core.monitoring.drift import partial_drifts

    if counts.partial.rows == 0:
        return judge_window(WindowFigures(name, source, 0), thresholds)
    features, prediction = partial_drifts(reference, counts.partial, thresholds)
    classes = list(reference.classes)
    performance, labelled, realised = None, 0, None
    if counts.labels is not None and counts.scores is not None:
        labelled = len(counts.labels)
        if labelled >= thresholds.min_labelled_rows:
            performance = labelled_performance(counts.labels, counts.scores, classes, champion.holdout)
            if performance is not None:  # the labels the estimates are compared with, as `analyse_window` has them
                y = counts.labels.astype(np.asarray(classes).dtype) if classes else counts.labels.astype(float)
                realised = realised_metrics(y, counts.scores, classes)
    figures = WindowFigures(
        name, source, counts.partial.rows, features, prediction, performance, labelled,
        null_rates=counts.partial.null_rates,
    )  # fmt: skip
    if counts.partial.rows < thresholds.min_rows:
        return judge_window(figures, thresholds)
    estimated = None
    if champion.estimator is not None and counts.estimation is not None:
        rule = BandRule(thresholds.estimate_sigmas, thresholds.estimate_min_change)
        known = labelled if realised is not None else 0
        estimated = estimated_from_partial(champion.estimator, counts.estimation, rule, realised, known)
    multivariate = None
    if thresholds.multivariate and counts.sample is not None:
        columns = [r.name for r in reference.features]  # the drift features, as `analyse_window` takes them
        multivariate = domain_classifier_drift(
            champion.reference, counts.sample, columns, thresholds.domain_permutations, thresholds.domain_min_auc
        )
    note = "" if estimated is not None else NO_REFERENCE_LABELS
    figures = replace(figures, estimated=estimated, estimation_note=note, multivariate=multivariate)
    return judge_window(figures, thresholds)


def analyse_on_cluster(
    cluster: ClusterPartition,
    champion: Champion,
    config: DatasetConfig,
    labels: pd.DataFrame | None,
    thresholds: DriftThresholds,
    settings: Settings,
) -> tuple[Window, WindowResult]:
    """The partition's figures from per-file counts and sums merged (the same as on the whole frame).

    Drift, decay (labels given), estimated performance (the champion's estimator, fitted here when it has none;
    none when its reference has no labels) and multivariate drift (`thresholds.multivariate`: a sample of
    `MAX_ROWS` rows). The window carries no rows (they stay on the cluster), so the report shows its figures without
    plots.
    """
    champion = champion if champion.estimator is not None else with_estimator(champion, config)
    reference = window_reference(champion.reference, config, champion.classes)
    job = DriftJob(champion.model_name, champion.version, config, reference, config.id_column, settings)
    sample_rows = MAX_ROWS if thresholds.multivariate else 0
    counts = drift_on_cluster(cluster.address, list(cluster.files), job, labels, champion.estimator, sample_rows)
    result = window_result("partition", cluster.uri, counts, reference, champion, thresholds)
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
