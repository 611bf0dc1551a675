"""What a training run depends on, as a fingerprint: equal to the champion's means nothing new to learn.

A run's answer (the model and the decision) is a function of four things; each is hashed on its own so
that a comparison can say which part matched and which changed:

- **data**: a listing version of the snapshot's files (name relative to the source, the store's ETag or the
  local file's size and modification time, size), taken without reading the data;
- **config**: the parsed dataset config, canonically (mapping keys sorted, defaults filled in), so YAML key
  order, comments and formatting do not matter while every value, and the order of lists such as
  `features` (the model's column order), does;
- **params**: the run parameters minus those that change neither the model nor the decision
  (`NOT_FINGERPRINTED`); every other parameter, including any added later, counts;
- **code**: the project's training source files and the versions of the libraries that fit the model.

Pure: the callers read the listing, the files and the registry tags.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

# Run parameters that cannot change the trained model or the decision: why the run was started, what it
# does after deciding (register or not, wait for a person, wait for the serving API) and `force` itself.
# `dataset` is the reference to a config (a name or a path); the config's content is its own part, and
# `data_version` (a frozen version to train on) is the data part of such a run.
NOT_FINGERPRINTED = frozenset(
    {
        "dataset",
        "data_version",
        "reason",
        "dry_run",
        "force",
        "require_approval",
        "approval_timeout_seconds",
        "serving_timeout_seconds",
        "rollout",  # how a promoted candidate reaches traffic, not what is trained
    }
)
PARTS = ("data", "config", "params", "code")
TAG_PREFIX = "fingerprint."  # one tag per part on the model version (and the run): fingerprint.data, ...


def canonical_hash(value: Any) -> str:
    """A short SHA-256 of a JSON value with sorted keys: equal for equal content, whatever the key order."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def listing_version(entries: Iterable[tuple[str, str, int]]) -> str:
    """The data part from a snapshot's listing: (name relative to the source, ETag or stamp, size) per file.

    The order of the listing does not matter; a file added, removed, renamed or rewritten with other bytes
    (another ETag) gives another version.
    """
    return canonical_hash(sorted([name, stamp, int(size)] for name, stamp, size in entries))


def params_version(params: Mapping[str, Any]) -> str:
    """The params part: every run parameter (as JSON) except `NOT_FINGERPRINTED`."""
    return canonical_hash({k: v for k, v in params.items() if k not in NOT_FINGERPRINTED})


def code_version(files: Iterable[tuple[str, bytes]], libraries: Mapping[str, str]) -> str:
    """The code part: (relative path, bytes) of each source file, plus the library versions that fit the model."""
    sources = sorted((path, hashlib.sha256(body).hexdigest()) for path, body in files)
    return canonical_hash({"files": sources, "libraries": dict(libraries)})


@dataclass(frozen=True)
class Fingerprint:
    """The four parts of what a run depends on (short hex digests)."""

    data: str
    config: str
    params: str
    code: str

    def tags(self) -> dict[str, str]:
        """One tag per part (`fingerprint.data`, ...), for the model version and the run."""
        return {f"{TAG_PREFIX}{part}": getattr(self, part) for part in PARTS}

    @classmethod
    def from_tags(cls, tags: Mapping[str, str]) -> Fingerprint | None:
        """The fingerprint recorded in a version's tags, or None when any part is missing (older versions)."""
        values = {part: tags.get(f"{TAG_PREFIX}{part}") for part in PARTS}
        if any(not value for value in values.values()):
            return None
        return cls(**values)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Comparison:
    """This run against the champion's fingerprint: whether anything changed, which parts, and why, in words."""

    unchanged: bool
    matched: tuple[str, ...]
    changed: tuple[str, ...]
    reason: str

    def note(self, forced: bool) -> str:
        """What a run that trains records about it: why it was not skipped."""
        if self.unchanged and forced:
            return "forced: the fingerprint is the champion's, retrained anyway"
        return ("forced; " if forced else "") + self.reason


def compare(current: Fingerprint, champion: Fingerprint | None, model_name: str, version: str | None) -> Comparison:
    """Compare this run's fingerprint with the champion's.

    Unchanged only when there is a champion, it carries a fingerprint, and all four parts are equal.
    """
    if version is None:
        return Comparison(False, (), PARTS, f"{model_name} has no champion")
    if champion is None:
        return Comparison(False, (), PARTS, f"champion {model_name} v{version} carries no fingerprint")
    matched = tuple(p for p in PARTS if getattr(current, p) == getattr(champion, p))
    changed = tuple(p for p in PARTS if p not in matched)
    if changed:
        what = ", ".join(f"{p} ({getattr(champion, p)} -> {getattr(current, p)})" for p in changed)
        return Comparison(False, matched, changed, f"changed since champion {model_name} v{version}: {what}")
    return Comparison(
        True,
        matched,
        (),
        f"nothing new: the data, dataset config, parameters and code are those of champion {model_name} "
        f"v{version} (data {current.data}, config {current.config}, params {current.params}, code {current.code}); "
        "a new run would train the same model, so nothing was trained or promoted",
    )


def nothing_new_markdown(model_name: str, comparison: Comparison, current: Fingerprint, data_version: str) -> str:
    """The record of a run that found nothing new (Prefect artifact, MLflow run text)."""
    rows = [f"| {part} | `{getattr(current, part)}` | same as the champion's |" for part in comparison.matched]
    return (
        "\n".join(
            [
                "# Nothing new: not trained, nothing promoted",
                "",
                f"**Outcome:** {comparison.reason}",
                "",
                f"- model: `{model_name}`; data version: `{data_version}`",
                "- run again with `force` (the form's *Force retraining*, `mlops train --force`) to retrain anyway",
                "",
                "| part | fingerprint | |",
                "|---|---|---|",
                *rows,
            ]
        )
        + "\n"
    )
