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
A background thread closes the segment every `serving_log_flush_seconds`, writes it to
`s3://<bucket>/predictions/serving/<model>/date=YYYY-MM-DD/<HHMMSS>-<owner>-<segment>.parquet` (a key
derived from the segment's name, so uploading it again after a crash overwrites the same object) and
deletes the segment only once S3 confirmed the write. Monitoring reads that folder (the layout and the
table are defined once, in `core/prediction_log.py`) and drops duplicate rows as well.

Several serving processes may share one state folder: each owns `<state>/spool/<model>/<owner>/` for
each model it serves (one log per model: its own folder and S3 prefix), held by an exclusive `flock` for
its lifetime. At start-up and every upload round a process adopts the folders of the same model whose lock
is free (their process died), uploads their segments first, and removes them. Segments are turned into
Parquet in a converter process (`CONVERTER`), one per serving process, shared by the logs of all its models.

The spool is bounded (`serving_spool_max_bytes`): at the bound, predictions are still answered, their
rows are dropped, counted in `/metrics` and logged as errors. A logging failure never fails a request.

`MemoryPredictionLog` is the previous in-memory buffer (rows lost on a crash), kept behind
`MLOPS_SERVING_SPOOL=false` to measure what the spool costs (`python -m bench.spool`).
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import logging
import multiprocessing
import os
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import orjson
import pandas as pd

from adapters.clients import s3_client
from adapters.settings import Settings
from core.prediction_log import Entry, object_key, spooled_table, to_table

__all__ = [
    "Entry",
    "MemoryPredictionLog",
    "PredictionLog",
    "SpooledPredictionLog",
    "to_table",
]  # Entry, to_table: core's

log = logging.getLogger(__name__)

Inputs = pd.DataFrame | Mapping[str, np.ndarray]  # a batch's records: a frame, or column -> 1-d array


class PredictionLog(Protocol):
    """What the serving API logs its predictions through."""

    def record(
        self,
        inputs: Inputs,
        scores: np.ndarray,
        classes: list[Any],
        request_ids: Sequence[str],
        version: str,
        record_ids: Sequence[str | None] | None = None,
        record_index: Sequence[int] | None = None,
    ) -> None:
        """Log one scored batch (called in the prediction thread, before its requests are answered).

        `inputs`: the records as a frame or as `LoadedModel.columns_of`'s arrays (column -> 1-d array).
        """

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

    syncs_each_write = False  # `record` does no I/O

    def record(
        self,
        inputs: Inputs,
        scores: np.ndarray,
        classes: list[Any],
        request_ids: Sequence[str],
        version: str,
        record_ids: Sequence[str | None] | None = None,
        record_index: Sequence[int] | None = None,
    ) -> None:
        """Keep one scored batch for the next write (cheap: no I/O)."""
        frame = inputs if isinstance(inputs, pd.DataFrame) else pd.DataFrame(inputs, copy=False)
        request_ids = np.asarray(request_ids, dtype=object)
        record_ids = None if record_ids is None else np.asarray(record_ids, dtype=object)
        record_index = None if record_index is None else np.asarray(record_index, dtype="int64")
        entry = Entry(frame, scores, classes, request_ids, version, datetime.now(UTC), record_ids, record_index)
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


SEGMENT_SUFFIX = ".jsonl"
LOCK_NAME = "lock"
DROP_LOG_EVERY = 10.0  # seconds between two error lines while rows are being dropped (each says how many)
PUBLISH_BYTES_EVERY = 0.1  # seconds between two updates of the spool-size gauge from the request path


def _plain_list(values: Sequence[Any]) -> list[Any]:
    """A list of plain Python values (what orjson writes) from a list, a range or a numpy array."""
    return values.tolist() if isinstance(values, np.ndarray) else list(values)


def _lock(path: Path) -> int | None:
    """An exclusive, non-blocking `flock` on `path` (created if needed): its fd, or None when another holds it."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except FileNotFoundError:  # its folder was just removed by the process that adopted it
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    if not path.exists():  # removed between open and lock: the folder is being dropped
        os.close(fd)
        return None
    return fd


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    """This process's spool folder: segments of JSON lines, appended and fsynced, under an exclusive lock.

    Args:
        root: `<state>/spool/<model>`; this process's folder is a new subfolder of it.
        max_bytes: Bytes of segments kept; an append beyond them is refused (returns False).
        sync_each: fdatasync in `append` itself (before the caller answers); otherwise `append` only writes
            (the kernel holds the line: a killed process loses nothing) and `sync()`, called by a background
            thread every few milliseconds, makes it durable against a crash of the machine.
    """

    def __init__(self, root: Path, max_bytes: int, sync_each: bool = True) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self.sync_each = sync_each
        self._dirty = False
        self.folder: Path | None = None
        self.bytes = 0
        self._lock_fd: int | None = None
        self._fd: int | None = None
        self._segment: Path | None = None
        self._opened_at = 0.0
        self._day: Any = None
        self._seq = 0
        self._mutex = threading.Lock()

    def open(self) -> Path:
        """Create and lock this process's folder (a fresh name until the lock is ours)."""
        self.root.mkdir(parents=True, exist_ok=True)
        while self._lock_fd is None:
            folder = self.root / f"{datetime.now(UTC):%Y%m%dT%H%M%S}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            folder.mkdir()
            self._lock_fd = _lock(folder / LOCK_NAME)
            self.folder = folder
        _fsync_dir(self.root)
        return self.folder  # type: ignore[return-value]

    @property
    def owner(self) -> str:
        """This process's folder name: part of every S3 key it writes."""
        assert self.folder is not None, "open() first"
        return self.folder.name

    def append(self, line: bytes, now: datetime) -> bool:
        """Write one line scored at `now` (and fdatasync it with `sync_each`); False (nothing written) at the bound."""
        with self._mutex:
            if self.bytes + len(line) > self.max_bytes:
                return False
            if self._fd is not None and now.date() != self._day:  # a segment holds one UTC date: its S3 folder
                self._close()
            if self._fd is None:
                assert self.folder is not None, "open() first"
                self._seq += 1
                self._segment = self.folder / f"{now:%Y%m%dT%H%M%S%f}-{self._seq:06d}{SEGMENT_SUFFIX}"
                self._fd = os.open(self._segment, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
                self._opened_at, self._day = time.monotonic(), now.date()
                _fsync_dir(self.folder)  # the new name itself must survive a crash
            os.write(self._fd, line)
            if self.sync_each:
                os.fdatasync(self._fd)
            else:
                self._dirty = True
            self.bytes += len(line)
            return True

    def sync(self) -> None:
        """Make durable (fdatasync) what `append` wrote since the last sync; appends go on meanwhile."""
        with self._mutex:
            if not self._dirty or self._fd is None:
                return
            fd, self._dirty = os.dup(self._fd), False
        try:
            os.fdatasync(fd)
        finally:
            os.close(fd)

    def _close(self) -> None:
        if self._fd is not None:
            if self._dirty:
                os.fdatasync(self._fd)
                self._dirty = False
            os.close(self._fd)
        self._fd, self._segment = None, None

    def roll(self, older_than: float = 0.0) -> None:
        """Close the open segment (if opened more than `older_than` seconds ago), so it can be uploaded."""
        with self._mutex:
            if self._fd is not None and time.monotonic() - self._opened_at >= older_than:
                self._close()

    def closed_segments(self) -> list[Path]:
        """This process's segments that no longer take appends, oldest first."""
        assert self.folder is not None, "open() first"
        with self._mutex:
            current = self._segment
        return sorted(p for p in self.folder.glob(f"*{SEGMENT_SUFFIX}") if p != current)

    def forget(self, size: int) -> None:
        """Count `size` bytes as gone (a segment was uploaded and deleted)."""
        with self._mutex:
            self.bytes = max(self.bytes - size, 0)

    def close(self) -> None:
        """Close the open segment and release the folder (removed when empty)."""
        with self._mutex:
            self._close()
        if self.folder is not None and self._lock_fd is not None:
            if not any(self.folder.glob(f"*{SEGMENT_SUFFIX}")):
                with contextlib.suppress(OSError):
                    (self.folder / LOCK_NAME).unlink()
                    self.folder.rmdir()
            os.close(self._lock_fd)
            self._lock_fd = None

    def orphans(self) -> list[Path]:
        """Sibling folders of processes that died (their lock is free), oldest first."""
        if not self.root.exists():
            return []
        return sorted(p for p in self.root.iterdir() if p.is_dir() and p != self.folder)


def segment_parquet(path: Path) -> tuple[bytes | None, int, int]:
    """A segment as the Parquet object its upload writes: (bytes, or None when it has no line; rows; torn lines).

    Run in the converter process (`SpooledPredictionLog`): decoding a few seconds of lines and building the
    table is CPU work in Python that would hold the serving process's GIL for hundreds of milliseconds.
    """
    lines, torn = read_segment(path)
    rows = sum(len(line["rid"]) for line in lines)
    if not lines:
        return None, rows, torn
    buffer = io.BytesIO()
    spooled_table(lines).to_parquet(buffer, index=False)
    return buffer.getvalue(), rows, torn


def _exit_with_parent(parent: int) -> None:
    """In the converter process: exit once the serving process that started it is gone (even SIGKILLed).

    A process pool's worker holds both ends of its own call queue, so it would never read an end of file.
    """

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def read_segment(path: Path) -> tuple[list[dict[str, Any]], int]:
    """The lines of a segment, and how many were unreadable (a torn last line: never synced, never answered)."""
    lines, torn = [], 0
    for raw in path.read_bytes().splitlines():
        if not raw.strip():
            continue
        try:
            lines.append(orjson.loads(raw))
        except orjson.JSONDecodeError:
            torn += 1
    return lines, torn


class SharedConverter:
    """The converter process of a serving process, shared by the prediction logs of every model it serves.

    One spawned process (about as large as a bare Python with pandas and pyarrow) per serving process,
    whatever the number of models: segments of different models are converted one after the other there.
    Started on first use; shut down when the last log that started (`acquire`) has stopped (`release`).
    """

    def __init__(self) -> None:
        self.pool: ProcessPoolExecutor | None = None
        self._users = 0
        self._lock = threading.Lock()

    def acquire(self) -> None:
        """A log starts using the converter."""
        with self._lock:
            self._users += 1

    def release(self) -> None:
        """A log stopped; the last one shuts the converter process down."""
        with self._lock:
            self._users = max(self._users - 1, 0)
            pool, self.pool = (self.pool, None) if self._users == 0 else (None, self.pool)
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    def _started(self) -> ProcessPoolExecutor:
        with self._lock:
            if self.pool is None:
                self.pool = ProcessPoolExecutor(
                    max_workers=1,
                    mp_context=multiprocessing.get_context("spawn"),
                    initializer=_exit_with_parent,
                    initargs=(os.getpid(),),
                )
            return self.pool

    def convert(self, segment: Path) -> tuple[bytes | None, int, int]:
        """`segment_parquet(segment)` in the converter process; in this process when it cannot be used."""
        try:
            pool = self._started()
        except (OSError, ValueError) as exc:
            log.warning("prediction log: no converter process (%s); converting in this process", exc)
            return segment_parquet(segment)
        try:
            return pool.submit(segment_parquet, segment).result()
        except BrokenProcessPool as exc:
            log.warning("prediction log: the converter process died (%s); converting in this process", exc)
            with self._lock:
                if self.pool is pool:
                    self.pool = None
            return segment_parquet(segment)


CONVERTER = SharedConverter()


class SpooledPredictionLog:
    """Predictions durable in a local spool before they are answered, uploaded to S3 by a daemon thread.

    Args:
        settings: Where S3 and the state folder are, the spool bound.
        model_name: Names the spool folder and the key prefix.
        flush_seconds: Age at which a segment is closed and uploaded.
        on_event: Called with ("written" | "dropped" | "failed", rows) for metrics.
        on_spool_bytes: Called with the spool's size (a gauge): after each upload, and after appends at most
            every `PUBLISH_BYTES_EVERY` seconds from the request path (and by the sync thread, within its interval).
    """

    def __init__(
        self,
        settings: Settings,
        model_name: str,
        flush_seconds: float = 5.0,
        on_event: Callable[[str, int], None] | None = None,
        on_spool_bytes: Callable[[int], None] | None = None,
    ) -> None:
        self.settings = settings
        self.model_name = model_name
        self.flush_seconds = flush_seconds
        self.on_event = on_event or (lambda kind, rows: None)
        self.on_spool_bytes = on_spool_bytes or (lambda size: None)
        self.spool = Spool(
            settings.state_dir.resolve() / "spool" / model_name,
            settings.serving_spool_max_bytes,
            sync_each=settings.serving_spool_sync == "always",
        )
        self.sync_seconds = settings.serving_spool_sync_seconds
        self._syncer: threading.Thread | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._client: Any = None
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

    def record(
        self,
        inputs: Inputs,
        scores: np.ndarray,
        classes: list[Any],
        request_ids: Sequence[str],
        version: str,
        record_ids: Sequence[str | None] | None = None,
        record_index: Sequence[int] | None = None,
    ) -> None:
        """Append one scored batch to the spool as one line (synced in `always` mode); at the bound, count the drop.

        The line is what `core.prediction_log.spooled_batch` writes (and `spooled_table` reads), built straight
        from the column arrays: numbers as float64 arrays (orjson writes them without a Python loop; NaN
        becomes null), text as lists.
        """
        now = datetime.now(UTC)
        columns = {name: np.asarray(values) for name, values in inputs.items()}
        rows = len(scores)
        if classes is not self._classes_seen:  # the same list for every batch of one model
            self._classes_seen = classes
            self._classes_plain = [c.item() if isinstance(c, np.generic) else c for c in classes]
        line = orjson.dumps(
            {
                "v": version,
                "at": now.isoformat(),
                "cls": self._classes_plain,
                "rid": _plain_list(request_ids),
                "ids": None if record_ids is None else _plain_list(record_ids),
                "idx": None if record_index is None else _plain_list(record_index),
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

    @property
    def _converter(self) -> ProcessPoolExecutor | None:
        """The converter process pool this log uses (shared by every log of the process), None before first use."""
        return CONVERTER.pool

    def _convert(self, segment: Path) -> tuple[bytes | None, int, int]:
        """`segment_parquet` in the process's converter process (`CONVERTER`, started on first use).

        Building the table there never holds this process's GIL: measured with 100-record requests from 8
        clients, a 5 s segment took ~0.65 s of such work, and the answers' p99 went from ~19 ms (no upload)
        to 60-300 ms. In this process as before when the converter cannot be used (it died, or cannot start).
        """
        return CONVERTER.convert(segment)

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
        segments = self.spool.closed_segments()
        for done, segment in enumerate(segments):
            size = segment.stat().st_size
            if not self._upload(segment, self.spool.owner):
                return len(segments) - done
            self.spool.forget(size)
            self.on_spool_bytes(self.spool.bytes)
        return 0

    def adopt(self) -> int:
        """Upload and remove the spool folders of dead processes (lock free); returns the segments uploaded."""
        uploaded = 0
        for folder in self.spool.orphans():
            fd = _lock(folder / LOCK_NAME)
            if fd is None:
                continue  # a live process owns it
            try:
                segments = sorted(folder.glob(f"*{SEGMENT_SUFFIX}"))
                if segments:
                    log.warning("prediction log: uploading %d segment(s) left by %s", len(segments), folder.name)
                for segment in segments:
                    if not self._upload(segment, folder.name):
                        return uploaded  # S3 down: keep the rest for the next round
                    uploaded += 1
                with contextlib.suppress(OSError):  # the lock file last: others fail to open it, then
                    (folder / LOCK_NAME).unlink()
                    folder.rmdir()
            finally:
                os.close(fd)
        return uploaded

    def _upload(self, segment: Path, owner: str) -> bool:
        """One segment to S3 at its own key, then deleted; False (segment kept) when S3 did not confirm."""
        body, rows, torn = self._convert(segment)
        if torn:
            log.warning(
                "prediction log: %s: %d torn line(s) skipped (written, never synced or answered)", segment, torn
            )
        if body is not None:
            created = datetime.strptime(segment.name.split("-", 1)[0], "%Y%m%dT%H%M%S%f").replace(tzinfo=UTC)
            key = object_key(self.model_name, created, f"{owner}-{segment.stem.split('-', 1)[1]}")
            try:
                if self._client is None:
                    self._client = s3_client(self.settings)
                self._client.put_object(Bucket=self.settings.bucket, Key=key, Body=body)
            except Exception as exc:
                log.warning("prediction log: writing %d rows to S3 failed (%s); kept in %s", rows, exc, segment)
                self.on_event("failed", rows)
                return False
            self.on_event("written", rows)
        segment.unlink()
        return True
