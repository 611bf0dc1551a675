"""Pure checks of what makes a stored model loadable (`core.modeling.artifacts`): no servers.

Each refusal is checked to happen before deserialisation: the planted objects write a marker file when they
are unpickled or rebuilt, and the marker must not exist afterwards.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import skops.io
from sklearn.base import BaseEstimator
from sklearn.linear_model import LogisticRegression

from core.data.dataset import load_local_dataset_config
from core.data.features import prepare_inputs, prepare_target
from core.data.synthetic import generate_month
from core.inference.compiled import CompiledCheck
from core.inference.compiled_parity import Parity
from core.modeling.artifacts import (
    FORMAT_TAG,
    MLMODEL_DIGEST_TAG,
    MODEL_DIGEST_TAG,
    ONNX_DIGEST_TAG,
    ArtifactDigests,
    UntrustedArtifactError,
    check_digest,
    load_skops,
    untrusted_types,
)
from core.modeling.search import make_pipeline

MARKER = "MLOPS_TEST_MARKER"


class _Planted:
    """Unpickling it runs code: it writes the marker file."""

    def __reduce__(self):
        return (Path.write_text, (Path(os.environ[MARKER]), "code ran"))


class PlantedEstimator(BaseEstimator):
    """An estimator of a module the project does not trust; rebuilding it would write the marker."""

    def __setstate__(self, state):
        Path(os.environ[MARKER]).write_text("code ran")
        self.__dict__.update(state)


@pytest.fixture
def marker(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "marker"
    monkeypatch.setenv(MARKER, str(path))
    return path


@pytest.fixture(scope="module")
def pipeline_and_rows():
    config = load_local_dataset_config("credit-risk")
    frame = generate_month(0, 600, seed=3)
    model = make_pipeline(config, LogisticRegression(max_iter=500))
    model.fit(prepare_inputs(frame, config), prepare_target(frame, config))
    return model, prepare_inputs(frame.head(50), config)


def test_the_projects_pipeline_round_trips_with_the_projects_types_only(pipeline_and_rows):
    model, rows = pipeline_and_rows
    data = skops.io.dumps(model)
    assert untrusted_types(data) == []
    loaded = load_skops(data, "the pipeline")
    assert np.array_equal(loaded.predict_proba(rows), model.predict_proba(rows))


def test_a_pickle_is_refused_without_running_it(marker):
    data = pickle.dumps(_Planted())
    with pytest.raises(UntrustedArtifactError, match="not a skops file"):
        load_skops(data, "a planted pickle")
    assert not marker.exists()


def test_a_skops_file_naming_a_foreign_type_is_refused_before_it_is_built(marker):
    data = skops.io.dumps(PlantedEstimator())
    assert untrusted_types(data) == [f"{__name__}.PlantedEstimator"]
    with pytest.raises(UntrustedArtifactError, match="PlantedEstimator"):
        load_skops(data, "a planted estimator")
    assert not marker.exists()
    # the reference: skops itself would have built it, had the type been trusted
    skops.io.loads(data, trusted=[f"{__name__}.PlantedEstimator"])
    assert marker.exists()


def test_recorded_digests_are_sha256_of_the_stored_bytes_and_any_other_byte_is_refused():
    model, mlmodel = b"model bytes", b"mlmodel bytes"
    digests = ArtifactDigests.of(model, mlmodel)
    assert digests.tags() == {
        MODEL_DIGEST_TAG: hashlib.sha256(model).hexdigest(),
        MLMODEL_DIGEST_TAG: hashlib.sha256(mlmodel).hexdigest(),
        FORMAT_TAG: "skops",
    }
    recorded = ArtifactDigests.from_tags(digests.tags(), "m v1")
    recorded.check(model, mlmodel, "m v1")
    with pytest.raises(UntrustedArtifactError, match=r"m v1: stored model\.skops"):
        recorded.check(model + b" ", mlmodel, "m v1")
    with pytest.raises(UntrustedArtifactError, match="stored MLmodel"):
        recorded.check(model, b"other", "m v1")


def test_a_version_without_digests_or_with_another_format_is_refused_and_told_the_way_out():
    with pytest.raises(UntrustedArtifactError, match=r"m v2 has no recorded artifact digest.*mlops models trust"):
        ArtifactDigests.from_tags({"run_id": "x"}, "m v2")
    tags = ArtifactDigests.of(b"a", b"b").tags() | {FORMAT_TAG: "cloudpickle"}
    with pytest.raises(UntrustedArtifactError, match="format 'cloudpickle'"):
        ArtifactDigests.from_tags(tags, "m v3")


def test_check_digest_needs_a_recorded_digest_and_the_same_bytes():
    data = b"onnx bytes"
    check_digest(data, hashlib.sha256(data).hexdigest(), "the compiled file")
    with pytest.raises(UntrustedArtifactError, match="no recorded digest"):
        check_digest(data, None, "the compiled file")
    with pytest.raises(UntrustedArtifactError, match="the compiled file: SHA-256"):
        check_digest(data + b"x", hashlib.sha256(data).hexdigest(), "the compiled file")


def test_the_compiled_forms_tags_carry_the_digest_of_the_onnx_file_it_logs():
    passed = Parity(passed=True)
    check = CompiledCheck("onnx", passed, passed, model=b"\x08\x07onnx")
    assert check.tags()[ONNX_DIGEST_TAG] == hashlib.sha256(b"\x08\x07onnx").hexdigest()
    assert ONNX_DIGEST_TAG not in CompiledCheck("pipeline", Parity(passed=False), passed).tags()
