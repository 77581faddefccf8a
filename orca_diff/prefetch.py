"""Keep the disk busy while apply computes: read ahead what the next chunks need, write back early.

With a cold page cache every decode worker used to stop on its own ``pread`` of base bytes and
payload bytes, then decode while the disk sat idle. :class:`ReadAhead` names the byte ranges of
the jobs a few steps ahead to ``posix_fadvise(WILLNEED)`` (asynchronous readahead into the page
cache) on a helper thread: by the time a worker reads them they are, or are being, in memory.
Only a bounded distance ahead is asked for (``AHEAD_BYTES``), so a page cache smaller than the
model (a memory cgroup, a small machine) keeps what is about to be used. Where ``posix_fadvise``
does not exist this does nothing; it never changes what is read, only when the disk reads it.

The other side: a file's dirty pages used to be flushed by the ``fsync`` before it is renamed,
gigabytes at once for a 4-10 GB shard, while the decode window sat full. :class:`EarlyWriteback`
starts the writeback of every ``WRITEBACK_BYTES`` written (Linux ``sync_file_range(WRITE)``, which
waits for nothing), so the final fsync finds little left; elsewhere it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import queue
import sys
import threading
from collections import deque
from pathlib import Path
from typing import Callable, Iterable, Iterator, TypeVar


T = TypeVar("T")
Range = tuple[Path, int, int]  # (file, offset, length)

#: How far ahead of the job being submitted the ranges are announced (bytes of base + payload).
AHEAD_BYTES = 96 << 20

_WILLNEED = getattr(os, "POSIX_FADV_WILLNEED", None)


#: Announcements waiting for the helper thread beyond which new ones are dropped (advice only).
MAX_PENDING = 64


class ReadAhead:
    """``posix_fadvise(WILLNEED)`` for ranges, on one helper thread that the caller never waits
    for (``fadvise`` can block while the disk's queue is full: the caller is apply's writer);
    descriptors opened read-only once per file and closed by :meth:`close`. Errors are ignored:
    readahead is advice."""

    def __init__(self) -> None:
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue[list[Range] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        if _WILLNEED is not None:
            self._thread = threading.Thread(target=self._run, name="orca-diff-readahead", daemon=True)
            self._thread.start()

    def want(self, ranges: list[Range]) -> None:
        if self._thread is not None and ranges and self._queue.qsize() < MAX_PENDING:
            self._queue.put(ranges)

    def _run(self) -> None:
        while (ranges := self._queue.get()) is not None:
            self._advise(ranges)

    def _advise(self, ranges: list[Range]) -> None:
        for path, offset, length in ranges:
            with self._lock:
                fd = self._fds.get(path)
                if fd is None:
                    try:
                        fd = self._fds[path] = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
                    except OSError:
                        continue
            try:
                os.posix_fadvise(fd, offset, length, _WILLNEED)  # type: ignore[arg-type]
            except OSError:
                pass

    def close(self) -> None:
        if self._thread is not None:
            while True:  # drop what is still queued, then stop the thread
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    break
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()


def announced(items: Iterable[T], ranges_of: Callable[[T], list[Range]], ahead: ReadAhead,
              distance: int = AHEAD_BYTES) -> Iterator[T]:
    """``items`` unchanged, each one's ranges announced to ``ahead`` about ``distance`` bytes
    before the item is yielded."""
    queue: deque[tuple[T, int]] = deque()
    queued = 0
    for item in items:
        ranges = ranges_of(item)
        ahead.want(ranges)
        size = sum(r[2] for r in ranges)
        queue.append((item, size))
        queued += size
        while queue and queued > distance:
            it, n = queue.popleft()
            queued -= n
            yield it
    while queue:
        yield queue.popleft()[0]


#: Bytes written to a file between two writeback starts.
WRITEBACK_BYTES = 32 << 20
_SYNC_FILE_RANGE_WRITE = 2


def _sync_file_range():
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


class EarlyWriteback:
    """Start writing back each file's pages every WRITEBACK_BYTES (advice: errors are ignored,
    and durability still comes from the fsync before the rename)."""

    _fn = _sync_file_range()

    def __init__(self) -> None:
        self._started: dict[int, int] = {}  # fd -> bytes whose writeback was started

    def wrote(self, fd: int, size: int) -> None:
        """``fd`` now holds ``size`` bytes."""
        done = self._started.get(fd, 0)
        if size < done:  # a new file on a reused descriptor number
            done = 0
        if self._fn is not None and size - done >= WRITEBACK_BYTES:
            self._fn(fd, done, size - done, _SYNC_FILE_RANGE_WRITE)
            done = size
        self._started[fd] = done

    def forget(self, fd: int) -> None:
        self._started.pop(fd, None)


__all__ = ["ReadAhead", "EarlyWriteback", "announced", "AHEAD_BYTES", "WRITEBACK_BYTES"]
