"""Bounded, ordered parallelism: the one place threads are managed.

zstd, numpy and hashlib release the GIL on large buffers, so plain threads use every core. Jobs
run ahead of the consumer by at most ``window`` results, which bounds memory to about
``window`` chunks whatever the model size.
"""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def default_threads() -> int:
    env = os.environ.get("ORCA_DIFF_THREADS")
    if env and env.isdigit() and int(env) > 0:
        return int(env)
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def ordered_map(fn: Callable[[T], R], items: Iterable[T], threads: int, window: int | None = None,
                on_abort: Callable[[], None] | None = None) -> Iterator[R]:
    """Like ``map(fn, items)`` but computed by ``threads`` workers, at most ``window`` ahead.

    On an exception (or when the consumer stops early) pending jobs are cancelled and the pool
    is shut down, so Ctrl-C does not leave workers running; ``on_abort`` is called first, to
    release workers that wait on something else (bytes still downloading).
    """
    window = window or threads + 2
    if threads <= 1:
        yield from map(fn, items)
        return
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="orca-diff")
    pending: deque[Future[R]] = deque()
    it = iter(items)
    try:
        for item in it:
            pending.append(pool.submit(fn, item))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for f in pending:
            f.cancel()
        if pending and on_abort is not None:
            on_abort()
        pool.shutdown(wait=True, cancel_futures=True)


class SerialWorker:
    """One helper thread running calls in submission order with at most one in flight: ``submit``
    first waits for the previous call, so a buffer handed to it is held no longer than the
    caller's loop holds the next one (the digests apply measures while it writes)."""

    def __init__(self, name: str):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._pending: Future[Any] | None = None

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        self.wait()
        self._pending = self._pool.submit(fn, *args)

    def wait(self) -> None:
        """Wait for the call in flight; its exception, if any, is raised here."""
        if self._pending is not None:
            p, self._pending = self._pending, None
            p.result()

    def close(self) -> None:
        """Drop the call in flight (waiting for it if it already started) and stop the thread."""
        self._pending = None
        self._pool.shutdown(wait=True, cancel_futures=True)
