"""The run fingerprint (core/data/fingerprint.py) and the local listing it is taken from: pure, no servers."""

from __future__ import annotations

import hashlib
import json
import os

import pandas as pd
import pytest
import yaml

from adapters.settings import Settings
from adapters.snapshot_listing import snapshot_listing
from adapters.snapshots import DataLoadError
from core.data.dataset import bundled_config_text, parse_dataset_config
from core.data.fingerprint import (
    NOT_FINGERPRINTED,
    PARTS,
    Fingerprint,
    canonical_hash,
    code_version,
    compare,
    listing_version,
    params_version,
)
from core.evaluation.decision import Gates
from core.modeling.search import SearchSpec
from flows.training import TrainingParams

BUNDLED = yaml.safe_load(bundled_config_text("credit-risk"))


def _config_hash(text: str) -> str:
    return canonical_hash(parse_dataset_config(text, "test").model_dump(mode="json"))


def test_canonical_hash_is_sha256_of_sorted_compact_json():
    # an independent reference: the standard library's JSON with sorted keys, hashed by hashlib
    value = {"b": [1, 2, {"y": 1, "x": None}], "a": "é"}
    reference = hashlib.sha256(
        json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    ).hexdigest()[:16]
    assert canonical_hash(value) == reference == canonical_hash({"a": "é", "b": [1, 2, {"x": None, "y": 1}]})


def test_config_hash_ignores_key_order_comments_and_explicit_defaults():
    # Given the bundled config written with its keys in another order, a comment, and a default spelled out
    shuffled = dict(reversed(list(BUNDLED.items())))
    text = "# reordered by hand\n" + yaml.safe_dump(shuffled, sort_keys=False)
    features = [dict(reversed(list(f.items()))) for f in BUNDLED["features"]]
    spelled = yaml.safe_dump(BUNDLED | {"features": features, "min_group_rows": 30})
    original = _config_hash(yaml.safe_dump(BUNDLED))
    assert "min_group_rows" not in BUNDLED  # so spelling out its default (30) is a real difference in the text
    # then the config part is the same
    assert _config_hash(text) == original
    assert _config_hash(spelled) == original


@pytest.mark.parametrize(
    "change",
    [
        {"min_rows": 999},
        {"source": "s3://mlops/elsewhere/"},
        {"features": list(reversed(BUNDLED["features"]))},  # the model's column order
    ],
    ids=["a value", "the source", "the feature order"],
)
def test_config_hash_changes_with_any_value(change):
    assert _config_hash(yaml.safe_dump(BUNDLED | change)) != _config_hash(yaml.safe_dump(BUNDLED))


def _params(**changes) -> str:
    return params_version(TrainingParams(**changes).model_dump(mode="json"))


def test_params_that_cannot_change_the_answer_are_left_out():
    base = _params()
    # why the run started, what happens after deciding, and the config's reference (its content is hashed)
    assert base == _params(
        reason="scheduled",
        dry_run=True,
        force=True,
        require_approval=True,
        approval_timeout_seconds=60,
        serving_timeout_seconds=5,
        dataset="/some/where/credit-risk.yaml",
    )


@pytest.mark.parametrize(
    "change",
    [
        {"seed": 7},
        {"search": SearchSpec(trials_per_family=1)},
        {"search": SearchSpec(cv_folds=5)},
        {"gates": Gates(min_roc_auc=0.8)},
        {"gates": Gates(allow_schema_change=True)},
    ],
    ids=["seed", "trials", "folds", "a gate's bound", "a gate's switch"],
)
def test_params_that_can_change_the_answer_count(change):
    assert _params(**change) != _params()


def test_every_training_parameter_is_classified():
    # A new parameter counts by default (a needless run, never a wrong skip); this names the decision made.
    counted = set(TrainingParams.model_fields) - NOT_FINGERPRINTED
    assert counted == {"search", "gates", "seed"}
    assert set(TrainingParams.model_fields) >= NOT_FINGERPRINTED


def test_listing_version_ignores_order_and_sees_any_file_change():
    listing = [("month=2025-01/part-0.parquet", "etag-a", 100), ("month=2025-02/part-0.parquet", "etag-b", 120)]
    version = listing_version(listing)
    assert listing_version(list(reversed(listing))) == version
    assert listing_version([*listing, ("month=2025-03/part-0.parquet", "etag-c", 90)]) != version  # added
    assert listing_version(listing[:1]) != version  # removed
    assert listing_version([listing[0], ("month=2025-02/part-0.parquet", "etag-x", 120)]) != version  # rewritten
    assert listing_version([listing[0], ("month=2025-02/part-1.parquet", "etag-b", 120)]) != version  # renamed


def test_code_version_sees_a_source_edit_and_a_library_upgrade():
    files = [("core/a.py", b"x = 1\n"), ("flows/b.py", b"y = 2\n")]
    libraries = {"scikit-learn": "1.7.2", "numpy": "2.3.0"}
    version = code_version(files, libraries)
    assert code_version(list(reversed(files)), dict(reversed(list(libraries.items())))) == version
    assert code_version([files[0], ("flows/b.py", b"y = 3\n")], libraries) != version
    assert code_version(files, libraries | {"scikit-learn": "1.8.0"}) != version


def test_code_fingerprint_reads_the_training_packages_only(tmp_path):
    from tasks import tracking

    # the same code gives the same value; the CLI and serving packages are not part of it
    assert tracking.code_fingerprint() == tracking.code_fingerprint()
    assert set(tracking.TRAINING_PACKAGES) == {"core", "adapters", "dask_engine", "tasks", "services", "flows"}


FP = Fingerprint(data="d1", config="c1", params="p1", code="k1")


def test_tags_round_trip_and_an_untagged_version_has_no_fingerprint():
    assert FP.tags() == {"fingerprint.data": "d1", "fingerprint.config": "c1", "fingerprint.params": "p1",
                         "fingerprint.code": "k1"}  # fmt: skip
    assert Fingerprint.from_tags(FP.tags() | {"decision": "promote"}) == FP
    assert Fingerprint.from_tags({"fingerprint.data": "d1"}) is None
    assert Fingerprint.from_tags({}) is None


def test_compare_is_unchanged_only_when_all_four_parts_match():
    same = compare(FP, FP, "m", "3")
    assert same.unchanged and same.matched == PARTS and same.changed == ()
    assert "nothing new" in same.reason and "m v3" in same.reason
    assert same.note(forced=True).startswith("forced")
    for part in PARTS:
        other = compare(Fingerprint(**(FP.__dict__ | {part: "zz"})), FP, "m", "3")
        assert not other.unchanged and other.changed == (part,)
        assert f"{part} (" in other.reason and "-> zz" in other.reason, other.reason
    assert not compare(FP, None, "m", None).unchanged  # no champion
    untagged = compare(FP, None, "m", "2")  # a champion from before fingerprints
    assert not untagged.unchanged and "carries no fingerprint" in untagged.reason


def _write(path, rows: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"a": range(rows)}).to_parquet(path)


def test_local_listing_is_cheap_and_sees_added_and_touched_files(tmp_path):
    settings = Settings()
    _write(tmp_path / "month=1" / "part-0.parquet", 10)
    _write(tmp_path / "month=2" / "part-0.parquet", 20)
    (tmp_path / "notes.txt").write_text("not data")
    listing = snapshot_listing(str(tmp_path), "parquet", settings)
    # names relative to the source, sizes from the file system; other suffixes left out
    assert [(name, size) for name, _, size in listing] == [
        ("month=1/part-0.parquet", (tmp_path / "month=1" / "part-0.parquet").stat().st_size),
        ("month=2/part-0.parquet", (tmp_path / "month=2" / "part-0.parquet").stat().st_size),
    ]
    version = listing_version(listing)
    assert listing_version(snapshot_listing(str(tmp_path), "parquet", settings)) == version
    # a touched file counts (a needless run at worst), and so does one more partition
    target = tmp_path / "month=1" / "part-0.parquet"
    stat = target.stat()
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    touched = listing_version(snapshot_listing(str(tmp_path), "parquet", settings))
    assert touched != version
    _write(tmp_path / "month=3" / "part-0.parquet", 5)
    assert listing_version(snapshot_listing(str(tmp_path), "parquet", settings)) not in {version, touched}


def test_local_listing_names_a_missing_or_empty_source(tmp_path):
    with pytest.raises(DataLoadError, match="no such file or folder"):
        snapshot_listing(str(tmp_path / "nope"), "parquet", Settings())
    with pytest.raises(DataLoadError, match="no parquet files found"):
        snapshot_listing(str(tmp_path), "parquet", Settings())
