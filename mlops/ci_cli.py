"""What CI/CD needs from the CLI: the model check of a pull request, and running a deployment to its end.

- `mlops train --dry-run --summary FILE --fail-on-reject` (options of `mlops train`, handled by `ModelGate`):
  the flow's decision for a candidate trained with this checkout's code, judged against the champion on
  the same holdout rows, written as Markdown (the decision and the run's model card) for the job summary
  and the PR comment; with `--fail-on-reject` the command exits `REJECT_EXIT` when the candidate is worse
  than the champion or unsafe.
- `mlops run-deployment NAME --wait` (`run_deployment_command`, registered by `mlops.cli`): start a
  deployment's run on the configured Prefect server, print its URL, wait for it and exit non-zero unless
  it completed.

The verdict of a PR is read off the flow's own decision; there is no threshold here. The flow says
`promote` or `reject`, and it rejects a candidate that is merely not better beyond noise, which is what
most PRs that touch model code but do not mean to improve it produce. A PR is therefore judged:
- **promote**: the flow would promote the candidate (every gate passes, it beats the champion beyond noise);
- **neutral**: every gate passes but `beats_champion`, and the candidate is not worse than the champion
  beyond noise either (the upper bound of the flow's interval of the improvement is not below 0);
- **reject**: a gate other than `beats_champion` failed (absolute, slices, fairness, size, latency,
  input schema, or at a cold start the holdout size), the candidate is worse than the champion beyond
  noise (the whole interval below 0), or the PR's code cannot score the current champion.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from adapters.settings import Settings, get_settings

if TYPE_CHECKING:
    from core.evaluation.decision import Decision

REJECT_EXIT = 3  # distinct from 1 (the run failed) and 2 (the stack or server is not reachable)
MAX_SUMMARY_CHARS = 60_000  # a PR comment holds 65,536 characters


@dataclass(frozen=True)
class PrVerdict:
    """How a pull request's candidate compares with the champion: promote, neutral or reject, and why."""

    verdict: str
    why: str

    @property
    def blocks(self) -> bool:
        """True when the PR should not be merged as it is."""
        return self.verdict == "reject"


def judge(decision: Decision) -> PrVerdict:
    """The PR's verdict, read off the flow's decision (see the module's docstring)."""
    if decision.promote:
        return PrVerdict("promote", "every gate passes and the candidate beats the champion beyond noise")
    if decision.champion_version is not None and decision.champion_metrics is None:
        return PrVerdict("reject", f"this code cannot score the current champion v{decision.champion_version}")
    failed = [check for check in decision.checks if not check.passed and check.gate != "beats_champion"]
    if failed:
        return PrVerdict("reject", "gate(s) failed: " + "; ".join(f"{c.gate}: {c.detail}" for c in failed))
    interval = decision.interval or {}
    if interval.get("high", 0.0) < 0:
        low, high = interval["low"], interval["high"]
        return PrVerdict(
            "reject",
            f"{decision.primary_metric} is worse than the champion's beyond noise: improvement "
            f"{interval['delta']:+.4f}, {interval['confidence']:.0%} CI [{low:+.4f}, {high:+.4f}]",
        )
    return PrVerdict(
        "neutral",
        "every gate passes; the candidate is neither better nor worse than the champion beyond noise "
        "(the flow would not promote it, and it does not block the PR)",
    )


_HEADLINES = {
    "promote": "better than the champion: the flow would promote it",
    "neutral": "as good as the champion within noise: does not block the merge",
    "reject": "worse than the champion or unsafe: blocks the merge",
}


def _demote_headings(markdown: str, levels: int = 2) -> str:
    """Shift Markdown headings down (`# Card` -> `### Card`) so the card nests under the summary's heading."""
    return "\n".join("#" * levels + line if line.startswith("#") else line for line in markdown.splitlines())


def summary_markdown(
    verdict: PrVerdict, decision: Decision, model_name: str, data_version: str, card: str | None
) -> str:
    """The job summary and PR comment: the PR's verdict, the flow's decision and the model card."""
    from core.evaluation.decision import decision_markdown

    lines = [
        f"## Model check: {verdict.verdict.upper()}: {_HEADLINES[verdict.verdict]}",
        "",
        f"- **Why:** {verdict.why}",
        f"- **The flow's decision:** {decision.verdict} (dry run: nothing registered or promoted)",
        f"- **Compared with:** `{model_name}` champion "
        f"{'v' + decision.champion_version if decision.champion_version else 'none (cold start)'}, "
        f"on the same holdout rows of data version `{data_version}`",
        "",
    ]
    if card is None:
        lines += ["(The model card could not be read from the MLflow run; the flow's decision follows.)", ""]
        body = decision_markdown(decision, model_name, None, data_version, "dry run")
    else:
        body = card
    text = "\n".join(lines) + "\n" + _demote_headings(body) + "\n"
    if len(text) > MAX_SUMMARY_CHARS:
        text = text[:MAX_SUMMARY_CHARS] + "\n\n(cut here: the whole model card is in the MLflow run, `model_card/`)\n"
    return text


def failure_markdown(what: str, message: str) -> str:
    """The summary when no decision was made (the run failed, or the stack did not answer)."""
    return f"## Model check: FAILED: {what}\n\n```\n{message.strip()[:MAX_SUMMARY_CHARS]}\n```\n"


def read_card(settings: Settings, run_id: str) -> str | None:
    """The run's Markdown model card (`model_card/model_card.md`, published by the flow), or None."""
    import tempfile

    from adapters.clients import mlflow_client

    try:
        with tempfile.TemporaryDirectory() as folder:
            path = mlflow_client(settings).download_artifacts(run_id, "model_card/model_card.md", folder)
            return Path(path).read_text()
    except Exception as exc:  # the summary says it could not be read; the decision still stands
        typer.secho(f"warning: model card of run {run_id} not read: {exc}", fg=typer.colors.YELLOW, err=True)
        return None


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    typer.echo(f"summary written to {path}")


@dataclass(frozen=True)
class ModelGate:
    """`mlops train --summary FILE --fail-on-reject`: what the model check writes and how it exits."""

    summary: Path | None = None
    fail_on_reject: bool = False

    def failed(self, what: str, message: str) -> None:
        """No decision: record why in the summary (the exit code is the failure's own)."""
        if self.summary is not None:
            _write(self.summary, failure_markdown(what, message))

    def judge(self, outcome: Any, dataset: str, settings: Settings) -> int:
        """Judge a finished run for the PR and write its summary; returns the exit code (0 or REJECT_EXIT)."""
        if self.summary is None and not self.fail_on_reject:
            return 0
        verdict = judge(outcome.decision)
        typer.echo(f"PR verdict: {verdict.verdict}: {verdict.why}")
        if self.summary is not None:
            from adapters.snapshots import read_dataset_config

            model_name = read_dataset_config(dataset, settings).model_name
            card = read_card(settings, outcome.run_id)
            _write(self.summary, summary_markdown(verdict, outcome.decision, model_name, outcome.data_version, card))
        if verdict.blocks and self.fail_on_reject:
            typer.secho(f"failing (exit {REJECT_EXIT}): the candidate is rejected", fg=typer.colors.RED, err=True)
            return REJECT_EXIT
        return 0


def _wait(flow_run_id: Any, timeout: float, poll: float = 1) -> Any:
    """The flow run once it is in a final state, or as it is when `timeout` seconds have passed."""
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            run = client.read_flow_run(flow_run_id)
            if (run.state is not None and run.state.is_final()) or time.monotonic() >= deadline:
                return run
            time.sleep(poll)


def run_deployment_command(
    name: Annotated[str, typer.Argument(help="Deployment: `training`, or `flow/deployment`.")],
    wait: Annotated[bool, typer.Option("--wait", help="Wait for the run to end; exit 1 unless it completed.")] = False,
    timeout: Annotated[float, typer.Option(min=1, help="Seconds to wait with --wait.")] = 3600,
    tag: Annotated[list[str] | None, typer.Option("--tag", help="Tag of the flow run (repeatable).")] = None,
    param: Annotated[
        list[str] | None,
        typer.Option(
            "--param",
            help="A flow parameter `key=value` (repeatable), e.g. `dry_run=true` or `search.trials_per_family=2`; "
            "the value is read as YAML (numbers, true/false, null, lists); the deployment's other defaults stay.",
        ),
    ] = None,
) -> None:
    """Run a deployment (`training/<model>`, ...) on the configured Prefect server and print the run's URL."""
    settings = get_settings()
    os.environ["PREFECT_API_URL"] = settings.prefect_api_url
    os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
    from adapters.clients import StackNotRunningError, check_stack

    try:
        check_stack(settings, services=("Prefect",))
    except StackNotRunningError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from exc
    from prefect.settings import PREFECT_API_URL, temporary_settings

    try:
        changes = parse_params(param or [])
    except ValueError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from exc
    with temporary_settings({PREFECT_API_URL: settings.prefect_api_url}):
        code = _run_deployment(name, wait, timeout, tag or [], settings, changes)
    raise typer.Exit(code)


def parse_params(pairs: list[str]) -> dict[str, Any]:
    """`["a=1", "search.trials_per_family=2"]` -> `{"a": 1, "search": {"trials_per_family": 2}}`.

    Raises:
        ValueError: A pair without `=` or with an empty key, or one key given twice (names it).
    """
    import yaml

    changes: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts):
            raise ValueError(f"--param {pair!r}: expected key=value (a dotted key for a nested field)")
        try:
            value = yaml.safe_load(text) if text.strip() else text
        except yaml.YAMLError:
            value = text
        node = changes
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"--param {pair!r}: {part!r} is given as a value and as a group")
        if parts[-1] in node:
            raise ValueError(f"--param {pair!r}: {key!r} is given twice")
        node[parts[-1]] = value
    return changes


def merged(defaults: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """`defaults` with `changes` laid over them, nested mappings merged key by key."""
    out = dict(defaults)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = value
    return out


def _run_deployment(
    name: str, wait: bool, timeout: float, tags: list[str], settings: Settings, changes: dict[str, Any]
) -> int:
    """Start the deployment's run, print its URL, and with `wait` follow it; returns the exit code.

    `changes` are laid over the deployment's `params` defaults (the flows take one `params` model).
    """
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound
    from prefect.utilities.urls import url_for

    full_name = name if "/" in name else f"{name}/{name}"  # `features`: the shared deployment of its flow
    try:
        with get_client(sync_client=True) as client:
            defaults = client.read_deployment_by_name(full_name).parameters or {}
        parameters = {"params": merged(defaults.get("params") or {}, changes)} if changes else None
        run = run_deployment(full_name, timeout=0, tags=tags or None, parameters=parameters)
    except ObjectNotFound:
        typer.secho(
            f"error: no deployment {full_name!r}: add the model (`mlops models add`) and run `mlops deploy` first",
            fg=typer.colors.RED,
            err=True,
        )
        return 1
    link = url_for(run) or f"{settings.prefect_ui_url}/runs/flow-run/{run.id}"
    typer.echo(f"started {full_name}: flow run {run.name} ({run.id})\n  {link}")
    if not wait:
        return 0
    run = _wait(run.id, timeout)
    state = run.state
    typer.echo(f"flow run {run.name}: {run.state_name}{f': {state.message}' if state and state.message else ''}")
    typer.echo(f"  {link}")
    if state is None or not state.is_final():
        typer.secho(f"error: still {run.state_name} after {timeout:.0f}s", fg=typer.colors.RED, err=True)
        return 1
    return 0 if state.is_completed() else 1
