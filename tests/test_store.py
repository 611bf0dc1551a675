"""`adapters.store.list_keys` on the real S3 (SeaweedFS), against boto3's own listing of the same prefix."""

from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from adapters.clients import S3Location, s3_client
from adapters.settings import Settings
from adapters.store import BucketNotFoundError, StoreUnreachableError, list_keys
from tests.ports import free_port

pytestmark = [pytest.mark.integration]

# Keys below one folder: nested folders, a folder marker, an empty object, a sibling that shares the
# folder's first letters, names with spaces and non-ASCII letters.
KEYS = [
    "data/x.parquet",
    "data/empty.parquet",
    "data/b/y.csv",
    "data/b/c/z.parquet",
    "data/part-1/inside.parquet",
    "data/sp ace/é ü.csv",
    "data/marker/",
    "data-sibling/q.parquet",
    "top.json",
]
PAGED = 1100  # more than one page of ListObjectsV2 (1000 keys)


def _boto_keys(settings: Settings, bucket: str, prefix: str, delimiter: bool = False) -> list[str]:
    """The independent reference: boto3's paginated ListObjectsV2 of the same prefix."""
    extra = {"Delimiter": "/"} if delimiter else {}
    pages = s3_client(settings).get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix, **extra)
    return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))


def _files(keys: list[str]) -> list[str]:
    """Keys that are objects, not folder markers."""
    return [key for key in keys if not key.endswith("/")]


@pytest.fixture(scope="module")
def bucket(stack):
    """A fresh bucket of its own (so listing all of it races no other writer), removed afterwards."""
    name = f"store-test-{uuid.uuid4().hex[:8]}"
    client = s3_client(stack)
    client.create_bucket(Bucket=name)
    keys = KEYS + [f"paged/k{i:05d}.json" for i in range(PAGED)]

    def put(key: str) -> None:
        client.put_object(Bucket=name, Key=key, Body=b"" if key.endswith("/") or "empty" in key else b"data")

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(put, keys))
    yield name
    every = _boto_keys(stack, name, "")
    for start in range(0, len(every), 1000):
        batch = [{"Key": key} for key in every[start : start + 1000]]
        client.delete_objects(Bucket=name, Delete={"Objects": batch, "Quiet": True})
    client.delete_bucket(Bucket=name)


@pytest.mark.parametrize("key", ["data", "data/", "data/b", "data/b/c/", "paged/"])
def test_a_folder_lists_what_boto3_lists_below_it(stack, bucket, key):
    reference = _boto_keys(stack, bucket, key.rstrip("/") + "/")
    assert reference  # the case is not vacuous
    assert list_keys(stack, S3Location(bucket, key)) == _files(reference)


def test_only_the_folder_marker_is_left_out(stack, bucket):
    listed = list_keys(stack, S3Location(bucket, "data/"))
    assert sorted(set(_boto_keys(stack, bucket, "data/")) - set(listed)) == ["data/marker/"]
    assert "data/empty.parquet" in listed  # an empty object is a file, not a folder


def test_more_than_one_page(stack, bucket):
    assert len(list_keys(stack, S3Location(bucket, "paged"))) == PAGED


def test_an_empty_key_lists_the_whole_bucket(stack, bucket):
    reference = _boto_keys(stack, bucket, "")
    assert len(reference) == len(KEYS) + PAGED
    assert list_keys(stack, S3Location(bucket, "")) == _files(reference)


def test_suffixes_filter_as_a_filter_of_boto3s_listing(stack, bucket):
    suffixes = (".parquet", ".pq")
    reference = [key for key in _boto_keys(stack, bucket, "data/") if key.endswith(suffixes)]
    assert list_keys(stack, S3Location(bucket, "data"), suffixes) == reference
    assert list_keys(stack, S3Location(bucket, ""), (".json",)) == [
        key for key in _boto_keys(stack, bucket, "") if key.endswith(".json")
    ]


def test_not_recursive_lists_what_a_delimited_listing_does(stack, bucket):
    reference = _boto_keys(stack, bucket, "data/", delimiter=True)
    assert list_keys(stack, S3Location(bucket, "data"), recursive=False) == reference
    assert reference == ["data/empty.parquet", "data/x.parquet"]


def test_a_prefix_with_nothing_below_and_a_file_taken_as_a_folder_are_empty(stack, bucket):
    for key in ("nothing/", "data/nothing", "data/x.parquet", "dat"):
        assert list_keys(stack, S3Location(bucket, key)) == _boto_keys(stack, bucket, key.rstrip("/") + "/") == []


def test_a_missing_bucket_raises_bucket_not_found_as_boto3_raises_no_such_bucket(stack):
    missing = f"no-such-bucket-{uuid.uuid4().hex[:8]}"
    client = s3_client(stack)
    with pytest.raises(client.exceptions.NoSuchBucket):
        _boto_keys(stack, missing, "data/")
    for key in ("data/", ""):
        with pytest.raises(BucketNotFoundError, match=f"bucket {missing!r} does not exist"):
            list_keys(stack, S3Location(missing, key))


def test_callers_keep_their_messages_for_a_missing_bucket(stack):
    from typer.testing import CliRunner

    from adapters.scoring_store import list_partition_files
    from adapters.snapshots import DataLoadError, read_snapshot
    from core.inference.scoring import ScoringInputError
    from mlops.cli import app

    source = f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/data/"
    bucket = S3Location.parse(source).bucket
    with pytest.raises(DataLoadError, match=f"^{source}: bucket {bucket!r} does not exist$"):
        read_snapshot(source, "parquet", stack)
    with pytest.raises(ScoringInputError, match=f"^source {source}: bucket {bucket!r} does not exist$"):
        list_partition_files(source, stack)
    result = CliRunner().invoke(app, ["data", "init", source, "--target", "y", "--out", "/nonexistent/out.yaml"])
    assert result.exit_code == 1
    assert f"{source}: bucket {bucket!r} does not exist" in result.output


def test_history_of_a_model_without_changes_is_empty(stack):
    from adapters.history_store import list_changes

    assert list_changes(f"no-history-{uuid.uuid4().hex[:8]}", stack) == []


def test_an_unreachable_store_raises_a_connection_error():
    settings = Settings(s3_endpoint_url=f"http://127.0.0.1:{free_port()}")
    with pytest.raises(StoreUnreachableError, match="is unreachable"):
        list_keys(settings, S3Location("mlops", "data/"))
