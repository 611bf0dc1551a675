"""`mlops rollout`: see and decide a model's rollout (its challenger on live traffic) from a shell.

- `mlops rollout status MODEL`: the rollout under way (mode, share, since, the challenger and the champion it is
  compared with, a cut-off) and its timeline;
- `mlops rollout check MODEL [--labels s3://...]`: run the rollout flow now (gather the live evidence, decide);
- `mlops rollout promote MODEL --reason TEXT` / `mlops rollout rollback MODEL --reason TEXT`: a person decides
  (recorded as theirs, with the evidence of the moment).
"""

from __future__ import annotations

import os
from typing import Annotated

import typer

from adapters.settings import get_settings
from mlops.cli_common import fail, os_user, setup_logging
from mlops.stack import client_env

rollout_app = typer.Typer(
    help="Rollouts: a challenger judged on live traffic (shadow or canary) before it becomes champion.",
    no_args_is_help=True,
)

Model = Annotated[str, typer.Argument(help="Registered model (its catalog entry or bundled config is read).")]


@rollout_app.command("status")
def status(model: Model = "credit-risk") -> None:
    """The rollout under way and the steps recorded for the model's rollouts."""
    from adapters.rollout_store import list_events, read_rollout
    from core.rollout import timeline_markdown

    settings = get_settings()
    os.environ.update(client_env(settings))
    state, cut, aliases = read_rollout(settings, model)
    if state is None:
        typer.echo(f"{model}: no rollout under way (champion v{aliases.get('champion')})")
    else:
        typer.echo(f"{model}: {state.describe()}; challenger alias: v{aliases.get('challenger')}")
        if cut is not None and cut.rollout == state.id:
            typer.echo(f"cut off in serving at {cut.at}: {cut.reason}")
    typer.echo(timeline_markdown(list_events(settings, model)))


def _run(model: str, decide: str, reason: str, labels: str | None) -> None:
    setup_logging()
    settings = get_settings()
    os.environ.update(client_env(settings))
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from adapters.catalog import get_entry
    from flows.rollout import RolloutParams, rollout

    entry = get_entry(settings, model)  # a catalog model's config; else a bundled one by that name
    dataset = entry.uri if entry is not None else model
    params = RolloutParams(dataset=dataset, decide=decide, reason=reason, labels=labels, actor=os_user())
    with temporary_settings({PREFECT_API_URL: settings.prefect_api_url}):
        try:
            outcome = rollout(params)
        except Exception as exc:
            raise fail(f"rollout check of {model} failed: {exc}") from exc
    typer.echo(f"{model}: {outcome.action} (v{outcome.version}): " + "; ".join(outcome.reasons))
    for key, value in outcome.figures.items():
        typer.echo(f"  {key}: {value}")


@rollout_app.command("check")
def check(
    model: Model = "credit-risk",
    labels: Annotated[str | None, typer.Option(help="s3:// URI of labels that arrived (id column and target).")] = None,
) -> None:
    """Judge the rollout now on its live evidence: promote, roll back or extend."""
    _run(model, "auto", "", labels)


@rollout_app.command("promote")
def promote(
    reason: Annotated[str, typer.Option("--reason", help="Why (recorded).")], model: Model = "credit-risk"
) -> None:
    """Promote the challenger now (a person's decision)."""
    _run(model, "promote", reason, None)


@rollout_app.command("rollback")
def rollback(
    reason: Annotated[str, typer.Option("--reason", help="Why (recorded).")], model: Model = "credit-risk"
) -> None:
    """Roll the challenger back now (a person's decision); the champion stays."""
    _run(model, "rollback", reason, None)
