"""Structure of the Kubernetes manifests in infra/k8s (no cluster on our machines, so they are not applied here).

The work pool's base job template is checked against prefect-kubernetes' own default and rendered by its
job configuration into the Job a worker would submit.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from uuid import uuid4

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "infra" / "k8s"
NAMESPACE = "mlops"
# Names of variables that hold secrets: they must come from a Secret, never a value in a file.
SECRET_NAMES = {
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "PREFECT_API_KEY",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLOPS_SERVING_TOKEN",
    "MLOPS_FEAST_REDIS",
}


def _image() -> str:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    return f"prefect-mlops:{version}"


def _kustomization() -> dict:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text())


def _objects() -> list[dict]:
    objects = []
    for name in _kustomization()["resources"]:
        objects += [doc for doc in yaml.safe_load_all((K8S / name).read_text()) if doc]
    return objects


def _one(kind: str, name: str | None = None) -> dict:
    [found] = [o for o in _objects() if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    return found


def _template() -> dict:
    return json.loads((K8S / "base-job-template.json").read_text())


def _pod_specs() -> dict[str, dict]:
    """Every pod spec in the manifests and the base job template's, by where it is."""
    dask = _one("DaskCluster")["spec"]
    return {
        "worker Deployment": _one("Deployment", "prefect-worker")["spec"]["template"]["spec"],
        "Dask scheduler": dask["scheduler"]["spec"],
        "Dask workers": dask["worker"]["spec"],
        "flow-run Job": _template()["job_configuration"]["job_manifest"]["spec"]["template"]["spec"],
    }


def test_kustomization_lists_every_manifest_and_the_template():
    kustomization = _kustomization()
    manifests = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == manifests
    [generator] = kustomization["configMapGenerator"]
    assert generator["files"] == ["base-job-template.json"]
    assert kustomization["namespace"] == NAMESPACE


def test_kinds_api_versions_and_namespace():
    found = {(o["apiVersion"], o["kind"]) for o in _objects()}
    assert found == {
        ("v1", "Namespace"),
        ("v1", "ConfigMap"),
        ("v1", "ServiceAccount"),
        ("rbac.authorization.k8s.io/v1", "Role"),
        ("rbac.authorization.k8s.io/v1", "RoleBinding"),
        ("apps/v1", "Deployment"),
        ("kubernetes.dask.org/v1", "DaskCluster"),
        ("networking.k8s.io/v1", "NetworkPolicy"),
    }
    for o in _objects():
        if o["kind"] != "Namespace":
            assert o["metadata"]["namespace"] == NAMESPACE, o["metadata"]["name"]


def test_every_container_runs_the_project_image_with_resources_set():
    from dask.utils import parse_bytes

    compose = yaml.safe_load((ROOT / "infra" / "docker-compose.yml").read_text())
    assert compose["services"]["worker"]["image"] == _image()  # the name Compose builds infra/Dockerfile under
    for where, spec in _pod_specs().items():
        for container in spec["containers"]:
            if where == "flow-run Job":  # templated: the pool's variables give the values
                assert container["image"] == "{{ image }}"
                assert set(container["resources"]["limits"]) == {"cpu", "memory"}
                continue
            assert container["image"] == _image(), where
            resources = container["resources"]
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(resources[kind]), f"{where}: {kind}"
                # Kubernetes binary suffixes (Gi, Mi) read as dask's (GiB, MiB)
                assert parse_bytes(resources["requests"]["memory"] + "B") <= parse_bytes(
                    resources["limits"]["memory"] + "B"
                )
    variables = _template()["variables"]["properties"]
    assert variables["image"]["default"] == _image()
    for name in ("cpu_request", "cpu_limit", "memory_request", "memory_limit"):
        assert variables[name]["default"], name


def test_dask_workers_bound_their_memory_below_the_pods_limit():
    from dask.utils import parse_bytes

    [worker] = _one("DaskCluster")["spec"]["worker"]["spec"]["containers"]
    args = worker["args"]
    assert args[:2] == ["dask", "worker"]
    own_limit = parse_bytes(args[args.index("--memory-limit") + 1])
    pod_limit = parse_bytes(worker["resources"]["limits"]["memory"] + "B")
    assert 0 < own_limit < pod_limit
    assert _one("DaskCluster")["spec"]["worker"]["replicas"] >= 1


def test_dask_dashboards_are_not_exposed_beyond_the_namespace():
    dask = _one("DaskCluster")
    assert dask["spec"]["scheduler"]["service"]["type"] == "ClusterIP"
    assert not [o for o in _objects() if o["kind"] in {"Ingress", "Route"}]
    assert all(o.get("spec", {}).get("type") not in {"LoadBalancer", "NodePort"} for o in _objects())
    policy = _one("NetworkPolicy")
    assert policy["spec"]["podSelector"]["matchLabels"] == {"dask.org/cluster-name": dask["metadata"]["name"]}
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    assert policy["spec"]["ingress"] == [{"from": [{"podSelector": {}}]}]  # this namespace's pods only
    # the flows find the scheduler at the Service the operator names `<cluster>-scheduler`
    address = _one("ConfigMap", "mlops-config")["data"]["MLOPS_DASK_ADDRESS"]
    assert address == f"tcp://{dask['metadata']['name']}-scheduler.{NAMESPACE}.svc.cluster.local:8786"


def _env(spec: dict) -> list[dict]:
    return [e for c in spec["containers"] for e in c.get("env", [])]


def test_secrets_come_from_the_secret_never_from_a_value():
    assert not [o for o in _objects() if o["kind"] == "Secret"]
    secret_refs = 0
    for where, spec in _pod_specs().items():
        for entry in _env(spec):
            if entry["name"] in SECRET_NAMES:
                ref = entry["valueFrom"]["secretKeyRef"]
                assert ref["name"] == "mlops-credentials" and ref["key"] == entry["name"], (where, entry)
                assert "value" not in entry
                secret_refs += 1
    assert secret_refs >= 2 + 2  # at least the S3 keys of the flow runs and of the Dask workers
    assert not SECRET_NAMES & set(_one("ConfigMap", "mlops-config")["data"])
    flow_run_env = {e["name"] for e in _env(_pod_specs()["flow-run Job"])}
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "PREFECT_API_URL", "MLFLOW_TRACKING_URI"} <= flow_run_env


def test_the_worker_serves_the_pool_mlops_deploy_uses_with_namespaced_rbac():
    from deployments.deploy import KUBERNETES_POOL

    deployment = _one("Deployment", "prefect-worker")
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    args = container["args"]
    assert args[:3] == ["prefect", "worker", "start"]
    assert args[args.index("--pool") + 1] == KUBERNETES_POOL
    assert args[args.index("--type") + 1] == "kubernetes"
    # the pool is created from the template the kustomization puts in the mounted ConfigMap
    template_path = Path(args[args.index("--base-job-template") + 1])
    [mount] = [m for m in container["volumeMounts"] if m["mountPath"] == str(template_path.parent)]
    [volume] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert volume["configMap"]["name"] == _kustomization()["configMapGenerator"][0]["name"]
    assert template_path.name == "base-job-template.json"
    # its service account may manage Jobs and read pods in this namespace only
    assert pod["serviceAccountName"] == _one("ServiceAccount", "prefect-worker")["metadata"]["name"]
    binding = _one("RoleBinding")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "prefect-worker"}
    assert binding["subjects"][0]["name"] == pod["serviceAccountName"]
    rules = {
        (group, resource): set(rule["verbs"])
        for rule in _one("Role")["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
    }
    assert {"create", "get", "list", "watch", "delete"} <= rules[("batch", "jobs")]
    assert {"get", "list", "watch"} <= rules[("", "pods")] and "get" in rules[("", "pods/log")]
    observed = {e["name"]: e.get("value") for e in container["env"]}
    assert observed["PREFECT_INTEGRATIONS_KUBERNETES_OBSERVER_NAMESPACES"] == NAMESPACE  # so a Role suffices


def test_base_job_template_keeps_prefect_kubernetes_defaults_shape():
    from prefect_kubernetes.worker import KubernetesWorker

    default = KubernetesWorker.get_default_base_job_template()
    ours = _template()
    assert set(ours["variables"]["properties"]) == set(default["variables"]["properties"])
    assert set(ours["job_configuration"]) == set(default["job_configuration"])
    # the same placeholders, but for the container's env: a list of references to the ConfigMap and the Secret
    # (the worker prepends Prefect's own variables to it)
    ours_manifest = json.dumps(ours["job_configuration"]["job_manifest"])
    for placeholder in {
        p for p in json.dumps(default["job_configuration"]["job_manifest"]).split('"') if p.startswith("{{")
    }:
        assert placeholder in ours_manifest or placeholder == "{{ env }}", placeholder


class _NoClient:
    """Stands in for the Prefect client when nothing needs the API; any call fails the test."""

    def __getattr__(self, name: str):
        raise AssertionError(f"rendering the template called the Prefect API ({name})")


@pytest.mark.anyio
async def test_base_job_template_renders_the_job_a_worker_submits():
    from prefect.client.schemas.objects import FlowRun
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    # Given the pool's template with a deployment's values (none) and a flow run. The template references no
    # block or Prefect variable, so rendering needs no API: a client that is never called stands in for it.
    configuration = await KubernetesWorkerJobConfiguration.from_template_and_values(_template(), {}, client=_NoClient())
    flow_run = FlowRun(id=uuid4(), name="anywhere", flow_id=uuid4())
    # when the worker prepares it for the run
    configuration.prepare_for_flow_run(flow_run)
    job = configuration.job_manifest
    # then it is the Job of our image, in our namespace, with its identity, resources and environment
    assert job["kind"] == "Job" and job["apiVersion"] == "batch/v1"
    assert job["metadata"]["namespace"] == NAMESPACE
    pod = job["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "mlops-flow-run" and pod["automountServiceAccountToken"] is False
    [container] = pod["containers"]
    assert container["image"] == _image()
    assert container["resources"] == {
        "limits": {"cpu": "2", "memory": "4Gi"},
        "requests": {"cpu": "1", "memory": "2Gi"},
    }
    assert container["args"] == ["prefect", "flow-run", "execute"]
    env = {e["name"]: e for e in container["env"]}
    assert env["PREFECT__FLOW_RUN_ID"]["value"] == str(flow_run.id)  # Prefect's own, prepended
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "mlops-credentials"
    assert env["MLOPS_DASK_ADDRESS"]["valueFrom"]["configMapKeyRef"]["name"] == "mlops-config"
