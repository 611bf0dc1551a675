"""`mlops`: the command line of prefect-mlops (local stack, data, training)."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from mlops import stack
from mlops.settings import Settings, get_settings
from mlops.stack import client_env

app = typer.Typer(help="Safe, self-retraining tabular ML on Prefect, MLflow and S3.", no_args_is_help=True)
stack_app = typer.Typer(help="Start, stop and inspect the local stack (S3, MLflow, Prefect).", no_args_is_help=True)
data_app = typer.Typer(help="Datasets: generate the bundled synthetic data.", no_args_is_help=True)
app.add_typer(stack_app, name="stack")
app.add_typer(data_app, name="data")


def _setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("httpx", "botocore", "urllib3", "alembic", "great_expectations"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _fail(message: str, code: int = 1) -> typer.Exit:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    return typer.Exit(code)


@stack_app.command("up")
def stack_up() -> None:
    """Start S3, MLflow and Prefect on loopback (a no-op for servers already running)."""
    _setup_logging()
    settings = get_settings()
    try:
        statuses = stack.up(settings)
    except stack.StackError as exc:
        raise _fail(str(exc)) from exc
    for status in statuses:
        typer.echo(status.describe())


@stack_app.command("down")
def stack_down() -> None:
    """Stop the servers started from this state folder."""
    stopped = stack.down(get_settings())
    typer.echo(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running")


@stack_app.command("status")
def stack_status() -> None:
    """Report each server; exits 1 if any is not healthy."""
    statuses = stack.status(get_settings())
    for status in statuses:
        typer.echo(status.describe())
    if not all(s.healthy for s in statuses):
        raise typer.Exit(1)


@data_app.command("generate")
def data_generate(
    months: Annotated[int, typer.Option(min=1, help="Number of monthly partitions.")] = 12,
    rows_per_month: Annotated[int, typer.Option(min=10, help="Rows in each month.")] = 4000,
    seed: Annotated[int, typer.Option(help="Generator seed.")] = 42,
    start: Annotated[str, typer.Option(help="First month, YYYY-MM.")] = "2025-01",
    drift_from: Annotated[int | None, typer.Option(help="Index of the first drifted month (0-based).")] = None,
    drift_strength: Annotated[float, typer.Option(min=0, max=1, help="0 none .. 1 strong.")] = 0.5,
    dest: Annotated[str | None, typer.Option(help="Where to write (default: the bundled config's source).")] = None,
) -> None:
    """Write the synthetic credit-risk dataset as monthly Parquet partitions (to S3 by default)."""
    from mlops.clients import StackNotRunningError, check_stack
    from mlops.datagen import write_months
    from mlops.dataset import load_local_dataset_config
    from mlops.synthetic import DriftSpec

    _setup_logging()
    settings = get_settings()
    target = dest or load_local_dataset_config("credit-risk").source
    if target.startswith("s3://"):
        try:
            check_stack(settings, services=("S3",))
        except StackNotRunningError as exc:
            raise _fail(str(exc)) from exc
    drift = DriftSpec(start_month=drift_from, strength=drift_strength) if drift_from is not None else None
    written = write_months(settings, target, months, rows_per_month, seed, start, drift)
    typer.echo(f"wrote {len(written)} partitions ({months * rows_per_month} rows) to {target}")


@app.command("deploy")
def deploy(
    cron: Annotated[str, typer.Option(help="Training schedule (cron, server time zone).")] = "0 3 * * 1",
    interval: Annotated[int | None, typer.Option(min=10, help="Instead of cron: run every N seconds.")] = None,
) -> None:
    """Register the deployments (training, ...) on the configured Prefect server; idempotent."""
    _setup_logging()
    settings = get_settings()
    os.environ.update(client_env(settings))
    from mlops.clients import StackNotRunningError, check_stack

    try:
        check_stack(settings, services=("Prefect",))
    except StackNotRunningError as exc:
        raise _fail(str(exc), code=2) from exc
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from deployments.deploy import deploy_all

    with temporary_settings({PREFECT_API_URL: settings.prefect_api_url}):
        ids = deploy_all(training_cron=cron, training_interval=interval, work_pool=settings.work_pool)
    for name, deployment_id in ids.items():
        typer.echo(f"deployed training/{name}: {settings.prefect_ui_url}/deployments/deployment/{deployment_id}")
    typer.echo(f"work pool: {settings.work_pool} (served by the worker that `mlops stack up` starts)")


@app.command("worker")
def worker() -> None:
    """Run a Prefect process worker for the work pool in the foreground (Ctrl+C stops it)."""
    settings = get_settings()
    env = os.environ | client_env(settings)
    prefect = str(Path(sys.executable).parent / "prefect")
    command = [prefect, "worker", "start", "--pool", settings.work_pool, "--type", "process"]
    os.execve(command[0], command, env)


@app.command("serve")
def serve(
    host: Annotated[str | None, typer.Option(help="Address to bind (default MLOPS_HOST, loopback).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default MLOPS_SERVING_PORT, 8000).")] = None,
    model: Annotated[str | None, typer.Option(help="Registered model to follow (default MLOPS_SERVING_MODEL).")] = None,
    alias: Annotated[str | None, typer.Option(help="Alias to follow (default champion).")] = None,
    poll_seconds: Annotated[float | None, typer.Option(min=0.1, help="Registry poll interval.")] = None,
) -> None:
    """Serve predictions from `models:/<model>@champion`, following the alias without a restart."""
    _setup_logging()
    settings = get_settings()
    changes = {"serving_model": model, "serving_alias": alias, "serving_poll_seconds": poll_seconds}
    settings = settings.model_copy(update={k: v for k, v in changes.items() if v is not None})
    os.environ.update(client_env(settings))
    from serving.app import run

    run(host or settings.host, port or settings.serving_port, settings)


def serve_main() -> None:
    """Entry point for `python -m serving` (same options as `mlops serve`)."""
    typer.main.get_command(app)(["serve", *sys.argv[1:]], prog_name="python -m serving")


def run_training(dataset: str, dry_run: bool, seed: int, trials: int | None, settings: Settings) -> int:
    """Run the training flow against the configured stack; returns a process exit code."""
    os.environ.update(client_env(settings))
    from mlops.clients import StackNotRunningError, check_stack

    try:
        check_stack(settings)
    except StackNotRunningError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        return 2
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.training import TrainingParams, training
    from tasks.training import SearchSpec

    search = SearchSpec() if trials is None else SearchSpec(trials_per_family=trials)
    params = TrainingParams(dataset=dataset, dry_run=dry_run, seed=seed, search=search)
    with temporary_settings({PREFECT_API_URL: settings.prefect_api_url}):
        state = training(params, return_state=True)
    if not state.is_completed():
        typer.secho(f"training {state.name}: {state.message}", fg=typer.colors.RED, err=True)
        return 1
    outcome = state.result()
    typer.echo("")
    typer.echo(f"decision: {outcome.decision.verdict} -> {'PROMOTED' if outcome.promoted else 'not promoted'}")
    for reason in outcome.decision.reasons:
        typer.echo(f"  - {reason}")
    typer.echo(f"candidate version: {outcome.candidate_version or '-'}; data version: {outcome.data_version}")
    typer.echo(f"Prefect UI: {settings.prefect_ui_url}")
    typer.echo(f"MLflow UI:  {settings.mlflow_tracking_uri}/#/models")
    return 0


@app.command("train")
def train(
    config: Annotated[
        str, typer.Option("--config", help="Dataset config: bundled name, YAML path or s3:// URI.")
    ] = "credit-risk",
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Evaluate only; never register or promote.")] = False,
    seed: Annotated[int, typer.Option(help="Seed for the search, folds and models.")] = 42,
    trials: Annotated[int | None, typer.Option(min=1, help="Trials per model family.")] = None,
) -> None:
    """Run the retraining flow now, against the configured stack (shows up on its Prefect server)."""
    _setup_logging()
    if not config.startswith("s3://") and Path(config).suffix in {".yaml", ".yml"}:
        config = str(Path(config).resolve())
    code = run_training(config, dry_run, seed, trials, get_settings())
    raise typer.Exit(code)


def train_main() -> None:
    """Entry point for `python -m flows.training` (same options as `mlops train`)."""
    typer.main.get_command(app)(["train", *sys.argv[1:]], prog_name="python -m flows.training")


if __name__ == "__main__":
    app()
