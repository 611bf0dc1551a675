"""Deployments as code: register the project's flows on a Prefect server, served by a worker anywhere.

`mlops deploy` calls `deploy_all`. Each deployment names its flow by **module path** (`flows.training.training`)
and carries no path of this checkout and no pull step: a worker runs the flow from the `prefect-mlops` package
installed in its own environment (a venv, the Docker image, a Kubernetes job's image), from any folder, on any
machine. So the code a worker runs is the version installed there (the image tag is the package version);
the deployment's `version` (in the UI) is the deploying checkout's git commit, as Prefect infers it, else the
flow source's hash. Connection settings come from the
worker's environment, so no secret is stored in the deployment or shown in the UI. Re-deploying updates in
place (and drops the checkout path and pull step of deployments made before).

Every flow has a `FlowDeployment` entry in `deployments()`: `training` (weekly), `monitoring` (daily) and
`features` (feature store materialization, daily) on a schedule; `scoring` and `rollback` on demand.
`scoring` (batch scoring) has no schedule: it runs on demand, from the UI or `run_deployment`.
Then the automations (`deployments/automations.py`): drift retraining and the alerts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from importlib import import_module
from typing import Any
from uuid import UUID

from adapters.settings import get_settings
from deployments.automations import deploy_automations

log = logging.getLogger(__name__)

WORK_POOL = "mlops-process"
# The Kubernetes work pool (`mlops deploy --kubernetes`); infra/k8s's worker creates it from its base job template.
KUBERNETES_POOL = "mlops-kubernetes"
# The bundled dataset's latest month, as `mlops data generate` writes it (12 months from 2025-01).
DEFAULT_SCORING_SOURCE = "s3://mlops/datasets/credit-risk/month=2025-12/"


@dataclass(frozen=True)
class FlowDeployment:
    """One deployment: which flow, under which name, on which schedule (none when `on_demand`).

    `entrypoint` is the flow's module path in the installed package, `<module>.<flow function>`.
    """

    name: str
    entrypoint: str
    description: str
    cron: str | None = None
    interval_seconds: int | None = None
    anchor: datetime | None = None
    parameters: dict[str, Any] | None = None
    on_demand: bool = False

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


def deployments(
    training_cron: str = "0 3 * * 1",
    training_interval: int | None = None,
    training_anchor: datetime | None = None,
    training_parameters: dict[str, Any] | None = None,
    scoring_parameters: dict[str, Any] | None = None,
    monitoring_cron: str = "0 6 * * *",
    monitoring_parameters: dict[str, Any] | None = None,
) -> list[FlowDeployment]:
    """The project's deployments; the training schedule is weekly (Monday 03:00) unless changed.

    `training_parameters` are the deployment's default flow parameters (e.g. `{"params": {"dataset": ...}}`).
    `scoring_parameters` are the scoring deployment's defaults; by default the bundled dataset's latest
    month, scored with the champion.
    `monitoring_cron` schedules drift monitoring (daily 06:00 by default) with `monitoring_parameters` as its
    defaults (by default the bundled dataset's champion against the last day of the serving prediction log).
    `rollback` has no schedule: it is pressed in the UI (its form asks for a reason).
    """
    return [
        FlowDeployment(
            name="training",
            entrypoint="flows.training.training",
            description="Scheduled retraining: promote a new champion only when it is safe.",
            cron=training_cron,
            interval_seconds=training_interval,
            anchor=training_anchor,
            parameters=training_parameters,
        ),
        FlowDeployment(
            name="scoring",
            entrypoint="flows.scoring.scoring",
            description="Batch scoring on demand: predict a partition in S3 with the champion, in chunks.",
            parameters=scoring_parameters or {"params": {"dataset": "credit-risk", "source": DEFAULT_SCORING_SOURCE}},
            on_demand=True,
        ),
        FlowDeployment(
            name="monitoring",
            entrypoint="flows.monitoring.monitoring",
            description="Drift monitoring: recent data and predictions against the champion's training reference; "
            "triggers the training deployment when drift or decay crosses the thresholds.",
            cron=monitoring_cron,
            parameters=monitoring_parameters,
        ),
        FlowDeployment(
            name="features",
            entrypoint="flows.features.materialize",
            description="Feature store: apply the repository and load the newest feature values into the online "
            "store. Daily at 02:00, after the data and history land and before the weekly training; or press Run.",
            cron="0 2 * * *",
        ),
        FlowDeployment(
            name="rollback",
            entrypoint="flows.rollback.rollback",
            description="Roll the champion back to the previous (or a given) version, with a reason; on demand.",
            on_demand=True,
        ),
    ]


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
    training_cron: str = "0 3 * * 1",
    training_interval: int | None = None,
    work_pool: str = WORK_POOL,
    training_anchor: datetime | None = None,
    training_parameters: dict[str, Any] | None = None,
    scoring_parameters: dict[str, Any] | None = None,
    monitoring_cron: str = "0 6 * * *",
    monitoring_parameters: dict[str, Any] | None = None,
    name_suffix: str = "",
    automations: bool = True,
    kubernetes: bool = False,
) -> dict[str, str]:
    """Register every deployment and the automations (idempotent: updated in place); returns deployment name -> id.

    The automations (`deployments/automations.py`): drift -> run `training`, and, with
    `MLOPS_ALERT_WEBHOOK_URL` set, the alerts on failed runs and champion changes. `name_suffix` names a
    separate set of deployments (`training<suffix>`, ...; the returned keys are the plain names) and
    `automations=False` leaves the automations alone: a second set on another pool does not take them over.
    `kubernetes`: the pool is a Kubernetes pool (it must exist; see `ensure_work_pool`).
    """
    from prefect.deployments.runner import EntrypointType

    ensure_work_pool(work_pool, kubernetes=kubernetes)
    ids = {}
    specs = deployments(
        training_cron,
        training_interval,
        training_anchor,
        training_parameters,
        scoring_parameters,
        monitoring_cron,
        monitoring_parameters,
    )
    for spec in specs:
        flow = spec.load_flow()
        deployment_id = flow.deploy(
            name=spec.name + name_suffix,
            work_pool_name=work_pool,
            schedule=spec.schedule(),
            parameters=spec.parameters,
            description=spec.description,
            tags=["prefect-mlops"],
            # No working_dir, no pull step: the worker imports the module from its own installed package.
            job_variables={},
            entrypoint_type=EntrypointType.MODULE_PATH,
            print_next_steps=False,
            ignore_warnings=True,
            build=False,
            push=False,
        )
        ids[spec.name] = str(deployment_id)
        log.info("deployed %s/%s (%s)", flow.name, spec.name + name_suffix, deployment_id)
    _drop_stored_paths(ids.values())
    if automations:
        deploy_automations(UUID(ids["training"]), get_settings())
    return ids


def _drop_stored_paths(deployment_ids: Any) -> None:
    """Clear the folder a deployment made before (from this checkout) still stores: an update leaves it."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import DeploymentUpdate

    with get_client(sync_client=True) as client:
        for deployment_id in deployment_ids:
            if client.read_deployment(deployment_id).path:
                client.update_deployment(UUID(deployment_id), DeploymentUpdate(path=None))
