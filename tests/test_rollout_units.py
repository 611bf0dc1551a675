"""Rollouts, the pure part: who answers a record, the pairs, the live figures against independent computations, the
verdict's rules and the policy in a dataset config."""

from __future__ import annotations

import hashlib
import math
from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError
from sklearn.metrics import accuracy_score, roc_auc_score

from core.data.operations import Operations
from core.monitoring.drift_statistics import psi_from_shares
from core.rollout import (
    Arm,
    CutOff,
    Evidence,
    Realised,
    RolloutEvent,
    RolloutPolicy,
    RolloutState,
    judge,
    measure,
    realised_comparison,
    takes_challenger,
    timeline_markdown,
)


def test_canary_assignment_is_a_uniform_hash_of_the_rollout_and_the_key():
    # Given a 30 % canary and 20,000 distinct record ids
    keys = [f"id-{i}" for i in range(20_000)]
    chosen = [takes_challenger("r1", k, 0.3) for k in keys]
    # then the share is within 4 binomial standard deviations of 30 %
    sd = math.sqrt(0.3 * 0.7 / len(keys))
    assert abs(np.mean(chosen) - 0.3) < 4 * sd
    # and it is exactly blake2b's first 8 bytes read as a fraction (a second implementation)
    again = [
        int(hashlib.blake2b(f"r1\x00{k}".encode(), digest_size=8).hexdigest(), 16) / 2**64 < 0.3 for k in keys[:500]
    ]
    assert again == chosen[:500]
    # sticky: the same key, the same side; another rollout draws anew
    assert [takes_challenger("r1", k, 0.3) for k in keys[:500]] == chosen[:500]
    other = [takes_challenger("r2", k, 0.3) for k in keys]
    assert 0.55 < np.mean(np.array(other) == np.array(chosen)) < 0.65  # independent draws agree ~58 % of the time


def _state(**changes) -> RolloutState:
    policy = RolloutPolicy(mode="shadow", min_records=50, min_seconds=0)
    state = RolloutState.start("m", "2", "1", policy)
    since = (datetime.now(UTC) - timedelta(minutes=5)).isoformat()
    return RolloutState(**({**state.__dict__, "since": since} | changes))


def _log(version: str, proba: np.ndarray, ms: float, seq: str = "r") -> pd.DataFrame:
    n = len(proba)
    return pd.DataFrame(
        {
            "x": np.arange(n, dtype=float),
            "request_id": [f"{seq}{i // 2}" for i in range(n)],
            "record_index": [i % 2 for i in range(n)],
            "model_version": version,
            "proba_0": 1 - proba,
            "proba_1": proba,
            "call_ms": ms + np.arange(n) % 7,
            "predicted_at": pd.Timestamp.now(tz="UTC"),
        }
    )


def test_measure_pairs_each_record_and_computes_the_figures_as_sklearn_and_the_psi_formula():
    rng = np.random.default_rng(0)
    champion, challenger = rng.uniform(size=400), rng.uniform(size=400)
    state = _state()
    # champion answered (its log), the challenger scored the same records in shadow, shuffled
    answered, shadow = _log("1", champion, 2.0), _log("2", challenger, 3.0).sample(frac=1, random_state=1)
    evidence, pairs = measure(answered, shadow, state, [0, 1], datetime.now(UTC))
    assert evidence.paired == 400 and evidence.challenger.records == 400 and evidence.champion.records == 400
    np.testing.assert_allclose(pairs.champion[:, 1], champion[pairs.rows["x"].astype(int)])
    np.testing.assert_allclose(pairs.challenger[:, 1], challenger[pairs.rows["x"].astype(int)])
    expected = accuracy_score(champion > 0.5, challenger[np.arange(400)] > 0.5)
    assert evidence.agreement == pytest.approx(expected)
    # PSI: the champion's deciles, the challenger's shares in them
    edges = np.quantile(champion, np.linspace(0, 1, 11)[1:-1])
    ref = np.bincount(np.searchsorted(edges, champion, side="right"), minlength=10)
    cur = np.bincount(np.searchsorted(edges, challenger, side="right"), minlength=10)
    assert evidence.output_psi == pytest.approx(psi_from_shares(ref, cur), rel=1e-9)
    assert evidence.challenger.p99_ms == pytest.approx(np.percentile(3.0 + np.arange(400) % 7, 99))
    # rows logged before the rollout started do not count
    old = _log("2", challenger, 3.0, seq="old").assign(predicted_at=pd.Timestamp("2020-01-01", tz="UTC"))
    again, _ = measure(answered, pd.concat([shadow, old]), state, [0, 1], datetime.now(UTC))
    assert again.paired == 400


def test_realised_comparison_is_the_difference_of_sklearn_auc_with_a_paired_interval():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 3000)
    good = np.clip(y * 0.3 + rng.uniform(size=3000) * 0.7, 0, 1)
    weak = np.clip(y * 0.1 + rng.uniform(size=3000) * 0.9, 0, 1)
    state = _state()
    _, pairs = measure(_log("1", weak, 1.0), _log("2", good, 1.0), state, [0, 1], datetime.now(UTC))
    labels = y[pairs.rows["x"].astype(int)].astype(object)
    labels[:1000] = None  # not arrived yet
    realised = realised_comparison(labels, pairs, [0, 1])
    assert realised is not None and realised.labelled == 2000
    known = slice(1000, None)
    truth = labels[known].astype(int)
    assert realised.challenger == pytest.approx(roc_auc_score(truth, pairs.challenger[known, 1]))
    assert realised.champion == pytest.approx(roc_auc_score(truth, pairs.champion[known, 1]))
    assert realised.low < realised.delta < realised.high and realised.low > 0


def _evidence(**changes) -> Evidence:
    base = Evidence(
        seconds=3600,
        paired=1000,
        champion=Arm("1", 1000, 2.0, 5.0),
        challenger=Arm("2", 1000, 2.0, 6.0),
        agreement=0.95,
        output_psi=0.02,
    )
    return Evidence(**(base.__dict__ | changes))


def test_the_verdict_promotes_rolls_back_or_extends_by_the_gates():
    policy = RolloutPolicy(mode="canary", min_records=500, min_seconds=600, max_seconds=86_400)
    assert judge(_evidence(), policy).action == "promote"
    # a cut-off ends it at once, whatever else
    assert judge(_evidence(cut_off="scoring failed"), policy).action == "rollback"
    # each gate failing on enough records rolls back, naming it
    for changes, word in [
        ({"agreement": 0.5}, "agreement"),
        ({"output_psi": 0.9}, "PSI"),
        ({"challenger": Arm("2", 1000, 2.0, 50.0)}, "p99"),
        ({"estimated_metric": "roc_auc", "estimated": {"champion": 0.8, "challenger": 0.7}}, "estimated"),
    ]:
        verdict = judge(_evidence(**changes), policy)
        assert verdict.action == "rollback" and word in verdict.reasons[0], (changes, verdict)
    # a bad agreement on too few records is not judged yet: extended
    assert judge(_evidence(paired=100, agreement=0.1), policy).action == "extend"
    assert judge(_evidence(seconds=60), policy).action == "extend"
    # still short after the maximum: rolled back as undecided
    assert judge(_evidence(paired=100, seconds=90_000), policy).action == "rollback"
    # labels: significantly worse rolls back; undecided extends; required and missing extends
    worse = Realised("roc_auc", 800, 0.70, 0.75, -0.05, -0.08, -0.02, 0.95)
    unsure = Realised("roc_auc", 800, 0.74, 0.75, -0.01, -0.04, 0.02, 0.95)
    assert judge(_evidence(realised=worse), policy).action == "rollback"
    assert judge(_evidence(realised=unsure), policy).action == "extend"
    assert judge(_evidence(), policy.merged({"require_labels": True})).action == "extend"
    # regressors: RMSE is lower-is-better and relative
    rmse = {"estimated_metric": "rmse", "estimated": {"champion": 10.0, "challenger": 10.1}}
    assert judge(_evidence(**rmse), policy).action == "promote"
    rmse["estimated"] = {"champion": 10.0, "challenger": 11.0}
    assert judge(_evidence(**rmse), policy).action == "rollback"


def test_state_and_cut_off_round_trip_and_the_policy_is_checked_in_the_config():
    state = _state()
    assert RolloutState.from_json(state.to_json()) == state
    assert RolloutState.from_json("not json") is None and RolloutState.from_json(None) is None
    assert state.rules.min_records == 50
    cut = CutOff(state.id, "slow", pid=7)
    assert CutOff.from_json(cut.to_json()) == cut
    assert Operations.model_validate({"rollout": {"mode": "canary", "canary_share": 0.2}}).rollout.canary_share == 0.2
    with pytest.raises(ValidationError, match="canary_share"):
        Operations.model_validate({"rollout": {"mode": "canary", "canary_share": 1.5}})
    with pytest.raises(ValidationError, match="mode"):
        Operations.model_validate({"rollout": {"mode": "blue-green"}})


def test_the_timeline_lists_each_step():
    events = [
        RolloutEvent("m", "r", "started", "2", "1", "canary 10%", "flow"),
        RolloutEvent("m", "r", "rolled_back", "2", "1", "agreement 0.4 below 0.8", "flow", {"paired": 900}),
    ]
    table = timeline_markdown(events)
    assert "| started |" in table and "| rolled_back |" in table and "| 900 |" in table
    assert RolloutEvent.from_json(events[1].to_json()) == events[1]


class _Model:
    """A stand-in for a loaded model (a pure unit of the serving path): fixed probabilities, or an error."""

    serial_next = 0

    def __init__(self, version: str, p: float, fails: bool = False) -> None:
        _Model.serial_next += 1
        self.serial, self.name, self.version, self.classes = _Model.serial_next, "m", version, [0, 1]
        self.p, self.fails, self.calls = p, fails, 0

    def columns_of(self, records):
        return {"x": np.array([r["x"] for r in records], dtype=float)}

    def scores(self, columns):
        self.calls += 1
        if self.fails:
            raise ValueError("cannot score")
        n = len(columns["x"])
        return np.column_stack([np.full(n, 1 - self.p), np.full(n, self.p)])


class _Served:
    name = "m"
    shadow = object()

    def __init__(self) -> None:
        self.cut: list[str] = []
        self.counts: dict[str, int] = {}

    def cut_off(self, state, reason: str) -> None:
        self.cut.append(reason)

    def count_rollout(self, version: str, role: str, records: int) -> None:
        self.counts[role] = self.counts.get(role, 0) + records


def test_a_challenger_that_raises_is_cut_off_and_the_champion_answers_its_records():
    import asyncio

    from serving.batching import MicroBatcher
    from serving.rollout import ActiveRollout, RolloutPath

    champion, challenger = _Model("1", 0.2), _Model("2", 0.9, fails=True)
    state = RolloutState.start("m", "2", "1", RolloutPolicy(mode="canary", canary_share=0.5))
    served = _Served()

    async def run() -> list[dict]:
        batcher = MicroBatcher(inline=False)
        batcher.start()
        path = RolloutPath(batcher)
        rollout = ActiveRollout(state, challenger, 0.5)
        ids = [str(i) for i in range(40)]
        records = [{"x": float(i)} for i in range(40)]
        answer = await path.answer(served, rollout, champion, records, ids, "req")
        await path.stop()
        await batcher.stop()
        return answer["predictions"], ids

    predictions, ids = asyncio.run(run())
    # every record answered, by the champion, with its probabilities; the challenger was tried once and cut off
    assert len(predictions) == 40 and all(p["probabilities"]["1"] == pytest.approx(0.2) for p in predictions)
    mine = sum(takes_challenger(state.id, i, 0.5) for i in ids)
    assert mine > 0 and served.counts == {"champion_shadow": mine, "fallback": mine} and challenger.calls == 1
    assert len(served.cut) == 1 and "ValueError: cannot score" in served.cut[0]


def test_training_delivers_by_the_rollout_mode_and_a_cold_start_is_promoted(monkeypatch):
    from types import SimpleNamespace

    from core.evaluation.decision import Gates
    from services import promotion

    calls: list[tuple] = []
    monkeypatch.setattr(promotion, "promote_checked", lambda *a: calls.append(("promote", *a)) or (None, None, None))
    monkeypatch.setattr(promotion, "begin_rollout", lambda *a: calls.append(("rollout", *a)) or "under rollout: ...")
    candidate = SimpleNamespace(run_id="run-7")
    config = SimpleNamespace(model_name="m")
    decision = SimpleNamespace(reasons=["beats the champion"])

    def deliver(mode: str, champion: str | None) -> dict:
        policy = promotion.PromotionPolicy(Gates(), 0, rollout=RolloutPolicy(mode=mode), reason="scheduled")
        return promotion._deliver(candidate, config, policy, champion, "8", decision, "scheduled")

    # direct, or no champion to compare live with: promoted as before
    assert "promotion" in deliver("direct", "7") and calls[-1][:4] == ("promote", "m", "8", "7")
    assert "promotion" in deliver("canary", None) and calls[-1][:4] == ("promote", "m", "8", None)
    # shadow or canary against a champion: the rollout starts instead, with the run's reason and the decision's
    assert deliver("shadow", "7") == {"rollout": "under rollout: ..."}
    name, model, version, champion, policy, run_id, why = calls[-1]
    assert (name, model, version, champion, policy.mode, run_id) == ("rollout", "m", "8", "7", "shadow", "run-7")
    assert why == "run reason: scheduled | beats the champion"


def test_a_canary_champion_call_splits_into_its_answers_and_its_shadow_copies():
    from serving.batching import Job
    from serving.runtime import split_shadow

    one = Job(
        None, [{"x": i} for i in range(5)], "a", None, ["a0", "a1", "a2", "a3", "a4"], None, None, frozenset({1, 3})
    )
    two = Job(None, [{"x": 9}], "b", None, None, None, [4], None)  # a part of a request: its record is the 5th
    (answered, at), (copies, shadow_at) = split_shadow([one, two])
    assert at.tolist() == [0, 2, 4, 5] and shadow_at.tolist() == [1, 3]
    assert [(j.request_id, j.ids, j.index, j.shadow) for j in answered] == [
        ("a", ["a0", "a2", "a4"], [0, 2, 4], None),
        ("b", None, [4], None),
    ]
    assert [(j.request_id, j.ids, j.index, [r["x"] for r in j.records]) for j in copies] == [
        ("a", ["a1", "a3"], [1, 3], [1, 3])
    ]


def test_a_reload_checks_the_challenger_too_and_answers_the_champions_version():
    """After a rollout's promotion a /reload leaves no challenger behind the new champion (not the next poll)."""
    import asyncio
    from types import SimpleNamespace

    from serving.runtime import Runtime

    class Follower:
        def __init__(self, version: str | None, fails: bool = False) -> None:
            self.current = SimpleNamespace(version=version) if version else None
            self.last_error, self.forced, self.fails = None, [], fails

        async def check(self, force: bool = False) -> bool:
            self.forced.append(force)
            if self.fails:
                raise RuntimeError("the registry answered nonsense")
            self.current = None if self.current is None or self is served.challenger else self.current
            return True

    served = SimpleNamespace(follower=Follower("2"), challenger=Follower("2"))
    runtime = object.__new__(Runtime)  # only what reload_model reads: the served models and the metrics folder
    runtime.models = SimpleNamespace(get=lambda name: served if name == "m" else None)
    runtime.metrics = SimpleNamespace(multiprocess_dir=None)

    answer = asyncio.run(runtime.reload_model("m", timeout=1))
    assert served.follower.forced == [True] and served.challenger.forced == [True]
    assert served.challenger.current is None  # the promoted version is no longer shown as the challenger
    assert answer["version"] == "2" and answer["changed"] is True and answer["error"] is None
    # a challenger whose check fails does not fail the reload: the answer is the champion's
    served.challenger = Follower("3", fails=True)
    assert asyncio.run(runtime.reload_model("m", timeout=1))["version"] == "2"
    assert served.challenger.forced == [True]
