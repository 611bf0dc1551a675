"""`mlops models ...`: the model catalog (add, list, show, remove), and `mlops deploy`, which deploys all of it."""

from __future__ import annotations

import os
from typing import Annotated

import typer

from adapters.settings import get_settings
from mlops.cli_common import fail, setup_logging
from mlops.stack import client_env

models_app = typer.Typer(
    help="The model catalog: every model gets training, monitoring, scoring and serving from its config.",
    no_args_is_help=True,
)


def _connect(services: tuple[str, ...] = ("S3",)) -> None:
    settings = get_settings()
    os.environ.update(client_env(settings))
    os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
    from adapters.clients import StackNotRunningError, check_stack

    try:
        check_stack(settings, services=services)
    except StackNotRunningError as exc:
        raise fail(str(exc), code=2) from exc


@models_app.command("add")
def models_add(
    config: Annotated[str, typer.Argument(help="Dataset config: a YAML path, an s3:// URI or a bundled name.")],
    replace: Annotated[
        bool, typer.Option("--replace", help="Store a new version of a model already in the catalog (kept).")
    ] = False,
) -> None:
    """Check a dataset config and store it in the catalog (S3) where every worker reads it.

    Checked first, nothing stored on a failure: the fields, the gates, that its sources can be read, its
    feature repository, and that its model name is free (or --replace). Then `mlops deploy`.
    """
    setup_logging()
    _connect()
    from adapters.catalog import CatalogError, versions
    from services.catalog import add_model

    settings = get_settings()
    try:
        entry = add_model(config, settings, replace=replace)
    except CatalogError as exc:
        raise fail(str(exc)) from exc
    ops = entry.config.operations
    kept = len(versions(settings, entry.name))
    typer.echo(f"added {entry.name}: {entry.uri}" + (f" ({kept} earlier version(s) kept)" if kept else ""))
    every = f"every {ops.training_interval_seconds} s" if ops.training_interval_seconds else None
    schedule = every or ops.training_cron
    typer.echo(f"  training: {schedule or 'on demand'}; served: {'yes' if ops.served else 'no'}")
    typer.echo("next: `mlops deploy` creates its deployments (training/, monitoring/, scoring/, rollback/)")


@models_app.command("list")
def models_list() -> None:
    """One line per catalog model: champion and metric, last and next training, last monitoring, serving."""
    _connect(("S3", "MLflow", "Prefect"))
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from adapters.catalog import list_entries
    from core.catalog import table
    from services.catalog import model_status, serving_now

    settings = get_settings()
    entries = list_entries(settings)
    if not entries:
        typer.echo("the catalog is empty: `mlops models add CONFIG`")
        return
    served = serving_now(settings)
    with temporary_settings({PREFECT_API_URL: settings.prefect_api_url}):
        rows = [model_status(entry, settings, served).row() for entry in entries]
    for line in table(rows):
        typer.echo(line)


@models_app.command("show")
def models_show(name: Annotated[str, typer.Argument(help="Catalog model name.")]) -> None:
    """A model's status, its deployments, its kept config versions and its current config."""
    _connect(("S3", "MLflow", "Prefect"))
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from adapters.catalog import get_entry, versions
    from services.catalog import model_deployment_ids, model_status, serving_now

    settings = get_settings()
    entry = get_entry(settings, name)
    if entry is None:
        raise fail(f"model {name!r} is not in the catalog: `mlops models list` shows what is")
    with temporary_settings({PREFECT_API_URL: settings.prefect_api_url}):
        status = model_status(entry, settings, serving_now(settings))
        deployed = model_deployment_ids(name)
    for key, value in status.row().items():
        typer.echo(f"{key + ':':15}{value}")
    typer.echo(f"{'config:':15}{entry.uri}")
    for full_name, deployment_id in sorted(deployed.items()):
        typer.echo(f"{'deployment:':15}{full_name}  {settings.prefect_ui_url}/deployments/deployment/{deployment_id}")
    for uri in versions(settings, name):
        typer.echo(f"{'kept version:':15}{uri}")
    typer.echo("")
    typer.echo(entry.text.rstrip())


@models_app.command("trust")
def models_trust(
    name: Annotated[str, typer.Argument(help="Registered model name.")],
    version: Annotated[str, typer.Argument(help="Registered version (a number).")],
) -> None:
    """Record the artifact digests of a version registered before they existed, so that it can be loaded.

    Every loader (serving, scoring, training's champion, monitoring) refuses a version without the digests
    training records. Run this once, for a version you know your own training registered: it checks the stored
    model is skops with only the project's types (a pickle is refused: retrain it), then records its digests.
    """
    setup_logging()
    _connect(("S3", "MLflow"))
    import getpass

    from adapters.model_store import trust_version
    from core.modeling.artifacts import UntrustedArtifactError

    try:
        result = trust_version(get_settings(), name, version, actor=getpass.getuser())
    except UntrustedArtifactError as exc:
        raise fail(f"not trusted: {exc}") from exc
    done = "already recorded, and the stored files match" if result.already else "recorded"
    typer.echo(
        f"{name} v{version}: digests {done}: model.skops {result.digests.model[:16]}..., "
        f"MLmodel {result.digests.mlmodel[:16]}..." + (f", model.onnx {result.onnx[:16]}..." if result.onnx else "")
    )


@models_app.command("lineage")
def models_lineage(
    name: Annotated[str, typer.Argument(help="Registered model name.")],
    version: Annotated[str, typer.Argument(help="Registered version (a number).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the lineage as JSON.")] = False,
) -> None:
    """A version's lineage: data version -> training run -> version -> alias history -> what it scored and served.

    Batch-scoring outputs are those under s3://<bucket>/predictions/batch/<model>/ whose summary names the version;
    prediction-log partitions are the serving log's date folders of the days it was champion, with its rows there.
    """
    _connect(("S3", "MLflow"))
    from adapters.lineage import LineageError, read_lineage

    try:
        lineage = read_lineage(get_settings(), name, version)
    except LineageError as exc:
        raise fail(str(exc)) from exc
    typer.echo(lineage.to_json() if as_json else lineage.to_markdown().rstrip())


@models_app.command("remove")
def models_remove(name: Annotated[str, typer.Argument(help="Catalog model name.")]) -> None:
    """Remove a model: its deployments and schedules go (runs in flight are cancelled); versions, data and logs stay."""
    setup_logging()
    _connect(("S3", "Prefect"))
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from adapters.catalog import CatalogError
    from deployments.automations import remove_model_automations
    from services.catalog import remove_model

    settings = get_settings()
    with temporary_settings({PREFECT_API_URL: settings.prefect_api_url}):
        try:
            kept, deleted = remove_model(name, settings)
        except CatalogError as exc:
            raise fail(str(exc)) from exc
        remove_model_automations(name)
    typer.echo(f"removed {name}: deployments {', '.join(deleted) or '(none)'}; its last config kept at {kept}")
    typer.echo("  registry versions, data, reports and prediction logs stay; the serving API drops its routes")


def deploy(
    kubernetes: Annotated[
        bool, typer.Option(help="Deploy to the Kubernetes work pool `mlops-kubernetes` (infra/k8s) instead.")
    ] = False,
) -> None:
    """Create or update every catalog model's deployments and schedules (from its config); idempotent.

    A model removed from the catalog has its deployments deleted.
    """
    setup_logging()
    _connect(("S3", "Prefect"))
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from deployments.deploy import KUBERNETES_POOL, WorkPoolMissingError, deploy_all

    settings = get_settings()
    pool = KUBERNETES_POOL if kubernetes else settings.work_pool
    with temporary_settings({PREFECT_API_URL: settings.prefect_api_url}):
        try:
            ids = deploy_all(work_pool=pool, kubernetes=kubernetes)
        except WorkPoolMissingError as exc:
            raise fail(str(exc), code=2) from exc
    for name, deployment_id in ids.items():
        typer.echo(f"deployed {name}: {settings.prefect_ui_url}/deployments/deployment/{deployment_id}")
    if len(ids) == 1:
        typer.echo("the catalog is empty: `mlops models add CONFIG`, then deploy again")
    served_by = "the Kubernetes worker of infra/k8s" if kubernetes else "the worker that `mlops stack up` starts"
    typer.echo(f"work pool: {pool} (served by {served_by}; its flows come from the installed package)")
