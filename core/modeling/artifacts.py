"""What makes a stored model artifact safe to load: its recorded digest, its format, and the types it holds.

A model artifact is data. Training records the SHA-256 of the bytes it stored (the skops file and MLflow's
`MLmodel` beside it) on the registered version; every loader checks those digests on the downloaded bytes
and the types the skops file names against this project's own list, before anything is deserialised.
Nothing here reads the artifact's own idea of how to load it (MLmodel's `serialization_format` or
`skops_trusted_types`): pickle and cloudpickle are never loaded, whatever the file says.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from core.errors import PermanentError
from core.transformers import TRUSTED_MODULE_PREFIXES

FORMAT = "skops"  # the one serialisation this project writes and reads
MODEL_FILE = "model.skops"  # mlflow.sklearn's data file (skops format) within the model artifact
MLMODEL_FILE = "MLmodel"  # MLflow's description of the model (its signature is read from it)
MODEL_DIGEST_TAG = "model_sha256"
MLMODEL_DIGEST_TAG = "mlmodel_sha256"
FORMAT_TAG = "model_format"
ONNX_DIGEST_TAG = "onnx_sha256"


class UntrustedArtifactError(PermanentError, ValueError):
    """A stored artifact this project will not load: no recorded digest, another digest, format or type.

    Permanent: retrying reads the same bytes.
    """


def sha256_hex(data: bytes) -> str:
    """The SHA-256 of `data`, hex."""
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class ArtifactDigests:
    """The digests recorded on a registered version, as its tags carry them."""

    model: str
    mlmodel: str
    format: str = FORMAT

    def tags(self) -> dict[str, str]:
        """The version tags."""
        return {MODEL_DIGEST_TAG: self.model, MLMODEL_DIGEST_TAG: self.mlmodel, FORMAT_TAG: self.format}

    @classmethod
    def of(cls, model: bytes, mlmodel: bytes) -> ArtifactDigests:
        """The digests of the two stored files."""
        return cls(sha256_hex(model), sha256_hex(mlmodel))

    @classmethod
    def from_tags(cls, tags: dict[str, str], what: str) -> ArtifactDigests:
        """The digests a version records (UntrustedArtifactError naming `what`: none, or not skops)."""
        if not tags.get(MODEL_DIGEST_TAG) or not tags.get(MLMODEL_DIGEST_TAG):
            raise UntrustedArtifactError(
                f"{what} has no recorded artifact digest (registered by earlier code or outside training): "
                "it is not loaded. Retrain it, or check it and run `mlops models trust` on it"
            )
        found = tags.get(FORMAT_TAG, "")
        if found != FORMAT:
            raise UntrustedArtifactError(f"{what} records format {found!r}; only {FORMAT!r} is loaded")
        return cls(tags[MODEL_DIGEST_TAG], tags[MLMODEL_DIGEST_TAG], found)

    def check(self, model: bytes, mlmodel: bytes, what: str) -> None:
        """UntrustedArtifactError naming the file when a downloaded file is not the one recorded."""
        for name, data, expected in ((MODEL_FILE, model, self.model), (MLMODEL_FILE, mlmodel, self.mlmodel)):
            found = sha256_hex(data)
            if found != expected:
                raise UntrustedArtifactError(
                    f"{what}: stored {name} has SHA-256 {found[:16]}..., the version records {expected[:16]}...: "
                    "the artifact changed after registration; it is not loaded"
                )


def check_digest(data: bytes, expected: str | None, what: str) -> None:
    """UntrustedArtifactError when `data` is not the bytes whose digest was recorded (or none was)."""
    if not expected:
        raise UntrustedArtifactError(f"{what}: no recorded digest; it is not loaded")
    found = sha256_hex(data)
    if found != expected:
        raise UntrustedArtifactError(
            f"{what}: SHA-256 {found[:16]}..., the version records {expected[:16]}...; it is not loaded"
        )


def untrusted_types(data: bytes) -> list[str]:
    """The types a skops file names that this project does not trust (read from its schema; nothing loaded).

    Raises:
        UntrustedArtifactError: the bytes are not a skops file.
    """
    import skops.io

    try:
        types = skops.io.get_untrusted_types(data=data)
    except Exception as exc:  # not a zip, no schema: not an artifact we wrote
        raise UntrustedArtifactError(f"not a skops file ({type(exc).__name__}: {exc})") from exc
    return sorted(t for t in types if not t.startswith(TRUSTED_MODULE_PREFIXES))


def load_skops(data: bytes, what: str) -> Any:
    """The model in a skops file, trusting only this project's types (never the file's own list).

    Raises:
        UntrustedArtifactError: the file names a type outside the project's list, or is not a skops file.
    """
    import skops.io

    refused = untrusted_types(data)
    if refused:
        raise UntrustedArtifactError(f"{what} names types this project does not load: {refused}")
    return skops.io.loads(data, trusted=skops.io.get_untrusted_types(data=data))
