"""A snapshot's files as a listing (name, ETag or stamp, size), read without reading the data.

The training flow compares this listing's version (`core.data.fingerprint.listing_version`) with the champion's
before it loads anything. S3 gives each object's ETag in the listing itself (the MD5 of its bytes for a
plain upload, so a file rewritten with the same bytes keeps it); a local file gives its size and
modification time (touching a file counts as a change: a needless run, never a wrong skip). The same files
as `adapters.snapshots.read_snapshot` reads: same suffixes, same folder rule.

A database query (format sql) cannot be listed without running it: its listing is one entry with a fresh stamp,
so every run of an SQL source counts as new data and trains (the run's data version, a hash of the result,
still says whether the rows were the same).
"""

from __future__ import annotations

import uuid
from pathlib import Path

from adapters.clients import S3Location, s3_client
from adapters.settings import Settings
from adapters.snapshots import SUFFIXES, DataLoadError, StoreUnavailableError

Entry = tuple[str, str, int]  # (name relative to the source, ETag or stamp, size in bytes)


def snapshot_listing(source: str, fmt: str, settings: Settings) -> list[Entry]:
    """The snapshot's files as listed by the store or the file system, without reading them.

    Raises:
        DataLoadError: No such file, bucket or folder, or no file of the format (names the place).
        StoreUnavailableError: S3 did not answer (retried by the caller's policy).
    """
    if fmt == "sql":
        return sql_listing()
    if not source.startswith("s3://"):
        return _local_listing(source, fmt)
    from botocore.exceptions import ConnectionError as BotoConnectionError

    try:
        return _s3_listing(source, fmt, settings)
    except BotoConnectionError as exc:
        raise StoreUnavailableError(
            f"S3 at {settings.s3_endpoint_url} is unreachable while listing {source}: {exc}. "
            "Check `mlops stack status` (or AWS_ENDPOINT_URL_S3)."
        ) from exc


def sql_listing() -> list[Entry]:
    """A query's listing: one entry whose stamp is new on every call, so the data part never matches a past run's."""
    return [("query", f"unlisted-{uuid.uuid4().hex}", 0)]


def _s3_listing(source: str, fmt: str, settings: Settings) -> list[Entry]:
    from botocore.exceptions import ClientError

    location = S3Location.parse(source)
    client = s3_client(settings)
    try:
        if source.endswith(SUFFIXES[fmt]):
            head = client.head_object(Bucket=location.bucket, Key=location.key)
            return [("", head["ETag"].strip('"'), int(head["ContentLength"]))]
        prefix = location.key.rstrip("/") + "/" if location.key.strip("/") else ""
        entries = [
            (f"s3://{location.bucket}/{item['Key']}".removeprefix(source), item["ETag"].strip('"'), int(item["Size"]))
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=location.bucket, Prefix=prefix)
            for item in page.get("Contents", [])
            if item["Key"].endswith(SUFFIXES[fmt])
        ]
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        if code == "NoSuchBucket":
            raise DataLoadError(f"{source}: bucket {location.bucket!r} does not exist") from exc
        if code in {"404", "NoSuchKey", "NotFound"}:
            raise DataLoadError(f"{source}: no such file") from exc
        raise
    if not entries:
        raise DataLoadError(f"{source}: no {fmt} files found (nothing under this prefix)")
    return entries


def _local_listing(source: str, fmt: str) -> list[Entry]:
    path = Path(source)
    if path.is_file():
        stat = path.stat()
        return [("", str(stat.st_mtime_ns), stat.st_size)]
    if not path.exists():
        raise DataLoadError(f"{source}: no such file or folder")
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(SUFFIXES[fmt]))
    if not files:
        raise DataLoadError(f"{source}: no {fmt} files found in this folder")
    return [(p.relative_to(path).as_posix(), str(p.stat().st_mtime_ns), p.stat().st_size) for p in files]
