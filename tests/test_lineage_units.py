"""A version's lineage, assembled from facts (no servers): champion periods, what falls in them, the text."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime

from core.promotion.history import ChampionChange
from core.promotion.lineage import (
    ChampionPeriod,
    DataFacts,
    LogPartition,
    ScoringOutput,
    assemble,
    champion_periods,
    lineage_command,
    log_days,
    manifest_uri,
)

NOW = datetime(2026, 3, 10, 12, tzinfo=UTC)


def _change(at: str, before: str | None, after: str | None, kind: str = "promotion") -> ChampionChange:
    return ChampionChange(at, "churn", before, after, kind, "why", "alice")


CHANGES = [
    _change("2026-03-01T10:00:00+00:00", None, "1"),
    _change("2026-03-03T09:00:00+00:00", "1", "2"),
    _change("2026-03-05T18:00:00+00:00", "2", "1", "rollback"),
    _change("2026-03-07T08:00:00+00:00", "1", "3"),
    _change("2026-03-08T08:00:00+00:00", "3", "2", "rollback"),
]


def test_periods_follow_the_alias_to_and_from_the_version():
    assert champion_periods(CHANGES, "2") == [
        ChampionPeriod("2026-03-03T09:00:00+00:00", "2026-03-05T18:00:00+00:00"),
        ChampionPeriod("2026-03-08T08:00:00+00:00"),  # champion again, still
    ]
    assert champion_periods(CHANGES, "3") == [ChampionPeriod("2026-03-07T08:00:00+00:00", "2026-03-08T08:00:00+00:00")]
    assert champion_periods(CHANGES, "9") == []


def test_the_log_days_are_every_day_a_period_touches():
    days = log_days(champion_periods(CHANGES, "2"), NOW)
    assert days == [date(2026, 3, d) for d in (3, 4, 5, 8, 9, 10)]


def test_assemble_marks_scoring_runs_in_champion_periods_and_keeps_only_the_versions_changes():
    scoring = [
        ScoringOutput("s3://b/predictions/batch/churn/p/v2/", "r2", "2026-03-09T07:00:00+00:00", 10, "s3://in/", True),
        ScoringOutput("s3://b/predictions/batch/churn/p/v2/", "r1", "2026-03-06T07:00:00+00:00", 12, "s3://in/"),
    ]
    partitions = [LogPartition("s3://b/predictions/serving/churn/date=2026-03-09/", "2026-03-09", 2, 5, 7)]
    data = DataFacts.from_manifest(
        "abc123",
        manifest_uri("b", "churn", "abc123"),
        {"rows": 1200, "files": [{"name": "a"}, {"name": "b"}], "bytes": 5000, "source": "s3://b/d/", "extra": 1},
    )
    registry = {
        "run_id": "run-2",
        "run_url": None,
        "registered_at": "2026-03-03T08:00:00+00:00",
        "aliases": ["champion"],
    }
    lineage = assemble("churn", "2", data, registry, CHANGES, scoring, partitions, NOW)
    assert [c.at for c in lineage.changes] == [CHANGES[1].at, CHANGES[2].at, CHANGES[4].at]
    assert [(s.run_version, s.while_champion) for s in lineage.scoring_outputs] == [("r1", False), ("r2", True)]
    assert (lineage.data.rows, lineage.data.files, lineage.data.manifest_found) == (1200, 2, True)
    text = lineage.to_markdown()
    for expected in (
        "Data version:** abc123 (frozen at s3://b/data-versions/churn/abc123.json)",
        "1,200 rows, 2 files, 5,000 bytes",
        "Training run:** run-2",
        "aliases: champion",
        "rollback v2 -> v1 by alice",
        "Champion: 2026-03-03T09:00:00+00:00 to 2026-03-05T18:00:00+00:00; 2026-03-08T08:00:00+00:00 to now.",
        "run r2: 10 rows scored 2026-03-09T07:00:00+00:00 from s3://in/; current",
        "run r1: 12 rows scored 2026-03-06T07:00:00+00:00 from s3://in/; replaced since; not while champion",
        "date=2026-03-09/: 2 objects, 5 of 7 rows predicted by v2",
    ):
        assert expected in text, expected
    assert json.loads(lineage.to_json())["data"]["data_version"] == "abc123"


def test_a_version_never_champion_without_manifest_says_so():
    data = DataFacts.from_manifest("old", manifest_uri("b", "churn", "old"), None)
    lineage = assemble("churn", "3", data, {}, [], [], [], NOW, ["no frozen manifest at ..."])
    text = lineage.to_markdown()
    assert "no frozen manifest at s3://b/data-versions/churn/old.json" in text
    assert "- never champion" in text and "## Not shown" in text
    assert lineage_command("churn", "3") == "mlops models lineage churn 3"


def test_the_model_card_shows_the_static_lineage_and_the_command():
    from core.promotion.card import ModelCard
    from core.promotion.card_render import render_html, render_markdown

    card = ModelCard(
        model_name="churn",
        candidate_version="4",
        champion_version=None,
        verdict="promote",
        outcome="promoted",
        reasons=["cold start"],
        data_version="abc123",
        training_window=None,
        rows_train=80,
        rows_holdout=20,
        candidate_metrics={"roc_auc": 0.8},
        code_version="deadbeef",
        created_at=NOW,
        mlflow_run_url="http://127.0.0.1:5000/#/experiments/1/runs/r9",
        data_manifest=manifest_uri("b", "churn", "abc123"),
    )
    markdown = render_markdown(card)
    assert "## Lineage" in markdown
    assert "- **Data version:** abc123, frozen at s3://b/data-versions/churn/abc123.json" in markdown
    assert "- **Training run:** http://127.0.0.1:5000/#/experiments/1/runs/r9" in markdown
    assert "- **Model version:** v4" in markdown
    assert "mlops models lineage churn 4" in markdown and "mlops models lineage churn 4" in render_html(card)
