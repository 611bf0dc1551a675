"""`mlops`: the command line of prefect-mlops (local stack, data, training)."""

from __future__ import annotations

import os
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from adapters.settings import Settings, get_settings
from core.dataset import DatasetConfig, TaskType
from mlops import stack
from mlops.ci_cli import REJECT_EXIT, ModelGate, run_deployment_command
from mlops.cli_common import connect, fail, os_user, setup_logging
from mlops.demo_cli import demo_app
from mlops.models_cli import deploy, models_app
from mlops.stack import client_env

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
app.command("deploy")(deploy)
app.command("run-deployment")(run_deployment_command)  # CD: run a deployment and wait for its end


@stack_app.command("up")
def stack_up() -> None:
    """Start S3, MLflow and Prefect on loopback (a no-op for servers already running)."""
    setup_logging()
    settings = get_settings()
    try:
        statuses = stack.up(settings)
    except stack.StackError as exc:
        raise fail(str(exc)) from exc
    for status in statuses:
        typer.echo(status.describe())
    typer.echo(stack.dask_summary(settings))


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
    history: Annotated[
        bool, typer.Option(help="Also write the applicants' event history (the feature store's offline source).")
    ] = True,
) -> None:
    """Write the synthetic credit-risk dataset as monthly Parquet partitions (to S3 by default)."""
    from adapters.clients import StackNotRunningError, check_stack
    from core.dataset import load_local_dataset_config
    from core.synthetic import DriftSpec
    from mlops.datagen import write_months

    setup_logging()
    settings = get_settings()
    target = dest or load_local_dataset_config("credit-risk").source
    if target.startswith("s3://"):
        try:
            check_stack(settings, services=("S3",))
        except StackNotRunningError as exc:
            raise fail(str(exc)) from exc
    drift = DriftSpec(start_month=drift_from, strength=drift_strength) if drift_from is not None else None
    written = write_months(settings, target, months, rows_per_month, seed, start, drift)
    typer.echo(f"wrote {len(written)} partitions ({months * rows_per_month} rows) to {target}")
    if history and target.startswith("s3://"):  # the feature store's offline source lives on the stack's S3
        from mlops.datagen import write_applicant_history

        uri, rows = write_applicant_history(settings, months, rows_per_month, seed, start, drift)
        typer.echo(f"wrote the applicants' history ({rows} feature rows) to {uri}")


class SnapshotFormat(StrEnum):
    """File format of a snapshot (`DatasetConfig.format`)."""

    csv = "csv"
    parquet = "parquet"


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


@data_app.command("init")
def data_init(
    source: Annotated[str, typer.Argument(help="CSV/Parquet file, folder of partitions, or s3:// prefix.")],
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
) -> None:
    """Write a commented dataset config inferred from a snapshot; `mlops train --config OUT` takes it as it is."""
    from core.config_inference import ConfigInferenceError, format_from_names, infer_config

    if out.exists() and not force:
        raise fail(f"{out} exists; pass --force to replace it")
    settings = get_settings()
    if source.startswith("s3://"):
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
        frame = read_snapshot(source, chosen, settings).frame
        inferred = infer_config(
            frame, source=source, fmt=chosen, target=target, id_column=id_column, task=task, name=name
        )
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
    workers: Annotated[
        int | None, typer.Option(min=0, help="Worker processes (default MLOPS_SERVING_WORKERS; 0: one per core).")
    ] = None,
) -> None:
    """Serve predictions from `models:/<model>@champion`, following the alias without a restart."""
    setup_logging()
    settings = get_settings()
    changes = {
        "serving_model": model,
        "serving_alias": alias,
        "serving_poll_seconds": poll_seconds,
        "serving_workers": workers,
    }
    settings = settings.model_copy(update={k: v for k, v in changes.items() if v is not None})
    os.environ.update(client_env(settings))
    from serving.app import run

    try:
        run(host or settings.host, port or settings.serving_port, settings)
    except OSError as exc:  # e.g. the port is busy
        raise fail(str(exc)) from exc


def run_training(
    dataset: str,
    dry_run: bool,
    seed: int,
    trials: int | None,
    settings: Settings,
    families: list[str] | None = None,
    gate: ModelGate | None = None,
    force: bool = False,
) -> int:
    """Run the training flow against the configured stack; returns a process exit code.

    With `gate` (CI's model check) the decision is also written as a summary and judged for the PR.
    """
    gate = gate or ModelGate()
    os.environ.update(client_env(settings))
    from adapters.clients import StackNotRunningError, check_stack

    try:
        check_stack(settings)
    except StackNotRunningError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        gate.failed("the stack is not reachable", str(exc))
        return 2
    from prefect import tags
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from pydantic import ValidationError

    from adapters.snapshots import DataLoadError, read_dataset_config
    from core.search import SearchSpec
    from flows.training import TrainingParams, training
    from services.catalog import model_tag

    try:
        config = read_dataset_config(dataset, settings)
    except DataLoadError as exc:
        raise fail(str(exc), code=2) from exc
    # the config's own search and gates (its `operations`), then what the command line changes
    chosen = {"families": families} if families else {}
    chosen |= {} if trials is None else {"trials_per_family": trials}
    try:
        search = SearchSpec.model_validate(config.operations.search | chosen)
    except ValidationError as exc:  # an unknown --family
        raise fail(f"--family: {exc.errors()[0]['msg']}", code=2) from exc
    gates = {"gates": config.operations.gates} if config.operations.gates else {}
    params = TrainingParams.model_validate(
        {"dataset": dataset, "dry_run": dry_run, "seed": seed, "search": search, "force": force} | gates
    )
    # tagged with its model like a deployment's runs, so `mlops models list` shows this run too
    with temporary_settings({PREFECT_API_URL: settings.prefect_api_url}), tags(model_tag(config.model_name)):
        state = training(params, return_state=True)
    if not state.is_completed():
        typer.secho(f"training {state.name}: {state.message}", fg=typer.colors.RED, err=True)
        gate.failed(f"the training run ended {state.name}", str(state.message))
        return 1
    outcome = state.result()
    typer.echo("")
    if outcome.nothing_new:  # the champion's data, config, params and code: the flow stopped before training
        typer.echo(f"nothing new -> not trained, not promoted (champion v{outcome.decision.champion_version} stays)")
        typer.echo(f"  - {outcome.nothing_new}")
        typer.echo("  - `mlops train --force` retrains anyway")
    else:
        typer.echo(f"decision: {outcome.decision.verdict} -> {'PROMOTED' if outcome.promoted else 'not promoted'}")
        for reason in outcome.decision.reasons:
            typer.echo(f"  - {reason}")
    typer.echo(f"candidate version: {outcome.candidate_version or '-'}; data version: {outcome.data_version}")
    typer.echo(f"Prefect UI: {settings.prefect_ui_url}")
    typer.echo(f"MLflow UI:  {settings.mlflow_tracking_uri}/#/models")
    serving = get_settings().serving_url  # set by client_env for the local stack
    if serving:
        typer.echo(f"Serving:    {_serving_line(serving, config, settings)}")
    return gate.judge(outcome, dataset, settings)


def _serving_line(url: str, config: DatasetConfig, settings: Settings) -> str:
    """Where the model is served, or why it is not (the serving API serves the catalog's served models)."""
    from adapters.catalog import get_entry

    if get_entry(settings, config.model_name) is None and config.model_name != settings.serving_model:
        return f"not served: {config.model_name} is not in the catalog (`mlops models add` serves it at /models/...)"
    if not config.operations.served:
        return f"not served: {config.model_name}'s config says served: false"
    return f"{url}/models/{config.model_name} (POST .../predict, .../invocations)"


@app.command("train")
def train(
    config: Annotated[
        str, typer.Option("--config", help="Dataset config: bundled name, YAML path or s3:// URI.")
    ] = "credit-risk",
    model: Annotated[
        str | None, typer.Option("--model", help="A catalog model (`mlops models list`): train on its stored config.")
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Evaluate only; never register or promote.")] = False,
    seed: Annotated[int, typer.Option(help="Seed for the search, folds and models.")] = 42,
    trials: Annotated[int | None, typer.Option(min=1, help="Trials per model family.")] = None,
    family: Annotated[
        list[str] | None,
        typer.Option(
            "--family",
            help="Model family to search (repeatable), e.g. decision_tree; default: the task's families.",
        ),
    ] = None,
    summary: Annotated[
        Path | None, typer.Option("--summary", dir_okay=False, help="Write the decision and model card as Markdown.")
    ] = None,
    fail_on_reject: Annotated[
        bool,
        typer.Option(
            "--fail-on-reject",
            help=f"Exit {REJECT_EXIT} when the candidate is worse than the champion or unsafe (CI's model check).",
        ),
    ] = False,
    force: Annotated[
        bool,
        typer.Option(
            "--force", help="Train even when the data, config, parameters and code are the champion's (nothing new)."
        ),
    ] = False,
) -> None:
    """Run the retraining flow now, against the configured stack (shows up on its Prefect server)."""
    setup_logging()
    if model is not None:
        from adapters.catalog import entry_uri

        config = entry_uri(get_settings(), model)
    elif not config.startswith("s3://") and Path(config).suffix in {".yaml", ".yml"}:
        config = str(Path(config).resolve())
    gate = ModelGate(summary.resolve() if summary else None, fail_on_reject)
    code = run_training(config, dry_run, seed, trials, get_settings(), family, gate, force)
    raise typer.Exit(code)


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
    from core.history import history_table

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


if __name__ == "__main__":
    app()


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
