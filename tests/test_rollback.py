"""Rollback and champion history on the real stack: CLI, flow, serving API, S3 history, named errors."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from adapters.clients import mlflow_client
from adapters.history_store import list_changes
from adapters.promotion import promote_version, revert_promotion
from core.evaluation.decision import Gates
from core.modeling.search import SearchSpec
from core.promotion.history import ChampionChange, PendingChange, happened
from flows.rollback import RollbackParams, rollback
from flows.training import TrainingParams, training
from mlops.stack import running
from services.rollback import RollbackError
from services.rollback import rollback as rollback_now
from tests.ports import free_port
from tests.serving_helpers import register_again
from tests.waiting import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MODEL = "rollback-test"


def _bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def _aliases(stack) -> dict[str, str]:
    return {k: str(v) for k, v in mlflow_client(stack).get_registered_model(MODEL).aliases.items()}


@pytest.fixture(scope="module")
def versions(stack, default_data, tmp_path_factory) -> dict[str, str]:
    """v1 (trained, cold-start champion), v2 (the same model registered again, then promoted), and v3
    (another seed, registered but rejected by a gate it cannot pass: never champion)."""
    import yaml

    from core.data.dataset import bundled_config_text

    raw = yaml.safe_load(bundled_config_text("credit-risk")) | {"name": MODEL, "model_name": MODEL}
    config = tmp_path_factory.mktemp(MODEL) / f"{MODEL}.yaml"
    config.write_text(yaml.safe_dump(raw))
    state = training(
        TrainingParams(dataset=str(config), search=SearchSpec(trials_per_family=1, cv_folds=2)), return_state=True
    )
    assert state.is_completed(), state.message
    first = state.result()
    assert first.promoted
    second = register_again(stack, MODEL, first.candidate_version)
    promote_version(MODEL, second, first.candidate_version, reason="test: a newer version", actor="tester")
    rejected = training(
        TrainingParams(
            dataset=str(config),
            search=SearchSpec(trials_per_family=1, cv_folds=2),
            seed=3,
            gates=Gates(min_roc_auc=0.999),
        ),
        return_state=True,
    )
    assert rejected.is_completed(), rejected.message
    assert not rejected.result().promoted and rejected.result().candidate_version is not None
    return {"first": first.candidate_version, "second": second, "rejected": rejected.result().candidate_version}


@pytest.fixture(scope="module")
def server(stack, versions, tmp_path_factory):
    port = free_port()
    command = [_bin("mlops"), "serve", "--port", str(port), "--model", MODEL, "--poll-seconds", "0.5"]
    log_file = tmp_path_factory.mktemp("rollback-serving") / "serving.log"
    with running(command, f"http://127.0.0.1:{port}/health", dict(os.environ), log_file):
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: httpx.get(f"{url}/ready").status_code == 200, 60, "the server to load its model")
        yield url


def _cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [_bin("mlops"), *args], capture_output=True, text=True, timeout=180, env=os.environ | env, check=False
    )


def _predicted_version(server: str) -> str:
    record = {
        "age": 40.0,
        "annual_income": 50000.0,
        "loan_amount": 10000.0,
        "loan_term_months": 36.0,
        "debt_to_income": 0.3,
        "credit_utilization": 0.5,
        "credit_history_years": 10.0,
        "num_open_accounts": 4.0,
        "num_delinquencies": 0.0,
        "employment_type": "salaried",
        "home_ownership": "rent",
        "loan_purpose": "car",
        "region": "north",
    }
    answer = httpx.post(f"{server}/predict", json={"records": [record]}, timeout=30)
    assert answer.status_code == 200, answer.text
    return answer.json()["model"]["version"]


def test_cli_rollback_moves_the_champion_back_and_the_serving_api_follows(stack, versions, server):
    first, second = versions["first"], versions["second"]
    # Given v2 is champion (v1 previous) and the serving API serves it
    assert _aliases(stack) == {"champion": second, "previous": first}
    wait_for(
        lambda: httpx.get(f"{server}/health").json()["version"] == second, 60, f"v{second} to be served", interval=0.3
    )
    # when an operator rolls back from the shell (the serving API to check is configured)
    result = _cli("rollback", "--model", MODEL, "--reason", "v2 answers nonsense", MLOPS_SERVING_URL=server)
    # then the champion is v1 again, v2 is previous, and the serving API answers with v1
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"champion v{second} -> v{first}" in result.stdout and f"serves v{first}" in result.stdout
    assert _aliases(stack) == {"champion": first, "previous": second}
    assert _predicted_version(server) == first
    tags = mlflow_client(stack).get_model_version(MODEL, second).tags
    assert "v2 answers nonsense" in tags["rolled_back"]


def test_rollback_errors_name_the_problem(stack, versions):
    first = versions["first"]
    with pytest.raises(RollbackError, match="has no version '999'"):
        rollback_now(MODEL, "999", "typo", "tester")
    with pytest.raises(RollbackError, match=f"v{first} is already the champion"):
        rollback_now(MODEL, first, "no-op", "tester")
    with pytest.raises(RollbackError, match="needs a reason"):
        rollback_now(MODEL, None, "  ", "tester")
    with pytest.raises(RollbackError, match="has no champion"):
        rollback_now("no-such-model-anywhere", None, "why", "tester")
    result = _cli("rollback", "--model", MODEL, "--to", "999", "--reason", "typo")
    assert result.returncode == 1 and "has no version '999'" in result.stderr
    assert _aliases(stack)["champion"] == first  # nothing moved


def test_rollback_flow_to_a_given_version_records_the_ui_actor(stack, versions, server, monkeypatch):
    second = versions["second"]
    monkeypatch.setenv("MLOPS_SERVING_URL", server)
    state = rollback(
        RollbackParams(model_name=MODEL, reason="v1 was fine after all", to_version=second), return_state=True
    )
    assert state.is_completed(), state.message
    outcome = state.result()
    assert outcome.change.to_version == second and outcome.serving.checked and outcome.serving.ok
    assert outcome.change.actor.startswith("prefect-ui (flow run ")
    assert _aliases(stack)["champion"] == second
    assert _predicted_version(server) == second


def test_history_failure_never_undoes_a_promotion(stack, versions, monkeypatch, caplog):
    first, second = versions["first"], versions["second"]

    def broken(*args, **kwargs):
        raise ConnectionError("S3 down")

    # Given S3 refuses every write (the intent then goes to the local state folder)
    monkeypatch.setattr("adapters.history_store.put_bytes", broken)
    with caplog.at_level(logging.WARNING, logger="adapters"):
        promotion = promote_version(MODEL, first, second, reason="while S3 is down")
    # then the promotion stands, and its record waits in a durable intent, loudly
    assert _aliases(stack)["champion"] == first
    assert "HISTORY NOT RECORDED YET" in caplog.text
    assert list((stack.state_dir / "history-pending" / MODEL).glob("*.json"))
    monkeypatch.undo()
    # and once S3 is back, the next change (a revert of it) records it first, then itself
    revert_promotion(promotion, "serving did not confirm", actor="tester")
    assert _aliases(stack)["champion"] == second
    assert not list((stack.state_dir / "history-pending" / MODEL).glob("*.json"))


def test_history_lists_every_change_in_order(stack, versions):
    first, second = versions["first"], versions["second"]
    changes = list_changes(MODEL, stack)
    moves = [(c.kind, c.from_version, c.to_version) for c in changes]
    assert moves == [
        ("promotion", None, first),  # cold start by the training flow
        ("promotion", first, second),
        ("rollback", second, first),  # the CLI
        ("rollback", first, second),  # the flow
        ("promotion", second, first),  # while S3 was down: recorded from its intent once S3 was back
        ("revert", first, second),
    ]
    cold, _, cli, flow, _, _ = changes
    assert "cold start" in cold.reason and "run reason: manual" in cold.reason
    assert cli.reason == "v2 answers nonsense" and cli.actor not in {"", "prefect-ui"}
    assert flow.actor.startswith("prefect-ui") and "prefect_flow_run" in flow.links
    assert all(c.metrics.get("roc_auc", 0) > 0.5 and c.run_id for c in changes)
    assert [c.at for c in changes] == sorted(c.at for c in changes)
    # the CLI (a new process: nothing in memory) lists the same, oldest first
    result = _cli("history", "--model", MODEL)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1 + len(changes) and lines[0].split()[:4] == ["at", "kind", "from", "to"]
    kinds = [line.split()[2] for line in lines[1:]]
    assert kinds == ["promotion", "promotion", "rollback", "rollback", "promotion", "revert"]


def _run_metric(stack, version: str, name: str = "holdout_roc_auc") -> float:
    client = mlflow_client(stack)
    return client.get_run(client.get_model_version(MODEL, version).tags["run_id"]).data.metrics[name]


class _AliasWrites:
    """Real MLflow calls, with a fault after (or instead of) chosen alias writes, and the order of writes."""

    def __init__(self, monkeypatch, fail_after: set[str] = frozenset(), fail_instead: set[str] = frozenset()):
        from mlflow import MlflowClient

        self.calls: list[tuple[str, str]] = []
        real_alias, real_tag = MlflowClient.set_registered_model_alias, MlflowClient.set_model_version_tag

        def set_alias(client, name, alias, version):
            self.calls.append(("alias", alias))
            if alias in fail_instead:
                fail_instead.discard(alias)
                raise ConnectionError("MLflow went away before applying it")
            real_alias(client, name, alias, version)
            if alias in fail_after:
                fail_after.discard(alias)
                raise TimeoutError("read timed out (the server applied it)")

        def set_tag(client, name, version, key, value):
            self.calls.append(("tag", key))
            real_tag(client, name, version, key, value)

        monkeypatch.setattr(MlflowClient, "set_registered_model_alias", set_alias)
        monkeypatch.setattr(MlflowClient, "set_model_version_tag", set_tag)


def _moves(stack) -> list[tuple[str, str | None, str | None]]:
    return [(c.kind, c.from_version, c.to_version) for c in list_changes(MODEL, stack)]


def test_a_promote_whose_alias_write_timed_out_after_applying_it_is_accepted(stack, versions, monkeypatch):
    first, second = versions["first"], versions["second"]
    assert _aliases(stack) == {"champion": second, "previous": first}
    before = _moves(stack)
    # Given the champion alias write reaches MLflow but the client times out waiting for the answer
    writes = _AliasWrites(monkeypatch, fail_after={"champion"})
    # when v1 is promoted over v2
    promotion = promote_version(MODEL, first, second, reason="timeout test", actor="tester")
    monkeypatch.undo()
    # then the move is read back and accepted: previous, tag and history all follow, tags after the move
    assert promotion.replaced == second and promotion.replaced_previous == first
    assert _aliases(stack) == {"champion": first, "previous": second}
    assert writes.calls.index(("alias", "champion")) < writes.calls.index(("tag", "promoted_at"))
    assert mlflow_client(stack).get_model_version(MODEL, first).tags["promoted_at"] == promotion.promoted_at
    assert _moves(stack) == [*before, ("promotion", second, first)]


def test_a_retried_promote_finishes_what_the_first_attempt_started(stack, versions, monkeypatch):
    first, second = versions["first"], versions["second"]
    before = _moves(stack)
    # Given a promotion whose champion move went through, then MLflow failed (the `previous` write is lost)
    _AliasWrites(monkeypatch, fail_instead={"previous"})
    with pytest.raises(ConnectionError):
        promote_version(MODEL, second, first, reason="retry test", actor="tester")
    monkeypatch.undo()
    assert _aliases(stack)["champion"] == second  # half done: champion moved, previous not, no record
    assert _moves(stack) == before
    # when the same promotion is retried (as the task's retry does)
    promotion = promote_version(MODEL, second, first, reason="retry test", actor="tester")
    # then no conflict: the first attempt's move is accepted and finished, recorded once
    assert promotion.replaced == first and promotion.replaced_previous == second
    assert _aliases(stack) == {"champion": second, "previous": first}
    assert _moves(stack) == [*before, ("promotion", first, second)]


def test_a_rollback_to_a_rejected_never_champion_version_is_refused_unless_forced(stack, versions, server):
    second, rejected = versions["second"], versions["rejected"]
    assert _aliases(stack)["champion"] == second
    # when an operator rolls back to the version the gates rejected
    refused = _cli("rollback", "--model", MODEL, "--to", rejected, "--reason", "try v3", MLOPS_SERVING_URL=server)
    # then it is refused, saying which gate failed and that it never was champion; nothing moved
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "gates rejected" in refused.stderr and "min_roc_auc" in refused.stderr
    assert "never champion" in refused.stderr and "--force" in refused.stderr
    assert _aliases(stack)["champion"] == second
    # the flow refuses the same way
    state = rollback(RollbackParams(model_name=MODEL, reason="try v3", to_version=rejected), return_state=True)
    assert state.is_failed() and "never champion" in state.message
    # when forced, it happens, and the history row shows the new champion's own metrics
    forced = _cli(
        "rollback", "--model", MODEL, "--to", rejected, "--reason", "try v3", "--force", MLOPS_SERVING_URL=server
    )
    assert forced.returncode == 0, forced.stdout + forced.stderr
    assert _aliases(stack) == {"champion": rejected, "previous": second}
    last = list_changes(MODEL, stack)[-1]
    assert (last.kind, last.from_version, last.to_version) == ("rollback", second, rejected)
    assert "[forced: the gates rejected" in last.reason
    own, old = _run_metric(stack, rejected), _run_metric(stack, second)
    assert own != old and last.metrics["roc_auc"] == pytest.approx(own)
    row = _cli("history", "--model", MODEL).stdout.strip().splitlines()[-1]
    assert f"{own:.4f}" in row.split() and f"{old:.4f}" not in row.split()
    # and back to v2 (a former champion that passed its gates: no force needed)
    back = _cli("rollback", "--model", MODEL, "--to", second, "--reason", "v3 was a test", MLOPS_SERVING_URL=server)
    assert back.returncode == 0, back.stdout + back.stderr


def _intent(at: str, before: str | None, after: str | None) -> PendingChange:
    change = ChampionChange(at, MODEL, before, after, "promotion", "unit", "me")
    return PendingChange(change, {"champion": before}, {"champion": after}, {str(after): {"promoted_at": at}})


def test_which_unfinished_changes_happened_is_read_from_the_champion_and_later_intents():
    # a pure unit: no server
    one, two = _intent("2026-01-01T00:00:01+00:00", "1", "2"), _intent("2026-01-01T00:00:02+00:00", "2", "3")
    assert happened([one], "2") == [True] and happened([one], "1") == [False]
    # the later change started from the earlier one's champion: both happened, though the champion moved on
    assert happened([one, two], "3") == [True, True]
    # an earlier move that never happened, then one from the old champion
    never, after = _intent("2026-01-01T00:00:01+00:00", "1", "2"), _intent("2026-01-01T00:00:02+00:00", "1", "4")
    assert happened([never, after], "4") == [False, True]
    # a reverted cold start leaves no champion, which is its target
    assert happened([_intent("2026-01-01T00:00:03+00:00", "1", None)], None) == [True]
    assert PendingChange.from_json(one.to_json()) == one


# --- races: a champion change whose lock lapsed, or whose champion moved, moves nothing -----------------

RACES = "promotion-races"


def _copy(stack, version: str) -> str:
    """MODEL's `version` registered as a new version of RACES (the same stored files and digests)."""
    return register_again(stack, MODEL, version, as_name=RACES)


def _races_aliases(stack) -> dict[str, str]:
    return {k: str(v) for k, v in mlflow_client(stack).get_registered_model(RACES).aliases.items()}


class _Paused:
    """A promotion to `version` (against champion `expected`) in a thread, holding the promotion lock, paused
    right before its champion move (`MLOPS_TEST_PAUSE_AT=before-champion-move`); `leases` what it holds."""

    def __init__(self, version: str, expected: str | None, folder: Path, monkeypatch) -> None:
        import contextvars
        import json
        import threading

        from adapters.locks import ensure_lock, hold, promotion_lock_name

        self.release, self.error = folder / "release", None
        monkeypatch.setenv("MLOPS_TEST_PAUSE_AT", "before-champion-move")
        monkeypatch.setenv("MLOPS_TEST_PAUSE_FILE", str(self.release))
        self.lock = ensure_lock(promotion_lock_name(RACES))

        def run() -> None:
            try:
                with hold(self.lock, timeout_seconds=120):
                    promote_version(RACES, version, expected, reason="test: the paused holder", actor="A")
            except Exception as exc:
                self.error = exc

        # in this test's context: Prefect's API address is a context setting of the session (tests/conftest.py)
        self.thread = threading.Thread(target=contextvars.copy_context().run, args=(run,), daemon=True)
        self.thread.start()
        reached = Path(f"{self.release}.reached")
        wait_for(lambda: reached.exists() or not self.thread.is_alive(), 120, "the pause before the champion move")
        assert self.thread.is_alive(), self.error
        self.leases = json.loads(reached.read_text())["leases"]
        monkeypatch.delenv("MLOPS_TEST_PAUSE_AT")  # nobody else pauses

    def go_on(self) -> Exception | None:
        self.release.touch()
        self.thread.join(120)
        assert not self.thread.is_alive()
        return self.error


def test_a_holder_whose_lease_lapsed_moves_nothing_after_the_next_holder_promoted(
    stack, versions, tmp_path, monkeypatch
):
    from uuid import UUID

    from prefect.client.orchestration import get_client

    from adapters.history_store import list_pending
    from adapters.locks import LockLost, hold

    champion, a, b = (_copy(stack, versions["first"]) for _ in range(3))
    promote_version(RACES, champion, None, reason="test: the champion", actor="tester")
    # Given holder A, paused with its intent stored, right before moving the champion to its version
    holder = _Paused(a, champion, tmp_path, monkeypatch)
    assert [intent.change.to_version for intent in list_pending(RACES, stack)] == [a]
    # when its lease lapses (revoked, as the server does to a lease not renewed in time) and holder B takes the
    # lock, finds A's intent (its move never happened: discarded) and promotes its own version
    with get_client(sync_client=True) as client:
        client.release_concurrency_slots_with_lease(lease_id=UUID(holder.leases[holder.lock]))
    with hold(holder.lock, timeout_seconds=30):
        promote_version(RACES, b, champion, reason="test: the next holder", actor="B")
    # then A, going on, cannot confirm its lease and moves nothing: B's champion stands, recorded once
    error = holder.go_on()
    assert isinstance(error, LockLost) and "could not be renewed" in str(error), error
    assert _races_aliases(stack) == {"champion": b, "previous": champion}
    moves = [(c.kind, c.from_version, c.to_version) for c in list_changes(RACES, stack)]
    assert moves == [("promotion", None, champion), ("promotion", champion, b)]
    assert list_pending(RACES, stack) == []
    assert "promoted_at" not in mlflow_client(stack).get_model_version(RACES, a).tags


def test_a_champion_moved_outside_the_lock_is_never_overwritten(stack, versions, tmp_path, monkeypatch):
    from adapters.history_store import list_pending
    from adapters.promotion import PromotionConflict
    from adapters.registry import CHAMPION

    before = _races_aliases(stack)[CHAMPION]
    a, by_hand = _copy(stack, versions["first"]), _copy(stack, versions["first"])
    # Given holder A, paused right before moving the champion from `before` to its version
    holder = _Paused(a, before, tmp_path, monkeypatch)
    # when someone moves the champion by hand meanwhile (the MLflow UI, outside the lock)
    mlflow_client(stack).set_registered_model_alias(RACES, CHAMPION, by_hand)
    # then A reads the champion back, refuses, and drops its intent: the hand-made champion stands
    error = holder.go_on()
    assert isinstance(error, PromotionConflict) and f"no longer v{before}" in str(error), error
    assert _races_aliases(stack)[CHAMPION] == by_hand
    assert list_pending(RACES, stack) == []
    assert [c.to_version for c in list_changes(RACES, stack)].count(a) == 0
