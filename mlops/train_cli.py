"""`mlops train`: one training run here and now, against the configured stack, and its report.

The run shows up on the stack's Prefect server like a deployment's (tagged with its model). The report
says what the flow decided and why, where the candidate and the UIs are, and where the model is served.
With CI's `ModelGate` (`--summary`, `--fail-on-reject`) the decision is also written and judged for a PR.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from adapters.settings import Settings, get_settings
from mlops.ci_cli import REJECT_EXIT, ModelGate
from mlops.cli_common import fail, setup_logging
from mlops.stack import client_env

if TYPE_CHECKING:
    from core.data.dataset import DatasetConfig
    from flows.training import TrainingParams


@dataclass(frozen=True)
class TrainingRequest:
    """What `mlops train` asks of one run: the dataset config and what the command line changes.

    `trials` and `families` replace the config's own search settings when given; `force` trains even when
    nothing changed since the champion; `dry_run` evaluates only (never registers or promotes); `data_version`
    trains on that frozen version of the model's data instead of the source as it is now.
    """

    dataset: str  # bundled name, YAML path or s3:// URI
    dry_run: bool = False
    seed: int = 42
    trials: int | None = None
    families: tuple[str, ...] = ()
    force: bool = False
    data_version: str | None = None


def train_and_report(request: TrainingRequest, settings: Settings, gate: ModelGate | None = None) -> int:
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

    from flows.training import training
    from services.catalog import model_tag

    config, params = _training_params(request, settings)
    # tagged with its model like a deployment's runs, so `mlops models list` shows this run too
    with temporary_settings({PREFECT_API_URL: settings.prefect_api_url}), tags(model_tag(config.model_name)):
        state = training(params, return_state=True)
    if not state.is_completed():
        typer.secho(f"training {state.name}: {state.message}", fg=typer.colors.RED, err=True)
        gate.failed(f"the training run ended {state.name}", str(state.message))
        return 1
    outcome = state.result()
    _print_outcome(outcome, config, settings)
    return gate.judge(outcome, request.dataset, settings)


def _training_params(request: TrainingRequest, settings: Settings) -> tuple[DatasetConfig, TrainingParams]:
    """The dataset's config and the flow's parameters: the config's own search and gates, then the request's."""
    from pydantic import ValidationError

    from adapters.snapshots import DataLoadError, read_dataset_config
    from core.modeling.search import SearchSpec
    from flows.training import TrainingParams

    try:
        config = read_dataset_config(request.dataset, settings)
    except DataLoadError as exc:
        raise fail(str(exc), code=2) from exc
    if request.data_version:
        _check_frozen(config.model_name, request.data_version, settings)
    # the config's own search and gates (its `operations`), then what the command line changes
    chosen: dict[str, Any] = {"families": list(request.families)} if request.families else {}
    chosen |= {} if request.trials is None else {"trials_per_family": request.trials}
    try:
        search = SearchSpec.model_validate(config.operations.search | chosen)
    except ValidationError as exc:  # an unknown --family
        raise fail(f"--family: {exc.errors()[0]['msg']}", code=2) from exc
    gates = {"gates": config.operations.gates} if config.operations.gates else {}
    params = TrainingParams.model_validate(
        {"dataset": request.dataset, "dry_run": request.dry_run, "seed": request.seed, "search": search}
        | {"force": request.force, "data_version": request.data_version}
        | gates
    )
    return config, params


def _check_frozen(model_name: str, data_version: str, settings: Settings) -> None:
    """Exit 2 naming the version and the model, and listing the frozen ones, when it was never frozen."""
    from adapters.data_versions import list_manifests, read_manifest
    from core.data.data_versions import UnknownDataVersionError

    if read_manifest(settings, model_name, data_version) is None:
        known = [m.data_version for m in list_manifests(settings, model_name)]
        raise fail(str(UnknownDataVersionError(model_name, data_version, known)), code=2)


def _print_outcome(outcome: Any, config: DatasetConfig, settings: Settings) -> None:
    """The decision and its reasons (or why nothing was trained), the candidate, the UIs, the serving API."""
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


def _serving_line(url: str, config: DatasetConfig, settings: Settings) -> str:
    """Where the model is served, or why it is not (the serving API serves the catalog's served models)."""
    from adapters.catalog import get_entry

    if get_entry(settings, config.model_name) is None and config.model_name != settings.serving_model:
        return f"not served: {config.model_name} is not in the catalog (`mlops models add` serves it at /models/...)"
    if not config.operations.served:
        return f"not served: {config.model_name}'s config says served: false"
    return f"{url}/models/{config.model_name} (POST .../predict, .../invocations)"


def run_training(
    dataset: str, dry_run: bool, seed: int, trials: int | None, settings: Settings, families: list[str] | None = None
) -> int:
    """`train_and_report` without CI's gate, for in-process callers (tests) that pass the fields one by one."""
    return train_and_report(TrainingRequest(dataset, dry_run, seed, trials, tuple(families or ())), settings)


def train(  # noqa: PLR0913 - a Typer command declares one parameter per command-line option
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
    data_version: Annotated[
        str | None,
        typer.Option(
            "--data-version",
            help="Train on this frozen data version of the model (`mlops data versions MODEL`), not the source.",
        ),
    ] = None,
) -> None:
    """Run the retraining flow now, against the configured stack (shows up on its Prefect server)."""
    setup_logging()
    if model is not None:
        from adapters.catalog import entry_uri

        config = entry_uri(get_settings(), model)
    elif not config.startswith("s3://") and Path(config).suffix in {".yaml", ".yml"}:
        config = str(Path(config).resolve())
    gate = ModelGate(summary.resolve() if summary else None, fail_on_reject)
    request = TrainingRequest(config, dry_run, seed, trials, tuple(family or ()), force, data_version)
    raise typer.Exit(train_and_report(request, get_settings(), gate))
