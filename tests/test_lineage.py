"""A version's lineage on the real stack: trained, served, batch-scored, replaced as champion, then traced back.

v1 is trained (cold start: champion), answers predictions through a serving API and scores a month while champion;
v2 (the same model registered again) is promoted; v1 then scores the month again by name, into the same output.
`mlops models lineage` and the model card must show every link of that chain.
"""

from __future__ import annotations

import json
import os
import sys
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pandas as pd
import pytest
from typer.testing import CliRunner

from adapters.clients import S3Location, mlflow_client, s3_client
from adapters.lineage import read_lineage
from adapters.promotion import promote_version
from core.modeling.search import SearchSpec
from core.monitoring.prediction_log import day_prefix
from core.promotion.lineage import lineage_command, manifest_uri
from flows.scoring import ScoringParams, scoring
from flows.training import TrainingParams, training
from mlops.cli import app
from mlops.stack import running
from tests.ports import free_port
from tests.serving_helpers import register_again
from tests.waiting import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MODEL = "lineage-test"
MONTH = "month=2025-03"
SEARCH = SearchSpec(trials_per_family=1, cv_folds=2)
NON_FEATURES = ["application_id", "applied_at", "defaulted"]


def _records(stack, default_data: str, n: int) -> list[dict]:
    location = S3Location.parse(default_data).child(f"{MONTH}/part-0.parquet")
    body = s3_client(stack).get_object(Bucket=location.bucket, Key=location.key)["Body"].read()
    frame = pd.read_parquet(pd.io.common.BytesIO(body)).drop(columns=NON_FEATURES, errors="ignore").head(n)
    return json.loads(frame.to_json(orient="records", date_format="iso"))


@pytest.fixture(scope="module")
def chain(stack, default_data, tmp_path_factory) -> dict:
    """Train v1, serve 5 predictions with it, score a month with it, promote v2, score the month with v1 again."""
    import yaml

    from core.data.dataset import bundled_config_text

    folder = tmp_path_factory.mktemp(MODEL)
    config = folder / f"{MODEL}.yaml"
    config.write_text(
        yaml.safe_dump(yaml.safe_load(bundled_config_text("credit-risk")) | {"name": MODEL, "model_name": MODEL})
    )
    state = training(TrainingParams(dataset=str(config), search=SEARCH), return_state=True)
    assert state.is_completed(), state.message
    first = state.result()
    assert first.promoted
    v1 = first.candidate_version

    port = free_port()
    command = [str(Path(sys.executable).parent / "mlops"), "serve", "--port", str(port), "--model", MODEL]
    environment = os.environ | {"MLOPS_SERVING_LOG_FLUSH_SECONDS": "1"}
    with running(command, f"http://127.0.0.1:{port}/health", environment, folder / "serving.log"):
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: httpx.get(f"{url}/ready").status_code == 200, 60, "the server to load its model")
        answer = httpx.post(f"{url}/predict", json={"records": _records(stack, default_data, 5)}, timeout=30)
        assert answer.status_code == 200, answer.text
        day = datetime.now(UTC).date()
        prefix = S3Location(stack.bucket, day_prefix(MODEL, day))
        wait_for(
            lambda: s3_client(stack).list_objects_v2(Bucket=prefix.bucket, Prefix=prefix.key).get("KeyCount", 0) > 0,
            30,
            "the prediction log to reach S3",
        )

    source = f"{default_data}{MONTH}/"
    while_champion = scoring(ScoringParams(dataset=str(config), source=source), return_state=True)
    assert while_champion.is_completed(), while_champion.message
    v2 = register_again(stack, MODEL, v1)
    promote_version(MODEL, v2, v1, reason="test: a newer version", actor="tester")
    by_name = scoring(ScoringParams(dataset=str(config), source=source, model_version=v1), return_state=True)
    assert by_name.is_completed(), by_name.message
    return {
        "v1": v1,
        "v2": v2,
        "training": first,
        "flow_run_id": str(state.state_details.flow_run_id),
        "day": day.isoformat(),
        "scored": [while_champion.result(), by_name.result()],
    }


def test_the_lineage_traces_data_run_aliases_scoring_and_the_log(stack, chain):
    v1, v2 = chain["v1"], chain["v2"]
    lineage = read_lineage(stack, MODEL, v1)
    training_run = chain["training"]

    # data version -> its frozen manifest -> the training run -> the version
    assert lineage.data.data_version == training_run.data_version
    assert lineage.data.manifest_uri == manifest_uri(stack.bucket, MODEL, training_run.data_version)
    assert lineage.data.manifest_found and lineage.data.rows > 0
    assert lineage.data.first_run_id == chain["flow_run_id"]  # the Prefect flow run that froze it
    assert lineage.run_id == training_run.run_id and lineage.run_url.endswith(f"/runs/{training_run.run_id}")
    assert lineage.aliases == ["previous"] and lineage.registered_at  # the promotion moved `previous` to it

    # its alias history: champion at the cold start, replaced by v2; one closed period
    assert [(c.from_version, c.to_version) for c in lineage.changes] == [(None, v1), (v1, v2)]
    assert len(lineage.periods) == 1 and lineage.periods[0].end == lineage.changes[1].at

    # both batch-scoring runs of v1 into the month's output: the first while champion (replaced since), the
    # second by name after it lost the alias (current)
    outputs = lineage.scoring_outputs
    assert {s.output for s in outputs} == {chain["scored"][0].output}
    assert [(s.while_champion, s.current) for s in outputs] == [(True, False), (False, True)]
    assert all(s.rows == chain["scored"][0].rows for s in outputs)

    # today's prediction-log partition, with the 5 rows v1 answered
    assert [(p.day, p.rows_of_version) for p in lineage.log_partitions] == [(chain["day"], 5)]

    # v2 is champion now, made no scoring run and answered none of the logged rows
    other = read_lineage(stack, MODEL, v2)
    assert other.aliases == ["champion"] and other.periods[0].end is None
    assert other.scoring_outputs == [] and [p.rows_of_version for p in other.log_partitions] == [0]


def test_the_cli_prints_the_chain_and_the_card_points_to_it(stack, chain):
    v1, training_run = chain["v1"], chain["training"]
    manifest = manifest_uri(stack.bucket, MODEL, training_run.data_version)
    runner = CliRunner()
    text = runner.invoke(app, ["models", "lineage", MODEL, v1])
    assert text.exit_code == 0, text.output
    for expected in (
        f"# Lineage of {MODEL} v{v1}",
        f"**Data version:** {training_run.data_version} (frozen at {manifest})",
        f"**Training run:** {training_run.run_id}",
        f"promotion v{v1} -> v{chain['v2']} by tester",
        "; replaced since",
        "; current; not while champion",
        f"date={chain['day']}/: 1 object, 5 of 5 rows predicted by v{v1}",
    ):
        assert expected in text.output, (expected, text.output)
    as_json = runner.invoke(app, ["models", "lineage", MODEL, v1, "--json"])
    assert json.loads(as_json.output)["run_id"] == training_run.run_id
    missing = runner.invoke(app, ["models", "lineage", MODEL, "999"])
    assert missing.exit_code != 0 and f"model {MODEL!r} has no registered version '999'" in missing.output

    # the model card made at training time shows the static part and the command for the rest
    card_uri = mlflow_client(stack).get_model_version(MODEL, v1).tags["model_card"]
    location = S3Location.parse(card_uri.replace("model_card.html", "model_card.md"))
    card = s3_client(stack).get_object(Bucket=location.bucket, Key=location.key)["Body"].read().decode()
    assert "## Lineage" in card
    assert f"frozen at {manifest}" in card
    assert lineage_command(MODEL, v1) in card
