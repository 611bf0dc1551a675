"""The prediction log's storage: the write-ahead spool's files on local disk, and their upload to S3.

The serving API's logs (`serving/prediction_log.py`) write through this module; it is their only door to
the disk folder and to S3.

`Spool`: this process's spool folder `<state>/spool/<model>/<owner>/`, segments of JSON lines appended
(and fdatasynced, at once or by a background thread's `sync()`) before the requests are answered. Several
serving processes may share one state folder: each owns its folder for its lifetime through an exclusive
`flock`; a segment holds one UTC date. The spool is bounded (`max_bytes`): an append beyond it is refused.

`SpoolUploader`: writes each closed segment to
`s3://<bucket>/predictions/serving/<model>/date=YYYY-MM-DD/<HHMMSS>-<owner>-<segment>.parquet` (a key
derived from the segment's name, so uploading it again after a crash overwrites the same object) and deletes
the segment only once S3 confirmed the write. It adopts the folders of the same model whose lock is free
(their process died): uploads their segments first, and removes them. Monitoring reads that folder (the
layout and the table are defined once, in `core/monitoring/prediction_log.py`) and drops duplicate rows as well.

Segments are turned into Parquet in a converter process (`CONVERTER`), one per serving process, shared by
the logs of all its models (the functions it runs are pickled by this module's path).

`PredictionObjects`: where the in-memory log writes its Parquet objects (one S3 client, made on first write).
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
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from adapters.clients import s3_client
from adapters.settings import Settings
from core.monitoring.prediction_log import SERVING, object_key, spooled_table

log = logging.getLogger(__name__)

SEGMENT_SUFFIX = ".jsonl"
LOCK_NAME = "lock"


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


def _write_line(fd: int, line: bytes) -> None:
    """Append `line` whole, or not at all.

    A short write is continued; a write that fails part-way is cut back to the line's start (a partial line
    would glue onto the next one and both would be skipped as torn), then raised.
    """
    start = os.lseek(fd, 0, os.SEEK_END)
    view, done = memoryview(line), 0
    try:
        while done < len(line):
            written = os.write(fd, view[done:])
            if written <= 0:
                raise OSError(f"short write: {done} of {len(line)} bytes")
            done += written
    except OSError:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, start)
        raise


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
            _write_line(self._fd, line)
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

    Run in the converter process (`SharedConverter`): decoding a few seconds of lines and building the
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


class PredictionObjects:
    """Where a prediction log's Parquet objects go: the settings' bucket, through one S3 client made on first write."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._client: Any = None

    def put(self, key: str, body: bytes) -> str:
        """Write one object at `key`; returns its URI. Raises what the S3 client raises."""
        if self._client is None:
            self._client = s3_client(self.settings)
        self._client.put_object(Bucket=self.settings.bucket, Key=key, Body=body)
        return f"s3://{self.settings.bucket}/{key}"


class SpoolUploader:
    """Uploads a model's spooled segments to S3 (this process's and those dead processes left), then deletes them.

    Args:
        settings: Where S3 is and the bucket.
        model_name: Names the key prefix.
        spool: This process's spool of that model (its folder and its siblings').
        on_event: Called with ("written" | "failed", rows) for metrics.
        on_spool_bytes: Called with the spool's size after each segment of this process is uploaded.
    """

    def __init__(
        self,
        settings: Settings,
        model_name: str,
        spool: Spool,
        on_event: Callable[[str, int], None],
        on_spool_bytes: Callable[[int], None],
    ) -> None:
        self.model_name = model_name
        self.stream = SERVING  # or `shadow`: the key prefix (`core.monitoring.prediction_log.prefix_for`)
        self.spool = spool
        self.on_event = on_event
        self.on_spool_bytes = on_spool_bytes
        self.objects = PredictionObjects(settings)

    def upload_own(self) -> int:
        """Upload this process's closed segments in order; stops at the first failure. Returns how many are left."""
        segments = self.spool.closed_segments()
        for done, segment in enumerate(segments):
            size = segment.stat().st_size
            if not self.upload(segment, self.spool.owner):
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
                    if not self.upload(segment, folder.name):
                        return uploaded  # S3 down: keep the rest for the next round
                    uploaded += 1
                with contextlib.suppress(OSError):  # the lock file last: others fail to open it, then
                    (folder / LOCK_NAME).unlink()
                    folder.rmdir()
            finally:
                os.close(fd)
        return uploaded

    @staticmethod
    def convert(segment: Path) -> tuple[bytes | None, int, int]:
        """`segment_parquet` in the process's converter process (`CONVERTER`, started on first use).

        Building the table there never holds this process's GIL: measured with 100-record requests from 8
        clients, a 5 s segment took ~0.65 s of such work, and the answers' p99 went from ~19 ms (no upload)
        to 60-300 ms. In this process as before when the converter cannot be used (it died, or cannot start).
        """
        return CONVERTER.convert(segment)

    def upload(self, segment: Path, owner: str) -> bool:
        """One segment to S3 at its own key, then deleted; False (segment kept) when S3 did not confirm."""
        body, rows, torn = self.convert(segment)
        if torn:
            log.warning(
                "prediction log: %s: %d torn line(s) skipped (written, never synced or answered)", segment, torn
            )
        if body is not None:
            created = datetime.strptime(segment.name.split("-", 1)[0], "%Y%m%dT%H%M%S%f").replace(tzinfo=UTC)
            key = object_key(self.model_name, created, f"{owner}-{segment.stem.split('-', 1)[1]}", self.stream)
            try:
                self.objects.put(key, body)
            except Exception as exc:
                log.warning("prediction log: writing %d rows to S3 failed (%s); kept in %s", rows, exc, segment)
                self.on_event("failed", rows)
                return False
            self.on_event("written", rows)
        segment.unlink()
        return True
