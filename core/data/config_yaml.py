"""An inferred dataset config as commented YAML (what `mlops data init` writes)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

import yaml

from core.data.column_kinds import plain_number
from core.data.dataset import (
    DatasetConfig,
    Feature,
)
from core.data.operations import COMMENTED_DEFAULTS

log = logging.getLogger(__name__)


def _flow(value: Any) -> str:
    """One value in YAML flow style, on one line."""
    text = yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=10**9, allow_unicode=True)
    return text.removesuffix("\n").removesuffix("\n...").strip()


def _comment_lines(text: str, indent: str = "") -> list[str]:
    return [f"{indent}# {line}".rstrip() for line in text.splitlines()]


def _aligned(pairs: list[tuple[str, str]]) -> list[str]:
    width = min(60, max(len(code) for code, _ in pairs))
    return [f"{code.ljust(width)}  # {note}" if note else code for code, note in pairs]


def _feature_dict(feature: Feature) -> dict[str, Any]:
    raw = feature.model_dump(mode="json", exclude_none=True)
    return {key: plain_number(value) if key in {"min", "max"} else value for key, value in raw.items()}


def render_yaml(inferred: InferredConfig) -> str:
    """Commented YAML of an inferred config (the rules on top, a reason on each line)."""
    config = inferred.config
    dumped = config.model_dump(mode="json")
    keys = ["name", "model_name", "source", "format", "target", "task", "classes", "id_column", "time_column"]
    keys[4:4] = ["query", "password_env"] if config.format == "sql" else []
    keys += ["time_features", "calendar_parts"] if config.time_column else []
    keys += ["min_rows", "max_null_fraction", "holdout_fraction"]
    top = []
    for key in keys:
        note = inferred.notes.get(key, "")
        if dumped[key] is None:  # not set: say why in a comment instead of writing `null`
            top.append((f"# {key}: {note}", ""))
        else:
            text = json.dumps(dumped[key]) if key == "query" else _flow(dumped[key])  # a query on one line
            top.append((f"{key}: {text}", note))
    lines = [*_comment_lines(inferred.header), "", *_aligned(top)]
    lines.append("features:")
    rows = [
        (f"  - {_flow(_feature_dict(feature))}", inferred.feature_notes[feature.name]) for feature in config.features
    ]
    lines += _aligned(rows)
    lines += [f"  # left out: {reason}" for reason in inferred.left_out.values()]
    lines += _comment_lines(
        'slices and sensitive_features are not inferred: add them by hand (README, "Your own data").'
    )
    return "\n".join(lines) + "\n\n" + COMMENTED_DEFAULTS


@dataclass(frozen=True)
class InferredConfig:
    """A config inferred from a frame, with the reason for each choice and the columns left out."""

    config: DatasetConfig
    notes: dict[str, str] = field(repr=False)
    feature_notes: dict[str, str] = field(repr=False)
    left_out: dict[str, str]
    header: str = field(repr=False)

    def to_yaml(self) -> str:
        """The config as commented YAML that `parse_dataset_config` reads back to the same config."""
        return render_yaml(self)

    def summary(self) -> str:
        """One line for the command line."""
        c = self.config
        kinds = f"{len(c.numeric_features)} numeric, {len(c.categorical_features)} categorical"
        kinds += f", {len(c.datetime_features)} date/time" if c.datetime_features else ""
        out = f"; {len(self.left_out)} column(s) left out" if self.left_out else ""
        time = f", time {c.time_column!r}" if c.time_column else ""
        return f"task {c.task}, target {c.target!r}, id {c.id_column!r}{time}; features: {kinds}{out}"
