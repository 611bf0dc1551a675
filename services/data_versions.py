"""Frozen data versions across the store and the registry: who used each version, and the retention rule applied.

The rule is `core.data.data_versions.plan_retention` (keep what a registered version or one of the last N runs
used, and what was first used recently); the objects are `adapters.data_versions`'.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from adapters.data_versions import (
    delete_blob,
    delete_manifest,
    list_manifests,
    other_models_blobs,
    registered_by_data_version,
    runs_by_data_version,
    usage,
)
from adapters.settings import Settings
from core.data.data_versions import Manifest, RetentionPlan, Usage, plan_retention

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VersionRow:
    """One frozen version of a model and who used it."""

    manifest: Manifest
    usage: Usage


def versions_of(settings: Settings, model_name: str) -> list[VersionRow]:
    """A model's frozen versions, oldest first use first, with the runs and registered versions that used each."""
    manifests = list_manifests(settings, model_name)
    if not manifests:
        return []
    used = usage(settings, model_name, manifests[-1].experiment)
    return [VersionRow(m, used.get(m.data_version, Usage())) for m in manifests]


def retention_plan(
    settings: Settings, model_name: str, keep_runs: int, min_age: timedelta, now: datetime | None = None
) -> RetentionPlan:
    """What the retention rule keeps and removes for a model now (nothing is deleted)."""
    manifests = list_manifests(settings, model_name)
    if not manifests:
        return RetentionPlan()
    recent = [version for _, version in runs_by_data_version(settings, manifests[-1].experiment)]
    return plan_retention(
        manifests,
        registered_by_data_version(settings, model_name),
        recent,
        keep_runs,
        now or datetime.now(UTC),
        min_age,
        other_models_blobs(settings, model_name),
    )


def apply_retention(settings: Settings, model_name: str, plan: RetentionPlan) -> tuple[str, ...]:
    """Remove the plan's versions, then the blobs no manifest (of any model) names any more; returns those blobs.

    The blobs are checked again after the manifests are gone: a version first frozen meanwhile (by any model)
    that shares a blob keeps it.
    """
    for version in plan.remove:
        delete_manifest(settings, model_name, version)
        log.info("removed data version %s of %s", version, model_name)
    still_named = other_models_blobs(settings, model_name) | {
        f.sha256 for m in list_manifests(settings, model_name) for f in m.files
    }
    removed = tuple(sha for sha in plan.blobs_removed if sha not in still_named)
    for sha in removed:
        delete_blob(settings, sha)
    log.info("removed %d blob(s) no data version names", len(removed))
    return removed
