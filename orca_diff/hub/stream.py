"""Ranged, resumable, stall-proof reads of Hub files, through huggingface_hub's own session.

Two consumers:

* :class:`StreamedPayloads` feeds ``apply`` the payload chunks of a diff straight from the Hub:
  the chunks apply will need, in the order it needs them, grouped into ranged GETs with several
  in flight; each chunk is checked against its manifest digest as it lands and handed to the
  decoder, then forgotten (no copy of the diff is written). A failed, short, stalled or wrong
  range is retried from the first chunk not yet checked.
* :func:`fetch_to_cache` downloads one file into the standard HF cache layout (a blob named by
  its sha256 or git oid, a ``snapshots/<commit>/<path>`` link, ``refs/<branch>``), resuming a
  partial blob left by an earlier run and checking the sha256 of the bytes as they land.

Every read has a stall timeout (:func:`stall_timeout`): no byte for that long is a retry; after
:data:`RETRIES` tries without progress, one line naming the host and the file (HubError, exit 9).
:func:`install_timeouts` gives the client's own requests (``model_info``, the tree listing, the
HEAD calls, uploads) the same bound: huggingface_hub 2.4.0 builds its HTTP client with
``timeout=None`` and sends its metadata calls with ``timeout=None``, so a server that accepts a
connection and never answers hangs them forever, whatever ``HF_HUB_ETAG_TIMEOUT`` says.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator
from urllib.parse import urlsplit

import numpy as np

from ..digests import digest_bytes
from ..errors import CorruptDiffError, HubError, OrcaDiffError
from ..format import Chunk, Manifest

#: Seconds without a byte before a read is abandoned and retried (option ``--stall-timeout``).
STALL_ENV = "ORCA_DIFF_STALL_TIMEOUT"
DEFAULT_STALL_S = 10.0
#: Tries of one range without progress (a try that received bytes resets the count).
RETRIES = 5
#: Backoff between tries, seconds (doubling, capped).
BACKOFF_S, BACKOFF_MAX_S = 0.5, 8.0
#: Ranged GETs in flight, bytes fetched but not yet consumed, and the target size of one GET.
IN_FLIGHT = 4
PREFETCH_BUDGET = 192 << 20
RANGE_BYTES = 16 << 20
#: Times a chunk or file whose bytes fail their digest is fetched again before it is refused.
REFETCHES = 1


def stall_timeout() -> float:
    """``ORCA_DIFF_STALL_TIMEOUT``, else ``HF_HUB_DOWNLOAD_TIMEOUT``, else 10 s."""
    for name in (STALL_ENV, "HF_HUB_DOWNLOAD_TIMEOUT"):
        raw = os.environ.get(name, "").strip()
        if raw:
            try:
                value = float(raw)
            except ValueError:
                raise HubError(f"{name}={raw!r} is not a number of seconds") from None
            if value > 0:
                return value
    return DEFAULT_STALL_S


# --------------------------------------------------------------------------- the client's own calls
_installed = False


def _fill_timeouts(request) -> None:
    """Request hook: every timeout the client left at None (no limit) becomes the stall timeout,
    and none exceeds it by more than the client's ETag timeout allows (2.4.0 retries a failed HEAD
    with a hard-coded 60 s timeout, five times)."""
    from huggingface_hub import constants

    stall = stall_timeout()
    cap = max(stall, float(constants.HF_HUB_ETAG_TIMEOUT or 0))
    t = dict(request.extensions.get("timeout") or {})
    for key in ("connect", "read", "write", "pool"):
        v = t.get(key)
        t[key] = stall if v is None else min(float(v), cap)
    request.extensions["timeout"] = t


def install_timeouts() -> None:
    """Make huggingface_hub's shared HTTP client bound every request (idempotent)."""
    global _installed
    if _installed:
        return
    import huggingface_hub
    from huggingface_hub.utils import _http

    def factory():
        client = _http.default_client_factory()
        hooks = client.event_hooks
        hooks["request"] = [*hooks.get("request", []), _fill_timeouts]
        client.event_hooks = hooks
        return client

    huggingface_hub.set_client_factory(factory)
    _installed = True


# --------------------------------------------------------------------------- one ranged read
@dataclass(frozen=True)
class RemoteFile:
    """A file of a Hub repo at a commit."""

    repo_id: str
    commit: str
    path: str
    size: int

    @property
    def url(self) -> str:
        from huggingface_hub import hf_hub_url

        return hf_hub_url(self.repo_id, self.path, revision=self.commit)

    @property
    def host(self) -> str:
        return urlsplit(self.url).netloc

    def __str__(self) -> str:
        return f"{self.path} of {self.repo_id}@{self.commit[:12]}"


class _Retry(Exception):
    """A try failed in a way another try may fix (timeout, cut, short answer, 5xx, bad bytes)."""

    def __init__(self, why: str, *, stalled: bool = False):
        super().__init__(why)
        self.stalled = stalled


class Cancelled(Exception):
    """The consumer went away (apply failed or was interrupted): stop quietly."""


_RETRY_STATUS = (408, 429, 500, 502, 503, 504)
_NETWORK = ("ReadError", "WriteError", "NetworkError", "RemoteProtocolError", "ConnectError", "LocalProtocolError")
_TIMEOUT = ("ReadTimeout", "WriteTimeout", "ConnectTimeout", "PoolTimeout", "TimeoutException")


def _stream_range(f: RemoteFile, start: int, end: int, stop: threading.Event | None) -> Iterator[bytes]:
    """Yield the bytes [start, end) of ``f`` as they arrive, from one GET. Raises _Retry for what
    a retry may fix; the client's own errors (gated, not found, 401/403, offline) otherwise."""
    import httpx2
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    install_timeouts()
    stall = stall_timeout()
    headers = build_hf_headers()
    headers["Range"] = f"bytes={start}-{end - 1}"
    try:
        with get_session().stream("GET", f.url, headers=headers, follow_redirects=True,
                                  timeout=httpx2.Timeout(stall)) as r:
            if r.status_code in _RETRY_STATUS:
                raise _Retry(f"the server answered {r.status_code}")
            if r.status_code >= 400:
                r.read()
                hf_raise_for_status(r)
            skip = 0
            if r.status_code == 206:
                got = (r.headers.get("Content-Range") or "").removeprefix("bytes ").split("-")[0]
                if got != str(start):
                    raise _Retry(f"the server answered range {r.headers.get('Content-Range')!r} for bytes {start}-")
            elif start:  # the server ignored Range: read past what is not wanted
                skip = start
            left = end - start  # and never past what is wanted (a 200 answer sends it all)
            for piece in r.iter_bytes():  # as received (a chunk_size would hold bytes back)
                if stop is not None and stop.is_set():
                    raise Cancelled()
                if skip:
                    cut = min(skip, len(piece))
                    piece, skip = piece[cut:], skip - cut
                    if not piece:
                        continue
                if len(piece) >= left:
                    yield piece[:left]
                    return
                left -= len(piece)
                yield piece
    except (OrcaDiffError, Cancelled, _Retry):
        raise
    except Exception as exc:
        from huggingface_hub.errors import OfflineModeIsEnabled

        name = type(exc).__name__
        if isinstance(exc, OfflineModeIsEnabled):  # a ConnectionError, but no retry can help
            raise
        if name in _TIMEOUT:
            raise _Retry(f"no byte for {stall:g} s", stalled=True) from exc
        if name in _NETWORK or isinstance(exc, ConnectionError):
            raise _Retry(f"{name}: {' '.join(str(exc).split()) or 'connection lost'}") from exc
        raise


def _gave_up(f: RemoteFile, last: _Retry, tries: int) -> HubError:
    if last.stalled:
        return HubError(f"no data from {f.host} for {stall_timeout():g} s while fetching {f} ({tries} tries); check "
                        f"the connection, or raise --stall-timeout / {STALL_ENV}; rerun the same command to resume "
                        "(finished work is kept)")
    return HubError(f"fetching {f} from {f.host} failed {tries} times ({last}); rerun the same command to resume"
                    " (finished work is kept)")


def with_retries(f: RemoteFile, attempt: Callable[[], bool], stop: threading.Event | None = None,
                 sleep: Callable[[float], None] = time.sleep) -> None:
    """Call ``attempt`` until it returns True; a _Retry it raises is retried with doubling backoff,
    at most RETRIES times in a row without progress (``attempt`` returns False after progress)."""
    first = float(os.environ.get("ORCA_DIFF_BACKOFF_S") or BACKOFF_S)  # tests shorten it
    tries, wait = 0, first
    while True:
        try:
            if attempt():
                return
            tries, wait = 0, first  # progress: the count starts again
            continue
        except _Retry as exc:
            tries += 1
            if tries >= RETRIES:
                raise _gave_up(f, exc, tries) from None
        if stop is not None:
            if stop.wait(wait):
                raise Cancelled()
        else:
            sleep(wait)
        wait = min(BACKOFF_MAX_S, wait * 2)


# --------------------------------------------------------------------------- streamed payloads
@dataclass
class _Range:
    payload: str
    chunks: list[Chunk]

    @property
    def start(self) -> int:
        return self.chunks[0].offset

    @property
    def end(self) -> int:
        return self.chunks[-1].offset + self.chunks[-1].length

    @property
    def nbytes(self) -> int:
        return sum(c.length for c in self.chunks)


def plan_ranges(chunks: list[Chunk], range_bytes: int = RANGE_BYTES) -> list[_Range]:
    """Group chunks, in the order given, into ranged GETs: neighbours in one payload file that
    follow each other on disk share a GET of up to ``range_bytes`` (a chunk alone may exceed it)."""
    ranges: list[_Range] = []
    for c in chunks:
        last = ranges[-1] if ranges else None
        if (last is not None and last.payload == c.payload and last.end == c.offset
                and last.nbytes + c.length <= range_bytes):
            last.chunks.append(c)
        else:
            ranges.append(_Range(c.payload, [c]))
    return ranges


class StreamedPayloads:
    """Payload chunks from the Hub, for apply (the interface of ``apply._Payloads``: ``read`` a
    chunk, checked; ``close``). Fetching starts at construction, ``in_flight`` GETs at a time, in
    the order of ``chunks``; at most ``budget`` bytes are held fetched but not yet read."""

    def __init__(self, repo_id: str, commit: str, manifest: Manifest, chunks: list[Chunk], *,
                 in_flight: int = IN_FLIGHT, budget: int = PREFETCH_BUDGET, range_bytes: int | None = None):
        range_bytes = range_bytes or int(os.environ.get("ORCA_DIFF_RANGE_BYTES") or RANGE_BYTES)
        self.repo_id, self.commit, self.algo = repo_id, commit, manifest.digest_algo
        self._sizes = {p.path: p.size for p in manifest.payloads}
        self._ranges = deque(plan_ranges(chunks, max(1, min(range_bytes, budget // max(1, in_flight)))))
        self._planned = {(c.payload, c.offset) for c in chunks}
        self._budget = budget
        self._held = 0          # bytes of scheduled ranges whose chunks are not yet read
        self._ready: dict[tuple[str, int], np.ndarray] = {}
        self._error: BaseException | None = None
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self.bytes_fetched = 0
        self.retries = 0
        self.started = time.monotonic()
        self.last_byte = self.started
        self._threads = [threading.Thread(target=self._work, name=f"orca-diff-fetch-{i}", daemon=True)
                         for i in range(max(1, in_flight))]
        for t in self._threads:
            t.start()

    def _file(self, payload: str) -> RemoteFile:
        return RemoteFile(self.repo_id, self.commit, payload, self._sizes.get(payload, 0))

    # -- workers -----------------------------------------------------------------------------
    def _next_range(self) -> _Range | None:
        """The next range in order, once the budget has room for it (always when nothing is held)."""
        with self._cond:
            while True:
                if self._stop.is_set() or self._error is not None or not self._ranges:
                    return None
                r = self._ranges[0]
                if self._held == 0 or self._held + r.nbytes <= self._budget:
                    self._ranges.popleft()
                    self._held += r.nbytes
                    return r
                self._cond.wait()

    def _work(self) -> None:
        r: _Range | None = None
        try:
            while (r := self._next_range()) is not None:
                self._fetch(r)
        except Cancelled:
            pass
        except BaseException as exc:  # handed to the reader, which raises it in apply's thread
            with self._cond:
                if self._error is None:
                    self._error = (exc if isinstance(exc, OrcaDiffError) else
                                   _describe(exc, self._file(r.payload if r is not None else "?")))
                self._cond.notify_all()

    def _fetch(self, r: _Range) -> None:
        f = self._file(r.payload)
        todo = list(r.chunks)
        refetched: dict[int, int] = {}

        def attempt() -> bool:
            if not todo:
                return True
            first = todo[0]
            buf = np.empty(first.length, dtype=np.uint8)
            filled = 0
            progressed = False
            try:
                for piece in _stream_range(f, todo[0].offset, r.end, self._stop):
                    view = memoryview(piece)
                    while len(view):
                        c = todo[0]
                        n = min(len(view), c.length - filled)
                        buf[filled:filled + n] = np.frombuffer(view[:n], dtype=np.uint8)
                        filled += n
                        view = view[n:]
                        self.bytes_fetched += n
                        self.last_byte = time.monotonic()
                        if filled == c.length:
                            if digest_bytes(buf, self.algo) != c.digest:
                                k = refetched.get(c.offset, 0)
                                if k >= REFETCHES:
                                    raise CorruptDiffError(
                                        f"{f} on {f.host}: chunk at offset {c.offset} fails its {self.algo} check in "
                                        f"{REFETCHES + 1} downloads: the Hub serves other bytes than the diff's "
                                        f"manifest records; tell the publisher ({f.url.split('/resolve/')[0]})")
                                refetched[c.offset] = k + 1
                                raise _Retry(f"chunk at offset {c.offset} failed its {self.algo} check")
                            self._deliver(r.payload, c, buf)
                            progressed = True
                            todo.pop(0)
                            if not todo:
                                return True
                            buf = np.empty(todo[0].length, dtype=np.uint8)
                            filled = 0
            except _Retry:
                if progressed:  # chunks landed: resume after them, with a fresh count of tries
                    self.retries += 1
                    return False
                self.retries += 1
                raise
            if todo:
                self.retries += 1
                if progressed:
                    return False
                raise _Retry(f"the answer ended {sum(c.length for c in todo) - filled} bytes short")
            return True

        with_retries(f, attempt, self._stop)

    def _deliver(self, payload: str, c: Chunk, buf: np.ndarray) -> None:
        with self._cond:
            self._ready[(payload, c.offset)] = buf
            self._cond.notify_all()

    # -- the reader (apply's decode workers) --------------------------------------------------
    def read(self, c: Chunk, owner: str) -> np.ndarray:
        key = (c.payload, c.offset)
        with self._cond:
            unplanned = key not in self._planned
            if unplanned:  # not in the plan (a finished file that failed its re-check): fetched now
                self._planned.add(key)
                self._held += c.length
        if unplanned:
            try:
                self._fetch(_Range(c.payload, [c]))
            except OrcaDiffError:
                raise
            except Cancelled:
                raise
            except Exception as exc:
                raise _describe(exc, self._file(c.payload)) from None
        with self._cond:
            while key not in self._ready:
                if self._error is not None:
                    raise self._error
                if self._stop.is_set():
                    raise Cancelled()
                self._cond.wait(0.5)
            buf = self._ready.pop(key)
            self._planned.discard(key)  # read once; a second read fetches it again
            self._held -= c.length
            self._cond.notify_all()
        return buf

    def close(self) -> None:
        self._stop.set()
        with self._cond:
            self._ready.clear()
            self._cond.notify_all()


def _describe(exc: BaseException, f: RemoteFile) -> OrcaDiffError:
    from .transfer import RepoRef, describe_hub_error

    return describe_hub_error(exc, RepoRef(f.repo_id, f.commit), f"diff file {f.path} of")


class payload_source:
    """What ``apply_diff(payloads=...)`` takes: builds the streamed reader once apply knows which
    chunks it needs (files finished by an interrupted run are not fetched again); ``stream`` is
    the reader it built (for its measured figures)."""

    def __init__(self, repo_id: str, commit: str, **kw):
        self.repo_id, self.commit, self.kw = repo_id, commit, kw
        self.stream: StreamedPayloads | None = None

    def __call__(self, manifest: Manifest, chunks: list[Chunk]) -> StreamedPayloads:
        self.stream = StreamedPayloads(self.repo_id, self.commit, manifest, chunks, **self.kw)
        return self.stream

    def summary(self) -> str | None:
        """One line of what was measured: bytes streamed, how long, from which host, retries."""
        s = self.stream
        if s is None or not s.bytes_fetched:
            return None
        from ..progress import human_bytes

        took = max(1e-9, s.last_byte - s.started)
        host = RemoteFile(self.repo_id, self.commit, "x", 0).host
        return (f"streamed {human_bytes(s.bytes_fetched)} of payload from {host} in {took:.1f}s "
                f"({s.bytes_fetched / took / 1e6:.1f} MB/s), {s.retries} retr{'y' if s.retries == 1 else 'ies'}; "
                "no copy of the diff kept")


# --------------------------------------------------------------------------- whole files into the HF cache
PARTIAL_SUFFIX = ".orca-diff.incomplete"


def cache_paths(repo_id: str, commit: str, path: str, blob: str) -> tuple[Path, Path, Path]:
    """(repo storage folder, blob path, snapshot pointer path) in the HF cache."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    storage = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model")
    return storage, storage / "blobs" / blob, storage / "snapshots" / commit / path


def _link(blob: Path, pointer: Path) -> None:
    pointer.parent.mkdir(parents=True, exist_ok=True)
    rel = os.path.relpath(blob, pointer.parent)
    tmp = pointer.with_name(f".{pointer.name}.{os.getpid()}.link")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    os.symlink(rel, tmp)
    os.replace(tmp, pointer)


def write_ref(repo_id: str, revision: str | None, commit: str) -> None:
    """``refs/<revision>`` -> commit, as the client writes it (only for a branch or tag name)."""
    if not revision or revision == commit:
        return
    storage, _, _ = cache_paths(repo_id, commit, "x", "x")
    ref = storage / "refs" / revision
    ref.parent.mkdir(parents=True, exist_ok=True)
    if not ref.is_file() or ref.read_text().strip() != commit:
        # a name of this thread's own: several files of one repo land in parallel, each writing the ref
        tmp = ref.with_name(f".{ref.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(commit)
        os.replace(tmp, ref)


def _sha256_of(path: Path):
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(16 << 20):
            h.update(block)
    return h


def fetch_to_cache(f: RemoteFile, blob_name: str, sha256: str | None, *, revision: str | None = None,
                   force: bool = False, on_bytes: Callable[[int], None] | None = None, fetches: int = REFETCHES + 1,
                   error: type[OrcaDiffError] = CorruptDiffError, stop: threading.Event | None = None) -> Path:
    """Download ``f`` into the HF cache as the client would (``blobs/<blob_name>``, a
    ``snapshots/<commit>/<path>`` link, ``refs/<revision>``); return the snapshot path.

    Resumable across runs: the bytes go to ``blobs/<blob_name>.orca-diff.incomplete``, which an
    interrupted run leaves behind and the next one continues (its prefix is re-hashed). With
    ``sha256``, the bytes are checked as they land; a file that fails is fetched once more from
    its first byte (``fetches`` downloads in all), then refused naming the server (``error``).
    ``force``: replace a cached copy."""
    from huggingface_hub.utils import WeakFileLock

    storage, blob, pointer = cache_paths(f.repo_id, f.commit, f.path, blob_name)
    if not force and blob.is_file() and blob.stat().st_size == f.size:
        _link(blob, pointer)
        write_ref(f.repo_id, revision, f.commit)
        return pointer
    blob.parent.mkdir(parents=True, exist_ok=True)
    lock = storage.parent / ".locks" / storage.name / f"{blob_name}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    partial = blob.with_name(blob_name + PARTIAL_SUFFIX)
    with WeakFileLock(lock):
        if force:
            with contextlib.suppress(FileNotFoundError):
                partial.unlink()
        for fetch in range(fetches):
            h = _sha256_of(partial) if partial.is_file() and partial.stat().st_size <= f.size else None
            if h is None:
                with contextlib.suppress(FileNotFoundError):
                    partial.unlink()
                h = hashlib.sha256()
            with open(partial, "ab") as out:

                def attempt() -> bool:
                    done = out.tell()
                    if done >= f.size:
                        return True
                    got = 0
                    try:
                        for piece in _stream_range(f, done, f.size, stop):
                            out.write(piece)  # _stream_range stops at the size asked for
                            h.update(piece)
                            got += len(piece)
                            if on_bytes is not None:
                                on_bytes(len(piece))
                    except _Retry:
                        out.flush()
                        if got:
                            return False
                        raise
                    out.flush()
                    if out.tell() < f.size:
                        if got:
                            return False
                        raise _Retry(f"the answer ended {f.size - out.tell()} bytes short")
                    return True

                with_retries(f, attempt, stop)
                out.flush()
                os.fsync(out.fileno())
            if sha256 is None or h.hexdigest() == sha256:
                os.replace(partial, blob)
                _link(blob, pointer)
                write_ref(f.repo_id, revision, f.commit)
                return pointer
            partial.unlink()
        raise error(f"{f} on {f.host}: its bytes hash to sha256 {h.hexdigest()[:12]}…, not the {sha256[:12]}… "
                    f"it should have, in {fetches} download{'s' if fetches > 1 else ''}: the server holds a damaged "
                    f"copy; tell its owner ({f.url.split('/resolve/')[0]})")


def run_parallel(items: list, fn: Callable, workers: int = IN_FLIGHT) -> None:
    """``fn(item, stop)`` for every item on up to ``workers`` daemon threads (several files in
    flight, as the client's snapshot_download does); the first exception is raised here after
    the others were told to stop. Daemon threads and a polling join keep Ctrl-C immediate."""
    if len(items) <= 1 or workers <= 1:
        for it in items:
            fn(it, None)
        return
    stop = threading.Event()
    queue = deque(items)
    lock = threading.Lock()
    errors: list[BaseException] = []

    def work() -> None:
        while not stop.is_set():
            with lock:
                if not queue:
                    return
                it = queue.popleft()
            try:
                fn(it, stop)
            except Cancelled:
                return
            except BaseException as exc:
                with lock:
                    errors.append(exc)
                stop.set()
                return

    threads = [threading.Thread(target=work, name=f"orca-diff-download-{i}", daemon=True)
               for i in range(min(workers, len(items)))]
    for t in threads:
        t.start()
    try:
        for t in threads:
            while t.is_alive():
                t.join(0.2)
    finally:
        stop.set()
    if errors:
        raise errors[0]


__all__ = ["stall_timeout", "run_parallel", "install_timeouts", "RemoteFile", "StreamedPayloads", "payload_source", "plan_ranges",
           "fetch_to_cache", "write_ref", "cache_paths", "with_retries"]
