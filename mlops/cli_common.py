"""Helpers every command module of the CLI shares: logging, errors with their exit code, connecting to the stack."""

from __future__ import annotations

import logging
import os

import typer

from adapters.settings import Settings
from mlops.stack import client_env

log = logging.getLogger(__name__)


def setup_logging(verbose: bool = False) -> None:
    """Log our lines to stderr with a time stamp; third-party chatter only from warnings up."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("httpx", "botocore", "urllib3", "alembic", "great_expectations"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print `error: message` in red and return the `typer.Exit` to raise (exit `code`)."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    return typer.Exit(code)


def connect(settings: Settings) -> None:
    """Point this process's clients at the stack, or exit with the way out when it does not answer."""
    os.environ.update(client_env(settings))
    # Our loggers also feed Prefect's run logs; outside a run (this command's own lines) that is not a warning.
    os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
    from adapters.clients import StackNotRunningError, check_stack

    try:
        check_stack(settings)
    except StackNotRunningError as exc:
        raise fail(str(exc), code=2) from exc


def os_user() -> str:
    """The OS user running the command (the actor of a rollback), or `unknown-user`."""
    import getpass

    try:
        return getpass.getuser()
    except Exception:  # no user database entry (containers)
        return "unknown-user"
