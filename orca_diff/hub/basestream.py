"""A Hub base that is not in the cache, downloaded into the HF cache while apply reads it.

``download_base`` (apply only, :func:`orca_diff.hub.transfer.download_base` with ``stream=True``)
hands back a :class:`StreamedBase` instead of a finished folder when

* the diff's manifest records ``base.weight_files`` (size + sha256 of every weight file, measured
  by ``make``) and the repo's listing shows exactly those (sha256, size) as LFS files: the base is
  identified before any weight byte is downloaded (that refusal is unchanged), and
* they are safetensors files (read by ranges; a pickled ``.bin`` needs the whole file), and
* at least one of them is not in the cache yet.

The side files (config, tokenizer, index: small) are fetched through the client first; each
missing weight file is then downloaded by one background thread into the HF cache exactly as
:func:`orca_diff.hub.stream.fetch_to_cache` does (``blobs/<sha256>.orca-diff.incomplete``, resumed
across runs; the blob gets its sha256 name, the ``snapshots/<commit>/<path>`` link and the ref only
once the sha256 of its bytes, measured as they are written, matches the listing): first the
safetensors header of every missing file (two small ranged GETs each), then each file's data from
start to end, one file after the other, in the order apply first reads them. Apply's base reader
(:class:`StreamedSafetensorsModel`) reads a byte range with ``pread`` from the partial file as soon
as the download's watermark has passed it (a condition variable; never past what was written).

What replaces the sampled-block check before writing (it needs bytes spread over whole files):
the listing's proof that the repo holds files with the sha256 the diff records, and, before
anything is published, (a) the sha256 of each downloaded file (a mismatch: no blob under that
name, the partial is deleted) and (b) the full digest of every needed base tensor, measured from
the bytes the rebuild reads. Either mismatch is a BaseMismatchError (exit 6) naming the file,
the host and the tensor; the staging folder is removed and the partial file discarded, so a rerun
downloads it again.

Stalls and failures: the same rules as every other transfer (``stream.with_retries``: stall
timeout, retries with backoff, one line and exit 9); an interrupted run leaves the partial blob,
which the same command continues (nothing finished is fetched again).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..containers.safetensors import MAX_HEADER_BYTES, SafetensorsModel, parse_safetensors_header
from ..containers.base import list_extra_files, read_exact
from ..errors import BaseMismatchError, FormatError, OrcaDiffError
from .stream import (PARTIAL_SUFFIX, Cancelled, RemoteFile, _Retry, _link, _stream_range, cache_paths, with_retries,
                     write_ref)


#: Base weight files whose data download at once (besides the diff's ranged GETs).
FILES_IN_FLIGHT = 2


@dataclass
class _File:
    """One weight file being downloaded: what is written so far (``have``), its read descriptor."""

    remote: RemoteFile
    sha256: str
    revision: str | None
    blob: Path
    pointer: Path
    partial: Path
    lock: Path
    have: int = 0
    done: bool = False
    data_start: int | None = None
    fd: int = -1          # read-only descriptor of the partial file (stays valid across its rename)
    fetched: int = 0      # bytes downloaded by this run
    discard: bool = False
    hasher: object = field(default=None, repr=False)

    @property
    def rel(self) -> str:
        return self.remote.path


class StreamedBase:
    """The base folder (a ``snapshots/<commit>`` of the HF cache, side files in place) plus the
    weight files still downloading into it. ``open()`` gives apply its reader; ``wait_complete()``
    waits until every file is in the cache, checked (apply calls it before publishing)."""

    def __init__(self, folder: Path, files: list[_File], cached: list[str]):
        self.folder = folder
        self.files = {f.rel: f for f in files}
        self.cached = cached          # weight files already in the cache (checked blobs)
        self._order = [f.rel for f in files]
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self.retries = 0
        self.started = time.monotonic()
        self.last_byte = self.started
        self.bytes_fetched = 0
        self._thread = threading.Thread(target=self._run, name="orca-diff-base-download", daemon=True)
        self._thread.start()

    def __fspath__(self) -> str:  # where the base is, for messages and the "is --out an input" check
        return os.fspath(self.folder)

    # -- the download thread ----------------------------------------------------------------
    def _run(self) -> None:
        from huggingface_hub.utils import WeakFileLock

        try:
            with contextlib.ExitStack() as locks:
                for f in self.files.values():
                    f.lock.parent.mkdir(parents=True, exist_ok=True)
                    locks.enter_context(WeakFileLock(f.lock))
                    self._open(f)
                for f in self.files.values():  # every header first: apply opens the model with them
                    self._header(f)
                # then the data, FILES_IN_FLIGHT files at a time in read order: a stalled file does
                # not leave the link idle, and a finished one is fsynced and named while others download
                queue = list(self._order)
                lock = threading.Lock()

                def worker() -> None:
                    try:
                        while not self._stop.is_set():
                            with lock:
                                if not queue:
                                    return
                                f = self.files[queue.pop(0)]
                            self._append(f, f.remote.size)
                            self._finish_or_stop(f)
                    except Cancelled:
                        pass
                    except BaseException as exc:
                        self._fail(exc)
                        self._stop.set()

                helpers = [threading.Thread(target=worker, name=f"orca-diff-base-download-{i}", daemon=True)
                           for i in range(1, min(FILES_IN_FLIGHT, len(queue)))]
                for t in helpers:
                    t.start()
                worker()
                for t in helpers:
                    t.join()
        except Cancelled:
            pass
        except BaseException as exc:
            self._fail(exc)
        finally:
            for f in self.files.values():
                wfd = getattr(f, "_wfd", -1)
                if wfd >= 0 and not f.done:
                    with contextlib.suppress(OSError):
                        os.close(wfd)
                    f._wfd = -1  # type: ignore[attr-defined]
            self._drop_discarded()
            with self._cond:
                self._cond.notify_all()

    def _fail(self, exc: BaseException) -> None:
        """Record the download's first error (as one line naming the file) and wake the readers."""
        with self._cond:
            if self._error is None:
                self._error = exc if isinstance(exc, OrcaDiffError) else _describe(exc, self._current())
            self._cond.notify_all()

    def _current(self) -> RemoteFile:
        for rel in self._order:
            if not self.files[rel].done:
                return self.files[rel].remote
        return next(iter(self.files.values())).remote

    def _open(self, f: _File) -> None:
        """Open the partial file (continuing one an earlier run left: its bytes are re-hashed)."""
        f.blob.parent.mkdir(parents=True, exist_ok=True)
        h = hashlib.sha256()
        if f.partial.is_file() and f.partial.stat().st_size <= f.remote.size:
            with open(f.partial, "rb") as fh:
                while block := fh.read(16 << 20):
                    h.update(block)
        else:
            with contextlib.suppress(FileNotFoundError):
                f.partial.unlink()
        wfd = os.open(f.partial, os.O_WRONLY | os.O_CREAT | os.O_APPEND | getattr(os, "O_CLOEXEC", 0), 0o644)
        rfd = os.open(f.partial, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        with self._cond:
            f.hasher = h
            f.fd = rfd
            f.have = os.fstat(wfd).st_size
            f._wfd = wfd  # type: ignore[attr-defined]
            self._cond.notify_all()

    def _header(self, f: _File) -> None:
        """Download the first bytes of ``f`` up to the end of its safetensors header."""
        self._append(f, min(8, f.remote.size))
        if f.have < 8:
            return
        (n,) = struct.unpack("<Q", os.pread(f.fd, 8, 0))
        if n > MAX_HEADER_BYTES or n > f.remote.size - 8:
            return  # not a safetensors header: the reader refuses the file (wrong bytes)
        f.data_start = 8 + n
        self._append(f, 8 + n)

    def _append(self, f: _File, upto: int) -> None:
        """Download bytes [have, upto) of ``f`` onto the end of its partial file."""
        from ..prefetch import EarlyWriteback

        writeback = EarlyWriteback()
        wfd = f._wfd  # type: ignore[attr-defined]

        def attempt() -> bool:
            if f.have >= upto:
                return True
            got = 0
            try:
                for piece in _stream_range(f.remote, f.have, upto, self._stop):
                    view = memoryview(piece)
                    while len(view):
                        n = os.write(wfd, view)
                        view = view[n:]
                    f.hasher.update(piece)  # type: ignore[attr-defined]
                    got += len(piece)
                    with self._cond:
                        f.have += len(piece)
                        f.fetched += len(piece)
                        self.bytes_fetched += len(piece)
                        self.last_byte = time.monotonic()
                        self._cond.notify_all()
                    writeback.wrote(wfd, f.have)
            except _Retry:
                with self._cond:
                    self.retries += 1
                if got:
                    return False
                raise
            if f.have < upto:
                with self._cond:
                    self.retries += 1
                if got:
                    return False
                raise _Retry(f"the answer ended {upto - f.have} bytes short")
            return True

        with_retries(f.remote, attempt, self._stop)

    def _finish_or_stop(self, f: _File) -> None:
        """``_finish``; its failure is the download's error at once (readers raise it) and stops it."""
        try:
            self._finish(f)
        except BaseException as exc:
            with self._cond:
                if self._error is None:
                    self._error = exc if isinstance(exc, OrcaDiffError) else _describe(exc, f.remote)
                self._cond.notify_all()
            self._stop.set()
            raise

    def _finish(self, f: _File) -> None:
        """The whole file is there: fsync, check its sha256, give it its blob name and links."""
        from .transfer import _mark_verified

        wfd = f._wfd  # type: ignore[attr-defined]
        os.fsync(wfd)
        os.close(wfd)
        f._wfd = -1  # type: ignore[attr-defined]
        found = f.hasher.hexdigest()  # type: ignore[attr-defined]
        if found != f.sha256:
            with contextlib.suppress(FileNotFoundError):
                f.partial.unlink()
            err = BaseMismatchError(  # as a wrong base inside apply (its staging goes), then said as the server's
                f"base file {f.rel} of {f.remote.repo_id}@{f.remote.commit[:12]} from {f.remote.host}: its bytes hash "
                f"to sha256 {found[:12]}…, not the {f.sha256[:12]}… the repo's listing (and the diff) record: the "
                "server sent other bytes than it lists; nothing was published and the download was discarded "
                f"(rerun to fetch it again; if it persists, tell the repo's owner: {f.remote.url.split('/resolve/')[0]})")
            err.from_server = True  # type: ignore[attr-defined]
            raise err
        os.replace(f.partial, f.blob)
        _link(f.blob, f.pointer)
        write_ref(f.remote.repo_id, f.revision, f.remote.commit)
        _mark_verified(f.blob)
        with self._cond:
            f.done = True
            self._cond.notify_all()

    def _drop_discarded(self) -> None:
        for f in self.files.values():
            if f.discard and not f.done:
                with contextlib.suppress(FileNotFoundError):
                    f.partial.unlink()

    # -- what apply calls -------------------------------------------------------------------
    def wait_for(self, rel: str, end: int) -> _File:
        """Block until bytes [0, end) of ``rel`` are on disk; raise the download's error if it failed."""
        f = self.files[rel]
        with self._cond:
            while f.have < end or f.fd < 0:
                if self._error is not None:
                    raise self._error
                if self._stop.is_set():
                    raise Cancelled()
                if not self._thread.is_alive() and f.have < end:
                    raise BaseMismatchError(f"base file {rel} from {f.remote.host} ended at byte {f.have}, before byte "
                                            f"{end} that its header describes: the server sent other bytes than it lists")
                self._cond.wait(0.5)
        return f

    def open(self) -> "StreamedSafetensorsModel":
        return StreamedSafetensorsModel(self)

    def wait_complete(self) -> None:
        """Every weight file downloaded, its sha256 checked and named in the cache."""
        while self._thread.is_alive():
            self._thread.join(0.2)
        if self._error is not None:
            raise self._error
        left = [f.rel for f in self.files.values() if not f.done]
        if left:
            raise Cancelled()

    def refused(self, exc: BaseMismatchError, tensor_file: str | None) -> OrcaDiffError:
        """What apply raises when the base it read while downloading is refused (the staging folder
        is gone already). The listing proved the base, so bytes that contradict it came wrong from
        the server: a HubError (exit 9, as for a download that fails its sha256) naming the file and
        the host, and the partial file is discarded so that a rerun fetches it again. A tensor of a
        file that was in the cache (checked) stays a BaseMismatchError."""
        from ..errors import HubError

        f = self.files.get(tensor_file or "")
        if getattr(exc, "from_server", False):
            return HubError(str(exc))
        if f is None and tensor_file is not None and tensor_file in self.cached:
            return exc
        if f is None or f.done:  # which file is unknown (a layout refusal): no partial may keep those bytes
            if f is None:
                with self._cond:
                    for g in self.files.values():
                        g.discard = True
                self.close(wait=2.0)
                self._drop_discarded()
            return exc
        with self._cond:
            f.discard = True
        self.close(wait=2.0)
        if not self._thread.is_alive():
            self._drop_discarded()
        return HubError(f"{exc} Those bytes came from {f.remote.host} as {f.rel} of {f.remote.repo_id}"
                        f"@{f.remote.commit[:12]}, whose listing records the sha256 of the diff's base: the server "
                        "sent other bytes than it lists; the partial download was discarded (rerun to fetch it "
                        f"again; if it persists, tell the repo's owner: {f.remote.url.split('/resolve/')[0]})")

    def close(self, wait: float = 0.0) -> None:
        """Stop downloading (what was written stays, for the next run to continue); the read
        descriptors are closed once the thread has stopped (apply has finished reading by then)."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if wait:
            self._thread.join(wait)
        if not self._thread.is_alive():
            for f in self.files.values():
                if f.fd >= 0:
                    with contextlib.suppress(OSError):
                        os.close(f.fd)
                    f.fd = -1

    def summary(self) -> str | None:
        if not self.bytes_fetched:
            return None
        from ..progress import human_bytes

        took = max(1e-9, self.last_byte - self.started)
        host = next(iter(self.files.values())).remote.host
        return (f"downloaded {human_bytes(self.bytes_fetched)} of base weights from {host} into the HF cache while "
                f"rebuilding, in {took:.1f}s ({self.bytes_fetched / took / 1e6:.1f} MB/s), {self.retries} "
                f"retr{'y' if self.retries == 1 else 'ies'}")


def _describe(exc: BaseException, f: RemoteFile) -> OrcaDiffError:
    from .transfer import RepoRef, describe_hub_error

    return describe_hub_error(exc, RepoRef(f.repo_id, f.commit), f"base file {f.path} of")


class StreamedSafetensorsModel(SafetensorsModel):
    """A SafetensorsModel over a base whose files may still be downloading: the headers are read
    as soon as they landed, and every read waits until the download has passed its last byte."""

    streamed = True

    def __init__(self, source: StreamedBase):
        folder = source.folder
        self.source = source
        self.path = folder
        self.extra_files = {k: v for k, v in list_extra_files(folder).items()}
        self.tensors = {}
        self.headers = {}
        self._where = {}
        self._fds: dict[Path, int] = {}
        self._streamed: dict[Path, str] = {}
        rels = sorted({*source.cached, *source.files})
        for rel in rels:
            file = folder / rel
            if rel in source.files:
                header = self._streamed_header(rel)
                self._streamed[file] = rel
            else:
                from ..containers.safetensors import read_safetensors_header

                header = read_safetensors_header(file)
            self._index(file, rel, header)

    def _streamed_header(self, rel: str):
        src = self.source
        f = src.wait_for(rel, min(8, src.files[rel].remote.size))
        size = f.remote.size
        try:
            if size < 8:
                raise FormatError(f"too short to be a safetensors file ({size} bytes)")
            (n,) = struct.unpack("<Q", os.pread(f.fd, 8, 0))
            if n > MAX_HEADER_BYTES or n > size - 8:
                raise FormatError(f"safetensors header length {n} is impossible for a {size}-byte file")
            f = src.wait_for(rel, 8 + n)
            raw = os.pread(f.fd, n, 8)
            return parse_safetensors_header(raw, rel, size)
        except FormatError as exc:
            raise src.refused(BaseMismatchError(f"base file {rel}: {exc}"), rel) from None

    def file_of(self, tensor: str) -> str | None:
        """The base file (relative path) holding ``tensor``, None for an unknown name."""
        where = self._where.get(tensor)
        return where[0].relative_to(self.path).as_posix() if where else None

    def read(self, name: str, start: int = 0, length: int | None = None) -> np.ndarray:
        file, begin, end = self._where[name]
        rel = self._streamed.get(file)
        if rel is None:
            return super().read(name, start, length)
        size = end - begin
        if length is None:
            length = size - start
        if start < 0 or length < 0 or start + length > size:
            raise ValueError(f"range [{start}, {start + length}) outside tensor {name!r} of {size} bytes")
        f = self.source.wait_for(rel, begin + start + length)
        buf = np.empty(length, dtype=np.uint8)
        read_exact(f.fd, buf, begin + start, str(f.partial))
        return buf

    def close(self) -> None:
        super().close()


def read_order(folder: Path, rels: list[str], manifest) -> list[str]:
    """``rels`` in the order apply first reads a tensor of each (the index's weight map against
    the tensors the diff's chunks predict from, in rebuild order); the rest by name."""
    weight_map: dict[str, str] = {}
    index = folder / "model.safetensors.index.json"
    try:
        weight_map = dict(json.loads(index.read_text(encoding="utf-8")).get("weight_map", {}))
    except (OSError, ValueError, AttributeError):
        weight_map = {}
    if len(rels) == 1 or not weight_map:
        return sorted(rels)
    from ..format import file_segments

    order: list[str] = []
    needed = manifest.needed_base_tensors()
    for f in manifest.files:
        for seg in file_segments(f):
            t = manifest.tensors.get(seg.tensor) if seg.tensor is not None else None
            b = t.encoding.base_tensor if t is not None else None
            rel = weight_map.get(b) if b in needed else None
            if rel in rels and rel not in order:
                order.append(rel)
    return order + sorted(r for r in rels if r not in order)


def start_streamed_base(repo_id: str, commit: str, revision: str | None, folder: Path,
                        missing: list[tuple[str, int, str]], cached: list[str], manifest) -> StreamedBase:
    """Start downloading the ``missing`` (path, size, sha256) weight files of a base into the HF
    cache beside the side files already in ``folder``, in apply's read order."""
    from huggingface_hub import constants

    order = read_order(folder, [p for p, _s, _h in missing], manifest)
    by_path = {p: (s, h) for p, s, h in missing}
    files = []
    for rel in order:
        size, sha = by_path[rel]
        storage, blob, pointer = cache_paths(repo_id, commit, rel, sha)
        lock = Path(constants.HF_HUB_CACHE) / ".locks" / storage.name / f"{sha}.lock"
        files.append(_File(RemoteFile(repo_id, commit, rel, size), sha, revision, blob, pointer,
                           blob.with_name(sha + PARTIAL_SUFFIX), lock))
    return StreamedBase(folder, files, cached)


__all__ = ["StreamedBase", "StreamedSafetensorsModel", "start_streamed_base", "read_order"]
