"""Helpers shared by the serving API's integration tests."""

from __future__ import annotations

from adapters.clients import mlflow_client, s3_client, use_tracking_server


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


def register_again(stack, name: str, version: str, as_name: str | None = None) -> str:
    """Register the model of version `version` again (its run's `model`), with that version's run id and artifact
    digests (the same stored files): a second version to promote or roll back to (of model `as_name` if given)."""
    import mlflow

    from core.modeling.artifacts import FORMAT_TAG, MLMODEL_DIGEST_TAG, MODEL_DIGEST_TAG

    use_tracking_server(stack)
    details = mlflow_client(stack).get_model_version(name, version)
    kept = (MODEL_DIGEST_TAG, MLMODEL_DIGEST_TAG, FORMAT_TAG)
    tags = {key: value for key, value in details.tags.items() if key in kept} | {"run_id": details.run_id}
    return str(mlflow.register_model(f"runs:/{details.run_id}/model", as_name or name, tags=tags).version)
