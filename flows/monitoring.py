"""The monitoring flow: recent data against the champion's training reference; retrain when it drifted or decayed.

This module wires tasks; the statistics and the rules live in `core/monitoring/` (`drift.py`, decay in `decay.py`,
verdicts in `drift_analysis.py`, the reports in `drift_report.py`, the page per model over time in `model_page.py`),
the I/O in `adapters/monitoring_store.py`, the retraining rule in `core/monitoring/retraining.py` and its trigger in
`services/retraining.py` (a Prefect event that the model's `mlops-drift-retrain/<model>` automation turns into a run
of its training deployment).
Every task type is monitored: prediction drift is on the positive-class probability (binary), the predicted
classes' shares (multiclass) or the predicted value (regression); decay on ROC AUC and F1 (macro for
multiclass) or on RMSE and MAE (regression).
Deployed daily (`deployments/deploy.py`); `mlops demo drift` runs it once on a drifted month.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from prefect import flow
from prefect.runtime import flow_run
from pydantic import BaseModel, ConfigDict, Field

from core.monitoring.drift import DriftThresholds
from core.monitoring.drift_analysis import Verdict, WindowResult, overall_verdict, retrain_scope
from core.monitoring.drift_report import MonitoredModel, StoredReport, summary_markdown
from core.monitoring.model_page import StoredPage
from core.monitoring.retraining import RetrainRequest, Trigger
from services.retraining import retrain_if_needed
from tasks.features import load_partition_with_features
from tasks.loading import load_dataset_config
from tasks.monitoring import (
    analyse_partition_on_cluster,
    analyse_window,
    choose_drift_engine,
    fit_performance_estimator,
    load_champion_reference,
    load_labels,
    load_partition,
    load_prediction_log,
    publish_summary,
    store_report,
    update_model_page,
)

S3_URI = r"^s3://[^/]+(/.*)?$"


class MonitoringParams(BaseModel):
    """Parameters of one monitoring run (shown as a form in the Prefect UI)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    dataset: str = Field(
        "credit-risk",
        title="Dataset",
        description="A catalog model's config (s3://<bucket>/catalog/<model>.yaml, what `monitoring/<model>` "
        "passes), a bundled dataset name, a local YAML path or another s3:// URI. Its model's champion is monitored.",
    )
    partition: str | None = Field(
        None,
        pattern=S3_URI,
        title="Recent partition",
        description="s3:// URI of a new partition (file or folder) to compare; empty means none.",
    )
    prediction_log_days: int = Field(
        1,
        ge=0,
        le=90,
        title="Prediction log days",
        description="Also compare what the serving API logged over the last N days (0: do not read the log).",
    )
    labels: str | None = Field(
        None,
        pattern=S3_URI,
        title="Labels",
        description="s3:// URI of late-arriving labels (id column and target). Partition rows join on the id "
        "column, prediction-log rows on the id their record carried (else their request id); gives ROC AUC "
        "and F1 (macro for multiclass), or RMSE and MAE (regression), on recent data.",
    )
    engine: Literal["auto", "local", "dask"] = Field(
        "auto",
        title="Engine",
        description="Where the recent partition's statistics are computed. local: read whole here; dask: "
        "counted per Parquet file on the Dask cluster and merged (the same figures); auto: the cluster when "
        "there is one and the partition has at least 1,000,000 rows.",
    )
    thresholds: DriftThresholds = Field(
        default_factory=DriftThresholds, title="Thresholds", description="When drift or decay means retraining."
    )
    trigger_retraining: bool = Field(
        True,
        title="Trigger retraining",
        description="Emit the drift event (the automation then starts the training deployment) when a threshold "
        "is crossed.",
    )
    cooldown_minutes: float = Field(
        720,
        ge=0,
        le=60 * 24 * 30,
        title="Cooldown (minutes)",
        description="No new retraining while one that monitoring started is due within this window or unfinished.",
    )
    training_deployment: str | None = Field(
        None,
        title="Training deployment",
        description="`<flow>/<deployment>` that the model's drift automation (`mlops-drift-retrain/<model>`, "
        "created by `mlops deploy`) runs; checked before the drift event is emitted. Empty: training/<model>.",
    )


@dataclass(frozen=True)
class MonitoringOutcome:
    """What a run found and did."""

    model_name: str
    champion_version: str
    windows: list[WindowResult]
    verdict: Verdict
    report: StoredReport
    trigger: Trigger
    page: StoredPage | None = None  # the model's page over time; None when it could not be updated


@flow(
    name="monitoring",
    description="Compare recent data and predictions with the champion's training reference; retrain on drift.",
    persist_result=False,
)
def monitoring(params: MonitoringParams = MonitoringParams()) -> MonitoringOutcome:  # noqa: B008 - frozen default
    """Measure drift (and decay, when labels arrived), store the report, and trigger retraining if needed."""
    config = load_dataset_config(params.dataset)
    champion = fit_performance_estimator(load_champion_reference(config.model_name), config)  # once for every window
    labels = load_labels(params.labels, config) if params.labels else None
    windows, results, pending = [], [], []
    if params.partition:
        cluster = choose_drift_engine(params.engine, params.partition, config)
        if cluster:  # a big partition: counted per file on the cluster, merged into the same figures
            window, result = analyse_partition_on_cluster(cluster, champion, config, labels, params.thresholds)
            windows.append(window)
            results.append(result)
        else:
            load = load_partition_with_features if config.feature_service else load_partition  # store features too
            pending.append(load(params.partition, config))
    if params.prediction_log_days:
        pending.append(load_prediction_log(config.model_name, params.prediction_log_days, config))
    windows += pending
    results += [analyse_window(window, champion, config, labels, params.thresholds) for window in pending]
    verdict = overall_verdict(results)
    # A retrain reads the dataset's source: drift elsewhere (the prediction log, another prefix) is not retrained on.
    scope = retrain_scope(results, config.source)

    # The report first, so the drift event (and its alert) can link it.
    report = store_report(champion, windows, results, verdict, config, scope.note)
    # The model's page over time, this run included; a failure to update it does not stop the retraining trigger.
    page_state = update_model_page(config.model_name, return_state=True)
    page = page_state.result() if page_state.is_completed() else None
    request = RetrainRequest(
        config.model_name,
        params.dataset,
        f"drift: {verdict.summary} (monitoring run {flow_run.get_name() or 'local'})",
        params.cooldown_minutes,
        params.training_deployment or f"training/{config.model_name}",
        verdict.summary,
        report.link,
        scope.window_key,
    )
    trigger = retrain_if_needed(verdict, scope, request, params.trigger_retraining)
    publish_summary(
        summary_markdown(
            MonitoredModel(config.model_name, champion.version, champion.classes, page),
            results,
            verdict,
            report.html_uri,
            report.link,
            trigger.detail,
        )
    )
    return MonitoringOutcome(config.model_name, champion.version, results, verdict, report, trigger, page)
