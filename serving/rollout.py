"""Serving a rollout: the challenger beside the champion, in shadow or answering its canary share.

- **shadow**: the champion answers; the challenger scores the same records in the background (never delaying the
  answer), its outputs go to the model's shadow log (`predictions/shadow/<model>/`).
- **canary**: each record whose key (its id; the request id for a model without an id field) hashes below the
  share is answered by the challenger (`core.rollout.takes_challenger`): the same records in every
  process and after a restart. Those rows go to the model's prediction log with the challenger's version; the
  champion scores the whole request in one call, its answers to the prediction log and its copies of the
  challenger's records to the shadow log, so every challenger output has a pair.

**Safety first.** A challenger call that raises, gives no answer within its latency budget plus a second, or whose
call took longer than the budget cuts the challenger off in this process at once, for the rest of the rollout
(`ServedModel.cut_off`, recorded in the registry so the other processes, a restarted one and the rollout flow know).
The records it was to answer are answered by the champion within the same request: a client never sees the
challenger fail. Overload (the queue is full) is not the challenger's fault: those records fall back to the champion
without a cut-off.

A record is answered by one version and logged once with it; a challenger that times out while its call is already
running may still log its rows after the champion answered them: the rollout flow keeps the answered champion row.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any, Protocol

from core.rollout import RolloutState, takes_challenger
from serving.batching import MicroBatcher, Overloaded, Scored
from serving.forms import answer
from serving.model import LoadedModel


class ServedModel(Protocol):
    """What a rollout needs of its served model (`serving.served.ServedModel`)."""

    name: str
    shadow: Any  # where shadow copies are logged (the batcher's context for them)

    def cut_off(self, state: RolloutState, reason: str) -> None:
        """Stop using the challenger for the rest of the rollout."""

    def count_rollout(self, version: str, role: str, records: int) -> None:
        """Count records of the rollout by role."""


log = logging.getLogger(__name__)

MAX_SHADOW_PENDING = 256  # shadow scorings waiting at once per process; beyond, they are skipped (counted)
TIMEOUT_GRACE_SECONDS = 1.0  # a challenger's answer is waited for its latency budget plus this


@dataclass(frozen=True)
class ActiveRollout:
    """A rollout this process applies now: its state, the loaded challenger, its time limits."""

    state: RolloutState
    challenger: LoadedModel
    budget_seconds: float

    @property
    def timeout_seconds(self) -> float:
        """How long a challenger's answer is waited for before the champion answers instead."""
        return self.budget_seconds + TIMEOUT_GRACE_SECONDS


class RolloutPath:
    """Answers a request of a model under rollout (see the module).

    Args:
        batcher: The process's micro-batcher (both versions are scored through it).
    """

    def __init__(self, batcher: MicroBatcher) -> None:
        self.batcher = batcher
        self._background: set[asyncio.Task] = set()

    async def answer(
        self,
        served: ServedModel,
        rollout: ActiveRollout,
        champion: LoadedModel,
        records: list[dict[str, Any]],
        ids: list[str | None] | None,
        request_id: str,
    ) -> dict[str, Any]:
        """The answer to one request: the champion's (shadow) or split between the two versions (canary)."""
        state = rollout.state
        everything = list(range(len(records)))
        if state.mode == "shadow":
            scored = await self.batcher.score(champion, records, request_id, ids, served)
            self._in_background(served, rollout, (records, ids, everything), request_id)
            return answer(champion, scored.scores, request_id)
        keys = ids if ids is not None else [None] * len(records)
        mine = [i for i in everything if takes_challenger(state.id, keys[i] or request_id, state.share)]
        if not mine:
            scored = await self.batcher.score(champion, records, request_id, ids, served)
            return answer(champion, scored.scores, request_id)
        chosen = frozenset(mine)
        theirs = [i for i in everything if i not in chosen]
        part = _part(records, ids, mine)
        # one champion call for the whole request: its answers, and its shadow copy of the challenger's records
        challenged, whole = await asyncio.gather(
            self._challenger(served, rollout, part, request_id),
            self.batcher.score(champion, records, request_id, ids, served, index=everything, shadow=chosen),
        )
        kept = Scored(whole.scores[theirs], whole.batch_rows, whole.seconds)
        served.count_rollout(state.version, "champion_shadow", len(mine))
        if challenged is None:  # cut off or overloaded: the champion answers its records too (logged as answered)
            fallback = await self._score(champion, part, request_id, served)
            served.count_rollout(state.version, "fallback", len(mine))
            return _merged(request_id, [(champion, theirs, kept), (champion, mine, fallback)], champion)
        served.count_rollout(state.version, "answered", len(mine))
        return _merged(request_id, [(champion, theirs, kept), (rollout.challenger, mine, challenged)], champion)

    async def _score(
        self,
        model: LoadedModel,
        part: tuple[list[dict[str, Any]], list[str | None] | None, list[int]],
        request_id: str,
        context: Any,
    ) -> Scored:
        records, ids, index = part
        return await self.batcher.score(model, records, request_id, ids, context, index=index)

    async def _challenger(
        self,
        served: ServedModel,
        rollout: ActiveRollout,
        part: tuple[list[dict[str, Any]], list[str | None] | None, list[int]],
        request_id: str,
        context: Any = None,
    ) -> Scored | None:
        """The challenger's scores for `part`; None (after cutting it off, unless overloaded) when it failed."""
        state = rollout.state
        try:
            async with asyncio.timeout(rollout.timeout_seconds):
                scored = await self._score(rollout.challenger, part, request_id, context or served)
        except Overloaded:
            return None
        except TimeoutError:
            served.cut_off(state, f"no answer within {rollout.timeout_seconds:g} s (latency budget plus grace)")
            return None
        except Exception as exc:  # its own failure: never the client's
            served.cut_off(state, f"scoring failed: {type(exc).__name__}: {exc}"[:500])
            return None
        if scored.seconds > rollout.budget_seconds:
            ms = 1e3 * scored.seconds
            served.cut_off(state, f"a call took {ms:.0f} ms, over the {1e3 * rollout.budget_seconds:g} ms budget")
        return scored

    def _in_background(
        self,
        served: ServedModel,
        rollout: ActiveRollout,
        part: tuple[list[dict[str, Any]], list[str | None] | None, list[int]],
        request_id: str,
    ) -> None:
        """Score `part` with the challenger into the shadow log, after the answer (skipped, counted, if many wait)."""
        if len(self._background) >= MAX_SHADOW_PENDING:
            served.count_rollout(rollout.state.version, "shadow_skipped", len(part[0]))
            return
        task = asyncio.create_task(self._shadow(served, rollout, part, request_id))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _shadow(
        self,
        served: ServedModel,
        rollout: ActiveRollout,
        part: tuple[list[dict[str, Any]], list[str | None] | None, list[int]],
        request_id: str,
    ) -> None:
        if await self._challenger(served, rollout, part, request_id, served.shadow) is not None:
            served.count_rollout(rollout.state.version, "shadow", len(part[0]))

    async def stop(self) -> None:
        """Let the shadow scorings under way finish (their rows are logged)."""
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)


def _part(
    records: list[dict[str, Any]], ids: list[str | None] | None, index: list[int]
) -> tuple[list[dict[str, Any]], list[str | None] | None, list[int]]:
    """The records (and ids) at `index`, with their places in the request."""
    return [records[i] for i in index], None if ids is None else [ids[i] for i in index], index


def _merged(
    request_id: str, parts: list[tuple[LoadedModel, list[int], Scored | None]], champion: LoadedModel
) -> dict[str, Any]:
    """One answer from the parts each version scored, in the request's order.

    The answer's `model` is the version that answered every record; when both did, the champion's, and each
    prediction says its `version`.
    """
    answered = [(model, index, scored) for model, index, scored in parts if index and scored is not None]
    mixed = len({model.version for model, _, _ in answered}) > 1
    predictions: list[dict[str, Any] | None] = [None] * sum(len(index) for _, index, _ in answered)
    for model, index, scored in answered:
        assert scored is not None
        for place, prediction in zip(index, answer(model, scored.scores, request_id)["predictions"], strict=True):
            predictions[place] = prediction | {"version": model.version} if mixed else prediction
    shown = champion if mixed else answered[0][0]
    return {
        "request_id": request_id,
        "model": {"name": shown.name, "version": shown.version},
        "predictions": predictions,
    }
