"""Monitoring's I/O: the training reference in MLflow, the prediction log and the reports in S3.

Built from settings on each call; nothing is configured at import. The shapes are core's
(`core/monitoring/drift_analysis.py`, `core/monitoring/prediction_log.py`); this module only moves bytes.
"""

from __future__ import annotations

import io
import json
import logging
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any

import pandas as pd

from adapters.clients import S3Location, map_s3_requests, mlflow_client, put_bytes, s3_client
from adapters.registry import CHAMPION, aliases_of, holdout_metrics, load_model
from adapters.settings import Settings
from adapters.store import fs_path, list_keys, s3_filesystem
from core.monitoring.drift import MonitoringError
from core.monitoring.drift_analysis import Champion
from core.monitoring.drift_report import StoredReport
from core.monitoring.model_page import MAX_RUNS, StoredPage, StoredRun, model_prefix, page_key, run_time
from core.monitoring.prediction_log import SERVING, day_prefix, drop_duplicates, log_dates, prefix_for

log = logging.getLogger(__name__)

REFERENCE_ARTIFACT = "reference/reference.parquet"
REPORT_LINK_SECONDS = 7 * 24 * 3600  # presigned links to the report last a week


def store_reference(settings: Settings, run_id: str, frame: pd.DataFrame) -> str:
    """Store a reference sample as `reference/reference.parquet` in the model's run; returns that path."""
    client = mlflow_client(settings)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / Path(REFERENCE_ARTIFACT).name
        frame.to_parquet(path, index=False)
        client.log_artifact(run_id, str(path), str(Path(REFERENCE_ARTIFACT).parent))
    log.info("reference sample (holdout rows): %d rows in run %s at %s", len(frame), run_id, REFERENCE_ARTIFACT)
    return REFERENCE_ARTIFACT


def load_champion(settings: Settings, model_name: str) -> Champion:
    """The current champion with its training reference and holdout metrics; MonitoringError names what is missing."""
    version = aliases_of(mlflow_client(settings), model_name).get(CHAMPION)
    if version is None:
        raise MonitoringError(f"{model_name!r} has no champion in the registry: nothing to monitor (train first)")
    return load_version(settings, model_name, version)


def load_version(settings: Settings, model_name: str, version: str, where: str = "monitoring") -> Champion:
    """A registered version with its training reference and holdout metrics (see `load_champion`)."""
    from mlflow.exceptions import MlflowException

    client = mlflow_client(settings)
    run_id = client.get_model_version(model_name, version).run_id
    with tempfile.TemporaryDirectory() as folder:
        try:
            path = client.download_artifacts(run_id, REFERENCE_ARTIFACT, folder)
        except (MlflowException, OSError) as exc:
            raise MonitoringError(
                f"v{version} of {model_name!r} has no training reference ({REFERENCE_ARTIFACT} in run "
                f"{run_id}); it was trained before monitoring existed: retrain to create one"
            ) from exc
        reference = pd.read_parquet(path)
    if reference.empty:
        raise MonitoringError(f"the training reference of {model_name!r} v{version} (run {run_id}) is empty")
    holdout = holdout_metrics(client.get_run(run_id).data.metrics)
    model = load_model(model_name, version, settings, where=where)
    log.info("%s v%s loaded with %d reference rows (%s)", model_name, version, len(reference), where)
    return Champion(model_name, version, run_id, model, holdout, reference)


def prediction_log_keys(
    settings: Settings, model_name: str, days: int, now: datetime, filesystem: Any = None, stream: str = SERVING
) -> list[str]:
    """Keys of the serving prediction log in the last `days` UTC date folders (today and the `days - 1` before)."""
    filesystem = filesystem or s3_filesystem(settings)
    keys = []
    for day in log_dates(now, days):
        folder = S3Location(settings.bucket, day_prefix(model_name, day, stream))
        keys += list_keys(settings, folder, (".parquet",), filesystem)
    return sorted(keys)


def read_prediction_log(
    settings: Settings, model_name: str, days: int, now: datetime, stream: str = SERVING
) -> tuple[list[pd.DataFrame], str]:
    """The prediction log's objects of the last `days` date folders, and a description of where they came from.

    `stream` shadow: a rollout's outputs that answered nobody (`core.monitoring.prediction_log.SHADOW`).
    """
    filesystem = s3_filesystem(settings)
    keys = prediction_log_keys(settings, model_name, days, now, filesystem, stream)
    frames = []
    for key in keys:
        with filesystem.open_input_file(fs_path(S3Location(settings.bucket, key))) as body:
            frames.append(pd.read_parquet(io.BytesIO(body.read())))
    if frames:  # a spool segment uploaded twice (a crash between S3's answer and its deletion) counts once
        frames = [drop_duplicates(pd.concat(frames, ignore_index=True))]
    source = f"s3://{settings.bucket}/{prefix_for(model_name, stream)} (last {days} day(s), {len(keys)} file(s))"
    log.info("prediction log: %d file(s) from %d date folder(s)", len(keys), days)
    return frames, source


def report_folder(settings: Settings, model_name: str, now: datetime, run_id: str | None) -> S3Location:
    """`s3://<bucket>/reports/monitoring/<model>/<UTC time>-<flow run id, or local>/`."""
    return S3Location(settings.bucket, f"{model_prefix(model_name)}/{now:%Y%m%dT%H%M%SZ}-{run_id or 'local'}")


def store_report(settings: Settings, folder: S3Location, page: str, body: str) -> StoredReport:
    """Write `report.html` and `result.json` into `folder`; the HTML gets a presigned link."""
    html_uri = put_bytes(settings, folder.child("report.html"), page.encode(), "text/html; charset=utf-8")
    json_uri = put_bytes(settings, folder.child("result.json"), body.encode(), "application/json")
    link = s3_client(settings).generate_presigned_url(
        "get_object",
        Params={"Bucket": folder.bucket, "Key": folder.child("report.html").key},
        ExpiresIn=REPORT_LINK_SECONDS,
    )
    log.info("monitoring report stored at %s", html_uri)
    return StoredReport(html_uri, json_uri, link)


def _presigned(client: Any, location: S3Location) -> str:
    """A link a browser can open for `REPORT_LINK_SECONDS` (computed here; the object may not exist yet)."""
    return client.generate_presigned_url(
        "get_object", Params={"Bucket": location.bucket, "Key": location.key}, ExpiresIn=REPORT_LINK_SECONDS
    )


def page_link(settings: Settings, model_name: str) -> str:
    """The presigned link of the model's page (`core.monitoring.model_page.page_key`), for the run's report."""
    return _presigned(s3_client(settings), S3Location(settings.bucket, page_key(model_name)))


def read_results(settings: Settings, model_name: str, limit: int = MAX_RUNS) -> tuple[list[StoredRun], int]:
    """The newest `limit` stored runs of a model (their `result.json`, oldest first), and how many are stored.

    A run's folder is `<UTC time>-<flow run id>` (`report_folder`), so the keys sort by time. An unreadable result
    (not JSON, no time) is skipped with a warning: the page shows the others.
    """
    folder = S3Location(settings.bucket, model_prefix(model_name))
    depth = folder.key.count("/") + 2
    keys = [k for k in list_keys(settings, folder, ("/result.json",)) if k.count("/") == depth]
    client = s3_client(settings)

    def read(key: str) -> StoredRun | None:
        run_folder = key.rsplit("/", 2)[-2]
        body = client.get_object(Bucket=settings.bucket, Key=key)["Body"].read()
        try:
            result = json.loads(body)
        except ValueError as exc:
            log.warning("skipping unreadable monitoring result s3://%s/%s: %s", settings.bucket, key, exc)
            return None
        at = run_time(result, run_folder) if isinstance(result, dict) else None
        if at is None:
            log.warning(
                "skipping monitoring result s3://%s/%s: no time (`at`) and no time in its folder", folder.bucket, key
            )
            return None
        report = S3Location(settings.bucket, key.rsplit("/", 1)[0]).child("report.html")
        return StoredRun(at, run_folder, result, report.uri, _presigned(client, report))

    runs = [run for run in map_s3_requests(read, keys[-limit:]) if run is not None]
    log.info("monitoring page of %s: %d of %d stored run(s) read", model_name, len(runs), len(keys))
    return runs, len(keys)


def store_page(settings: Settings, model_name: str, page: str) -> StoredPage:
    """Write the model's page to `s3://<bucket>/reports/monitoring/<model>/index.html`, with a presigned link."""
    location = S3Location(settings.bucket, page_key(model_name))
    uri = put_bytes(settings, location, page.encode(), "text/html; charset=utf-8")
    log.info("monitoring page of %s stored at %s", model_name, uri)
    return StoredPage(uri, _presigned(s3_client(settings), location))
