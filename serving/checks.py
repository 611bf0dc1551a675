"""The checks of large request bodies, in a process of their own.

A body over `CHECK_ON_LOOP_BYTES` is checked first by a checking process (one per serving process, started
with the first large body): it decodes and checks the body as `serving.forms.decode_records` does and sends
back only its verdict, the 4xx (status and errors) or "accepted". Its interpreter lock is its own, so however many large
or invalid bodies arrive, the serving process's event loop is never held up by their parsing: a flood of
10 MB bodies of bad records costs the serving process the bytes it receives and hands over, nothing more.
An accepted body is then decoded in the serving process (the one-pass decoder: the records it scores).
"""

from __future__ import annotations

import asyncio
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from core.modeling.signature import Column
from serving.forms import BadRequest, decode_records
from serving.model import LoadedModel

Schema = tuple[tuple[tuple[str, str], ...], str | None]  # (column name, kind) pairs, and the id field

_STAND_INS: dict[Schema, LoadedModel] = {}  # in the checking process: a model without a pipeline per schema


def schema_of(model: LoadedModel) -> Schema:
    """What the checks need of a model: its inputs and its id field (a pipeline never crosses processes)."""
    return tuple((c.name, c.kind) for c in model.columns), model.id_field


def verdict(schema: Schema, body: bytes, limit: int) -> tuple[int, list[dict[str, Any]]] | None:
    """In the checking process: the 4xx status and errors of `body`, or None when the checks accept it."""
    if schema not in _STAND_INS:
        columns, id_field = schema
        _STAND_INS[schema] = LoadedModel("checks", "0", None, [Column(*c) for c in columns], [], id_field=id_field)
    try:
        decode_records(_STAND_INS[schema], body, limit)
    except BadRequest as exc:
        return exc.status, exc.errors
    return None


def _ready() -> bool:
    return True


class CheckingProcess:
    """One process that checks large bodies for a serving process (started lazily, spawned: no threads copied)."""

    def __init__(self) -> None:
        self._pool: ProcessPoolExecutor | None = None

    def start(self) -> None:
        """Start the process and have it import the checks at once (the first check waits for that only)."""
        self._pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
        self._pool.submit(_ready)

    async def check(self, model: LoadedModel, body: bytes, limit: int) -> None:
        """Raise the BadRequest the checks give `body` (checked in the checking process); return if accepted."""
        assert self._pool is not None, "start() first"
        found = await asyncio.get_running_loop().run_in_executor(self._pool, verdict, schema_of(model), body, limit)
        if found is not None:
            raise BadRequest(*found)

    def stop(self) -> None:
        """Stop the process (a check in flight is abandoned)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
