"""A run with nothing new (the champion's data, config, params and code) stops early; anything new trains.

On the real stack, with a model and a data folder of its own (the shared credit-risk champion is untouched).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

from adapters.clients import mlflow_client
from core.modeling.search import ModelFamily, SearchSpec
from flows.training import TrainingParams, training
from mlops.datagen import write_months

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MODEL = "skip-unchanged"
MONTHS, ROWS, DATA_SEED = 3, 1500, 11
# What `mlops train --family logistic_regression --trials 1` runs (default gates and folds), so the CLI can rerun it
SEARCH = SearchSpec(families=[ModelFamily.logistic_regression], trials_per_family=1)
TIMES: dict[str, float] = {}


def _train(config: str, **changes):
    params = TrainingParams(**{"dataset": config, "search": SEARCH, "reason": "skip test"} | changes)
    started = time.perf_counter()
    state = training(params, return_state=True)
    assert state.is_completed(), state.message
    return state.result(), time.perf_counter() - started, str(state.state_details.flow_run_id)


def _versions(stack) -> list[str]:
    return sorted(v.version for v in mlflow_client(stack).search_model_versions(f"name='{MODEL}'"))


def _champion(stack) -> str:
    return str(mlflow_client(stack).get_registered_model(MODEL).aliases["champion"])


@pytest.fixture(scope="module")
def source(stack) -> str:
    source = f"s3://{stack.bucket}/datasets/{MODEL}/"
    write_months(stack, source, MONTHS, ROWS, seed=DATA_SEED)
    return source


@pytest.fixture(scope="module")
def config(stack, source, tmp_path_factory) -> str:
    from core.data.dataset import bundled_config_text

    raw = yaml.safe_load(bundled_config_text("credit-risk")) | {"name": MODEL, "model_name": MODEL, "source": source}
    path = tmp_path_factory.mktemp(MODEL) / f"{MODEL}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


@pytest.fixture(scope="module")
def champion(stack, config):
    from adapters.promotion import promote_version

    # Given a champion trained by the flow (cold start; promoted by hand if 900 holdout rows are too few to judge)
    outcome, seconds, _ = _train(config)
    assert outcome.nothing_new is None and outcome.candidate_version is not None, outcome.decision.reasons
    if not outcome.promoted:
        promote_version(MODEL, outcome.candidate_version, None, reason="test: a champion", actor="tester")
    TIMES["first run (trains)"] = seconds
    return outcome


def test_a_rerun_with_nothing_new_trains_nothing_and_says_why(stack, source, config, champion, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, FlowRunFilter, FlowRunFilterId

    client = mlflow_client(stack)
    before = _versions(stack)
    tagged = client.get_model_version(MODEL, champion.candidate_version).tags
    assert {"fingerprint.data", "fingerprint.config", "fingerprint.params", "fingerprint.code"} <= set(tagged)
    # and its files written again with the same bytes (the listing's ETags are content hashes, not times)
    write_months(stack, source, MONTHS, ROWS, seed=DATA_SEED)
    # when the same training runs again (another reason, and as a dry run: neither changes the model)
    outcome, seconds, flow_run_id = _train(config, dry_run=True, reason="scheduled")
    TIMES["rerun, nothing new"] = seconds
    # then nothing was trained, registered or promoted
    assert outcome.nothing_new is not None and not outcome.promoted and outcome.candidate_version is None
    assert f"nothing new: the data, dataset config, parameters and code are those of champion {MODEL} v" in (
        outcome.nothing_new
    )
    assert f"v{champion.candidate_version}" in outcome.nothing_new
    assert _versions(stack) == before and _champion(stack) == champion.candidate_version
    assert outcome.data_version == champion.data_version  # the champion's content version: the same data
    # and the outcome is on an MLflow run of the dataset's experiment, with the fingerprint it matched
    run = client.get_run(outcome.run_id)
    assert (
        run.info.status == "FINISHED" and run.info.experiment_id == client.get_experiment_by_name(MODEL).experiment_id
    )
    assert run.data.tags["decision"] == "nothing_new" and run.data.tags["outcome"] == outcome.nothing_new
    assert run.data.tags["decision.champion_version"] == champion.candidate_version
    assert {k: v for k, v in run.data.tags.items() if k.startswith("fingerprint.")} == {
        k: v for k, v in tagged.items() if k.startswith("fingerprint.")
    }
    assert not run.data.metrics  # no holdout metrics: nothing was evaluated
    assert (
        "Nothing new"
        in Path(client.download_artifacts(outcome.run_id, "decision/decision.md", str(tmp_path))).read_text()
    )
    # and in the Prefect run: the decision artifact says so, and the data was never read or validated
    with get_client(sync_client=True) as prefect:
        [artifact] = prefect.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
        tasks = {t.name.rsplit("-", 1)[0] for t in prefect.read_task_runs(flow_run_filter=FlowRunFilter(
            id=FlowRunFilterId(any_=[flow_run_id])))}  # fmt: skip
    assert artifact.key == "promotion-decision" and "Nothing new" in artifact.data
    assert "fingerprint" in tasks and not tasks & {"load", "validate", "split", "champion-on-holdout", "refit"}, tasks
    assert not [name for name in tasks if name.startswith("trial ")], tasks


def test_mlops_train_says_nothing_new(stack, config, champion, capsys):
    from mlops.cli import run_training

    # when the same training is started from the CLI (`mlops train --config ... --family ... --trials 1`)
    started = time.perf_counter()
    code = run_training(config, False, 42, 1, stack, ["logistic_regression"])
    TIMES["mlops train, nothing new (in-process)"] = time.perf_counter() - started
    # then it exits 0 and says plainly that nothing was trained, why, and how to train anyway
    out = capsys.readouterr().out
    assert code == 0
    assert f"nothing new -> not trained, not promoted (champion v{champion.candidate_version} stays)" in out, out
    assert "are those of champion" in out and "--force" in out and "candidate version: -" in out


@pytest.mark.parametrize("change", [{"seed": 7}, {"force": True}], ids=["seed", "force"])
def test_a_changed_parameter_or_force_trains(stack, config, champion, change):
    # Given the champion, when a run changes a parameter that matters, or forces (dry runs: nothing registered)
    outcome, seconds, _ = _train(config, dry_run=True, **change)
    TIMES[f"dry run with {next(iter(change))} changed"] = seconds
    # then it trains and is judged against the champion as usual
    assert outcome.nothing_new is None
    assert outcome.decision.candidate_metrics and outcome.decision.champion_version == champion.candidate_version
    note = mlflow_client(stack).get_run(outcome.run_id).data.tags["fingerprint.comparison"]
    if "force" in change:
        assert note.startswith("forced: the fingerprint is the champion's"), note
    else:
        assert "changed since champion" in note and "params (" in note and "data (" not in note, note


def test_one_more_partition_trains_a_new_version(stack, source, config, champion):
    before = _versions(stack)
    # Given one more month in the data folder
    write_months(stack, source, 1, ROWS, seed=DATA_SEED, first_month=MONTHS)
    # when the same training runs again
    outcome, seconds, _ = _train(config)
    TIMES["rerun on new data (trains)"] = seconds
    # then it trains and registers a version whose fingerprint differs from the champion's only in its data
    assert outcome.nothing_new is None and outcome.candidate_version not in before
    assert outcome.data_version != champion.data_version
    client = mlflow_client(stack)
    old, new = (
        client.get_model_version(MODEL, v).tags for v in (champion.candidate_version, outcome.candidate_version)
    )
    differs = {k for k in old if k.startswith("fingerprint.") and old[k] != new[k]}
    assert differs == {"fingerprint.data"}, differs
    print("\nskip-unchanged timings (s): " + "; ".join(f"{k}: {v:.1f}" for k, v in TIMES.items()))
