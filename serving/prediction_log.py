"""Every answered prediction, logged to S3 as Parquet: in a local spool before the answer is sent.

`SpooledPredictionLog` (the default): the prediction thread appends each scored micro-batch as one JSON
line to a segment file of this process's spool folder before the requests are answered. How durable
that is, `serving_spool_sync` says:
- `batch` (default): the line is written (the kernel holds it, so a serving process that is killed or
  crashes loses nothing) and a background thread fdatasyncs the file every `serving_spool_sync_seconds`
  (20 ms): a crash of the whole machine may lose that last interval;
- `always`: the line is fdatasynced before the answer. The sync is per micro-batch, not per request:
  while one batch is scored and synced, the requests that arrive queue up and are scored, written and
  synced together next (group commit through the batcher, whose prediction thread does it: in this mode
  no model is scored inline on the event loop, `syncs_each_write`); a lone client pays the disk's flush
  latency on every request.
A background thread closes the segment every `serving_log_flush_seconds` and uploads it to S3, deleting it
only once S3 confirmed the write; at start-up and every upload round it also uploads what dead processes
left in the spool of the same model. The spool's folders, segments, S3 keys and converter process are
storage, in `adapters/prediction_spool.py` (one log per model: its own folder and S3 prefix).

The spool is bounded (`serving_spool_max_bytes`): at the bound, predictions are still answered, their
rows are dropped, counted in `/metrics` and logged as errors. A logging failure never fails a request.

`MemoryPredictionLog` is the previous in-memory buffer (rows lost on a crash), kept behind
`MLOPS_SERVING_SPOOL=false` to measure what the spool costs (`python -m bench.spool`).
"""

from __future__ import annotations

import io
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import numpy as np
import orjson
import pandas as pd

from adapters.prediction_spool import CONVERTER, PredictionObjects, Spool, SpoolUploader
from adapters.settings import Settings
from core.monitoring.prediction_log import SERVING, Entry, object_key, to_table

__all__ = [
    "Entry",
    "MemoryPredictionLog",
    "PredictionLog",
    "ScoredBatch",
    "SpooledPredictionLog",
    "to_table",
]  # Entry, to_table: core's

log = logging.getLogger(__name__)

Inputs = pd.DataFrame | Mapping[str, np.ndarray]  # a batch's records: a frame, or column -> 1-d array


@dataclass(frozen=True, slots=True)
class ScoredBatch:
    """One scored batch as a prediction log records it.

    Attributes:
        inputs: The records as a frame or as `LoadedModel.columns_of`'s arrays (column -> 1-d array).
        scores: The model's scores, a row per record (probabilities per class, or a regressor's values).
        classes: The model's classes (empty for a regressor).
        request_ids: Each record's request id.
        version: The registry version that scored them.
        record_ids: Each record's id (the model's `id_field`), None without one.
        record_index: Each record's position in its request.
        request_seq: Each record's request's position in its micro-batch (None: one request).
    """

    inputs: Inputs
    scores: np.ndarray
    classes: list[Any]
    request_ids: Sequence[str]
    version: str
    record_ids: Sequence[str | None] | None = None
    record_index: Sequence[int] | None = None
    request_seq: Sequence[int] | None = None
    call_ms: float | None = None


class PredictionLog(Protocol):
    """What the serving API logs its predictions through."""

    def record(self, batch: ScoredBatch) -> None:
        """Log one scored batch (called in the prediction thread, before its requests are answered)."""

    @property
    def syncs_each_write(self) -> bool:
        """Whether `record` waits for the disk (fdatasync): then it must never run on the event loop."""

    def start(self) -> None:
        """Start the background writer."""

    def stop(self) -> None:
        """Write what is left and stop."""


class MemoryPredictionLog:
    """Buffer of scored batches flushed to S3 by a daemon thread (lost on a crash: see `SpooledPredictionLog`).

    Args:
        settings: Where S3 is and the bucket.
        model_name: Names the key prefix.
        flush_seconds: Time between writes.
        max_rows: Rows kept while S3 is down; beyond it the oldest batches are dropped.
        on_event: Called with ("written" | "dropped" | "failed", rows) for metrics.
        stream: `serving` (answered predictions) or `shadow` (a rollout's unanswered outputs).
    """

    def __init__(
        self,
        settings: Settings,
        model_name: str,
        flush_seconds: float = 5.0,
        max_rows: int = 200_000,
        on_event: Callable[[str, int], None] | None = None,
        stream: str = SERVING,
    ) -> None:
        self.settings = settings
        self.model_name = model_name
        self.stream = stream
        self.flush_seconds = flush_seconds
        self.max_rows = max_rows
        self.on_event = on_event or (lambda kind, rows: None)
        self._entries: deque[Entry] = deque()
        self._rows = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._objects = PredictionObjects(settings)

    syncs_each_write = False  # `record` does no I/O

    def record(self, batch: ScoredBatch) -> None:
        """Keep one scored batch for the next write (cheap: no I/O)."""
        inputs = batch.inputs
        frame = inputs if isinstance(inputs, pd.DataFrame) else pd.DataFrame(inputs, copy=False)
        request_ids = np.asarray(batch.request_ids, dtype=object)
        record_ids = None if batch.record_ids is None else np.asarray(batch.record_ids, dtype=object)
        record_index = None if batch.record_index is None else np.asarray(batch.record_index, dtype="int64")
        request_seq = None if batch.request_seq is None else np.asarray(batch.request_seq, dtype="int64")
        entry = Entry(
            frame,
            batch.scores,
            batch.classes,
            request_ids,
            batch.version,
            datetime.now(UTC),
            record_ids,
            record_index,
            request_seq,
            batch.call_ms,
        )
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
            key = object_key(self.model_name, now, uuid.uuid4().hex[:12], self.stream)
            uri = self._objects.put(key, buffer.getvalue())
        except Exception as exc:
            log.warning("prediction log: writing %d rows to S3 failed (%s); kept for the next try", rows, exc)
            self.on_event("failed", rows)
            with self._lock:  # put them back in front, keeping the bound
                self._entries.extendleft(reversed(entries))
                self._rows += rows
                self._trim()
            return None
        self.on_event("written", rows)
        return uri


DROP_LOG_EVERY = 10.0  # seconds between two error lines while rows are being dropped (each says how many)
PUBLISH_BYTES_EVERY = 0.1  # seconds between two updates of the spool-size gauge from the request path


def _plain_list(values: Sequence[Any]) -> list[Any]:
    """A list of plain Python values (what orjson writes) from a list, a range or a numpy array."""
    return values.tolist() if isinstance(values, np.ndarray) else list(values)


class PredictionNotLogged(RuntimeError):
    """With `serving_spool_full=refuse`: a batch the spool could not take is not answered (503)."""


class SpooledPredictionLog:
    """Predictions durable in a local spool before they are answered, uploaded to S3 by a daemon thread.

    Args:
        settings: Where S3 and the state folder are, the spool bound.
        model_name: Names the spool folder and the key prefix.
        flush_seconds: Age at which a segment is closed and uploaded.
        on_event: Called with ("written" | "dropped" | "failed", rows) for metrics.
        on_spool_bytes: Called with the spool's size (a gauge): after each upload, and after appends at most
            every `PUBLISH_BYTES_EVERY` seconds from the request path (and by the sync thread, within its interval).
        stream: `serving` (answered predictions) or `shadow` (a rollout's unanswered outputs: spool folder
            `<state>/spool-shadow/<model>/`).
    """

    def __init__(
        self,
        settings: Settings,
        model_name: str,
        flush_seconds: float = 5.0,
        on_event: Callable[[str, int], None] | None = None,
        on_spool_bytes: Callable[[int], None] | None = None,
        stream: str = SERVING,
    ) -> None:
        self.settings = settings
        self.model_name = model_name
        self.flush_seconds = flush_seconds
        self.on_event = on_event or (lambda kind, rows: None)
        self.on_spool_bytes = on_spool_bytes or (lambda size: None)
        self.spool = Spool(
            settings.state_dir.resolve() / ("spool" if stream == SERVING else f"spool-{stream}") / model_name,
            settings.serving_spool_max_bytes,
            sync_each=settings.serving_spool_sync == "always",
        )
        self.sync_seconds = settings.serving_spool_sync_seconds
        self._syncer: threading.Thread | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.uploader = SpoolUploader(settings, model_name, self.spool, self.on_event, self.on_spool_bytes)
        self.uploader.stream = stream
        self._dropped_since_log = 0
        self._last_drop_log = 0.0
        self._bytes_published, self._bytes_value = 0.0, 0
        self._classes_seen: list[Any] | None = None
        self._classes_plain: list[Any] = []
        self._uses_converter = False  # holds a share of CONVERTER (from start to stop)

    @property
    def syncs_each_write(self) -> bool:
        """True in `always` sync mode: `record` fdatasyncs before it returns."""
        return self.spool.sync_each

    def record(self, batch: ScoredBatch) -> None:
        """Append one scored batch to the spool as one line (synced in `always` mode); at the bound, count the drop.

        The line is what `core.monitoring.prediction_log.spooled_batch` writes (and `spooled_table` reads), built
        straight from the column arrays: numbers as float64 arrays (orjson writes them without a Python loop; NaN
        becomes null), text as lists.
        """
        now = datetime.now(UTC)
        columns = {name: np.asarray(values) for name, values in batch.inputs.items()}
        scores, classes, record_ids, record_index = batch.scores, batch.classes, batch.record_ids, batch.record_index
        rows = len(scores)
        if classes is not self._classes_seen:  # the same list for every batch of one model
            self._classes_seen = classes
            self._classes_plain = [c.item() if isinstance(c, np.generic) else c for c in classes]
        line = orjson.dumps(
            {
                "v": batch.version,
                "at": now.isoformat(),
                "cls": self._classes_plain,
                "rid": _plain_list(batch.request_ids),
                "ids": None if record_ids is None else _plain_list(record_ids),
                "idx": None if record_index is None else _plain_list(record_index),
                "seq": None if batch.request_seq is None else _plain_list(batch.request_seq),
                "ms": batch.call_ms,
                # orjson writes C-contiguous arrays only: a column cut from a 2-d batch, or a class slice of the
                # scores, is a strided view (seen with several models behind one batcher), so copy it when it is one
                "s": np.ascontiguousarray(scores, dtype="float64"),
                "f": {
                    name: np.ascontiguousarray(v) if v.dtype.kind == "f" else v.tolist() for name, v in columns.items()
                },
            },
            option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_APPEND_NEWLINE,
        )
        try:
            if self.spool.append(line, now):
                if time.monotonic() - self._bytes_published >= PUBLISH_BYTES_EVERY:
                    self._publish_bytes()
                return
            why = f"spool full ({self.spool.bytes} of {self.spool.max_bytes} bytes; S3 unreachable?)"
        except OSError as exc:  # disk full, folder removed: answered anyway, but say loudly that it is not logged
            why = f"cannot write the spool ({exc})"
        self._dropped(rows, why)
        if self.settings.serving_spool_full == "refuse":  # nothing is answered that is not logged
            raise PredictionNotLogged(f"the predictions could not be logged: {why}")

    def _publish_bytes(self) -> None:
        """Report the spool's size (a gauge: an mmap write in multiprocess mode, so not on every request)."""
        self._bytes_published, self._bytes_value = time.monotonic(), self.spool.bytes
        self.on_spool_bytes(self._bytes_value)

    def _dropped(self, rows: int, why: str) -> None:
        """Count rows not logged, and say so as an error at most every DROP_LOG_EVERY seconds."""
        self.on_event("dropped", rows)
        self._dropped_since_log += rows
        if time.monotonic() - self._last_drop_log >= DROP_LOG_EVERY:
            log.error(
                "prediction log: %s in %s: %d answered predictions NOT logged since the last report",
                why,
                self.spool.folder,
                self._dropped_since_log,
            )
            self._dropped_since_log, self._last_drop_log = 0, time.monotonic()

    def start(self) -> None:
        """Open this process's spool folder and start the uploader (leftovers of dead processes first)."""
        folder = self.spool.open()
        CONVERTER.acquire()
        self._uses_converter = True
        log.info("prediction log: spooling to %s, uploading every %.1fs", folder, self.flush_seconds)
        self._thread = threading.Thread(target=self._loop, name="prediction-log", daemon=True)
        self._thread.start()
        if not self.spool.sync_each:
            self._syncer = threading.Thread(target=self._sync_loop, name="prediction-log-sync", daemon=True)
            self._syncer.start()

    def _sync_loop(self) -> None:
        while not self._stop.wait(self.sync_seconds):
            try:
                self.spool.sync()
            except OSError:
                log.exception("prediction log: syncing the spool failed")
            if self.spool.bytes != self._bytes_value:
                self._publish_bytes()

    def stop(self) -> None:
        """Stop the uploader, upload what is spooled (one try each), release the folder."""
        self._stop.set()
        for thread in (self._thread, self._syncer):
            if thread is not None:
                thread.join(timeout=30)
        self.spool.roll()
        left = self.upload_own()
        if left:
            log.warning("prediction log: %d segment(s) stay in %s for the next start", left, self.spool.folder)
        self.spool.close()
        if self._uses_converter:
            self._uses_converter = False
            CONVERTER.release()

    def _loop(self) -> None:
        while True:
            try:
                self.adopt()
                self.spool.roll(older_than=self.flush_seconds)
                self.upload_own()
            except Exception:  # never let the uploader die: the spool would only grow
                log.exception("prediction log: upload round failed")
            if self._stop.wait(self.flush_seconds):
                return

    def upload_own(self) -> int:
        """Upload this process's closed segments in order; stops at the first failure. Returns how many are left."""
        return self.uploader.upload_own()

    def adopt(self) -> int:
        """Upload and remove the spool folders of dead processes (lock free); returns the segments uploaded."""
        return self.uploader.adopt()
