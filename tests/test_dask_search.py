"""The search on Dask: each trial a Prefect task run on the cluster, and the same seed
chooses the same model on one worker, two workers and without a cluster.

The reference is the search in this process (`core.modeling.search.search_models`, trials one after another):
the runs through Prefect's task runners must give exactly its trials table and choice.
"""

from __future__ import annotations

import pickle
import sys
import time
import warnings

import cloudpickle
import dask
import numpy as np
import pytest
from prefect import flow

from core.data.dataset import load_local_dataset_config
from core.data.features import prepare_inputs, prepare_target
from core.data.split import search_sample, split_frame
from core.data.synthetic import generate_frame
from core.modeling.calibration import calibrate
from core.modeling.search import ModelFamily, SearchResult, SearchSpec, build_model, search_models
from tasks.search_trials import dask_runner, local_runner, run_search_on
from tasks.training import train_candidate

pytestmark = pytest.mark.integration

SEED = 3
# Single-threaded families: under load, OpenMP threads spin (gradient boosting runs ~20x slower in-process).
SPEC = SearchSpec(
    families=[ModelFamily.logistic_regression, ModelFamily.decision_tree],
    trials_per_family=4,
    trials_per_batch=2,
    cv_folds=3,
)
CONFIG = load_local_dataset_config("credit-risk").model_copy(update={"model_name": "dask-search-test"})
TRAIN = split_frame(generate_frame(2000, seed=SEED), CONFIG).train


# The stack's workers run the project's installed packages, not tests/: this module travels by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


@flow(name="search-on-dask-test", persist_result=False)
def search_flow(address: str | None) -> SearchResult:
    # The rows are made here, not a module global nor a parameter: this module travels by value inside every
    # task's context, with the globals its flow names (a frame there would be in every trial's graph), and
    # Prefect would try to JSON-encode a frame parameter.
    train = split_frame(generate_frame(2000, seed=SEED), CONFIG).train
    return run_search_on(dask_runner(address) if address else local_runner(), train, CONFIG, SPEC, SEED)


def _table(result: SearchResult) -> list[tuple]:
    return [(t.number, t.family, t.params, t.cv_mean, t.cv_std, t.state, t.folds) for t in result.trials]


def test_same_seed_same_trials_and_choice_on_one_worker_two_workers_and_no_cluster(dask_cluster, stack):
    from distributed import LocalCluster
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterTaskRunId

    reference = search_models(TRAIN, CONFIG, SPEC, SEED)
    assert {t.state for t in reference.trials} >= {"complete"} and len(reference.trials) == 8

    # The rows (about 200 kB pickled) are scattered to the workers once, never inside a task's graph: Dask warns
    # of any graph above the threshold.
    with (
        dask.config.set({"distributed.admin.large-graph-warning-threshold": "100kB"}),
        warnings.catch_warnings(record=True) as caught,
    ):
        warnings.simplefilter("always")
        two = search_flow(dask_cluster, return_state=True)  # the stack's cluster: 2 workers
    assert len(pickle.dumps(TRAIN)) > 150_000
    assert not [w for w in caught if "large graph" in str(w.message)], [str(w.message) for w in caught]
    with LocalCluster(
        n_workers=1, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address="127.0.0.1:0"
    ) as one_worker:
        one = search_flow(one_worker.scheduler_address, return_state=True)
    none = search_flow(None, return_state=True)

    for state in (two, one, none):
        result = state.result()
        assert _table(result) == _table(reference)
        assert (result.family, result.params, result.cv_mean) == (reference.family, reference.params, reference.cv_mean)

    # every trial of the run on the cluster is its own task run, with its own log line, and so is the refit
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[two.state_details.flow_run_id]))
        )
        trials = [run for run in runs if run.name.startswith("trial ")]
        expected = {f"trial {t.family}-{t.number % SPEC.trials_per_family}" for t in reference.trials}
        assert {run.name for run in trials} == expected
        assert all(run.state.is_completed() for run in trials)
        assert "refit" in {run.name.rsplit("-", 1)[0] for run in runs}
        deadline = time.monotonic() + 30  # the workers ship their logs in the background
        while True:
            logs = client.read_logs(LogFilter(task_run_id=LogFilterTaskRunId(any_=[run.id for run in trials])))
            if {log.task_run_id for log in logs} == {run.id for run in trials} or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert {log.task_run_id for log in logs} == {run.id for run in trials}
        assert any("after 3 of 3 folds" in log.message for log in logs)


SAMPLE_ROWS = 600
SMALL = SPEC.model_copy(update={"trials_per_family": 2})


@flow(name="sampled-search-test", persist_result=False)
def sampled_search_flow() -> SearchResult:
    # What the flow's pandas engine does with more training rows than `search_sample_rows` (`fit_candidate`).
    train = split_frame(generate_frame(2000, seed=SEED), CONFIG).train
    sample = search_sample(train, CONFIG.model_copy(update={"search_sample_rows": SAMPLE_ROWS}))
    result, _ = train_candidate(sample, CONFIG, SMALL, SEED, fit_rows=train)
    return result


def test_a_sampled_search_ships_the_chosen_configuration_fitted_on_every_training_row(stack):
    # Given the search sample of the training rows
    sample = search_sample(TRAIN, CONFIG.model_copy(update={"search_sample_rows": SAMPLE_ROWS}))
    assert SAMPLE_ROWS <= len(sample) < len(TRAIN)
    # when the search runs on the sample with every training row to fit on
    result = sampled_search_flow()
    # then its trials and choice are the search's on the sample alone
    reference = search_models(sample, CONFIG, SMALL, SEED)
    assert _table(result) == _table(reference)
    assert (result.family, result.params, result.calibration.method) == (
        reference.family,
        reference.params,
        reference.calibration.method,
    )
    # and the shipped model is that configuration fitted on every training row, calibrated as the search chose
    X, y = prepare_inputs(TRAIN, CONFIG), prepare_target(TRAIN, CONFIG)
    every_row = calibrate(build_model(CONFIG, result.family, result.params, SEED).fit(X, y), reference.calibration)
    np.testing.assert_array_equal(result.model.predict_proba(X), every_row.predict_proba(X))
    # not the search's own refit on the sample
    assert not np.array_equal(result.model.predict_proba(X), reference.model.predict_proba(X))
