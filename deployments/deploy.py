"""Deployments as code: every catalog model's flows on a Prefect server, served by a worker anywhere.

`mlops deploy` calls `deploy_all`, which reads the model catalog (`adapters/catalog.py`) and registers, for
each model, `training/<model>`, `monitoring/<model>`, `scoring/<model>` (when its config names a
`scoring_source`), `rollback/<model>` and `rollout/<model>` (when its `operations.rollout.mode` is shadow or
canary: judges the challenger every `check_seconds`), with the schedules and parameters of the config's `operations`
section (`core/data/operations.py`); then the shared `features/features` (feature store materialization, daily).
A model removed from the catalog has its deployments (and their scheduled runs) deleted by the next deploy.

Each deployment names its flow by **module path** (`flows.training.training`) and carries no path of this
checkout and no pull step: a worker runs the flow from the `prefect-mlops` package installed in its own
environment (a venv, the Docker image, a Kubernetes job's image), from any folder, on any machine. The
deployment's `version` (in the UI) is the deploying checkout's git commit, as Prefect infers it. A model's
deployments pass its catalog URI as the dataset, so a config changed with `mlops models add --replace`
takes effect at the next run without a redeploy (a changed schedule needs one). Connection settings come
from the worker's environment, so no secret is stored in a deployment or shown in the UI.
Then the automations (`deployments/automations.py`): drift retraining per model, and the alerts.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from importlib import import_module
from typing import Any
from uuid import UUID

from adapters.catalog import CatalogEntry, list_entries
from adapters.settings import get_settings
from core.data.operations import Operations
from deployments.automations import deploy_automations, remove_model_automations
from services.catalog import delete_model_deployments, model_tag

log = logging.getLogger(__name__)

WORK_POOL = "mlops-process"
# The Kubernetes work pool (`mlops deploy --kubernetes`); infra/k8s's worker creates it from its base job template.
KUBERNETES_POOL = "mlops-kubernetes"
# How the process pool's worker starts a run (`_deploy`).
PROCESS_COMMAND = "python -m prefect.engine"
PROJECT_TAG = "prefect-mlops"
# The flows a catalog model gets a deployment of, named after the model (`<flow>/<model>`).
MODEL_FLOWS = ("training", "monitoring", "scoring", "rollback", "rollout")
SHARED = "features/features"


@dataclass(frozen=True)
class FlowDeployment:
    """One deployment: which flow, under which name, on which schedule (none when `on_demand`).

    `entrypoint` is the flow's module path in the installed package, `<module>.<flow function>`.
    """

    name: str
    flow_name: str
    entrypoint: str
    description: str
    cron: str | None = None
    interval_seconds: int | None = None
    anchor: datetime | None = None
    parameters: dict[str, Any] | None = None
    on_demand: bool = False
    model: str | None = None

    @property
    def full_name(self) -> str:
        """`<flow>/<deployment>`, as `run_deployment` and `mlops run-deployment` take it."""
        return f"{self.flow_name}/{self.name}"

    @property
    def tags(self) -> list[str]:
        """The project's tag, and the model's for a model's deployment."""
        return [PROJECT_TAG, *([model_tag(self.model)] if self.model else [])]

    def schedule(self) -> Any:
        """The Prefect schedule object for this deployment; None for an on-demand deployment."""
        from prefect.schedules import Cron, Interval

        if self.on_demand:
            return None
        if self.interval_seconds is not None:
            return Interval(self.interval_seconds, anchor_date=self.anchor)
        return Cron(self.cron or "0 3 * * 1")

    def load_flow(self) -> Any:
        """The flow object, imported from the installed package (what a worker does with the entrypoint)."""
        module, _, attribute = self.entrypoint.rpartition(".")
        return getattr(import_module(module), attribute)


def _scheduled(cron: str | None, interval: int | None, ops: Operations) -> dict[str, Any]:
    """The schedule fields of a deployment: an interval (from the anchor), a cron, or on demand."""
    if interval is not None:
        return {"interval_seconds": interval, "anchor": ops.schedule_anchor}
    return {"cron": cron} if cron is not None else {"on_demand": True}


def model_deployments(entry: CatalogEntry, name_suffix: str = "") -> list[FlowDeployment]:
    """A catalog model's deployments, from its config's `operations` section; each reads the config from the catalog.

    With `name_suffix` (a second set of deployments), monitoring's drift retrains the suffixed training deployment.
    """
    model, ops = entry.name, entry.config.operations
    training = {"dataset": entry.uri, "reason": "scheduled"}
    training |= {key: value for key, value in (("search", ops.search), ("gates", ops.gates)) if value}
    monitoring = {
        "dataset": entry.uri,
        "prediction_log_days": ops.prediction_log_days,
        "partition": ops.monitoring_partition,
        "training_deployment": f"training/{model}{name_suffix}",
    }
    specs = [
        FlowDeployment(
            name=model,
            flow_name="training",
            entrypoint="flows.training.training",
            description=f"Retraining of {model}: promote a new champion only when it is safe.",
            parameters={"params": training},
            model=model,
            **_scheduled(ops.training_cron, ops.training_interval_seconds, ops),
        ),
        FlowDeployment(
            name=model,
            flow_name="monitoring",
            entrypoint="flows.monitoring.monitoring",
            description=f"Drift monitoring of {model}: recent data and predictions against the champion's "
            f"reference; triggers training/{model} when drift or decay crosses the thresholds.",
            parameters={"params": monitoring},
            model=model,
            **_scheduled(ops.monitoring_cron, ops.monitoring_interval_seconds, ops),
        ),
        FlowDeployment(
            name=model,
            flow_name="rollback",
            entrypoint="flows.rollback.rollback",
            description=f"Roll {model}'s champion back to the previous (or a given) version, with a reason.",
            parameters={"params": {"model_name": model}},
            model=model,
            on_demand=True,
        ),
    ]
    if ops.scoring_source is not None:
        scoring = {"dataset": entry.uri, "source": ops.scoring_source}
        specs.append(
            FlowDeployment(
                name=model,
                flow_name="scoring",
                entrypoint="flows.scoring.scoring",
                description=f"Batch scoring with {model}'s champion: predict {ops.scoring_source} in chunks.",
                parameters={"params": scoring},
                model=model,
                **({"cron": ops.scoring_cron} if ops.scoring_cron else {"on_demand": True}),
            )
        )
    if ops.rollout.mode != "direct":
        specs.append(
            FlowDeployment(
                name=model,
                flow_name="rollout",
                entrypoint="flows.rollout.rollout",
                description=f"Rollout of {model}'s challenger ({ops.rollout.mode}): judge it on live traffic against "
                "the champion, then promote, roll back or extend.",
                parameters={"params": {"dataset": entry.uri}},
                model=model,
                interval_seconds=ops.rollout.check_seconds,
                anchor=ops.schedule_anchor,
            )
        )
    return specs


def shared_deployments() -> list[FlowDeployment]:
    """The deployments every model shares: the feature store's materialization."""
    return [
        FlowDeployment(
            name="features",
            flow_name="features",
            entrypoint="flows.features.materialize",
            description="Feature store: load the newest values of the registry's feature views into the online "
            "store. Daily at 02:00, before the models' training; or press Run.",
            cron="0 2 * * *",
        )
    ]


def deployments(entries: Sequence[CatalogEntry], name_suffix: str = "") -> list[FlowDeployment]:
    """Every deployment of these catalog models, and the shared ones."""
    return [spec for entry in entries for spec in model_deployments(entry, name_suffix)] + shared_deployments()


class WorkPoolMissingError(RuntimeError):
    """The Kubernetes work pool does not exist yet; says how to create it."""


def ensure_work_pool(name: str = WORK_POOL, kubernetes: bool = False) -> bool:
    """Create the process work pool if it is missing; returns True when it was created.

    A Kubernetes pool is not created here (its base job template, with the Secret's environment, is
    `infra/k8s/base-job-template.json`, which the worker of `infra/k8s` creates the pool from): a missing
    one raises WorkPoolMissingError naming how to create it.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        try:
            pool = client.read_work_pool(name)
        except ObjectNotFound:
            if kubernetes:
                raise WorkPoolMissingError(
                    f"work pool {name!r} does not exist: start the Kubernetes worker (`kubectl apply -k infra/k8s`"
                    f" creates it from infra/k8s/base-job-template.json), or `prefect work-pool create {name} "
                    "--type kubernetes --base-job-template infra/k8s/base-job-template.json`"
                ) from None
            client.create_work_pool(
                WorkPoolCreate(
                    name=name,
                    type="process",
                    base_job_template=ProcessWorker.get_default_base_job_template(),
                    description="Runs prefect-mlops flows as local processes.",
                )
            )
            log.info("created work pool %r", name)
            return True
        if kubernetes and pool.type != "kubernetes":
            raise WorkPoolMissingError(f"work pool {name!r} is of type {pool.type!r}, not 'kubernetes'")
        return False


def deploy_all(
    work_pool: str = WORK_POOL,
    entries: Sequence[CatalogEntry] | None = None,
    name_suffix: str = "",
    automations: bool = True,
    kubernetes: bool = False,
    prune: bool | None = None,
) -> dict[str, str]:
    """Register the deployments of every catalog model (or of `entries`) and the automations; idempotent.

    Returns `<flow>/<deployment>` -> id (the plain names, without `name_suffix`). With `prune` (by default
    when the whole catalog is deployed, not given `entries`), the
    deployments of models no longer in the catalog (found by their `model:<name>` tag on this pool) are
    deleted with their scheduled runs, and so are their drift automations. The automations
    (`deployments/automations.py`): per model, drift -> run `training/<model>`; with `MLOPS_ALERT_WEBHOOK_URL`
    set, the alerts on failed runs and champion changes. `name_suffix` names a separate set of deployments
    (`<model><suffix>`) and `automations=False` leaves the automations alone: a second set on another pool
    does not take them over. `kubernetes`: the pool is a Kubernetes pool (it must exist; see `ensure_work_pool`).
    """
    settings = get_settings()
    prune = entries is None if prune is None else prune
    entries = list_entries(settings) if entries is None else list(entries)
    ensure_work_pool(work_pool, kubernetes=kubernetes)
    ids = {}
    for spec in deployments(entries, name_suffix):
        ids[spec.full_name] = str(_deploy(spec, work_pool, name_suffix, kubernetes))
    _drop_stored_paths(ids.values())
    if prune:
        removed = prune_models(work_pool, {entry.name for entry in entries}, name_suffix)
        if automations:
            for model in removed:
                remove_model_automations(model)
    if automations:
        training = {e.name: UUID(ids[f"training/{e.name}"]) for e in entries}
        deploy_automations(training, settings)
    return ids


def _deploy(spec: FlowDeployment, work_pool: str, name_suffix: str, kubernetes: bool = False) -> UUID:
    from prefect.deployments.runner import EntrypointType

    flow = spec.load_flow()
    deployment_id = flow.deploy(
        name=spec.name + name_suffix,
        work_pool_name=work_pool,
        schedule=spec.schedule(),
        parameters=spec.parameters,
        description=spec.description,
        tags=spec.tags,
        # No working_dir, no pull step: the worker imports the module from its own installed package. On the
        # process pool, the command: without one, Prefect's process worker starts a supervisor process that
        # imports Prefect to prepare a workspace (none here) and then starts the run's process; with it, the
        # run's process directly (about 2 CPU seconds and 1-2 s less per run). `python` is the worker's own
        # interpreter: `mlops stack up` and `mlops worker` put it first on the worker's PATH.
        job_variables={} if kubernetes else {"command": PROCESS_COMMAND},
        entrypoint_type=EntrypointType.MODULE_PATH,
        print_next_steps=False,
        ignore_warnings=True,
        build=False,
        push=False,
    )
    log.info("deployed %s%s (%s)", spec.full_name, name_suffix, deployment_id)
    return deployment_id


def prune_models(work_pool: str, keep: set[str], name_suffix: str = "") -> list[str]:
    """Delete the deployments on `work_pool` of models not in `keep`; returns the models removed."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        tagged = {
            tag.removeprefix("model:")
            for d in client.read_deployments()
            if d.work_pool_name == work_pool and d.name.endswith(name_suffix)
            for tag in d.tags
            if tag.startswith("model:")
        }
    gone = sorted(tagged - keep)
    for model in gone:
        delete_model_deployments(model, work_pool)
    return gone


def _drop_stored_paths(deployment_ids: Any) -> None:
    """Clear the folder a deployment made before (from this checkout) still stores: an update leaves it."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import DeploymentUpdate

    with get_client(sync_client=True) as client:
        for deployment_id in deployment_ids:
            if client.read_deployment(deployment_id).path:
                client.update_deployment(UUID(deployment_id), DeploymentUpdate(path=None))
