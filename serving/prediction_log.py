"""Every prediction, logged to S3 as Parquet in batches, off the request path.

The request path only appends a reference to what it already computed (inputs, scores, ids);
a background thread turns the buffer into one Parquet object every few seconds at
`s3://<bucket>/predictions/serving/<model>/date=YYYY-MM-DD/<time>-<uuid>.parquet`, which monitoring
reads. When S3 is unreachable the rows stay buffered (bounded; the oldest are dropped and counted) and
are written once it answers again. A logging failure is counted and logged, never raised to a request.
"""

from __future__ import annotations

import io
import logging
import threading
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pandas as pd

from adapters.clients import s3_client
from adapters.settings import Settings

log = logging.getLogger(__name__)

PREFIX = "predictions/serving"


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
    table["request_id"] = np.concatenate([e.request_ids for e in entries])
    table["record_id"] = np.concatenate(
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
    table["predicted_at"] = pd.to_datetime(np.repeat([e.at for e in entries], sizes), utc=True)
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


def prefix_for(model_name: str) -> str:
    """Key prefix of a model's prediction log."""
    return f"{PREFIX}/{model_name}/"


class PredictionLog:
    """Buffer of scored batches flushed to S3 by a daemon thread.

    Args:
        settings: Where S3 is and the bucket.
        model_name: Names the key prefix.
        flush_seconds: Time between writes.
        max_rows: Rows kept while S3 is down; beyond it the oldest batches are dropped.
        on_event: Called with ("written" | "dropped" | "failed", rows) for metrics.
    """

    def __init__(
        self,
        settings: Settings,
        model_name: str,
        flush_seconds: float = 5.0,
        max_rows: int = 200_000,
        on_event: Callable[[str, int], None] | None = None,
    ) -> None:
        self.settings = settings
        self.model_name = model_name
        self.flush_seconds = flush_seconds
        self.max_rows = max_rows
        self.on_event = on_event or (lambda kind, rows: None)
        self._entries: deque[Entry] = deque()
        self._rows = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._client: Any = None

    def record(
        self,
        frame: pd.DataFrame,
        scores: np.ndarray,
        classes: list[Any],
        request_ids: np.ndarray,
        version: str,
        record_ids: np.ndarray | None = None,
    ) -> None:
        """Keep one scored batch for the next write (cheap: no copy, no I/O)."""
        entry = Entry(frame, scores, classes, request_ids, version, datetime.now(UTC), record_ids)
        with self._lock:
            self._entries.append(entry)
            self._rows += len(frame)
            self._trim()

    def _trim(self) -> None:
        """Drop the oldest batches beyond `max_rows` (caller holds the lock)."""
        dropped = 0
        while self._rows > self.max_rows and len(self._entries) > 1:
            old = self._entries.popleft()
            self._rows -= len(old.frame)
            dropped += len(old.frame)
        if dropped:
            log.warning("prediction log: buffer full, dropped the oldest %d rows", dropped)
            self.on_event("dropped", dropped)

    def start(self) -> None:
        """Start the background writer."""
        self._thread = threading.Thread(target=self._loop, name="prediction-log", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Write what is buffered (one last try) and stop the writer."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.flush()

    def _loop(self) -> None:
        while not self._stop.wait(self.flush_seconds):
            self.flush()

    def flush(self) -> str | None:
        """Write everything buffered as one Parquet object; returns its URI (None when nothing to write)."""
        with self._lock:
            entries = list(self._entries)
            self._entries.clear()
            self._rows = 0
        if not entries:
            return None
        rows = sum(len(e.frame) for e in entries)
        try:
            table = to_table(entries)
            buffer = io.BytesIO()
            table.to_parquet(buffer, index=False)
            now = datetime.now(UTC)
            key = f"{prefix_for(self.model_name)}date={now:%Y-%m-%d}/{now:%H%M%S}-{uuid.uuid4().hex[:12]}.parquet"
            if self._client is None:
                self._client = s3_client(self.settings)
            self._client.put_object(Bucket=self.settings.bucket, Key=key, Body=buffer.getvalue())
        except Exception as exc:
            log.warning("prediction log: writing %d rows to S3 failed (%s); kept for the next try", rows, exc)
            self.on_event("failed", rows)
            with self._lock:  # put them back in front, keeping the bound
                self._entries.extendleft(reversed(entries))
                self._rows += rows
                self._trim()
            return None
        self.on_event("written", rows)
        return f"s3://{self.settings.bucket}/{key}"
