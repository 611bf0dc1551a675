"""`mlops reproduce MODEL VERSION`: retrain a registered version from what its run recorded, and compare.

The run's frozen data version, its dataset config and parameters as stored with the run (`dataset/config.yaml`,
`dataset/params.json`) and its seed go into a training run here and now, as a dry run (it never registers or
promotes). Every metric of the new run is compared exactly with the original run's; the exit code is 0 when
all are identical, 1 when any differs, 2 when the version cannot be reproduced (no record, no frozen data).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from adapters.settings import Settings, get_settings
from mlops.cli_common import connect, fail, setup_logging

if TYPE_CHECKING:
    from adapters.data_versions import RecordedRun

# Metrics measured against whichever version was champion at the time: not a property of the run alone.
NOT_COMPARED = ("delta_",)
DIFFERENT_EXIT = 1


def _number(value: float | None) -> str:
    return "-" if value is None else repr(value)


def _train(settings: Settings, recorded: RecordedRun) -> Any:
    """The training flow on the recorded inputs, in this process, as a dry run; returns its outcome (or exits 1)."""
    from prefect import tags
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.training import TrainingParams, training
    from services.catalog import model_tag

    model, version = recorded.model_name, recorded.version
    known = {key: value for key, value in recorded.params.items() if key in TrainingParams.model_fields}
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"{model}-v{version}.yaml"  # the flow reads a config by reference
        path.write_text(recorded.config_yaml)
        chosen = TrainingParams.model_validate(
            known
            | {
                "dataset": str(path),
                "data_version": recorded.data_version,
                "dry_run": True,
                "force": True,
                "require_approval": False,
                "reason": f"reproduce {model} v{version}",
            }
        )
        with temporary_settings({PREFECT_API_URL: settings.prefect_api_url}), tags(model_tag(model), "reproduce"):
            state = training(chosen, return_state=True)
    if not state.is_completed():
        raise fail(f"the reproduction run ended {state.name}: {state.message}")
    return state.result()


def reproduce(
    model: Annotated[str, typer.Argument(help="The registered model's name.")],
    version: Annotated[str, typer.Argument(help="The registered version to retrain (e.g. the champion's).")],
) -> None:
    """Retrain a registered version from its frozen data, config, parameters and seed; compare every metric."""
    setup_logging()
    settings = get_settings()
    connect(settings)
    from adapters.data_versions import list_manifests, read_manifest, recorded_run, run_record
    from core.data.data_versions import UnknownDataVersionError, compare_metrics

    try:
        recorded = recorded_run(settings, model, version)
    except LookupError as exc:
        raise fail(str(exc), code=2) from exc
    if read_manifest(settings, model, recorded.data_version) is None:  # never frozen, or removed by retention
        known = [m.data_version for m in list_manifests(settings, model)]
        raise fail(f"{model} v{version}: {UnknownDataVersionError(model, recorded.data_version, known)}", code=2)
    typer.echo(
        f"reproducing {model} v{version} (run {recorded.run_id}) on data version {recorded.data_version}, "
        f"seed {recorded.params.get('seed')}"
    )
    outcome = _train(settings, recorded)
    metrics, tags = run_record(settings, outcome.run_id)
    rows, differing = compare_metrics(recorded.metrics, metrics, NOT_COMPARED)
    typer.echo(f"\n{'metric':<36} {'original':>24} {'reproduced':>24}  verdict")
    for name, before, after, verdict in rows:
        typer.echo(f"{name:<36} {_number(before):>24} {_number(after):>24}  {verdict}")
    for key, label in (("fingerprint.code", "code version"), ("git_commit", "git commit")):
        then, now = recorded.tags.get(key, "unknown"), tags.get(key, "unknown")
        if then != now:
            typer.echo(f"{label} differs: {then} (original) -> {now} (now)")
    typer.echo(f"reproduction run: {outcome.run_id} (dry run: not registered, not promoted)")
    if differing:
        typer.secho(f"DIFFERENT: {', '.join(differing)}", fg=typer.colors.RED)
        raise typer.Exit(DIFFERENT_EXIT)
    typer.echo(f"identical: all {sum(1 for row in rows if row[3] == 'identical')} compared metrics")
