"""The model catalog: one dataset config per model, in S3 where every worker and serving process reads it.

`s3://<bucket>/catalog/<model>.yaml` is the current config of `<model>` (its registered model name). Every
version it replaced, and the last one of a removed model, is kept under
`s3://<bucket>/catalog/.versions/<model>/<UTC time>.yaml`. The training, monitoring and scoring
deployments of a model read its config from the catalog URI, so a changed config needs no redeploy.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from adapters.clients import S3Location, s3_client
from adapters.settings import Settings
from core.data.dataset import DatasetConfig, DatasetConfigError, parse_dataset_config
from core.errors import PermanentError

log = logging.getLogger(__name__)

PREFIX = "catalog/"
VERSIONS = "catalog/.versions/"


class CatalogError(ValueError):
    """A catalog operation was refused; the message names the model and the field or place."""


class ModelRemovedError(PermanentError):
    """A catalog model was removed while one of its runs was in flight."""


@dataclass(frozen=True)
class CatalogEntry:
    """One catalog model: its name, the URI its deployments read, its config and the config's text."""

    name: str
    uri: str
    config: DatasetConfig
    text: str


def entry_location(settings: Settings, model: str) -> S3Location:
    """Where a model's current config lives."""
    return S3Location(settings.bucket, f"{PREFIX}{model}.yaml")


def entry_uri(settings: Settings, model: str) -> str:
    """`s3://<bucket>/catalog/<model>.yaml`: the dataset reference a catalog model's deployments pass."""
    return entry_location(settings, model).uri


def _get_text(client: Any, location: S3Location) -> str | None:
    from botocore.exceptions import ClientError

    try:
        return client.get_object(Bucket=location.bucket, Key=location.key)["Body"].read().decode()
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in {"NoSuchKey", "404", "NotFound"}:
            return None
        raise


def get_entry(settings: Settings, model: str) -> CatalogEntry | None:
    """The catalog entry of `model`, None when it is not in the catalog."""
    location = entry_location(settings, model)
    text = _get_text(s3_client(settings), location)
    if text is None:
        return None
    return CatalogEntry(model, location.uri, parse_dataset_config(text, location.uri), text)


def list_entries(settings: Settings) -> list[CatalogEntry]:
    """Every catalog model, by name; an entry that no longer parses is logged and left out."""
    client = s3_client(settings)
    entries = []
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=settings.bucket, Prefix=PREFIX)
    keys = sorted(
        item["Key"]
        for page in pages
        for item in page.get("Contents", [])
        if item["Key"].endswith(".yaml") and "/" not in item["Key"].removeprefix(PREFIX)
    )
    for key in keys:
        location = S3Location(settings.bucket, key)
        text = _get_text(client, location)
        if text is None:  # removed between the listing and the read
            continue
        try:
            config = parse_dataset_config(text, location.uri)
        except DatasetConfigError as exc:
            log.error("catalog entry %s is left out: %s", location.uri, exc)
            continue
        entries.append(CatalogEntry(config.model_name, location.uri, config, text))
    return entries


def served_models(settings: Settings) -> list[str]:
    """Names of the catalog models whose config says they are served (`operations.served`)."""
    return [entry.name for entry in list_entries(settings) if entry.config.operations.served]


def _keep_version(client: Any, settings: Settings, model: str, text: str, suffix: str = "") -> str:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    location = S3Location(settings.bucket, f"{VERSIONS}{model}/{stamp}{suffix}.yaml")
    client.put_object(Bucket=location.bucket, Key=location.key, Body=text.encode(), ContentType="application/yaml")
    return location.uri


def taken(model: str, uri: str) -> CatalogError:
    """The error for a model name already in the catalog."""
    return CatalogError(
        f"model {model!r} (field model_name) is already in the catalog ({uri}): "
        "give the config another model_name, or `mlops models add --replace` to store a new version of it"
    )


def put_entry(settings: Settings, config: DatasetConfig, text: str, replace: bool = False) -> CatalogEntry:
    """Store `config` (its YAML `text`) as its model's catalog entry; the replaced version is kept.

    Raises:
        CatalogError: The model is in the catalog already and `replace` is not set.
    """
    client = s3_client(settings)
    location = entry_location(settings, config.model_name)
    current = _get_text(client, location)
    if current is not None and not replace:
        raise taken(config.model_name, location.uri)
    if current is not None:
        kept = _keep_version(client, settings, config.model_name, current)
        log.info("kept the replaced config of %s as %s", config.model_name, kept)
    client.put_object(Bucket=location.bucket, Key=location.key, Body=text.encode(), ContentType="application/yaml")
    return CatalogEntry(config.model_name, location.uri, config, text)


def versions(settings: Settings, model: str) -> list[str]:
    """URIs of the kept earlier configs of `model`, oldest first."""
    client = s3_client(settings)
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=settings.bucket, Prefix=f"{VERSIONS}{model}/")
    return sorted(f"s3://{settings.bucket}/{item['Key']}" for page in pages for item in page.get("Contents", []))


def delete_entry(settings: Settings, model: str) -> str:
    """Remove `model` from the catalog, keeping its last config under `.versions/`; returns where it was kept.

    Raises:
        CatalogError: The model is not in the catalog.
    """
    client = s3_client(settings)
    location = entry_location(settings, model)
    current = _get_text(client, location)
    if current is None:
        raise CatalogError(f"model {model!r} is not in the catalog (no {location.uri})")
    kept = _keep_version(client, settings, model, current, suffix="-removed")
    client.delete_object(Bucket=location.bucket, Key=location.key)
    return kept


def read_config_text(ref: str, settings: Settings) -> tuple[str, str]:
    """The YAML text of a config given as a bundled name, a local path or an s3:// URI, and its origin."""
    from pathlib import Path

    from core.data.dataset import BUNDLED_DATASETS, bundled_config_text

    if ref in BUNDLED_DATASETS:
        return bundled_config_text(ref), f"bundled dataset {ref!r}"
    if ref.startswith("s3://"):
        location = S3Location.parse(ref)
        text = _get_text(s3_client(settings), location)
        if text is None:
            raise CatalogError(f"dataset config {ref}: no such file")
        return text, ref
    path = Path(ref)
    if not path.is_file():
        raise CatalogError(
            f"dataset config {ref!r} not found: give a YAML file path, an s3:// URI or a bundled name "
            f"{list(BUNDLED_DATASETS)}"
        )
    return path.read_text(), str(path)
