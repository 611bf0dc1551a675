"""`mlops data versions` and `mlops data prune`: a model's frozen data versions, and the retention rule applied.

Every training run freezes its snapshot in S3 before validating it (`core/data/data_versions.py` says how);
these commands list the versions with who used them, and remove what the retention rule does not keep.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated

import typer

from adapters.settings import get_settings
from mlops.cli_common import connect, setup_logging


def _size(count: int) -> str:
    value = float(count)
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{count} B"


def _runs(run_ids: tuple[str, ...], shown: int = 3) -> str:
    if not run_ids:
        return "-"
    more = f" (+{len(run_ids) - shown})" if len(run_ids) > shown else ""
    return ", ".join(run_id[:8] for run_id in run_ids[:shown]) + more


def data_versions(model: Annotated[str, typer.Argument(help="The registered model's name.")]) -> None:
    """List a model's frozen data versions: size, rows, first use, and the runs and model versions that used them."""
    setup_logging()
    settings = get_settings()
    connect(settings)
    from services.data_versions import versions_of

    rows = versions_of(settings, model)
    if not rows:
        typer.echo(f"{model}: no frozen data versions (a training run freezes the snapshot it reads)")
        return
    typer.echo(
        f"{'data version':<17} {'first use (UTC)':<26} {'size':>9} {'rows':>9} {'files':>5}  model versions  runs"
    )
    for row in rows:
        m, used = row.manifest, row.usage
        registered = ", ".join(f"v{v}" for v in used.model_versions) or "-"
        typer.echo(
            f"{m.data_version:<17} {m.created_at:<26} {_size(m.bytes):>9} {m.rows:>9} {len(m.files):>5}  "
            f"{registered:<14}  {len(used.runs)}: {_runs(used.runs)}"
        )
    total = sum(row.manifest.bytes for row in rows)
    typer.echo(f"{len(rows)} version(s), {_size(total)} as read (identical files are stored once, across models)")


def data_prune(
    model: Annotated[str, typer.Argument(help="The registered model's name.")],
    keep_runs: Annotated[
        int, typer.Option("--keep-runs", min=0, help="Keep the data versions the model's last N runs used.")
    ] = 20,
    min_age_hours: Annotated[
        float,
        typer.Option(
            "--min-age-hours",
            min=0,
            help="Keep versions first used less than this long ago (a run in flight froze its data before "
            "its MLflow run exists).",
        ),
    ] = 24,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Say what would be removed; remove nothing.")] = False,
) -> None:
    """Apply the retention rule: keep what any registered version or the last N runs used; remove the rest."""
    setup_logging()
    settings = get_settings()
    connect(settings)
    from services.data_versions import apply_retention, retention_plan

    plan = retention_plan(settings, model, keep_runs, timedelta(hours=min_age_hours))
    for version, why in plan.keep.items():
        typer.echo(f"keep   {version}  {why}")
    verb = "would remove" if dry_run else "remove"
    for version in plan.remove:
        typer.echo(f"{verb} {version}")
    if dry_run:
        typer.echo(
            f"dry run: {len(plan.remove)} version(s) and {len(plan.blobs_removed)} blob(s) "
            f"({_size(plan.bytes_freed)}) would be removed; nothing was"
        )
        return
    blobs = apply_retention(settings, model, plan)
    typer.echo(f"removed {len(plan.remove)} version(s) of {model} and {len(blobs)} blob(s) no version names")
