"""`mlops demo ...`: demonstrations against the running stack."""

from __future__ import annotations

import logging
from typing import Annotated

import typer

from adapters.settings import Settings, get_settings
from mlops.cli_common import connect, fail, setup_logging

log = logging.getLogger(__name__)


demo_app = typer.Typer(help="Demonstrations against the running stack.", no_args_is_help=True)


@demo_app.command("drift")
def demo_drift(
    strength: Annotated[float, typer.Option(min=0.05, max=1, help="Drift strength of the new month.")] = 0.8,
    rows: Annotated[int, typer.Option(min=500, help="Rows in the new month.")] = 4000,
    cooldown_minutes: Annotated[float, typer.Option(min=0, help="Monitoring's retraining cooldown.")] = 30,
    wait: Annotated[float, typer.Option(min=0, help="Seconds to wait for the triggered training run.")] = 900,
) -> None:
    """Add a drifted month to the bundled dataset, run monitoring, and follow the retraining it triggers."""
    setup_logging()
    settings = get_settings()
    connect(settings)
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: settings.prefect_api_url}):
        code = _drift_demo(settings, strength, rows, cooldown_minutes, wait)
    raise typer.Exit(code)


def _next_month(settings: Settings, source: str) -> tuple[int, str]:
    """Index (from 2025-01, the generator's default start) and label of the month after the latest partition."""
    import re

    import pandas as pd

    from adapters.clients import S3Location
    from adapters.store import list_keys

    keys = list_keys(settings, S3Location.parse(source))
    months = sorted({match.group(1) for key in keys if (match := re.search(r"month=(\d{4}-\d{2})/", key))})
    if not months:
        raise fail(f"no partitions under {source}: run `mlops data generate` first")
    index = (pd.Period(months[-1], freq="M") - pd.Period("2025-01", freq="M")).n + 1
    return index, str(pd.Period("2025-01", freq="M") + index)


def _wait_for_run(flow_run_id: str, timeout: float) -> object:
    import time

    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            run = client.read_flow_run(flow_run_id)
            if (run.state is not None and run.state.is_final()) or time.monotonic() > deadline:
                return run
            time.sleep(3)


def _print_monitoring(outcome: object, monitoring_link: str) -> None:
    echo = typer.echo
    for window in outcome.windows:
        echo(f"   {window.name}: {window.rows} rows; " + ("; ".join(window.reasons) or window.note))
        for feature in [*window.features, *([window.prediction] if window.prediction else [])]:
            if window.judged and (feature.drifted or feature.psi >= 0.05):
                mark = "DRIFTED" if feature.drifted else "       "
                echo(f"     {mark} {feature.name:<22} PSI {feature.psi:6.3f}  {feature.test} p={feature.p_value:.1g}")
        if window.performance is not None:
            perf = window.performance
            nan = float("nan")
            figures = ", ".join(
                f"{m} {v:.3f} (holdout {perf.holdout.get(m, nan):.3f})" for m, v in perf.metrics.items()
            )
            echo(f"     performance on {perf.rows} labelled rows: {figures}")
        if window.estimated is not None:  # what monitoring would have said before the labels arrived
            figures = ", ".join(
                f"{m.metric} {m.estimate:.3f} (band {m.lower:.3f}-{m.upper:.3f}"
                + ("" if m.realised is None else f", realised {m.realised:.3f}")
                + ")"
                for m in window.estimated.metrics
            )
            echo(f"     estimated without labels: {figures}")
        if window.multivariate is not None:
            echo(f"     multivariate: {window.multivariate.describe()}")
    echo(f"   verdict: {'RETRAIN' if outcome.verdict.triggered else 'ok'}: {outcome.verdict.summary}")
    echo(f"   report: {outcome.report.html_uri}\n   report link (7 days): {outcome.report.link}")
    echo(f"   monitoring run: {monitoring_link}")
    if outcome.page is not None:
        echo(f"   the model over time: {outcome.page.uri}\n   page link (7 days): {outcome.page.link}")
    echo(f"\n3. Retraining: {outcome.trigger.status}: {outcome.trigger.detail}")


def _print_training(settings: Settings, experiment_name: str, flow_run_id: str, wait: float) -> None:
    from adapters.clients import mlflow_client

    echo = typer.echo
    echo(f"   waiting for the training run (the worker runs it): {settings.prefect_ui_url}/runs/flow-run/{flow_run_id}")
    run = _wait_for_run(flow_run_id, wait)
    echo(f"   training run {run.name}: {run.state_name}")
    client = mlflow_client(settings)
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        return
    found = client.search_runs([experiment.experiment_id], f"tags.prefect_flow_run_id = '{flow_run_id}'")
    if not found:
        return
    tags = found[0].data.tags
    echo(f"   reason recorded on the run: {tags.get('trigger_reason')}")
    echo(f"   decision: {tags.get('decision', '-')} -> {tags.get('outcome', '-')}")
    for reason in tags.get("decision.reasons", "").split(" | "):
        echo(f"     - {reason}")
    link = f"{settings.mlflow_tracking_uri}/#/experiments/{experiment.experiment_id}/runs/{found[0].info.run_id}"
    echo(f"   MLflow run: {link}")


def _drift_demo(settings: Settings, strength: float, rows: int, cooldown_minutes: float, wait: float) -> int:
    """The drift story, step by step; returns a process exit code."""
    from adapters.history_store import list_changes
    from adapters.registry import champion_version
    from core.data.dataset import load_local_dataset_config
    from core.data.synthetic import DriftSpec
    from core.promotion.history import history_table
    from flows.monitoring import MonitoringParams, monitoring
    from mlops.datagen import SyntheticMonths, write_partitions

    config = load_local_dataset_config("credit-risk")
    champion = champion_version(config.model_name)
    if champion is None:
        raise fail(f"{config.model_name} has no champion yet: run `mlops train` (and `mlops deploy`) first")
    index, month = _next_month(settings, config.source)
    drifted = SyntheticMonths(1, rows, 42, "2025-01", DriftSpec(index, strength), first_month=index)
    [partition] = write_partitions(settings, config.source, drifted)
    echo = typer.echo
    echo(f"\n1. A new month arrived, {month}, drifted by the generator's knob (strength {strength}): {partition}")
    echo(f"   champion: {config.model_name} v{champion}; its labels are already in the partition (delayed labels)")
    echo("\n2. Monitoring compares it with the champion's training reference ...")
    params = MonitoringParams(partition=partition, labels=partition, cooldown_minutes=cooldown_minutes)
    state = monitoring(params, return_state=True)
    monitoring_link = f"{settings.prefect_ui_url}/runs/flow-run/{state.state_details.flow_run_id}"
    if not state.is_completed():
        echo(f"monitoring {state.name}: {state.message}\n   {monitoring_link}", err=True)
        return 1
    outcome = state.result()
    _print_monitoring(outcome, monitoring_link)
    if outcome.trigger.status == "triggered" and outcome.trigger.flow_run_id:
        _print_training(settings, config.name, outcome.trigger.flow_run_id, wait)
    echo(f"\n4. Champion history of {config.model_name} (`mlops history`):")
    for row in history_table(list_changes(config.model_name, settings))[-5:]:
        move = f"{row['from']:>4} -> {row['to']:<4}"
        echo(f"   {row['at']}  {row['kind']:<9} {move} by {row['actor']}: {row['reason'][:100]}")
    echo(f"\nnow champion: v{champion_version(config.model_name)}; roll back with `mlops rollback --reason TEXT`")
    return 0
