"""Every prediction, logged to S3 as Parquet in batches, off the request path.

The request path only appends a reference to what it already computed (inputs, scores, ids);
a background thread turns the buffer into one Parquet object every few seconds at
`s3://<bucket>/predictions/serving/<model>/date=YYYY-MM-DD/<time>-<uuid>.parquet`, which monitoring
reads (the layout and the table are defined once, in `core/prediction_log.py`). When S3 is unreachable
the rows stay buffered (bounded; the oldest are dropped and counted) and are written once it answers
again. A logging failure is counted and logged, never raised to a request.
"""

from __future__ import annotations

import io
import logging
import threading
import uuid
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pandas as pd

from adapters.clients import s3_client
from adapters.settings import Settings
from core.prediction_log import Entry, object_key, to_table

__all__ = ["Entry", "PredictionLog", "to_table"]  # Entry and to_table are core's, re-exported

log = logging.getLogger(__name__)


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
            key = object_key(self.model_name, now, uuid.uuid4().hex[:12])
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
