"""Fixtures: the real local stack (S3, MLflow, Prefect) on free ports in a temp folder, and its data."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from mlops.stack import CLIENT_DEFAULTS
from tests.ports import free_port, free_port_block

# Before Prefect or MLflow is imported by any test module.
os.environ.update(CLIENT_DEFAULTS)
# Except one: tests load registered versions with MLflow's own loaders too, as the independent reference for
# what was registered (the project's loaders check digests and never use them; the stack's servers, workers
# and flows keep MLflow's loaders refused). Set again before each test: a CLI command run in this process
# (`connect`) puts the stack's client environment back.
MLFLOW_LOADERS_ALLOWED = {"MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "true"}
os.environ.update(MLFLOW_LOADERS_ALLOWED)


@pytest.fixture(autouse=True)
def _mlflow_loaders_allowed_in_tests() -> None:
    os.environ.update(MLFLOW_LOADERS_ALLOWED)


TEST_MONTHS = 6
TEST_ROWS_PER_MONTH = 2000

# The modules that take longest, slowest first (their seconds in a clean-clone run on the 2-core machine).
# `make test` runs the suite on xdist workers, each module on one worker (`--dist loadfile`) in collection
# order: starting with these lets the workers finish together; the other modules follow in file order.
SLOWEST_MODULES = (
    "test_workflows",  # 469 s
    "test_faults_registry",  # 417 s
    "test_catalog",  # 297 s
    "test_deployments",  # 241 s
    "test_alerts",  # 180 s
    "test_faults_batch",  # 168 s (408 s with a killed run's lease of 300 s, since shortened)
    "test_trust",  # 166 s
    "test_faults_database",  # 150-200 s (PostgreSQL killed during a run and during a promotion)
    "test_monitoring",  # 154 s
    "test_training_flow",  # 149 s
    "test_scoring",  # 133 s
    "test_serving",  # 126 s
    "test_demo",  # 121 s
    "test_faults_serving",  # 113 s
    "test_rollback",  # 100 s
    "test_data_versions",  # about 100 s
    "test_lineage",  # about 100 s
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The slowest modules first, each module's tests in their own order."""
    rank = {name: i for i, name in enumerate(SLOWEST_MODULES)}
    items.sort(key=lambda item: rank.get(item.module.__name__.rsplit(".", 1)[-1], len(rank)))


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """Start a private stack for the session and point every client of this process at it."""
    from prefect.logging.handlers import APILogHandler
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from adapters.clients import use_tracking_server
    from adapters.settings import Settings
    from mlops import stack as local_stack

    state = tmp_path_factory.mktemp("stack")
    for var in (
        "MLFLOW_TRACKING_URI",
        "AWS_ENDPOINT_URL_S3",
        "PREFECT_API_URL",
        "MLFLOW_S3_ENDPOINT_URL",
        "MLOPS_DASK_ADDRESS",
    ):
        os.environ.pop(var, None)
    serving_port = free_port()
    env = {
        "MLOPS_STATE_DIR": str(state),
        "MLOPS_S3_PORT": str(free_port()),
        "MLOPS_MLFLOW_PORT": str(free_port()),
        "MLOPS_PREFECT_PORT": str(free_port()),
        "MLOPS_WORKER_PORT": str(free_port()),
        "MLOPS_POSTGRES_PORT": str(free_port()),  # Prefect's and MLflow's databases (MLOPS_DATABASE=auto)
        # The stack's serving API follows credit-risk; training runs check it after each promotion.
        "MLOPS_SERVING_PORT": str(serving_port),
        "MLOPS_SERVING_URL": f"http://127.0.0.1:{serving_port}",
        # The product's registry poll (2 s: a promotion's check wakes it at once through /reload), the catalog
        # re-read every 2 s (10 s by default). Each served model's poll is two registry reads (champion and
        # challenger), each also costing MLflow's server CPU: with 1 s, in two minutes of a clean-clone run
        # (2026-12-07), the two session stacks' serving processes used 12 % of a core and their MLflow servers
        # 17 % (these reads and the flows' logging).
        "MLOPS_SERVING_POLL_SECONDS": "2",
        "MLOPS_SERVING_CATALOG_POLL_SECONDS": "2",
        # One serving process (not one per core): each polls the registry and loads every new champion, the
        # suite's largest CPU consumer with two (tests/test_serving_workers.py starts several).
        "MLOPS_SERVING_WORKERS": "1",
        "MLOPS_WEED_PORT_BASE": str(free_port_block(16)),
        # The stack's Dask cluster (2 workers); flows in this process and in the stack's worker find it here.
        "MLOPS_DASK_WORKERS": "2",
        "MLOPS_DASK_SCHEDULER_PORT": str(free_port()),
        "MLOPS_DASK_DASHBOARD_PORT": str(free_port()),
        "AWS_ACCESS_KEY_ID": "test-access-key",
        "AWS_SECRET_ACCESS_KEY": "test-secret-key-do-not-log",
    }
    os.environ.update(env)
    settings = Settings()
    try:
        local_stack.up(settings)
        # MLflow's fluent API (mlflow.pyfunc.load_model, ...) in tests reads the process-wide tracking URI
        use_tracking_server(settings)
        with temporary_settings({PREFECT_API_URL: settings.prefect_api_url}):
            yield settings
            APILogHandler().flush()  # send queued run logs before the server goes away
    finally:
        local_stack.down(settings)


@pytest.fixture(scope="session")
def dask_cluster(stack) -> str:
    """The session stack's Dask cluster (scheduler and two nanny workers on loopback); yields its address.

    One cluster per session, started by `mlops stack up` like a user's; flows run in this process and by the
    stack's Prefect worker find it (`adapters.cluster.cluster_address`).
    """
    from adapters.cluster import cluster_address, require_workers

    address = cluster_address(stack)
    assert address is not None, "the stack started no Dask scheduler"
    require_workers(address)
    return address


@pytest.fixture(scope="session")
def default_data(stack) -> str:
    """The bundled dataset, small, written to the stack's S3 where the bundled config reads it."""
    from core.data.dataset import load_local_dataset_config
    from mlops.datagen import write_months

    source = load_local_dataset_config("credit-risk").source
    write_months(stack, source, TEST_MONTHS, TEST_ROWS_PER_MONTH, seed=7)
    return source


@pytest.fixture
def dataset_yaml(tmp_path: Path):
    """Write a dataset config derived from the bundled one with some fields replaced; returns its path."""
    import yaml

    from core.data.dataset import bundled_config_text

    def make(**changes: object) -> str:
        raw = yaml.safe_load(bundled_config_text("credit-risk")) | changes
        path = tmp_path / f"{raw['name']}.yaml"
        path.write_text(yaml.safe_dump(raw))
        return str(path)

    return make


@pytest.fixture(scope="module", autouse=True)
def _catalog_left_as_found() -> Iterator[None]:
    """Catalog entries a module added are removed after it, so later modules' serving APIs do not load them.

    Every serving API serves the catalog's models besides its default one: leftovers of earlier modules
    would make each private server of a later module load them all before it is ready.
    """
    before = _catalog_names()
    yield
    after = _catalog_names()
    if after is None:
        return
    from adapters.catalog import delete_entry
    from adapters.settings import Settings

    settings = Settings()
    for name in sorted(set(after) - set(before or [])):
        delete_entry(settings, name)


def _catalog_names() -> list[str] | None:
    """The session stack's catalog models, None when no stack runs in this session (yet)."""
    if "pytest-of" not in os.environ.get("MLOPS_STATE_DIR", ""):
        return None
    from adapters.catalog import list_entries
    from adapters.settings import Settings

    try:
        return [entry.name for entry in list_entries(Settings())]
    except Exception:  # the stack is down (a fault test stopped S3): leave the catalog as it is
        return None
