"""`mlops`: the command line of prefect-mlops (local stack, data, training)."""

from __future__ import annotations

import os
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from adapters.settings import Settings, get_settings
from core.data.dataset import TaskType
from mlops import stack
from mlops.ci_cli import run_deployment_command
from mlops.cli_common import connect, exit_now, fail, os_user, setup_logging
from mlops.data_versions_cli import data_prune, data_versions
from mlops.demo_cli import demo_app
from mlops.models_cli import deploy, models_app
from mlops.reproduce_cli import reproduce
from mlops.rollout_cli import rollout_app
from mlops.stack import client_env
from mlops.stack_env import worker_env
from mlops.stack_postgres import PostgresSetupError, database_summary
from mlops.train_cli import run_training, train

__all__ = ["app", "run_training"]  # run_training: tests train in-process through mlops.cli

app = typer.Typer(help="Safe, self-retraining tabular ML on Prefect, MLflow and S3.", no_args_is_help=True)
stack_app = typer.Typer(help="Start, stop and inspect the local stack (S3, MLflow, Prefect).", no_args_is_help=True)
data_app = typer.Typer(
    help="Datasets: generate the bundled synthetic data, or write a config for your own.", no_args_is_help=True
)
app.add_typer(stack_app, name="stack")
app.add_typer(data_app, name="data")
app.add_typer(demo_app, name="demo")
features_app = typer.Typer(
    help="Feature store (Feast): register the repository, load the online store, list what is there.",
    no_args_is_help=True,
)
app.add_typer(features_app, name="features")
alerts_app = typer.Typer(help="Alerts sent by the Prefect automations `mlops deploy` creates.", no_args_is_help=True)
app.add_typer(alerts_app, name="alerts")
app.add_typer(models_app, name="models")
app.add_typer(rollout_app, name="rollout")
app.command("deploy")(deploy)
app.command("run-deployment")(run_deployment_command)  # CD: run a deployment and wait for its end
app.command("reproduce")(reproduce)  # retrain a registered version from its frozen data and record
data_app.command("versions")(data_versions)
data_app.command("prune")(data_prune)


@stack_app.command("up")
def stack_up() -> None:
    """Start PostgreSQL, S3, MLflow, Prefect, Dask and serving on loopback (a no-op for servers already running)."""
    setup_logging()
    settings = get_settings()
    try:
        statuses = stack.up(settings)
    except (stack.StackError, PostgresSetupError) as exc:
        raise fail(str(exc)) from exc
    for status in statuses:
        typer.echo(status.describe())
    typer.echo(stack.dask_summary(settings))
    typer.echo(database_summary(settings))


@stack_app.command("down")
def stack_down() -> None:
    """Stop the servers started from this state folder."""
    stopped = stack.down(get_settings())
    first = " (serving first: it uploaded its spooled predictions while S3 still ran)" if "serving" in stopped else ""
    typer.echo(f"stopped: {', '.join(stopped)}{first}" if stopped else "nothing was running")


@stack_app.command("status")
def stack_status() -> None:
    """Report each server; exits 1 if any is not healthy."""
    settings = get_settings()
    statuses = stack.status(settings)
    for status in statuses:
        typer.echo(status.describe())
    typer.echo(stack.dask_summary(settings))
    typer.echo(database_summary(settings))
    if not all(s.healthy for s in statuses):
        raise typer.Exit(1)


@data_app.command("generate")
def data_generate(  # noqa: PLR0913 - a Typer command declares one parameter per command-line option
    months: Annotated[int, typer.Option(min=1, help="Number of monthly partitions.")] = 12,
    rows_per_month: Annotated[int, typer.Option(min=10, help="Rows in each month.")] = 4000,
    seed: Annotated[int, typer.Option(help="Generator seed.")] = 42,
    start: Annotated[str, typer.Option(help="First month, YYYY-MM.")] = "2025-01",
    drift_from: Annotated[int | None, typer.Option(help="Index of the first drifted month (0-based).")] = None,
    drift_strength: Annotated[float, typer.Option(min=0, max=1, help="0 none .. 1 strong.")] = 0.5,
    dest: Annotated[str | None, typer.Option(help="Where to write (default: the bundled config's source).")] = None,
    history: Annotated[
        bool, typer.Option(help="Also write the applicants' event history (the feature store's offline source).")
    ] = True,
) -> None:
    """Write the synthetic credit-risk dataset as monthly Parquet partitions (to S3 by default)."""
    from adapters.clients import StackNotRunningError, check_stack
    from core.data.dataset import load_local_dataset_config
    from core.data.synthetic import DriftSpec
    from mlops.datagen import SyntheticMonths, write_partitions

    setup_logging()
    settings = get_settings()
    target = dest or load_local_dataset_config("credit-risk").source
    if target.startswith("s3://"):
        try:
            check_stack(settings, services=("S3",))
        except StackNotRunningError as exc:
            raise fail(str(exc)) from exc
    drift = DriftSpec(start_month=drift_from, strength=drift_strength) if drift_from is not None else None
    written = write_partitions(settings, target, SyntheticMonths(months, rows_per_month, seed, start, drift))
    typer.echo(f"wrote {len(written)} partitions ({months * rows_per_month} rows) to {target}")
    if history and target.startswith("s3://"):  # the feature store's offline source lives on the stack's S3
        from mlops.datagen import write_applicant_history

        uri, rows = write_applicant_history(settings, months, rows_per_month, seed, start, drift)
        typer.echo(f"wrote the applicants' history ({rows} feature rows) to {uri}")


class SnapshotFormat(StrEnum):
    """File format of a snapshot (`DatasetConfig.format`)."""

    csv = "csv"
    parquet = "parquet"
    sql = "sql"


def _source_names(source: str, settings: Settings) -> list[str]:
    """Names of the files a source holds (the source itself when it names a file), to infer its format."""
    if source.startswith("s3://"):
        from adapters.clients import S3Location
        from adapters.store import BucketNotFoundError, list_keys

        location = S3Location.parse(source)
        try:
            return list_keys(settings, location)
        except BucketNotFoundError as exc:
            raise fail(f"{source}: bucket {location.bucket!r} does not exist") from exc
    path = Path(source)
    if not path.exists():
        raise fail(f"{source}: no such file or folder")
    return [path.name] if path.is_file() else [p.name for p in path.rglob("*") if p.is_file()]


def _write_atomically(path: Path, text: str) -> None:
    """Write a whole file or nothing: a temp file in the same folder, then a rename over the target."""
    import tempfile

    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(name)
    try:
        with os.fdopen(handle, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        tmp.chmod(0o644)  # mkstemp makes it private; a config is not a secret
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _check_sql_source(source: str, query: str | None) -> None:
    """A database source for `data init`: a PostgreSQL URL without a password, and a query."""
    from urllib.parse import urlsplit

    from core.data.dataset import SQL_SCHEMES, is_sql_url, sql_place

    if not is_sql_url(source):
        raise fail(f"--query needs a PostgreSQL URL as the source ({', '.join(SQL_SCHEMES)}://user@host:port/db)")
    if urlsplit(source).password is not None:  # never echoed: the message names the place only
        raise fail(f"the URL of {sql_place(source)} carries a password: remove it, put it in the environment")
    if not query:
        raise fail(f"{sql_place(source)}: pass --query, the SELECT whose result is the snapshot")


@data_app.command("init")
def data_init(  # noqa: PLR0913 - a Typer command declares one parameter per command-line option
    source: Annotated[
        str,
        typer.Argument(
            help="CSV/Parquet file, folder of partitions, s3:// prefix, or a PostgreSQL URL without a password "
            "(postgresql+psycopg://user@host:5432/db, with --query)."
        ),
    ],
    target: Annotated[str, typer.Option("--target", help="Target column.")],
    out: Annotated[Path, typer.Option("--out", help="YAML file to write.", dir_okay=False)],
    id_column: Annotated[
        str | None, typer.Option("--id", help="Id column (default: the one column unique per row).")
    ] = None,
    task: Annotated[TaskType | None, typer.Option("--task", help="Task (default: inferred from the target).")] = None,
    name: Annotated[str | None, typer.Option(help="Dataset and model name (default: from the source).")] = None,
    fmt: Annotated[
        SnapshotFormat | None, typer.Option("--format", help="File format (default: from the file names).")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace OUT if it exists.")] = False,
    query: Annotated[
        str | None, typer.Option("--query", help="With a database URL: the SELECT whose result is the snapshot.")
    ] = None,
    password_env: Annotated[
        str, typer.Option("--password-env", help="With a database URL: the variable holding its password.")
    ] = "PGPASSWORD",
) -> None:
    """Write a commented dataset config inferred from a snapshot; `mlops train --config OUT` takes it as it is."""
    from core.data.config_inference import ConfigInferenceError, InferenceRequest, format_from_names, infer_config
    from core.data.dataset import is_sql_url

    if out.exists() and not force:
        raise fail(f"{out} exists; pass --force to replace it")
    settings = get_settings()
    if is_sql_url(source) or query is not None or fmt is SnapshotFormat.sql:
        _check_sql_source(source, query)
        fmt = SnapshotFormat.sql
    elif source.startswith("s3://"):
        from adapters.clients import StackNotRunningError, check_stack

        try:
            check_stack(settings, services=("S3",))
        except StackNotRunningError as exc:
            raise fail(str(exc), code=2) from exc
    else:
        source = str(Path(source).resolve())
    from adapters.snapshots import DataLoadError, StoreUnavailableError, read_snapshot

    try:
        chosen = fmt.value if fmt else format_from_names(source, _source_names(source, settings))
        frame = read_snapshot(source, chosen, settings, query=query, password_env=password_env).frame
        request = InferenceRequest(
            source=source,
            fmt=chosen,
            target=target,
            id_column=id_column,
            task=task,
            name=name,
            **({"query": query, "password_env": password_env} if chosen == "sql" else {}),
        )
        inferred = infer_config(frame, request)
    except (ConfigInferenceError, DataLoadError, StoreUnavailableError) as exc:
        raise fail(str(exc)) from exc
    _write_atomically(out, inferred.to_yaml())
    typer.echo(f"wrote {out}: {inferred.summary()}")
    for reason in inferred.left_out.values():
        typer.echo(f"  left out: {reason}")
    typer.echo(f"next: check it (and its operations section), then `mlops models add {out}` and `mlops deploy`")


@app.command("worker")
def worker() -> None:
    """Run a Prefect process worker for the work pool in the foreground (Ctrl+C stops it)."""
    settings = get_settings()
    env = os.environ | client_env(settings) | worker_env(settings)
    prefect = str(Path(sys.executable).parent / "prefect")
    command = [prefect, "worker", "start", "--pool", settings.work_pool, "--type", "process"]
    os.execve(command[0], command, env)


@app.command("serve")
def serve(  # noqa: PLR0913 - a Typer command declares one parameter per command-line option
    host: Annotated[str | None, typer.Option(help="Address to bind (default MLOPS_HOST, loopback).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default MLOPS_SERVING_PORT, 8000).")] = None,
    model: Annotated[str | None, typer.Option(help="Registered model to follow (default MLOPS_SERVING_MODEL).")] = None,
    alias: Annotated[str | None, typer.Option(help="Alias to follow (default champion).")] = None,
    poll_seconds: Annotated[float | None, typer.Option(min=0.1, help="Registry poll interval.")] = None,
    workers: Annotated[
        int | None, typer.Option(min=0, help="Worker processes (default MLOPS_SERVING_WORKERS; 0: one per core).")
    ] = None,
    insecure: Annotated[
        bool,
        typer.Option(
            "--insecure", help="Bind beyond loopback without MLOPS_SERVING_TOKEN (refused otherwise; logged)."
        ),
    ] = False,
) -> None:
    """Serve predictions from `models:/<model>@champion`, following the alias without a restart."""
    setup_logging()
    try:
        settings = get_settings()
    except ValueError as exc:  # e.g. a blank MLOPS_SERVING_TOKEN
        raise fail(f"bad settings: {exc}") from exc
    changes = {
        "serving_model": model,
        "serving_alias": alias,
        "serving_poll_seconds": poll_seconds,
        "serving_workers": workers,
        "serving_insecure": insecure or None,
    }
    settings = settings.model_copy(update={k: v for k, v in changes.items() if v is not None})
    os.environ.update(client_env(settings))
    from serving.app import ExposedWithoutTokenError, run

    try:
        run(host or settings.host, port or settings.serving_port, settings)
    except ExposedWithoutTokenError as exc:
        raise fail(str(exc), code=2) from exc
    except OSError as exc:  # e.g. the port is busy
        raise fail(str(exc)) from exc


# `mlops train` (its options, the run and its report) lives in mlops.train_cli; `run_training` runs it in-process.
app.command("train")(train)


@app.command("rollback")
def rollback_command(
    reason: Annotated[str, typer.Option("--reason", help="Why (recorded in the champion history).")],
    to: Annotated[str | None, typer.Option("--to", help="Version to restore (default: the `previous` alias).")] = None,
    model: Annotated[str, typer.Option(help="Registered model.")] = "credit-risk",
    serving_timeout: Annotated[float, typer.Option(min=1, help="Seconds to wait for the serving API.")] = 60,
    force: Annotated[
        bool,
        typer.Option("--force", help="Also to a version the gates rejected or that was never champion (recorded)."),
    ] = False,
) -> None:
    """Move `champion` back to the previous (or given) version; the serving API follows it."""
    setup_logging()
    settings = get_settings()
    connect(settings)
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from adapters.promotion import PromotionConflict
    from services.rollback import RollbackError, rollback, serving_after_rollback

    with temporary_settings({PREFECT_API_URL: settings.prefect_api_url}):
        try:
            change = rollback(model, to, reason, os_user(), force)
        except (RollbackError, PromotionConflict) as exc:
            raise fail(str(exc)) from exc
    typer.echo(f"rolled back {model}: champion v{change.from_version} -> v{change.to_version} by {change.actor}")
    serving = serving_after_rollback(model, str(change.to_version), serving_timeout)
    typer.echo(f"serving: {serving.detail}")
    if not serving.ok:
        raise typer.Exit(1)


@app.command("history")
def history_command(
    model: Annotated[str, typer.Option(help="Registered model.")] = "credit-risk",
    as_json: Annotated[bool, typer.Option("--json", help="One JSON record per line.")] = False,
) -> None:
    """List every change of the champion (promotions, reverts, rollbacks), oldest first.

    First finishes any change a crash left half-done (its intent was stored before the alias moved).
    """
    settings = get_settings()
    os.environ.update(client_env(settings))
    import json
    from dataclasses import asdict

    from prefect.settings import PREFECT_API_URL, temporary_settings

    from adapters.history_store import list_changes
    from adapters.promotion import reconcile_now
    from core.promotion.history import history_table

    with temporary_settings({PREFECT_API_URL: settings.prefect_api_url}):
        unfinished = reconcile_now(model)
    if unfinished:
        typer.echo(unfinished, err=True)
    changes = list_changes(model, settings)
    if as_json:
        for change in changes:
            typer.echo(json.dumps(asdict(change), sort_keys=True))
        return
    if not changes:
        typer.echo(f"no champion changes recorded for {model}")
        return
    rows = history_table(changes)
    widths = {key: max(len(key), *(len(str(row[key])) for row in rows)) for key in rows[0] if key != "reason"}
    typer.echo("  ".join(key.ljust(width) for key, width in widths.items()) + "  reason")
    for row in rows:
        line = "  ".join(str(row[key]).ljust(width) for key, width in widths.items())
        typer.echo(f"{line}  {row['reason'][:160]}")


@alerts_app.command("resend")
def alerts_resend(
    since_minutes: Annotated[float, typer.Option(min=1, help="Look back this many minutes.")] = 24 * 60,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List the missed alerts; send nothing.")] = False,
) -> None:
    """Send again the alerts Prefect could not deliver (its webhook was down: Prefect does not retry later)."""
    from datetime import UTC, datetime, timedelta

    setup_logging()
    settings = get_settings()
    connect(settings)
    from adapters.alerts import redeliver, undelivered_alerts

    missed = undelivered_alerts(datetime.now(UTC) - timedelta(minutes=since_minutes))
    for alert in missed:
        typer.echo(f"missed: {alert.occurred:%Y-%m-%d %H:%M:%S} {alert.automation}: {alert.subject}")
    if dry_run or not missed:
        typer.echo(f"{len(missed)} missed alert(s); nothing sent")
        return
    typer.echo(f"resent {redeliver(missed)} alert(s)")


@features_app.command("apply")
def features_apply(
    repo: Annotated[
        str, typer.Option(help="Feast repository folder (relative: to this directory, else to the checkout).")
    ] = "examples/feature_repo",
) -> None:
    """Register a Feast repository's entities, feature views and services in the stack's registry."""
    from adapters.feature_store import FeatureRepoError, apply_repository, describe_store, resolve_repository

    setup_logging()
    settings = get_settings()
    try:
        names = apply_repository(settings, resolve_repository(repo))
    except FeatureRepoError as exc:
        raise fail(str(exc)) from exc
    typer.echo(f"applied {', '.join(names)} to {describe_store(settings)['registry']}")


@features_app.command("materialize")
def features_materialize(
    end: Annotated[str | None, typer.Option(help="Load values up to this UTC time (ISO 8601); default now.")] = None,
    repo: Annotated[str | None, typer.Option(help="Apply this Feast repository folder first.")] = None,
) -> None:
    """Run the `features` flow: load the registered views' newest values online (`--repo`: apply it first)."""
    from datetime import UTC, datetime

    setup_logging()
    try:
        until = datetime.fromisoformat(end).replace(tzinfo=UTC) if end else None
    except ValueError as exc:
        raise fail(f"--end {end!r}: not an ISO 8601 time ({exc})") from exc
    connect(get_settings())  # before Prefect is imported: it reads PREFECT_API_URL once
    from flows.features import MaterializeParams, materialize

    done = materialize(MaterializeParams(end=until, repo=repo))
    typer.echo(done.summary())


@features_app.command("list")
def features_list() -> None:
    """Where the store lives (no secrets) and its entities, feature views and services."""
    from adapters.feature_store import describe_store, list_repository

    settings = get_settings()
    for key, value in describe_store(settings).items():
        typer.echo(f"{key:9} {value}")
    for kind, names in list_repository(settings).items():
        typer.echo(f"{kind}:")
        for name in names or ["(none: run `mlops features apply`)"]:
            typer.echo(f"  {name}")


def main() -> None:
    """The `mlops` command: the CLI, then `exit_now` (a process that ran a command has nothing left to tear down)."""
    try:
        app(prog_name="mlops")  # Typer's standalone mode ends with SystemExit and the command's exit code
    except SystemExit as done:
        exit_now(done.code)
    exit_now(0)
