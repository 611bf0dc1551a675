"""The S3 store: one place that lists, reads and writes objects (pyarrow's S3 file system pages for us).

Built from settings on each call; nothing is configured at import.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from adapters.clients import S3Location
from adapters.settings import Settings


class BucketNotFoundError(LookupError):
    """The bucket named in an s3:// location does not exist."""


class StoreUnreachableError(ConnectionError):
    """S3 did not answer (connection refused or timed out): transient, worth retrying."""


def s3_filesystem(settings: Settings) -> Any:
    """A pyarrow S3 filesystem for the configured endpoint and credentials (path-style addressing)."""
    from pyarrow import fs

    endpoint = urlsplit(settings.s3_endpoint_url)
    return fs.S3FileSystem(
        access_key=settings.aws_access_key_id,
        secret_key=settings.aws_secret_access_key.get_secret_value(),
        region=settings.aws_region,
        scheme=endpoint.scheme or "https",
        endpoint_override=endpoint.netloc or None,
        connect_timeout=5,
        request_timeout=60,
    )


def fs_path(location: S3Location | str) -> str:
    """`bucket/key`, the path pyarrow's S3 file system takes, from a location or an s3:// URI."""
    uri = location.uri if isinstance(location, S3Location) else location
    return uri.removeprefix("s3://")


def list_keys(
    settings: Settings,
    location: S3Location,
    suffixes: tuple[str, ...] = (),
    filesystem: Any = None,
    recursive: bool = True,
) -> list[str]:
    """Keys of the objects below a folder-like prefix, sorted; only those ending in `suffixes` if given.

    The key is taken as a folder (`a/b` and `a/b/` both list `a/b/...`, never `a/bc`); an empty key
    lists the whole bucket. `recursive=False` lists only the objects directly in the folder. Folder
    marker objects (keys ending in `/`) are not listed. A prefix with nothing below it gives an empty
    list.

    Raises:
        BucketNotFoundError: The bucket does not exist.
        StoreUnreachableError: S3 does not answer.
    """
    from pyarrow import fs

    filesystem = filesystem or s3_filesystem(settings)
    base = fs_path(S3Location(location.bucket, location.key.rstrip("/")))
    try:
        if filesystem.get_file_info(location.bucket).type == fs.FileType.NotFound:
            raise BucketNotFoundError(f"bucket {location.bucket!r} does not exist")
        infos = filesystem.get_file_info(fs.FileSelector(base, recursive=recursive, allow_not_found=True))
    except OSError as exc:
        # pyarrow reports every S3 failure as an OSError; the AWS SDK's category tells a network failure.
        if "NETWORK_CONNECTION" in str(exc):
            raise StoreUnreachableError(f"S3 at {settings.s3_endpoint_url} is unreachable: {exc}") from exc
        raise
    keys = [
        info.path.removeprefix(f"{location.bucket}/")
        for info in infos
        if info.type == fs.FileType.File and info.path.endswith(suffixes or ("",))
    ]
    return sorted(keys)
