"""The serving prediction log's layout and table: one definition for the writer (serving) and the reader (monitoring).

Objects live at `s3://<bucket>/predictions/serving/<model>/date=YYYY-MM-DD/<HHMMSS>-<token>.parquet`
(the UTC date and time of the write), one row per scored record: the inputs, `request_id`, `record_id`
(the record's own id, when it sent one), `model_version`, `predicted`, `predicted_at` and a
`proba_<class>` column per class of a classifier. Pure: no I/O here.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from typing import Any

import numpy as np
import pandas as pd

PREFIX = "predictions/serving"
REQUEST_ID = "request_id"
RECORD_ID = "record_id"
PREDICTED_AT = "predicted_at"
LOG_KEY = "label_key"  # the column monitoring adds: what late labels join on (see `prediction_log_key`)


def prefix_for(model_name: str) -> str:
    """Key prefix of a model's prediction log."""
    return f"{PREFIX}/{model_name}/"


def day_prefix(model_name: str, day: date) -> str:
    """Key prefix of one UTC date of a model's prediction log."""
    return f"{prefix_for(model_name)}date={day:%Y-%m-%d}/"


def object_key(model_name: str, now: datetime, token: str) -> str:
    """Key of one write of the log, under the date folder of `now` (UTC)."""
    return f"{day_prefix(model_name, now.date())}{now:%H%M%S}-{token}.parquet"


def log_dates(now: datetime, days: int) -> list[date]:
    """The `days` UTC date folders "the last `days` days" reads: today and the `days - 1` before, newest first."""
    if days < 1:
        raise ValueError(f"days must be at least 1, not {days}")
    return [(now - timedelta(days=back)).date() for back in range(days)]


def window_start(now: datetime, days: int) -> datetime:
    """Start of "the last `days` days": 00:00 UTC of the oldest of `log_dates(now, days)`.

    Rows predicted before it are dropped even when a late write (S3 was down) put them in a newer folder,
    so the window is exactly the dates read.
    """
    return datetime.combine(log_dates(now, days)[-1], time(0), tzinfo=now.tzinfo)


def prediction_log_key(frame: pd.DataFrame) -> pd.Series:
    """What labels join on for each logged prediction.

    The record's own id when it sent one (the dataset's id column), else its request id (a client sending
    one record per request can set `x-request-id`).
    """
    request = frame[REQUEST_ID] if REQUEST_ID in frame.columns else pd.Series(None, index=frame.index)
    if RECORD_ID not in frame.columns:
        return request.astype(object)
    return frame[RECORD_ID].astype(object).where(frame[RECORD_ID].notna(), request)


@dataclass(frozen=True)
class Entry:
    """One scored batch, as the request path left it."""

    frame: pd.DataFrame
    scores: np.ndarray  # probabilities (n, classes), or a regressor's predicted values (n,)
    classes: list[Any]  # empty for a regressor
    request_ids: np.ndarray
    model_version: str
    at: datetime
    record_ids: np.ndarray | None = None  # the records' own ids (the dataset's id column), when sent


def to_table(entries: list[Entry]) -> pd.DataFrame:
    """Inputs, outputs and ids of many batches as one table (one row per record).

    `predicted` is the class with the highest probability for a classifier, with a `proba_<class>` column
    per class; for a regressor it is the predicted value (float) and there are no probability columns.
    Built with one concat of the input frames and numpy for the rest: the writer thread shares the GIL
    with the request path, so a flush of thousands of small batches must stay a few milliseconds.
    Batches of models with other classes (after a swap) get their own `proba_<class>` columns; if one
    flush mixes a regressor's and a classifier's batches (a swap between the two), `predicted` is text.
    """
    sizes = [len(e.frame) for e in entries]
    table = pd.concat([e.frame for e in entries], ignore_index=True)
    table[REQUEST_ID] = np.concatenate([e.request_ids for e in entries])
    table[RECORD_ID] = np.concatenate(
        [
            e.record_ids if e.record_ids is not None else np.full(size, None)
            for e, size in zip(entries, sizes, strict=True)
        ]
    ).astype(object)
    table["model_version"] = np.repeat([e.model_version for e in entries], sizes)
    predicted = [
        np.asarray(e.classes)[e.scores.argmax(axis=1)] if e.classes else np.asarray(e.scores, dtype="float64")
        for e in entries
    ]
    if len({bool(e.classes) for e in entries}) > 1:
        predicted = [p.astype(str).astype(object) for p in predicted]
    table["predicted"] = np.concatenate(predicted)
    table[PREDICTED_AT] = pd.to_datetime(np.repeat([e.at for e in entries], sizes), utc=True)
    columns = dict.fromkeys(f"proba_{c}" for e in entries for c in e.classes)
    for column in columns:
        table[column] = np.concatenate(
            [
                e.scores[:, [f"proba_{c}" for c in e.classes].index(column)]
                if column in {f"proba_{c}" for c in e.classes}
                else np.full(size, np.nan)
                for e, size in zip(entries, sizes, strict=True)
            ]
        )
    return table
