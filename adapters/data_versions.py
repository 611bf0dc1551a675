"""Frozen data versions in S3 (blobs by content, a manifest per model and version) and who used them (MLflow).

The layout and the rules are `core.data.data_versions`; this module reads and writes the objects. Built from
settings on each call; nothing is configured at import.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from adapters.clients import map_s3_requests, mlflow_client, s3_client
from adapters.settings import Settings
from core.data.data_versions import (
    BLOB_PREFIX,
    ROOT,
    Manifest,
    TamperedDataError,
    UnknownDataVersionError,
    Usage,
    blob_key,
    manifest_key,
    model_prefix,
    verify_blob,
)

log = logging.getLogger(__name__)

MISSING = {"404", "NoSuchKey", "NotFound"}


class FreezeError(RuntimeError):
    """The snapshot could not be stored as a data version (S3 failed): retried, then the run fails with this."""


@dataclass(frozen=True)
class Frozen:
    """The outcome of freezing a snapshot: its manifest (the first use's, if stored before) and what was written."""

    manifest: Manifest
    new_blobs: int
    stored_blobs: int  # already there: identical content is stored once
    first_use: bool

    def describe(self) -> str:
        """One log line."""
        when = "first use" if self.first_use else f"first used {self.manifest.created_at}"
        return (
            f"froze data version {self.manifest.data_version} of {self.manifest.model_name} ({when}): "
            f"{self.new_blobs} new blob(s), {self.stored_blobs} already stored, {self.manifest.bytes} bytes"
        )


def _exists(client: Any, bucket: str, key: str) -> bool:
    from botocore.exceptions import ClientError

    try:
        client.head_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in MISSING:
            return False
        raise
    return True


def _read(client: Any, bucket: str, key: str) -> bytes | None:
    """An object's bytes, or None when absent."""
    from botocore.exceptions import ClientError

    try:
        return client.get_object(Bucket=bucket, Key=key)["Body"].read()
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in MISSING:
            return None
        raise


def freeze(settings: Settings, manifest: Manifest, objects: Sequence[tuple[str, bytes]]) -> Frozen:
    """Store a snapshot's bytes by content (only blobs not yet there) and its manifest (only if absent).

    `objects` are the snapshot's (name, bytes) in the manifest's order. After the manifest is written each blob
    is checked again and rewritten if it went missing meanwhile (a `mlops data prune` that listed the manifests
    before this one existed).

    Raises:
        FreezeError: S3 failed; names the version and the place.
    """
    from botocore.exceptions import BotoCoreError, ClientError

    client, bucket = s3_client(settings), settings.bucket
    where = f"s3://{bucket}/{manifest_key(manifest.model_name, manifest.data_version)}"
    try:
        blobs = [(blob_key(file.sha256), body) for file, (_, body) in zip(manifest.files, objects, strict=True)]
        new = _store_missing(client, bucket, blobs)
        kept, first_use = _manifest_once(client, bucket, manifest)
        _store_missing(client, bucket, blobs)
    except (BotoCoreError, ClientError) as exc:
        raise FreezeError(
            f"could not freeze data version {manifest.data_version} of {manifest.model_name} at {where} "
            f"(S3 at {settings.s3_endpoint_url}): {exc}"
        ) from exc
    frozen = Frozen(kept, new, len(manifest.files) - new, first_use)
    log.info("%s", frozen.describe())
    return frozen


def _store_missing(client: Any, bucket: str, blobs: list[tuple[str, bytes]]) -> int:
    """Write each (key, bytes) blob that is not in the bucket; how many were written.

    Side by side (`map_s3_requests`: a request or two per blob).
    """

    def store(blob: tuple[str, bytes]) -> bool:
        key, body = blob
        if _exists(client, bucket, key):
            return False
        client.put_object(Bucket=bucket, Key=key, Body=body)
        return True

    return sum(map_s3_requests(store, blobs))


def _manifest_once(client: Any, bucket: str, manifest: Manifest) -> tuple[Manifest, bool]:
    """Write the manifest at its first use only (never changed after); the stored one, and whether it is new."""
    key = manifest_key(manifest.model_name, manifest.data_version)
    stored = _read(client, bucket, key)
    if stored is not None:
        return Manifest.from_json(stored.decode()), False
    client.put_object(Bucket=bucket, Key=key, Body=manifest.to_json().encode(), ContentType="application/json")
    return manifest, True


def read_manifest(settings: Settings, model_name: str, data_version: str) -> Manifest | None:
    """A model's manifest of one data version, or None."""
    body = _read(s3_client(settings), settings.bucket, manifest_key(model_name, data_version))
    return Manifest.from_json(body.decode()) if body is not None else None


def _keys(settings: Settings, prefix: str) -> list[tuple[str, int]]:
    client = s3_client(settings)
    found: list[tuple[str, int]] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=settings.bucket, Prefix=prefix):
        found += [(item["Key"], int(item["Size"])) for item in page.get("Contents", [])]
    return found


def list_manifests(settings: Settings, model_name: str) -> list[Manifest]:
    """Every frozen version of a model, oldest first use first."""
    client = s3_client(settings)
    manifests = []
    for key, _ in _keys(settings, model_prefix(model_name)):
        if key.endswith(".json") and "/" not in key.removeprefix(model_prefix(model_name)):
            body = client.get_object(Bucket=settings.bucket, Key=key)["Body"].read()
            manifests.append(Manifest.from_json(body.decode()))
    return sorted(manifests, key=lambda m: m.created_at)


def other_models_blobs(settings: Settings, model_name: str) -> set[str]:
    """The blobs the manifests of every other model name (blobs are shared across models)."""
    client = s3_client(settings)
    names: set[str] = set()
    for key, _ in _keys(settings, f"{ROOT}/"):
        if key.startswith(BLOB_PREFIX) or key.startswith(model_prefix(model_name)) or not key.endswith(".json"):
            continue
        body = json.loads(client.get_object(Bucket=settings.bucket, Key=key)["Body"].read())
        names |= {f["sha256"] for f in body.get("files", [])}
    return names


def blob_sizes(settings: Settings) -> dict[str, int]:
    """Every stored blob: SHA-256 hex -> size in bytes."""
    return {key.removeprefix(BLOB_PREFIX): size for key, size in _keys(settings, BLOB_PREFIX)}


def read_frozen(settings: Settings, model_name: str, data_version: str) -> tuple[Manifest, list[tuple[str, bytes]]]:
    """A frozen version's manifest and its files' (path, bytes), each blob's SHA-256 checked on read.

    Raises:
        UnknownDataVersionError: The model has no such frozen version (lists those it has).
        TamperedDataError: A blob is missing or its bytes no longer hash to its name (names it).
    """
    manifest = read_manifest(settings, model_name, data_version)
    if manifest is None:
        known = [m.data_version for m in list_manifests(settings, model_name)]
        raise UnknownDataVersionError(model_name, data_version, known)
    manifest.check_version()
    client = s3_client(settings)
    objects = []
    for file in manifest.files:
        body = _read(client, settings.bucket, blob_key(file.sha256))
        if body is None:
            raise TamperedDataError(
                f"data version {data_version} of {model_name}: blob {blob_key(file.sha256)} "
                f"(file {file.path or file.name!r}) is missing from s3://{settings.bucket}"
            )
        verify_blob(data_version, file, body)
        objects.append((file.path, body))
    log.info(
        "read frozen data version %s of %s: %d file(s), %d bytes",
        data_version,
        model_name,
        len(objects),
        manifest.bytes,
    )
    return manifest, objects


def delete_manifest(settings: Settings, model_name: str, data_version: str) -> None:
    """Remove a model's manifest of one version (its blobs are removed separately, when no manifest names them)."""
    s3_client(settings).delete_object(Bucket=settings.bucket, Key=manifest_key(model_name, data_version))


def delete_blob(settings: Settings, sha256: str) -> None:
    """Remove one blob."""
    s3_client(settings).delete_object(Bucket=settings.bucket, Key=blob_key(sha256))


def runs_by_data_version(settings: Settings, experiment: str) -> list[tuple[str, str]]:
    """The experiment's runs that carry a data version, newest first: (run id, data version)."""
    client = mlflow_client(settings)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    runs: list[tuple[str, str]] = []
    token = None
    while True:
        page = client.search_runs(
            [found.experiment_id],
            filter_string="tags.data_version != ''",
            order_by=["attributes.start_time DESC"],
            max_results=1000,
            page_token=token,
        )
        runs += [(run.info.run_id, run.data.tags["data_version"]) for run in page if run.data.tags.get("data_version")]
        token = page.token
        if not token:
            return runs


def registered_by_data_version(settings: Settings, model_name: str) -> dict[str, list[str]]:
    """Data version -> the model's registered versions trained on it (from their `data_version` tags)."""
    used: dict[str, list[str]] = {}
    for version in mlflow_client(settings).search_model_versions(f"name='{model_name}'"):
        if version.tags.get("data_version"):
            used.setdefault(version.tags["data_version"], []).append(str(version.version))
    return used


def usage(settings: Settings, model_name: str, experiment: str) -> dict[str, Usage]:
    """Data version -> the runs (newest first) and registered versions that used it."""
    runs: dict[str, list[str]] = {}
    for run_id, version in runs_by_data_version(settings, experiment):
        runs.setdefault(version, []).append(run_id)
    registered = registered_by_data_version(settings, model_name)
    return {
        version: Usage(tuple(runs.get(version, ())), tuple(registered.get(version, ())))
        for version in set(runs) | set(registered)
    }


@dataclass(frozen=True)
class RecordedRun:
    """What a registered version was trained from, as its run recorded it."""

    model_name: str
    version: str
    run_id: str
    data_version: str
    config_yaml: str
    params: dict[str, Any]
    metrics: dict[str, float]
    tags: dict[str, str]


def recorded_run(settings: Settings, model_name: str, version: str) -> RecordedRun:
    """A registered version's run: its data version, dataset config and parameters as stored, its metrics.

    Raises:
        LookupError: No such version, or its run predates stored configs (nothing to reproduce from).
    """
    from mlflow.exceptions import MlflowException

    client = mlflow_client(settings)
    try:
        tags = client.get_model_version(model_name, version).tags
    except MlflowException as exc:
        raise LookupError(f"{model_name} v{version}: no such registered version") from exc
    run_id, data_version = tags.get("run_id"), tags.get("data_version")
    if not run_id or not data_version:
        raise LookupError(f"{model_name} v{version} records no run_id or data_version tag: nothing to reproduce from")
    run = client.get_run(run_id)
    try:
        config_yaml = _run_text(settings, run_id, "dataset/config.yaml")
        params = json.loads(_run_text(settings, run_id, "dataset/params.json"))
    except (MlflowException, OSError) as exc:
        raise LookupError(
            f"{model_name} v{version}'s run {run_id} stored no dataset config and parameters "
            "(trained before runs recorded them): it cannot be reproduced exactly"
        ) from exc
    metrics = {key: float(value) for key, value in run.data.metrics.items()}
    return RecordedRun(model_name, version, run_id, data_version, config_yaml, params, metrics, dict(run.data.tags))


def _run_text(settings: Settings, run_id: str, path: str) -> str:
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as folder:
        local = mlflow_client(settings).download_artifacts(run_id, path, folder)
        return Path(local).read_text()


def run_record(settings: Settings, run_id: str) -> tuple[dict[str, float], dict[str, str]]:
    """A run's metrics and tags."""
    run = mlflow_client(settings).get_run(run_id)
    return {key: float(value) for key, value in run.data.metrics.items()}, dict(run.data.tags)


CHUNK_BYTES = 8 * 2**20


def _hash_s3(client: Any, uri: str) -> tuple[str, int, str]:
    """(SHA-256 hex, size, ETag) of an S3 object, read once in chunks (never held whole)."""
    import hashlib

    bucket, _, key = uri.removeprefix("s3://").partition("/")
    response = client.get_object(Bucket=bucket, Key=key)
    digest, size = hashlib.sha256(), 0
    for chunk in response["Body"].iter_chunks(CHUNK_BYTES):
        digest.update(chunk)
        size += len(chunk)
    return digest.hexdigest(), size, response["ETag"]


def _hash_local(path: str) -> tuple[str, int]:
    import hashlib

    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def _store_blob(client: Any, settings: Settings, uri: str, sha: str, etag: str | None) -> bool:
    """Put a file's bytes at its blob key when absent (S3: a server-side copy; local: an upload). True if new.

    A server-side copy is checked against what was hashed: the copy's ETag must be the one read (else the blob is
    read back and hashed); a source rewritten in between fails the freeze and leaves no wrong blob.
    """
    bucket, key = settings.bucket, blob_key(sha)
    if _exists(client, bucket, key):
        return False
    if not uri.startswith("s3://"):
        client.upload_file(uri, bucket, key)
        return True
    source_bucket, _, source_key = uri.removeprefix("s3://").partition("/")
    copied = client.copy_object(Bucket=bucket, Key=key, CopySource={"Bucket": source_bucket, "Key": source_key})
    if copied.get("CopyObjectResult", {}).get("ETag") != etag and _hash_s3(client, f"s3://{bucket}/{key}")[0] != sha:
        client.delete_object(Bucket=bucket, Key=key)
        raise FreezeError(f"{uri} changed while it was being frozen; run again")
    return True


def freeze_files(  # noqa: PLR0913 - the snapshot's facts, each named
    settings: Settings,
    model_name: str,
    source: str,
    fmt: str,
    uris: Sequence[str],
    rows: int,
    columns: Sequence[str],
    first_run_id: str | None,
    experiment: str = "",
) -> Frozen:
    """Freeze a big snapshot's files without holding them: each is read once in chunks to hash it, then copied.

    The data version is computed as for a snapshot read in memory (`core.data.data_versions.version_of`), so a
    frozen big snapshot is read back, verified and reproduced like any other.

    Raises:
        FreezeError: S3 failed, or a file changed while it was frozen; names the place.
    """
    from datetime import UTC, datetime

    from botocore.exceptions import BotoCoreError, ClientError

    from core.data.data_versions import FrozenFile, manifest_of_files, relative_name

    client, new = s3_client(settings), 0
    try:
        files, etags = [], {}
        for uri in uris:
            if uri.startswith("s3://"):
                sha, size, etags[uri] = _hash_s3(client, uri)
            else:
                (sha, size), etags[uri] = _hash_local(uri), None
            files.append(FrozenFile(relative_name(uri, source), uri, sha, size))
        manifest = manifest_of_files(
            model_name, source, fmt, files, rows, columns, datetime.now(UTC), first_run_id, experiment
        )
        new = sum(_store_blob(client, settings, f.path, f.sha256, etags[f.path]) for f in manifest.files)
        kept, first_use = _manifest_once(client, settings.bucket, manifest)
    except (BotoCoreError, ClientError, OSError) as exc:
        raise FreezeError(
            f"could not freeze {source} for {model_name} (S3 at {settings.s3_endpoint_url}): {exc}"
        ) from exc
    frozen = Frozen(kept, new, len(manifest.files) - new, first_use)
    log.info("%s", frozen.describe())
    return frozen


def frozen_files(settings: Settings, model_name: str, data_version: str) -> tuple[Manifest, list[str]]:
    """A frozen version's manifest and its blobs' s3:// URIs, for the Dask engine to read in place.

    Each blob's SHA-256 is checked as it streams through this process (never held whole).

    Raises:
        UnknownDataVersionError: The model has no such frozen version (lists those it has).
        TamperedDataError: A blob is missing or altered (names it).
    """
    from botocore.exceptions import ClientError

    manifest = read_manifest(settings, model_name, data_version)
    if manifest is None:
        known = [m.data_version for m in list_manifests(settings, model_name)]
        raise UnknownDataVersionError(model_name, data_version, known)
    manifest.check_version()
    client, uris = s3_client(settings), []
    for file in manifest.files:
        uri = f"s3://{settings.bucket}/{blob_key(file.sha256)}"
        try:
            actual = _hash_s3(client, uri)[0]
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in MISSING:
                raise
            actual = "missing"
        if actual != file.sha256:
            raise TamperedDataError(
                f"data version {data_version} of {model_name}: blob {uri} (file {file.path or file.name!r}) is "
                + ("missing" if actual == "missing" else f"altered: its bytes hash to {actual}")
            )
        uris.append(uri)
    return manifest, uris
