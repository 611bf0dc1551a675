"""Frozen data versions and reproduced runs, on the real stack, with a model and a data folder of their own.

Every run freezes its snapshot (content-addressed, before validation); the source is then overwritten, and the
champion is reproduced from its frozen version with metrics equal to the last digit, while a control trained on
the overwritten source differs. Then the retention rule, and the errors: an unknown version, an altered blob.
"""

from __future__ import annotations

import pytest
import yaml
from typer.testing import CliRunner

from adapters.clients import S3Location, mlflow_client, s3_client
from adapters.data_versions import FreezeError, blob_sizes, freeze, read_frozen, read_manifest
from adapters.snapshots import read_dataset_config
from core.data.data_versions import TamperedDataError, blob_key
from core.modeling.search import ModelFamily, SearchSpec
from flows.training import TrainingParams, training
from mlops.cli import app
from mlops.datagen import write_months
from tasks.loading import load_snapshot

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MODEL, TWIN, INVALID = "frozen-data", "frozen-twin", "frozen-invalid"
MONTHS, ROWS = 3, 800
SEARCH = SearchSpec(families=[ModelFamily.logistic_regression], trials_per_family=1, cv_folds=2)
SEEN: dict[str, object] = {}  # what one test leaves for the next (the module's tests run in order)


def _source(stack, model: str = MODEL) -> str:
    return f"s3://{stack.bucket}/datasets/{model}/"


def _config(tmp_path_factory, model: str, source: str, **changes: object) -> str:
    from core.data.dataset import bundled_config_text

    raw = yaml.safe_load(bundled_config_text("credit-risk")) | {"name": model, "model_name": model, "source": source}
    path = tmp_path_factory.mktemp(model) / f"{model}.yaml"
    path.write_text(yaml.safe_dump(raw | changes))
    return str(path)


def _source_bytes(stack, source: str) -> dict[str, bytes]:
    client, location = s3_client(stack), S3Location.parse(source)
    listed = client.list_objects_v2(Bucket=location.bucket, Prefix=location.key).get("Contents", [])
    return {
        f"s3://{location.bucket}/{o['Key']}": client.get_object(Bucket=location.bucket, Key=o["Key"])["Body"].read()
        for o in listed
    }


def _train(config: str, **changes: object):
    params = TrainingParams(**{"dataset": config, "search": SEARCH, "reason": "frozen-data test"} | changes)
    state = training(params, return_state=True)
    assert state.is_completed(), state.message
    return state.result()


def _cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def config(stack, tmp_path_factory) -> str:
    write_months(stack, _source(stack), MONTHS, ROWS, seed=21)
    return _config(tmp_path_factory, MODEL, _source(stack))


@pytest.fixture(scope="module")
def champion(stack, config):
    from adapters.promotion import promote_version

    SEEN["original bytes"] = _source_bytes(stack, _source(stack))
    outcome = _train(config)
    assert outcome.candidate_version is not None, outcome.decision.reasons
    if not outcome.promoted:  # a cold start on 800 holdout rows may be too few to judge: promoted by hand
        promote_version(MODEL, outcome.candidate_version, None, reason="test: a champion", actor="tester")
    return outcome


def test_a_run_freezes_its_snapshot_once_by_content(stack, config, champion, tmp_path_factory):
    # Given the champion's run: its data version is frozen, one blob per file, a manifest with its facts
    manifest = read_manifest(stack, MODEL, champion.data_version)
    assert manifest is not None and manifest.rows == MONTHS * ROWS and len(manifest.files) == MONTHS
    assert manifest.first_run_id and manifest.experiment == MODEL
    assert manifest.bytes == sum(len(body) for body in SEEN["original bytes"].values())
    blobs = blob_sizes(stack)
    assert {f.sha256 for f in manifest.files} <= set(blobs)
    # When the same content is loaded again, for this model and for another model reading the same source
    twin = _config(tmp_path_factory, TWIN, _source(stack))
    load_snapshot.fn(read_dataset_config(config, stack))
    load_snapshot.fn(read_dataset_config(twin, stack))
    # Then no blob is added (identical content is stored once, across models) and the first use stays first
    assert blob_sizes(stack) == blobs
    assert read_manifest(stack, MODEL, champion.data_version) == manifest
    assert read_manifest(stack, TWIN, champion.data_version).files == manifest.files
    print(f"\nfrozen version: {manifest.bytes} bytes in {len(manifest.files)} blobs, {manifest.rows} rows")


def test_a_run_whose_data_fail_validation_froze_them_first(stack, tmp_path_factory):
    # Given data that fail validation (fewer rows than the config's minimum)
    source = _source(stack, INVALID)
    write_months(stack, source, 1, 150, seed=5)
    config = _config(tmp_path_factory, INVALID, source)
    # When a run reads them, it fails on validation
    state = training(TrainingParams(dataset=config, search=SEARCH), return_state=True)
    assert state.is_failed(), state.message
    assert "150" in str(state.message) and "1000" in str(state.message), state.message  # rows vs min_rows
    # Then the bytes were frozen before: readable byte-exact
    loaded = load_snapshot.fn(read_dataset_config(config, stack))
    manifest, objects = read_frozen(stack, INVALID, loaded.data_version)
    assert dict(objects) == _source_bytes(stack, source) and manifest.rows == 150
    SEEN["invalid version"] = manifest


def test_an_overwritten_source_leaves_the_frozen_version_readable_byte_exact(stack, config, champion):
    # When the source is overwritten in place (the same partition names, other rows)
    write_months(stack, _source(stack), MONTHS, ROWS, seed=22)
    overwritten = _source_bytes(stack, _source(stack))
    assert overwritten.keys() == SEEN["original bytes"].keys() and overwritten != SEEN["original bytes"]
    # Then the champion's version still reads back, byte for byte
    manifest, objects = read_frozen(stack, MODEL, champion.data_version)
    assert dict(objects) == SEEN["original bytes"]
    assert {f.path for f in manifest.files} == set(SEEN["original bytes"])


def test_reproducing_the_champion_gives_identical_metrics_and_a_control_differs(stack, config, champion):
    client = mlflow_client(stack)
    original = client.get_run(champion.run_id).data.metrics
    # When the champion is reproduced (the source was overwritten by the test before)
    code, output = _cli("reproduce", MODEL, champion.candidate_version)
    print(output)
    # Then every metric is the original's to the last digit, and nothing was registered
    assert code == 0, output
    assert "identical: all" in output
    run_id = output.split("reproduction run: ")[1].split()[0]
    again = client.get_run(run_id)
    assert again.data.tags["data_version"] == champion.data_version and again.data.tags["dry_run"] == "true"
    compared = {k for k in original if not k.startswith("delta_")}
    assert compared and {k: again.data.metrics.get(k) for k in compared} == {k: original[k] for k in compared}
    assert "holdout_roc_auc" in compared
    versions = {v.version for v in client.search_model_versions(f"name='{MODEL}'")}
    assert versions == {champion.candidate_version}
    # And a control trained on the overwritten source (same config, params and seed) differs
    control = _train(config, dry_run=True, force=True)
    assert control.data_version != champion.data_version
    assert client.get_run(control.run_id).data.metrics["holdout_roc_auc"] != original["holdout_roc_auc"]
    SEEN["control version"] = control.data_version


def test_train_on_a_frozen_version_and_an_unknown_one(stack, config, champion):
    # When `mlops train --data-version` names a version never frozen, the error names it, the model, the known ones
    code, output = _cli("train", "--config", config, "--data-version", "0123456789abcdef")
    assert code == 2
    assert "'0123456789abcdef'" in output and f"'{MODEL}'" in output and champion.data_version in output
    # and the flow's parameter says the same when a run is started with it (e.g. from the UI)
    state = training(TrainingParams(dataset=config, search=SEARCH, data_version="0123456789abcdef"), return_state=True)
    assert (
        state.is_failed() and "0123456789abcdef" in str(state.message) and champion.data_version in str(state.message)
    )


def test_retention_removes_exactly_what_the_rule_says(stack, config, champion):
    # Given a third version: the overwritten source plus one more month (its first three files are the control's)
    write_months(stack, _source(stack), MONTHS + 1, ROWS, seed=22)
    third = load_snapshot.fn(read_dataset_config(config, stack)).data_version
    extra = {f.sha256 for f in read_manifest(stack, MODEL, third).files} - {
        f.sha256 for f in read_manifest(stack, MODEL, SEEN["control version"]).files
    }
    assert len(extra) == 1
    # When the rule keeps what a registered version or the last run used, as a dry run first
    code, output = _cli("data", "prune", MODEL, "--keep-runs", "1", "--min-age-hours", "0", "--dry-run")
    assert code == 0, output
    assert f"would remove {third}" in output and "1 blob(s)" in output
    assert read_manifest(stack, MODEL, third) is not None
    code, output = _cli("data", "prune", MODEL, "--keep-runs", "1", "--min-age-hours", "0")
    print(output)
    # Then only the third version and its one unshared blob go; the registered and the last run's stay readable
    assert code == 0, output
    assert read_manifest(stack, MODEL, third) is None and not extra & set(blob_sizes(stack))
    assert f"keep   {champion.data_version}  registered: v{champion.candidate_version}" in output
    assert f"keep   {SEEN['control version']}  used by one of the last 1 runs" in output
    assert dict(read_frozen(stack, MODEL, champion.data_version)[1]) == SEEN["original bytes"]
    read_frozen(stack, MODEL, SEEN["control version"])
    # and the listing shows what is left, with who used it
    code, output = _cli("data", "versions", MODEL)
    assert code == 0 and third not in output and f"v{champion.candidate_version}" in output
    assert "2 version(s)" in output


def test_an_altered_blob_is_named_on_read_and_a_failed_freeze_is_clear(stack):
    manifest = SEEN["invalid version"]
    key = blob_key(manifest.files[0].sha256)
    s3_client(stack).put_object(Bucket=stack.bucket, Key=key, Body=b"not the same bytes")
    with pytest.raises(TamperedDataError, match=key):
        read_frozen(stack, INVALID, manifest.data_version)
    unreachable = stack.model_copy(update={"s3_endpoint_url": "http://127.0.0.1:9"})
    with pytest.raises(FreezeError, match=f"could not freeze data version {manifest.data_version}"):
        freeze(unreachable, manifest, [(f.path, b"x") for f in manifest.files])
