"""The data a training run learns from, whatever the engine: load, join features, validate, split and train.

The `pandas` engine reads the snapshot into memory (and joins the feature store's features as of each row's
time when the model has a feature service); the `dask` engine keeps the partitions on the cluster, validates a
sample with Great Expectations plus full-data checks computed there, runs the same model search on a sample of
the training rows (the configured families and `lightgbm`) and fits the chosen configuration on every training
row. The dataset config's `engine` chooses (`auto`, the default, counts the Parquet rows). The search result
carries the record of what ran where, on how many rows (`core.modeling.training_record`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from core.dask_engine.fitting import search_spec
from core.dask_engine.split import DaskSplit
from core.data.dataset import DatasetConfig
from core.data.feature_history import JoinReport
from core.data.split import Split, search_sample
from core.data.validation import DataValidationError, ValidationReport
from core.modeling.search import SearchResult, SearchSpec
from core.modeling.training_record import FLOW_PROCESS, TrainingRecord
from tasks.dask_training import (
    check_big_snapshot,
    choose_snapshot_engine,
    fit_big_candidate,
    freeze_big_snapshot,
    load_big_snapshot,
    load_frozen_big_snapshot,
    split_big_snapshot,
)
from tasks.features import join_features
from tasks.loading import load_snapshot
from tasks.reports import store_validation_report
from tasks.split import split_snapshot
from tasks.training import train_candidate
from tasks.validation import check_snapshot


@dataclass(frozen=True)
class PreparedData:
    """A loaded snapshot, ready to split, and its validation.

    Attributes:
        snapshot: The snapshot (in memory, or the cluster's partitions with the `dask` engine).
        frame: The rows to learn from (after the feature join), None with the `dask` engine.
        join: The feature store's point-in-time join report, when there is a feature service.
        validation: The validation report (the `dask` engine validates first), or the future of the one
            running beside the search (in memory): read it through `report`.
    """

    snapshot: Any
    frame: pd.DataFrame | None
    join: JoinReport | None
    validation: Any

    @property
    def data_version(self) -> str:
        """The snapshot's data version."""
        return self.snapshot.data_version

    @property
    def on_cluster(self) -> bool:
        """Whether the rows stay on the Dask cluster."""
        return self.frame is None

    def _validation_report(self) -> ValidationReport:
        # (a report has a `result` attribute of its own: GX's JSON)
        return self.validation if isinstance(self.validation, ValidationReport) else self.validation.result()

    @property
    def report(self) -> ValidationReport:
        """The validation report once it is done; `DataValidationError` when the data failed it."""
        report = self._validation_report()
        if not report.success:
            raise DataValidationError(report.failures, report)
        return report

    def raise_if_invalid(self, error: BaseException) -> None:
        """After `error` stopped the run: raise `DataValidationError` from it when the data failed validation.

        A search on bad data can fail on its symptom (e.g. a column of text where numbers belong) before the
        validation beside it has named the cause; the cause is what the run reports. A validation that could
        not finish leaves `error` as it is.
        """
        if isinstance(error, DataValidationError):
            return
        try:
            report = self._validation_report()
        except Exception:
            return
        if not report.success:
            raise DataValidationError(report.failures, report) from error

    def stop_if_invalid(self) -> None:
        """Raise `DataValidationError` if the validation beside the search has finished and failed (no wait)."""
        running = getattr(self.validation, "wrapped_future", None)  # the thread pool's future: no API call
        if running is None or running.done():
            self.report  # noqa: B018 - raises when the data failed


def prepare_data(
    config: DatasetConfig, seed: int, data_version: str | None = None, engine: str | None = None
) -> PreparedData:
    """Load (and freeze) the snapshot and validate it (the report stored either way).

    In memory the validation runs beside what follows (the split and the search: nothing is registered before
    `PreparedData.report` has said it passed); on the `dask` engine it runs first and `DataValidationError` is
    raised here. With `data_version`, the model's frozen version of that name, on the engine the config chooses
    for its size. On the `dask` engine the partitions are frozen by streaming them (hashed in chunks, copied
    inside S3), and a frozen version is read in place from its blobs. `engine`: the engine already chosen
    (`choose_snapshot_engine`), else it is chosen here.
    """
    if (engine or choose_snapshot_engine(config, data_version)) == "dask":
        big = load_frozen_big_snapshot(config, data_version) if data_version else None
        snapshot = big or freeze_big_snapshot(config, load_big_snapshot(config))
        report = check_big_snapshot(snapshot, config, seed)
        store_validation_report(config.name, snapshot.data_version, report.to_json(), report.to_markdown())
        if not report.success:
            raise DataValidationError(report.failures, report)
        return PreparedData(snapshot, None, None, report)
    snapshot = load_snapshot(config, data_version)  # frozen before it is validated
    # With a feature service, the store's features as of each row's time; lost rows are counted, not hidden.
    frame, join = join_features(snapshot.frame, config) if config.feature_service else (snapshot.frame, None)
    validation = validate_beside.submit(frame, config, snapshot.data_version, join, seed)
    return PreparedData(snapshot, frame, join, validation)


@task(name="validation", cache_policy=NO_CACHE)
def validate_beside(
    frame: pd.DataFrame, config: DatasetConfig, data_version: str, join: JoinReport | None, seed: int
) -> ValidationReport:
    """Prefect task: validate the rows and store the report (`check_snapshot`), beside the flow's next steps.

    Great Expectations took 2.4-5 s of a 100k-row run before anything else could start; beside the search it
    ran 3.6 s of a 51.5 s run without being on its path (bench/results/run_cost.md).
    """
    report = check_snapshot(frame, config, data_version, join, seed)
    store_validation_report(config.name, data_version, report.to_json(), report.to_markdown())
    return report


def split_data(data: PreparedData, config: DatasetConfig) -> Split | DaskSplit:
    """Split off the frozen holdout: in memory, or by id hash per partition on the cluster."""
    return split_big_snapshot(data.snapshot, config) if data.on_cluster else split_snapshot(data.frame, config)


def fit_candidate(
    data: PreparedData, split: Split | DaskSplit, config: DatasetConfig, search: SearchSpec, seed: int
) -> SearchResult:
    """Train the candidate on the training rows of `split` (`split_data`); its `record` says what ran where.

    In memory: the model search with cross-validation (on about `search_sample_rows` of the training rows, by id
    hash, when there are more), the chosen configuration refitted on every training row.
    On the cluster: the same search on the search sample (`split.train`), over the configured families and
    `lightgbm`, then the chosen configuration fitted on every training row (`fit_big_candidate`).
    """
    if not data.on_cluster:
        # More than `search_sample_rows` training rows: the search on a sample of them, the final fit on all.
        sample = search_sample(split.train, config)
        sampled = split.train if len(sample) < split.rows_train else None
        # a failed validation stops the search at its next trial
        result, where = train_candidate(sample, config, search, seed, data.stop_if_invalid, sampled)
        families = tuple(f.value for f in search.families_for(config.task))
        rows = split.rows_train
        fit_where = FLOW_PROCESS if sampled is not None else where
        return replace(result, record=TrainingRecord("pandas", rows, len(sample), families, where, rows, fit_where))
    spec = search_spec(search, config.task)
    result, searched_where = train_candidate(split.train, config, spec, seed)
    fit = fit_big_candidate(data.snapshot, split, config, result, seed)
    record = TrainingRecord(
        "dask",
        split.rows_train,
        split.rows_sample,
        tuple(f.value for f in spec.families_for(config.task)),
        searched_where,
        fit.rows,
        searched_where if fit.model is result.model else fit.where,  # the search's own refit: where it ran
        fit.reason,
    )
    return replace(result, model=fit.model, record=record)
