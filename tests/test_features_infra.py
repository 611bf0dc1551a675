"""The feature store's Compose part (Redis online store) and its settings, checked structurally.

No Docker engine on the development machines: the Compose file is parsed, not started (as tests/test_infra.py).
"""

from __future__ import annotations

from pathlib import Path

import yaml

COMPOSE = Path(__file__).resolve().parent.parent / "infra" / "docker-compose.yml"


def _services() -> dict:
    return yaml.safe_load(COMPOSE.read_text())["services"]


def test_redis_online_store_is_healthy_on_loopback_with_a_password_and_a_named_volume():
    compose = yaml.safe_load(COMPOSE.read_text())
    redis = compose["services"]["redis"]
    assert redis["image"].startswith("redis:") and redis["image"].count(".") == 2  # an exact, pinned release
    assert "--requirepass" in redis["command"]
    assert "healthcheck" in redis and "ping" in " ".join(redis["healthcheck"]["test"])
    assert all(port.startswith("127.0.0.1:") for port in redis["ports"])
    assert all(v.split(":")[0] in compose["volumes"] for v in redis["volumes"])


def test_worker_and_serving_reach_redis_and_wait_for_it():
    services = _services()
    for name in ("worker", "serving"):
        env = services[name]["environment"]
        assert env["MLOPS_FEAST_REDIS"].startswith("redis:6379,password="), name
        assert services[name]["depends_on"]["redis"] == {"condition": "service_healthy"}, name
        assert env["AWS_ENDPOINT_URL_S3"] == "http://minio:9000", name  # the registry and history live on MinIO


def test_settings_build_a_redis_or_sqlite_store_and_never_show_the_secret(tmp_path, monkeypatch):
    from feast import RepoConfig

    from adapters import feature_store
    from adapters.settings import Settings

    monkeypatch.setenv("MLOPS_STATE_DIR", str(tmp_path))
    monkeypatch.setenv("MLOPS_FEAST_REDIS", "redis:6379,password=very-secret-pw")
    monkeypatch.setenv("MLOPS_FEAST_REGISTRY", "postgresql+psycopg://feast:db-secret-pw@postgres:5432/feast")
    settings = Settings()
    config = RepoConfig(
        project=settings.feast_project,
        provider="local",
        registry=feature_store._registry(settings),
        online_store=feature_store._online(settings),
        offline_store={"type": "file"},
    )
    assert type(config.online_store).__name__ == "RedisOnlineStoreConfig"
    assert config.registry.registry_type == "sql"
    shown = str(feature_store.describe_store(settings)) + repr(settings)
    assert "very-secret-pw" not in shown and "db-secret-pw" not in shown
    monkeypatch.delenv("MLOPS_FEAST_REDIS")
    monkeypatch.delenv("MLOPS_FEAST_REGISTRY")
    plain = Settings()
    assert feature_store._online(plain) == {"type": "sqlite", "path": str((tmp_path / "feast" / "online.db").resolve())}
    assert feature_store._registry(plain)["path"] == f"s3://{plain.bucket}/features/registry.db"
