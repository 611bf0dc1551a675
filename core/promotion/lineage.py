"""A model version's lineage: data version -> training run -> version -> alias history -> what it produced.

`assemble` puts the facts an adapter read (`adapters/lineage.py`) into one `Lineage` value, shown by
`mlops models lineage NAME VERSION` as text (`to_markdown`) or JSON (`to_json`):

- the **data version** the version was trained on (its `data_version` tag) and the frozen manifest that keeps its
  bytes (`data-versions/<model>/<data_version>.json`; absent for a version trained before snapshots were frozen);
- the **training run** (the version's run id) and the **version** itself (when it was registered, its aliases now);
- its **alias history**: every recorded change of the `champion` alias that made it champion or took it away, and
  the periods it was champion (a period still open when it is champion now);
- **batch-scoring outputs** whose summary names this version (it scored them), each marked whether it fell in a
  champion period and whether it is still the output's current (published) version;
- **prediction-log partitions** (the serving log's UTC date folders) of the days it was champion, each with the
  number of logged rows that this version predicted (a row carries the version that answered it).

Pure: no I/O.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

from core.promotion.history import ChampionChange

DATA_VERSIONS_ROOT = "data-versions"  # the frozen versions' layout (core.data.data_versions)


def manifest_uri(bucket: str, model_name: str, data_version: str) -> str:
    """Where the frozen manifest of a model's data version is stored."""
    return f"s3://{bucket}/{DATA_VERSIONS_ROOT}/{model_name}/{data_version}.json"


def lineage_command(model_name: str, version: str) -> str:
    """The command that shows a version's live lineage."""
    return f"mlops models lineage {model_name} {version}"


@dataclass(frozen=True)
class ChampionPeriod:
    """A span during which the version was champion: from one change to the next that took it away (None: still)."""

    start: str
    end: str | None = None

    def covers(self, moment: datetime, now: datetime) -> bool:
        """Whether `moment` falls within the period (an open period runs until `now`)."""
        return _parse(self.start) <= moment <= (_parse(self.end) if self.end else now)

    def days(self, now: datetime) -> list[date]:
        """The UTC dates the period touches, oldest first."""
        first, last = _parse(self.start).date(), (_parse(self.end) if self.end else now).date()
        return [first + timedelta(days=n) for n in range((last - first).days + 1)]


@dataclass(frozen=True)
class ScoringOutput:
    """One batch-scoring run's predictions made by the version (its summary under the output's versions)."""

    output: str
    run_version: str
    scored_at: str
    rows: int
    source: str
    current: bool = False  # the output's manifest names this run: what readers of the output get now
    while_champion: bool = False


@dataclass(frozen=True)
class LogPartition:
    """One UTC date folder of the serving prediction log, and how many of its rows this version predicted."""

    uri: str
    day: str
    objects: int
    rows_of_version: int
    rows: int


@dataclass(frozen=True)
class DataFacts:
    """The data version and what its frozen manifest says (None fields: no manifest was found)."""

    data_version: str | None
    manifest_uri: str | None
    manifest_found: bool = False
    source: str | None = None
    rows: int | None = None
    files: int | None = None
    bytes: int | None = None
    created_at: str | None = None
    first_run_id: str | None = None  # the Prefect flow run that froze it first

    @staticmethod
    def from_manifest(data_version: str | None, uri: str | None, manifest: dict[str, Any] | None) -> DataFacts:
        """From a stored manifest's JSON fields (unknown ones ignored; missing ones None)."""
        if manifest is None:
            return DataFacts(data_version, uri)
        files = manifest.get("files")
        return DataFacts(
            data_version,
            uri,
            True,
            manifest.get("source"),
            manifest.get("rows"),
            len(files) if isinstance(files, list) else None,
            manifest.get("bytes"),
            manifest.get("created_at"),
            manifest.get("first_run_id"),
        )


@dataclass(frozen=True)
class Lineage:
    """Everything a model version came from and produced."""

    model_name: str
    version: str
    data: DataFacts
    run_id: str | None
    run_url: str | None
    registered_at: str | None
    aliases: list[str]
    changes: list[ChampionChange]
    periods: list[ChampionPeriod]
    scoring_outputs: list[ScoringOutput]
    log_partitions: list[LogPartition]
    notes: list[str] = field(default_factory=list)  # what could not be read, said plainly

    def to_json(self) -> str:
        """The lineage as JSON."""
        return json.dumps(asdict(self), indent=2, sort_keys=True, default=str)

    def to_markdown(self) -> str:
        """The chain as readable text (Markdown)."""
        d = self.data
        lines = [f"# Lineage of {self.model_name} v{self.version}", ""]
        if d.data_version is None:
            lines.append("- **Data version:** not recorded on this version")
        else:
            frozen = f"frozen at {d.manifest_uri}" if d.manifest_found else f"no frozen manifest at {d.manifest_uri}"
            lines.append(f"- **Data version:** {d.data_version} ({frozen})")
        if d.manifest_found:
            lines.append(
                f"  - source {d.source}; {_count(d.rows, 'row')}, {_count(d.files, 'file')}, "
                f"{_count(d.bytes, 'byte')}; first frozen {d.created_at} by Prefect flow run {d.first_run_id}"
            )
        lines.append(f"- **Training run:** {self.run_id or 'unknown'}" + (f" ({self.run_url})" if self.run_url else ""))
        aliases = ", ".join(self.aliases) if self.aliases else "none now"
        registered = self.registered_at or "at an unknown time"
        lines.append(f"- **Version:** v{self.version}, registered {registered}; aliases: {aliases}")
        lines += ["", "## Alias history", ""]
        lines += [f"- {change.describe()}" for change in self.changes] or ["- never champion"]
        if self.periods:
            spans = "; ".join(f"{p.start} to {p.end or 'now'}" for p in self.periods)
            lines += ["", f"Champion: {spans}."]
        lines += ["", "## Batch-scoring outputs", ""]
        lines += [
            f"- {s.output} run {s.run_version}: {_count(s.rows, 'row')} scored {s.scored_at} from {s.source}"
            + ("; current" if s.current else "; replaced since")
            + ("" if s.while_champion else "; not while champion (an explicit version)")
            for s in self.scoring_outputs
        ] or ["- none stored"]
        lines += ["", "## Prediction-log partitions (days it was champion)", ""]
        lines += [
            f"- {p.uri}: {_count(p.objects, 'object')}, {p.rows_of_version} of {_count(p.rows, 'row')} predicted by "
            f"v{self.version}"
            for p in self.log_partitions
        ] or ["- none"]
        if self.notes:
            lines += ["", "## Not shown", "", *[f"- {note}" for note in self.notes]]
        return "\n".join(lines) + "\n"


def _count(n: int | None, noun: str) -> str:
    if n is None:
        return f"? {noun}s"
    return f"{n:,} {noun}" + ("" if n == 1 else "s")


def _parse(moment: str) -> datetime:
    parsed = datetime.fromisoformat(moment.replace("Z", "+00:00"))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def version_changes(changes: list[ChampionChange], version: str) -> list[ChampionChange]:
    """The alias changes that made `version` champion or took it away, oldest first."""
    mine = [c for c in changes if version in (c.from_version, c.to_version) and c.from_version != c.to_version]
    return sorted(mine, key=lambda c: _parse(c.at))


def champion_periods(changes: list[ChampionChange], version: str) -> list[ChampionPeriod]:
    """The spans `version` was champion, from the changes that moved the alias to it and away from it."""
    periods: list[ChampionPeriod] = []
    start: str | None = None
    for change in version_changes(changes, version):
        if change.to_version == version and start is None:
            start = change.at
        elif change.from_version == version and start is not None:
            periods.append(ChampionPeriod(start, change.at))
            start = None
    if start is not None:
        periods.append(ChampionPeriod(start))
    return periods


def assemble(  # noqa: PLR0913 - the facts of one lineage, each named
    model_name: str,
    version: str,
    data: DataFacts,
    registry: dict[str, Any],
    changes: list[ChampionChange],
    scoring: list[ScoringOutput],
    partitions: list[LogPartition],
    now: datetime,
    notes: list[str] | None = None,
) -> Lineage:
    """The lineage of one version from what was read.

    Args:
        model_name: Registered model name.
        version: The model version.
        data: Its data version and what the frozen manifest says.
        registry: The version's `run_id`, `run_url`, `registered_at` and `aliases` as the registry has them.
        changes: Every recorded champion change of the model (those of other versions are left out here).
        scoring: Batch-scoring runs made by this version; marked here whether each fell in a champion period.
        partitions: The prediction-log date folders read for the champion periods (`log_days`).
        now: The end of a period still open.
        notes: What could not be read, said plainly.
    """
    periods = champion_periods(changes, version)
    marked = [
        ScoringOutput(**(asdict(s) | {"while_champion": any(p.covers(_parse(s.scored_at), now) for p in periods)}))
        for s in sorted(scoring, key=lambda s: s.scored_at)
    ]
    return Lineage(
        model_name=model_name,
        version=version,
        data=data,
        run_id=registry.get("run_id"),
        run_url=registry.get("run_url"),
        registered_at=registry.get("registered_at"),
        aliases=sorted(registry.get("aliases") or []),
        changes=version_changes(changes, version),
        periods=periods,
        scoring_outputs=marked,
        log_partitions=sorted(partitions, key=lambda p: p.day),
        notes=list(notes or []),
    )


def log_days(periods: list[ChampionPeriod], now: datetime) -> list[date]:
    """The UTC dates of the prediction log to read: every day any champion period touches, oldest first."""
    return sorted({day for period in periods for day in period.days(now)})
