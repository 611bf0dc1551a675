"""The Feast feature store, built from settings: registry on S3 (or SQL), offline Parquet on S3, online SQLite or Redis.

The store config is made here from the stack's settings (a repository's own `feature_store.yaml`, if any,
is not read), so the CLI, the flows and the serving API all reach the same store. Feast's S3 clients (the
registry's boto3, the file offline store's pyarrow/s3fs) read the endpoint and credentials from the
environment only, so `feature_store` exports them (`FEAST_S3_ENDPOINT_URL`, `AWS_*`) into this process
before building it.

Definitions come from a Feast repository the user owns: a folder in Feast's usual layout (Python files of
entities, data sources, feature views and services; the bundled one is `examples/feature_repo/`).
`apply_repository` parses it with Feast's own `parse_repo` and registers its objects; everything else
(training's point-in-time join, materialization, serving's online lookup) reads the registry by feature
service name and never imports the repository's code.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import logging
import os
import sys
import threading
import traceback
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pandas as pd

from adapters.clients import S3Location, put_bytes
from adapters.settings import Settings
from core.data.feature_history import ENTITY_TIMESTAMP, Materialized, history_features
from core.data.feature_repo import ENTITY_KEY, EXAMPLE_REPO, HISTORY_TABLE
from core.errors import PermanentError

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parent.parent  # the checkout: `examples/` lives here
# Parsing imports the repository's files by module name from its folder (Feast's way): one at a time.
_PARSE_LOCK = threading.Lock()
# Join keys per (project, feature service), read with the service (serving keeps the service object).
_JOIN_KEYS: dict[tuple[str, str], list[str]] = {}


class FeatureRepoError(PermanentError, ValueError):
    """A feature repository that cannot be applied (never retried): names the folder (and file) and the problem."""


def history_uri(settings: Settings) -> str:
    """Where the offline history table lives (the bucket's `features/` prefix)."""
    return f"s3://{settings.bucket}/{HISTORY_TABLE}"


def _registry(settings: Settings) -> dict[str, Any]:
    if settings.feast_registry is None:
        return {"path": f"s3://{settings.bucket}/features/registry.db", "cache_ttl_seconds": 60}
    url = settings.feast_registry.get_secret_value()
    if url.startswith("s3://"):
        return {"path": url, "cache_ttl_seconds": 60}
    return {"registry_type": "sql", "path": url, "cache_ttl_seconds": 60}


def _online(settings: Settings) -> dict[str, Any]:
    if settings.feast_redis is not None:
        return {"type": "redis", "connection_string": settings.feast_redis.get_secret_value()}
    settings.feast_online_path.parent.mkdir(parents=True, exist_ok=True)
    return {"type": "sqlite", "path": str(settings.feast_online_path.resolve())}


def describe_store(settings: Settings) -> dict[str, str]:
    """Where the store's parts live, for the CLI (no secret: SQL and Redis strings are named, not shown)."""
    registry = settings.feast_registry
    shown_registry = (
        registry.get_secret_value()
        if registry is not None and registry.get_secret_value().startswith("s3://")
        else ("SQL (MLOPS_FEAST_REGISTRY)" if registry is not None else _registry(settings)["path"])
    )
    online = "Redis (MLOPS_FEAST_REDIS)" if settings.feast_redis else f"SQLite {settings.feast_online_path}"
    return {
        "project": settings.feast_project,
        "registry": shown_registry,
        "offline": history_uri(settings),
        "online": online,
    }


def _export_environment(settings: Settings) -> None:
    """Put the S3 endpoint and credentials where Feast (and a repository's files) read them: the environment."""
    os.environ["FEAST_S3_ENDPOINT_URL"] = settings.s3_endpoint_url
    os.environ["AWS_ENDPOINT_URL_S3"] = settings.s3_endpoint_url
    os.environ["AWS_ACCESS_KEY_ID"] = settings.aws_access_key_id
    os.environ["AWS_SECRET_ACCESS_KEY"] = settings.aws_secret_access_key.get_secret_value()
    os.environ["AWS_DEFAULT_REGION"] = settings.aws_region
    os.environ["MLOPS_BUCKET"] = settings.bucket


def feature_store(settings: Settings) -> Any:
    """A Feast `FeatureStore` for the stack (definitions are registered by `apply_repository`)."""
    from feast import FeatureStore, RepoConfig

    # Feast reads these from the environment only (registry: boto3; offline files: pyarrow/s3fs).
    _export_environment(settings)
    config = RepoConfig(
        project=settings.feast_project,
        provider="local",
        registry=_registry(settings),
        online_store=_online(settings),
        offline_store={"type": "file"},
        entity_key_serialization_version=3,
    )
    return FeatureStore(config=config)


def write_history(settings: Settings, events: pd.DataFrame) -> tuple[str, int]:
    """Turn raw events into the history feature table and write it as the offline source; (URI, rows)."""
    table = history_features(events, ENTITY_KEY)
    buffer = io.BytesIO()
    table.to_parquet(buffer, index=False)
    uri = put_bytes(settings, S3Location.parse(history_uri(settings)), buffer.getvalue(), "application/x-parquet")
    log.info("wrote %s history feature rows (%s events) to %s", len(table), len(events), uri)
    return uri, len(table)


def resolve_repository(feature_repo: str | Path, config_ref: str | None = None) -> Path:
    """The folder a dataset config's `feature_repo` (or `--repo`) names, or a FeatureRepoError saying where it looked.

    An absolute path is taken as it is. A relative one is resolved against the config file's folder when
    `config_ref` is a local YAML file, and against the current directory otherwise (a bundled config, an
    s3:// config, the CLI's `--repo`); when it is not there, against the project's checkout (where the
    bundled `examples/feature_repo` lives), so the bundled config works from any directory.

    Args:
        feature_repo: The folder as written in the config or on the command line.
        config_ref: The dataset config's reference (bundled name, local path or s3:// URI), if any.

    Returns:
        The repository folder (absolute).

    Raises:
        FeatureRepoError: No such folder in any of the places tried, each named.
    """
    path = Path(feature_repo).expanduser()
    if path.is_absolute():
        candidates = [path]
    else:
        local_config = config_ref is not None and not config_ref.startswith("s3://") and Path(config_ref).is_file()
        base = Path(config_ref).resolve().parent if local_config else Path.cwd()
        candidates = [base / path, PROJECT_ROOT / path]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate.resolve()
    tried = ", ".join(dict.fromkeys(str(c) for c in candidates))
    raise FeatureRepoError(f"feature repository {str(feature_repo)!r} not found (looked for the folder {tried})")


def default_repository() -> Path:
    """The bundled example repository (`examples/feature_repo`), as `resolve_repository` finds it."""
    return resolve_repository(EXAMPLE_REPO)


@contextlib.contextmanager
def _importable_from(root: Path, files: list[Path]) -> Iterator[None]:
    """Make the repository's files importable by Feast's module names for them, then forget them again.

    Feast's `parse_repo` imports each file by its path relative to the current directory, so the current
    directory is the repository while it runs (as in `feast apply`). Modules of the same name imported
    before (another repository's, or this one before an edit) are set aside and put back afterwards.
    """
    from feast.repo_operations import py_path_to_module

    previous_cwd, previous_bytecode = os.getcwd(), sys.dont_write_bytecode
    os.chdir(root)
    try:
        names = {py_path_to_module(f) for f in files}
        names |= {".".join(n.split(".")[:i]) for n in names for i in range(1, n.count(".") + 1)}  # their packages
        set_aside = {n: sys.modules.pop(n) for n in names if n in sys.modules}
        sys.path.insert(0, str(root))
        sys.dont_write_bytecode = True  # no __pycache__ in the user's folder
        importlib.invalidate_caches()
        try:
            yield
        finally:
            sys.path.remove(str(root))
            for name in names:
                sys.modules.pop(name, None)
            sys.modules.update(set_aside)
    finally:
        sys.dont_write_bytecode = previous_bytecode
        os.chdir(previous_cwd)


def _failing_file(exc: BaseException, files: list[Path], root: Path) -> str:
    """Which repository file an import error comes from (relative to the folder), from the traceback."""
    if isinstance(exc, SyntaxError) and exc.filename:
        with contextlib.suppress(ValueError):
            return f"{Path(exc.filename).resolve().relative_to(root)}, line {exc.lineno}"
    known = {str(f) for f in files}
    inside = [
        (frame.filename, frame.lineno)
        for frame in traceback.extract_tb(exc.__traceback__)
        if str(Path(frame.filename).resolve()) in known
    ]
    if not inside:
        return "(while importing)"
    filename, line = inside[-1]
    return f"{Path(filename).resolve().relative_to(root)}, line {line}"


def parse_repository(repo: Path, project: str | None = None) -> Any:
    """Feast's parse of a repository folder (`feast.repo_operations.parse_repo`): its `RepoContents`.

    Args:
        repo: The repository folder.
        project: The stack's Feast project; a `Project` the repository defines must have this name.

    Returns:
        The parsed `RepoContents` (Feast appends its internal dummy entity to `entities`).

    Raises:
        FeatureRepoError: No such folder, no Python file, a file failing to import (named, with its line and
            the error), no Feast definition in any file, or a project other than the stack's.
    """
    from feast.repo_operations import get_repo_files, parse_repo

    folder = Path(repo)
    if not folder.is_dir():
        raise FeatureRepoError(f"feature repository {folder}: no such folder")
    root = folder.resolve()
    files = get_repo_files(root)
    if not files:
        raise FeatureRepoError(f"feature repository {folder}: no Python files (Feast definitions live in *.py files)")
    with _PARSE_LOCK, _importable_from(root, files):
        try:
            contents = parse_repo(root)
        except Exception as exc:
            where = _failing_file(exc, files, root)
            raise FeatureRepoError(f"feature repository {folder}: {where}: {type(exc).__name__}: {exc}") from exc
    if not _objects(contents):
        names = ", ".join(str(f.relative_to(root)) for f in files)
        raise FeatureRepoError(
            f"feature repository {folder}: no Feast definitions (entities, data sources, feature views, feature "
            f"services at module level) in {names}"
        )
    other = [p.name for p in contents.projects if project is not None and p.name != project]
    if other:
        raise FeatureRepoError(
            f"feature repository {folder}: defines project {other[0]!r}, but the stack's Feast project is "
            f"{project!r} (MLOPS_FEAST_PROJECT); remove the Project or rename it"
        )
    return contents


def _objects(contents: Any) -> list[Any]:
    """The repository's objects to register, in Feast's dependency order (sources and entities first)."""
    from feast.feature_view import DUMMY_ENTITY_NAME

    return [
        *contents.data_sources,
        *[e for e in contents.entities if e.name != DUMMY_ENTITY_NAME],
        *contents.feature_views,
        *contents.on_demand_feature_views,
        *contents.stream_feature_views,
        *getattr(contents, "label_views", []),
        *contents.feature_services,
        *contents.permissions,
    ]


def apply_repository(settings: Settings, repo: Path | str | None = None) -> list[str]:
    """Parse a Feast repository folder and register its objects in the stack's registry; returns their names.

    Idempotent. Adds and updates objects; never deletes what other repositories registered (each model's
    repository shares the stack's registry). The S3 endpoint, credentials and `MLOPS_BUCKET` are in the
    environment while the repository's files are imported.

    Args:
        settings: The stack's settings (registry, online store, S3).
        repo: The repository folder; default the bundled example (`examples/feature_repo`).

    Returns:
        Names of the applied entities, data sources, feature views and feature services.

    Raises:
        FeatureRepoError: The folder, or a file in it, cannot be applied (see `parse_repository`), or Feast
            refused its objects (the folder is named with Feast's message).
    """
    folder = Path(repo) if repo is not None else default_repository()
    _export_environment(settings)  # before the files are imported: they may read the environment
    objects = _objects(parse_repository(folder, settings.feast_project))
    store = feature_store(settings)
    try:
        store.apply(objects)
    except Exception as exc:
        raise FeatureRepoError(f"feature repository {folder}: Feast refused it: {type(exc).__name__}: {exc}") from exc
    names = [getattr(o, "name", str(o)) for o in objects]
    log.info("applied feature repository %s: %s", folder, ", ".join(names))
    return names


def has_service(settings: Settings, name: str) -> bool:
    """Whether the stack's registry holds the feature service `name` (read afresh, not from a cache)."""
    from feast.errors import FeatureServiceNotFoundException

    try:
        feature_store(settings).get_feature_service(name, allow_cache=False)
    except FeatureServiceNotFoundException:
        return False
    return True


def materialize(settings: Settings, end: datetime | None = None) -> Materialized:
    """Load every registered online view's newest values up to `end` (default now) into the online store.

    Reads the registry only (no repository code). Each view is loaded over its own TTL window (views without
    a TTL from the epoch); `start` is the earliest window's.
    """
    store = feature_store(settings)
    end = end or datetime.now(UTC)
    online = [view for view in store.list_feature_views() if view.online]
    if online:  # this machine's online store gets the views' tables (a worker elsewhere has a store of its own)
        store.apply([*store.list_entities(), *online], partial=True)
    by_ttl: dict[timedelta | None, list[str]] = {}
    for view in online:
        by_ttl.setdefault(view.ttl or None, []).append(view.name)
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    starts = []
    for ttl, views in by_ttl.items():
        start = end - ttl if ttl is not None else epoch
        store.materialize(start_date=start, end_date=end, feature_views=views)
        starts.append(start)
    return Materialized(sorted(v for views in by_ttl.values() for v in views), min(starts, default=end), end)


def list_repository(settings: Settings) -> dict[str, list[str]]:
    """Names of the registered entities, feature views (with their features) and services."""
    store = feature_store(settings)
    return {
        "entities": sorted(e.name for e in store.list_entities()),
        "feature_views": sorted(
            f"{v.name}: {', '.join(f.name for f in v.features)}" for v in store.list_feature_views()
        ),
        "feature_services": sorted(s.name for s in store.list_feature_services()),
    }


def _get_service(store: Any, service: str) -> Any:
    """A feature service from the registry, or a KeyError naming the ones it holds."""
    from feast.errors import FeatureServiceNotFoundException

    try:
        return store.get_feature_service(service)
    except FeatureServiceNotFoundException as exc:
        known = sorted(s.name for s in store.list_feature_services())
        raise KeyError(
            f"unknown feature service {service!r} in the registry (project {store.project!r}); known: {known}; "
            "apply the repository defining it (`mlops features apply --repo PATH`)"
        ) from exc


def join_keys(store: Any, found: Any) -> list[str]:
    """The entity join keys of a feature service's views, as its entity rows must name them (from the registry)."""
    from feast.errors import FeatureViewNotFoundException
    from feast.feature_view import DUMMY_ENTITY_ID, DUMMY_ENTITY_NAME

    keys: list[str] = []
    for projection in found.feature_view_projections:
        try:
            view = store.get_feature_view(projection.name)
        except FeatureViewNotFoundException:  # an on-demand view: its inputs' keys come from the other views
            continue
        names = [c.name for c in view.entity_columns] or [
            store.get_entity(e).join_key for e in view.entities if e != DUMMY_ENTITY_NAME
        ]
        keys += [projection.join_key_map.get(k, k) for k in names if k != DUMMY_ENTITY_ID]
    keys = list(dict.fromkeys(keys))
    _JOIN_KEYS[(store.project, found.name)] = keys
    return keys


def service_sources(settings: Settings, service: str) -> list[str]:
    """Where a registered feature service's offline data lives: its views' file source paths (from the registry).

    What a run's data fingerprint should list for the service (a rewritten table is new training data).
    """
    from feast.errors import FeatureViewNotFoundException

    store = feature_store(settings)
    paths = []
    for projection in _get_service(store, service).feature_view_projections:
        with contextlib.suppress(FeatureViewNotFoundException):  # an on-demand view: no batch source of its own
            source = store.get_feature_view(projection.name).batch_source
            if getattr(source, "path", None):
                paths.append(source.path)
    return list(dict.fromkeys(paths))


def service_features(store: Any, service: str) -> tuple[Any, list[str]]:
    """A service from the registry and the feature columns it returns (plain names, as in training frames)."""
    found = _get_service(store, service)
    join_keys(store, found)  # kept for `online_features`
    return found, [f.name for projection in found.feature_view_projections for f in projection.features]


def _entity_key(store: Any, found: Any, id_column: str | None) -> str:
    """The one join key a service's entity rows carry; `id_column` is used for it when given."""
    keys = join_keys(store, found)
    if len(keys) != 1:
        column = f"id column {id_column!r}" if id_column else "id column"
        raise ValueError(
            f"feature service {found.name!r} joins on {keys or 'no entity'}: the dataset's {column} stands for "
            "exactly one join key"
        )
    return keys[0]


def historical_features(
    settings: Settings, entity_rows: pd.DataFrame, service: str, id_column: str | None = None
) -> pd.DataFrame:
    """Point-in-time join of `entity_rows` (entity id and `event_timestamp`) with a registered feature service.

    The service, its views and their entity come from the registry only. Returns what Feast returned, as it
    returned it (rows it dropped are absent): the caller counts.

    Args:
        settings: The stack's settings.
        entity_rows: One row per training row: the entity id and `event_timestamp` (UTC).
        service: The feature service's name.
        id_column: The column of `entity_rows` holding the entity's join key (default: the join key's own
            name); the result names it the same way.

    Returns:
        Feast's joined frame: the id column, `event_timestamp` and the service's features.
    """
    store = feature_store(settings)
    found = _get_service(store, service)
    key = _entity_key(store, found, id_column)
    column = id_column or key
    rows = entity_rows[[column, ENTITY_TIMESTAMP]].rename(columns={column: key})
    job = store.get_historical_features(entity_df=rows, features=found)
    joined = job.to_df().rename(columns={key: column})
    joined[ENTITY_TIMESTAMP] = pd.to_datetime(joined[ENTITY_TIMESTAMP], utc=True)
    return joined


def online_features(store: Any, service: Any, ids: list[str]) -> dict[str, list[Any]]:
    """Newest feature values of entities `ids` from the online store (None where it has none).

    `service`: a service name, or the `FeatureService` object itself (reading it from the registry costs
    ~20 ms, far more than the lookup: the serving API keeps it). The entity's join key comes from the
    registry with the service (`service_features` keeps it).
    """
    found = _get_service(store, service) if isinstance(service, str) else service
    keys = _JOIN_KEYS.get((store.project, found.name)) or join_keys(store, found)
    if len(keys) != 1:
        raise ValueError(f"feature service {found.name!r} joins on {keys}: an id looks up exactly one join key")
    response = store.get_online_features(features=found, entity_rows=[{keys[0]: i} for i in ids])
    return response.to_dict()
