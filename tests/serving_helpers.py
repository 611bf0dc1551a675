"""Helpers shared by the serving API's integration tests."""

from __future__ import annotations

from adapters.clients import mlflow_client, s3_client


def corrupt_version(stack, name: str, version: str) -> None:
    """Overwrite the version's serialised model in S3 with garbage (what a bad upload would leave)."""
    import mlflow

    source = mlflow_client(stack).get_model_version(name, version).source
    artifacts = mlflow.get_logged_model(source.removeprefix("models:/")).artifact_location
    prefix = "mlflow/" + artifacts.split("mlflow-artifacts:/", 1)[1].strip("/") + "/"
    client = s3_client(stack)
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=stack.bucket, Prefix=prefix).get("Contents", [])]
    model_files = [k for k in keys if k.endswith((".skops", ".pkl"))]
    assert model_files, keys
    for key in model_files:
        client.put_object(Bucket=stack.bucket, Key=key, Body=b"not a model")
