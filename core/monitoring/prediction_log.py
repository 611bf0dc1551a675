"""The serving prediction log's layout and table: one definition for the writer (serving) and the reader (monitoring).

Objects live at `s3://<bucket>/predictions/serving/<model>/date=YYYY-MM-DD/<HHMMSS>-<token>.parquet`
(the UTC date and time of the write), one row per scored record: the inputs, `request_id`, `record_id`
(the record's own id, when it sent one), `record_index` (the record's place in its request), `model_version`,
`predicted`, `predicted_at`, `request_seq` and a `proba_<class>` column per class of a classifier. A row is
identified by `request_id` + `record_index` + `predicted_at` + `request_seq` (the request's place in its
micro-batch: two requests sent at once with the same id keep both answers, and a client that reuses a request
id later keeps both too): a segment uploaded twice after a crash is dropped again on read (`drop_duplicates`).
Pure: no I/O here.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from typing import Any

import numpy as np
import pandas as pd

REQUEST_ID = "request_id"
RECORD_ID = "record_id"
RECORD_INDEX = "record_index"
PREDICTED_AT = "predicted_at"
REQUEST_SEQ = "request_seq"
LOG_KEY = "label_key"  # the column monitoring adds: what late labels join on (see `prediction_log_key`)


SERVING = "serving"  # the log of answered predictions
SHADOW = "shadow"  # outputs computed during a rollout that answered nobody (`core.rollout`)
CALL_MS = "call_ms"  # the model call's milliseconds (its whole micro-batch), per row


def prefix_for(model_name: str, stream: str = SERVING) -> str:
    """Key prefix of a model's prediction log (`stream` shadow: its rollout's unanswered outputs)."""
    return f"predictions/{stream}/{model_name}/"


def day_prefix(model_name: str, day: date, stream: str = SERVING) -> str:
    """Key prefix of one UTC date of a model's prediction log."""
    return f"{prefix_for(model_name, stream)}date={day:%Y-%m-%d}/"


def object_key(model_name: str, now: datetime, token: str, stream: str = SERVING) -> str:
    """Key of one write of the log, under the date folder of `now` (UTC)."""
    return f"{day_prefix(model_name, now.date(), stream)}{now:%H%M%S}-{token}.parquet"


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
    at: datetime | np.ndarray  # when it was scored: one time, or one per row
    record_ids: np.ndarray | None = None  # the records' own ids (the dataset's id column), when sent
    record_index: np.ndarray | None = None  # each record's place in its request (0 for a one-record request)
    request_seq: np.ndarray | None = None  # each record's request's place in its micro-batch (None: all 0)
    call_ms: float | np.ndarray | None = None  # the model call's milliseconds: one per batch, or one per row


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
    table[RECORD_INDEX] = np.concatenate(
        [
            np.asarray(e.record_index, dtype="int64") if e.record_index is not None else np.full(size, -1)
            for e, size in zip(entries, sizes, strict=True)
        ]
    )
    table[REQUEST_SEQ] = np.concatenate(
        [
            np.asarray(e.request_seq, dtype="int64") if e.request_seq is not None else np.zeros(size, dtype="int64")
            for e, size in zip(entries, sizes, strict=True)
        ]
    )
    table["model_version"] = np.repeat([e.model_version for e in entries], sizes)
    if any(e.call_ms is not None for e in entries):
        table[CALL_MS] = np.concatenate(
            [
                np.broadcast_to(np.asarray(np.nan if e.call_ms is None else e.call_ms, dtype="float64"), size)
                for e, size in zip(entries, sizes, strict=True)
            ]
        )
    predicted = [
        np.asarray(e.classes)[e.scores.argmax(axis=1)] if e.classes else np.asarray(e.scores, dtype="float64")
        for e in entries
    ]
    if len({bool(e.classes) for e in entries}) > 1:
        predicted = [p.astype(str).astype(object) for p in predicted]
    table["predicted"] = np.concatenate(predicted)
    times = [
        e.at if isinstance(e.at, np.ndarray) else np.repeat([e.at], size)
        for e, size in zip(entries, sizes, strict=True)
    ]
    table[PREDICTED_AT] = pd.to_datetime(np.concatenate(times), utc=True)
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


def drop_duplicates(frame: pd.DataFrame) -> pd.DataFrame:
    """The log without rows stored twice (a spool segment re-uploaded after a crash), first copy kept.

    A row is one record of one answered request: `request_id` + `record_index` + `predicted_at` +
    `request_seq` (logs written before it existed have no column: their key is the other three). Rows of
    logs written before `record_index` existed (no column, or -1) are all kept: nothing identifies them.
    """
    if frame.empty or RECORD_INDEX not in frame.columns or REQUEST_ID not in frame.columns:
        return frame
    keyed = frame[RECORD_INDEX].notna() & (frame[RECORD_INDEX] >= 0)
    key = [REQUEST_ID, RECORD_INDEX, PREDICTED_AT] + ([REQUEST_SEQ] if REQUEST_SEQ in frame.columns else [])
    duplicated = frame.duplicated(subset=key, keep="first") & keyed
    return frame[~duplicated].reset_index(drop=True) if duplicated.any() else frame


def spooled_batch(entry: Entry) -> dict[str, Any]:
    """One scored batch as the JSON-able dict a spool line stores (columns as lists or float arrays).

    Numbers stay float64 arrays (orjson writes them without a Python loop; NaN becomes null), text columns
    become lists. `spooled_table` turns lines back into the log's table.
    """
    columns = {
        name: values.to_numpy() if values.dtype.kind == "f" else values.tolist() for name, values in entry.frame.items()
    }
    return {
        "v": entry.model_version,
        "at": entry.at.isoformat(),
        "cls": [c.item() if isinstance(c, np.generic) else c for c in entry.classes],
        "rid": entry.request_ids.tolist(),
        "ids": None if entry.record_ids is None else list(entry.record_ids),
        "idx": None if entry.record_index is None else np.asarray(entry.record_index).tolist(),
        "seq": None if entry.request_seq is None else np.asarray(entry.request_seq).tolist(),
        "ms": None if entry.call_ms is None else float(np.mean(entry.call_ms)),
        "s": np.asarray(entry.scores, dtype="float64"),
        "f": columns,
    }


def _ms(value: Any) -> float:
    return np.nan if value is None else float(value)


def spooled_table(lines: list[dict[str, Any]]) -> pd.DataFrame:
    """The log's table (one row per record, as `to_table` builds it) from decoded spool lines.

    Consecutive lines with the same columns and classes are joined before one DataFrame is built (a
    frame per line would cost ~0.2 ms each, for thousands of lines per upload).
    """
    entries: list[Entry] = []
    group: list[dict[str, Any]] = []

    def close() -> None:
        if not group:
            return
        columns = {name: [v for line in group for v in line["f"][name]] for name in group[0]["f"]}
        frame = pd.DataFrame(columns)
        for name, values in group[0]["f"].items():  # numbers stored as floats stay floats (null -> NaN)
            if values and all(isinstance(v, float) or v is None for v in values):
                frame[name] = frame[name].astype("float64")
        sizes = [len(line["rid"]) for line in group]
        scores = [np.asarray(line["s"], dtype="float64") for line in group]
        entries.append(
            Entry(
                frame=frame,
                scores=np.concatenate(scores) if scores else np.empty(0),
                classes=list(group[0]["cls"]),
                request_ids=np.asarray([r for line in group for r in line["rid"]], dtype=object),
                model_version=group[0]["v"],
                at=np.repeat([datetime.fromisoformat(line["at"]) for line in group], sizes),
                record_ids=np.asarray(
                    [i for line in group for i in (line["ids"] or [None] * len(line["rid"]))], dtype=object
                ),
                record_index=np.asarray(
                    [i for line in group for i in (line["idx"] or [-1] * len(line["rid"]))], dtype="int64"
                ),
                request_seq=np.asarray(
                    [i for line in group for i in (line.get("seq") or [0] * len(line["rid"]))], dtype="int64"
                ),
                call_ms=np.repeat([_ms(line.get("ms")) for line in group], sizes)
                if any(line.get("ms") is not None for line in group)
                else None,
            )
        )
        group.clear()

    for line in lines:
        if group and (
            line["f"].keys() != group[0]["f"].keys() or line["cls"] != group[0]["cls"] or line["v"] != group[0]["v"]
        ):
            close()
        group.append(line)
    close()
    if not entries:
        return pd.DataFrame()
    return to_table(entries)
