"""Frozen data versions: the content-addressed layout, a version's manifest and the retention rule.

Every training run's snapshot is kept in S3 before it is validated: each file's bytes once, under the SHA-256
of its content (`data-versions/blobs/sha256/<hex>`, shared by every model), and per model a manifest that
names the files of a version (`data-versions/<model>/<data_version>.json`). The data version is the one the
loader has always computed (a SHA-256 over each file's name relative to the source and the SHA-256 of its
bytes, in the snapshot's sorted order, first 16 hex digits), so the `data_version` tags of past runs and
registered versions name their manifests.

Pure: the adapter (`adapters/data_versions.py`) reads and writes the objects and asks MLflow who used what.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta

from core.errors import PermanentError

ROOT = "data-versions"
BLOB_PREFIX = f"{ROOT}/blobs/sha256/"


class UnknownDataVersionError(PermanentError):
    """A data version that was never frozen for this model; the message lists the ones that were."""

    def __init__(self, model_name: str, data_version: str, known: Sequence[str]) -> None:
        listed = ", ".join(known) if known else "none yet (a training run freezes its snapshot)"
        super().__init__(
            f"data version {data_version!r} of model {model_name!r} is not frozen; "
            f"frozen versions of {model_name}: {listed} (`mlops data versions {model_name}`)"
        )
        self.model_name, self.data_version, self.known = model_name, data_version, tuple(known)


class TamperedDataError(PermanentError):
    """A stored blob whose bytes no longer hash to its name, or a manifest that no longer names its version."""


def blob_key(sha256: str) -> str:
    """The S3 key of a file's bytes: the full SHA-256 hex of its content."""
    return f"{BLOB_PREFIX}{sha256}"


def manifest_key(model_name: str, data_version: str) -> str:
    """The S3 key of a model's manifest of one data version."""
    return f"{ROOT}/{model_name}/{data_version}.json"


def model_prefix(model_name: str) -> str:
    """The S3 prefix of a model's manifests."""
    return f"{ROOT}/{model_name}/"


def relative_name(name: str, source: str) -> str:
    """A file's name relative to the snapshot's source (empty for a single-file source), as the version hashes it."""
    return name.removeprefix(source)


def version_of(files: Iterable[tuple[str, str]]) -> str:
    """The data version of (relative name, SHA-256 hex of the bytes) pairs, in the snapshot's order."""
    digest = hashlib.sha256()
    for name, sha in files:
        digest.update(name.encode() + b"\0" + bytes.fromhex(sha))
    return digest.hexdigest()[:16]


def sha256_hex(body: bytes) -> str:
    """The SHA-256 of a file's bytes, as a blob is named."""
    return hashlib.sha256(body).hexdigest()


@dataclass(frozen=True)
class FrozenFile:
    """One file of a frozen version.

    Attributes:
        name: Relative to the source (what the data version hashes; empty for a single-file source).
        path: Where it was read from (its suffix tells how to parse it, e.g. `.csv.gz`).
        sha256: Full hex digest of the bytes: the blob's name.
        size: Bytes.
    """

    name: str
    path: str
    sha256: str
    size: int


@dataclass(frozen=True)
class Manifest:
    """What a frozen data version is: its files (by content), where they came from, its shape and first use.

    `first_run_id` is the Prefect flow run that froze it (the snapshot is frozen before validation, before
    the run's MLflow run exists; MLflow runs carry the same id as their `prefect_flow_run_id` tag).
    """

    data_version: str
    model_name: str
    source: str
    format: str
    files: tuple[FrozenFile, ...]
    rows: int
    columns: tuple[str, ...]
    bytes: int
    created_at: str
    first_run_id: str | None = None
    experiment: str = ""  # the dataset's MLflow experiment, where the runs that used it are

    def to_json(self) -> str:
        """The manifest object's text."""
        payload = asdict(self) | {"files": [asdict(f) for f in self.files], "columns": list(self.columns)}
        return json.dumps(payload, indent=2, sort_keys=False)

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        """A manifest from its stored text (unknown keys ignored, so later writers may add some)."""
        raw = json.loads(text)
        files = tuple(
            FrozenFile(f["name"], f.get("path", f["name"]), f["sha256"], int(f["size"])) for f in raw["files"]
        )
        return cls(
            data_version=raw["data_version"],
            model_name=raw["model_name"],
            source=raw["source"],
            format=raw["format"],
            files=files,
            rows=int(raw["rows"]),
            columns=tuple(raw.get("columns", ())),
            bytes=int(raw["bytes"]),
            created_at=raw["created_at"],
            first_run_id=raw.get("first_run_id"),
            experiment=raw.get("experiment") or raw["model_name"],
        )

    def check_version(self) -> None:
        """The files still hash to the manifest's data version.

        Raises:
            TamperedDataError: They do not (the manifest was edited).
        """
        actual = version_of((f.name, f.sha256) for f in self.files)
        if actual != self.data_version:
            raise TamperedDataError(
                f"manifest of {self.model_name} data version {self.data_version} names files that hash to {actual}"
            )


def build_manifest(  # noqa: PLR0913 - a manifest's facts, each named
    model_name: str,
    source: str,
    fmt: str,
    objects: Sequence[tuple[str, bytes]],
    rows: int,
    columns: Sequence[str],
    created_at: datetime,
    first_run_id: str | None,
    experiment: str = "",
) -> Manifest:
    """The manifest of a snapshot read as (name, bytes) objects (files, or one query result), first used now."""
    files = tuple(FrozenFile(relative_name(name, source), name, sha256_hex(body), len(body)) for name, body in objects)
    return manifest_of_files(model_name, source, fmt, files, rows, columns, created_at, first_run_id, experiment)


def manifest_of_files(  # noqa: PLR0913 - a manifest's facts, each named
    model_name: str,
    source: str,
    fmt: str,
    files: Sequence[FrozenFile],
    rows: int,
    columns: Sequence[str],
    created_at: datetime,
    first_run_id: str | None,
    experiment: str = "",
) -> Manifest:
    """The manifest of files already hashed (a big snapshot's partitions, hashed as they stream), first used now."""
    files = tuple(files)
    return Manifest(
        data_version=version_of((f.name, f.sha256) for f in files),
        model_name=model_name,
        source=source,
        format=fmt,
        files=files,
        rows=rows,
        columns=tuple(str(c) for c in columns),
        bytes=sum(f.size for f in files),
        created_at=created_at.isoformat(timespec="seconds"),
        first_run_id=first_run_id,
        experiment=experiment or model_name,
    )


def verify_blob(data_version: str, file: FrozenFile, body: bytes) -> None:
    """A blob read back must hash to its name.

    Raises:
        TamperedDataError: It does not; names the blob and the file.
    """
    actual = sha256_hex(body)
    if actual != file.sha256:
        raise TamperedDataError(
            f"data version {data_version}: blob {blob_key(file.sha256)} (file {file.path or file.name!r}) "
            f"has been altered: its bytes hash to {actual}"
        )


@dataclass(frozen=True)
class Usage:
    """Who used a data version: MLflow runs (newest first) and registered versions of the model."""

    runs: tuple[str, ...] = ()
    model_versions: tuple[str, ...] = ()


@dataclass(frozen=True)
class RetentionPlan:
    """What the retention rule keeps (and why) and removes, for one model's versions and the shared blobs."""

    keep: dict[str, str] = field(default_factory=dict)  # data version -> why it is kept
    remove: tuple[str, ...] = ()
    blobs_removed: tuple[str, ...] = ()  # SHA-256 hex of blobs no remaining manifest (of any model) names
    bytes_freed: int = 0


def plan_retention(  # noqa: PLR0913 - the rule's inputs, each named
    manifests: Sequence[Manifest],
    registered: Mapping[str, Sequence[str]],
    recent_runs: Sequence[str],
    keep_runs: int,
    now: datetime,
    min_age: timedelta,
    other_models_blobs: Iterable[str] = (),
) -> RetentionPlan:
    """The retention rule: keep what a registered version or one of the last `keep_runs` runs used.

    Args:
        manifests: This model's frozen versions.
        registered: Data version -> registered versions of the model trained on it.
        recent_runs: The data versions of the model's runs, newest first (one entry per run).
        keep_runs: How many of the newest runs keep their data.
        now: The time the rule is applied (UTC).
        min_age: Versions first used more recently are kept: a run in flight freezes its snapshot before
            its MLflow run exists.
        other_models_blobs: Blobs the manifests of other models name (blobs are shared).

    Returns:
        The versions kept with the reason, those removed, and the blobs no remaining manifest names.
    """
    last = set(recent_runs[: max(keep_runs, 0)])
    keep: dict[str, str] = {}
    remove = []
    for manifest in sorted(manifests, key=lambda m: m.created_at):
        version = manifest.data_version
        if registered.get(version):
            keep[version] = "registered: v" + ", v".join(sorted(registered[version], key=_version_order))
        elif version in last:
            keep[version] = f"used by one of the last {keep_runs} runs"
        elif now - datetime.fromisoformat(manifest.created_at) < min_age:
            keep[version] = f"first used less than {min_age} ago"
        else:
            remove.append(version)
    referenced = set(other_models_blobs) | {f.sha256 for m in manifests if m.data_version in keep for f in m.files}
    candidates: dict[str, int] = {f.sha256: f.size for m in manifests if m.data_version in remove for f in m.files}
    orphans = tuple(sorted(sha for sha in candidates if sha not in referenced))
    return RetentionPlan(keep, tuple(remove), orphans, sum(candidates[sha] for sha in orphans))


def _version_order(version: str) -> tuple[int, str]:
    return (int(version), version) if version.isdigit() else (0, version)


def compare_metrics(
    original: Mapping[str, float], reproduced: Mapping[str, float], skipped_prefixes: Sequence[str] = ()
) -> tuple[list[tuple[str, float | None, float | None, str]], list[str]]:
    """Every metric of the original run against the reproduction's, exactly.

    Returns:
        Rows (metric, original, reproduced, verdict: `identical`, `DIFFERS`, `missing` or `not compared: why`)
        and the names of the metrics that differ (missing on either side counts as a difference).
    """
    rows: list[tuple[str, float | None, float | None, str]] = []
    differing = []
    for name in sorted(set(original) | set(reproduced)):
        before, after = original.get(name), reproduced.get(name)
        if any(name.startswith(prefix) for prefix in skipped_prefixes):
            rows.append((name, before, after, "not compared: measured against the champion of the day"))
        elif before is None or after is None:
            rows.append((name, before, after, "missing"))
            differing.append(name)
        elif before == after or (math.isnan(before) and math.isnan(after)):  # NaN on both sides is the same result
            rows.append((name, before, after, "identical"))
        else:
            rows.append((name, before, after, "DIFFERS"))
            differing.append(name)
    return rows, differing
