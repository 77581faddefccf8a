"""base + diff -> the fine-tuned model, byte-identical to the publisher's files.

Order of events, each a promise:
1. the manifest is validated and the payload files are checked for presence and size;
2. every base tensor and file the diff needs is hashed and compared (``check_base``) — a wrong
   base is refused before any output exists;
3. files are rebuilt into a hidden staging folder beside ``out`` (decode in worker threads,
   write and sha256 in order), each fsynced, checked against its sha256 and only then given its
   final name; the staging folder records finished files so an interrupted run resumes;
4. the staging folder is renamed to ``out``.
Memory is bounded by ``threads + 2`` chunks in flight.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

import numpy as np

from .codec import base_prediction, decode_chunk
from .digests import digest_bytes
from .errors import CorruptDiffError, InterruptedError_, OrcaDiffError, OutputError, VerificationError
from .format import Chunk, FileEntry, Manifest, file_segments, load_manifest
from .outdir import check_output, describe_os_error, publish, staging_dir
from .pipeline import default_threads, ordered_map
from .progress import byte_bar, human_bytes as _human
from .containers import DTYPE_SIZES, ModelReader, file_sha256, open_model, read_exact, read_range
from .verify import check_base, check_payload_presence, describe_file_mismatch

STATE_NAME = ".orca-diff-state.json"
INCOMPLETE = ".incomplete"


@dataclass
class ApplyReport:
    out: Path
    files: int
    bytes_written: int
    resumed_files: int
    seconds: float
    base_fingerprint: str
    target_fingerprint: str


@dataclass(frozen=True)
class _Job:
    """One step of rebuilding a file: a chunk of a tensor or of verbatim bytes, verbatim bytes
    held in the manifest, or a copy of a base file. Each yields the next bytes of the file."""

    file: FileEntry
    chunk: Chunk | None = None
    tensor: str | None = None  # the tensor these bytes belong to
    data: bytes | None = None  # verbatim bytes from the manifest
    from_base: bool = False
    first: bool = False        # first job of its file
    last: bool = False         # last job of its file


class _Payloads:
    """Thread-safe positional reads of payload chunks, sha256-checked before decoding."""

    def __init__(self, diff_dir: Path, algo: str):
        self.diff_dir, self.algo = diff_dir, algo
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()

    def read(self, c: Chunk, owner: str) -> np.ndarray:
        with self._lock:  # one descriptor per payload file, whichever worker opens it first
            fd = self._fds.get(c.payload)
            if fd is None:
                fd = self._fds[c.payload] = os.open(self.diff_dir / c.payload, os.O_RDONLY)
        buf = np.empty(c.length, dtype=np.uint8)
        try:
            read_exact(fd, buf, c.offset, str(self.diff_dir / c.payload))
        except OrcaDiffError as exc:
            raise CorruptDiffError(f"{exc}; download the diff again") from None
        if digest_bytes(buf, self.algo) != c.digest:
            raise CorruptDiffError(f"{self.diff_dir / c.payload}: chunk at offset {c.offset} ({owner}) fails its "
                                   f"{self.algo} check; the diff is corrupt, download it again")
        return buf

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)


def _jobs(manifest: Manifest, files: list[FileEntry]) -> Iterator[_Job]:
    for f in files:
        steps: list[_Job] = []
        for seg in file_segments(f):
            if seg.tensor is not None:
                steps += [_Job(f, c, seg.tensor) for c in manifest.tensors[seg.tensor].chunks]
            elif seg.data is not None:
                steps.append(_Job(f, data=seg.data))
            elif seg.from_base:
                steps.append(_Job(f, from_base=True))
            else:
                steps += [_Job(f, c) for c in seg.chunks]
        if not steps:  # an empty file
            steps = [_Job(f, data=b"")]
        for i, s in enumerate(steps):
            yield replace(s, first=i == 0, last=i == len(steps) - 1)


def _decode(job: _Job, manifest: Manifest, base: ModelReader, payloads: _Payloads) -> bytes | np.ndarray:
    f, c = job.file, job.chunk
    if job.data is not None:
        return job.data
    if job.from_base:
        return base.extra_files[f.path].read_bytes()
    if c is None:
        return b""
    if job.tensor is None:
        return decode_chunk(payloads.read(c, f"file {f.path!r}"), None, 1, "raw", c.size, "bytes",
                            where=f"{f.path} chunk {c.start}")
    t = manifest.tensors[job.tensor]
    enc = t.encoding
    owner = f"tensor {t.name!r}"
    payload = payloads.read(c, owner)
    itemsize = t.info.itemsize
    if c.mode == "delta":
        bt = manifest.base.tensors[enc.base_tensor]  # type: ignore[index]
        b_item = DTYPE_SIZES[bt.dtype]
        b_raw = read_range(base, enc.base_tensor, c.start // itemsize * b_item, c.size // itemsize * b_item)  # type: ignore[arg-type]
        pred = base_prediction(b_raw, bt.dtype, t.dtype)
        return decode_chunk(payload, pred, itemsize, enc.transform, c.size, enc.layout, where=owner)
    return decode_chunk(payload, None, itemsize, "raw", c.size, "planes", where=owner)


class _State:
    """The staging folder's record of finished files: {path: [size, mtime_ns]} for one manifest."""

    def __init__(self, staging: Path, manifest_id: str):
        self.path = staging / STATE_NAME
        self.manifest_id = manifest_id
        self.done: dict[str, list[int]] = {}

    def load(self) -> bool:
        try:
            doc = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return False
        if not isinstance(doc, dict) or doc.get("manifest") != self.manifest_id or not isinstance(doc.get("done"), dict):
            return False
        self.done = {k: v for k, v in doc["done"].items() if isinstance(v, list) and len(v) == 2}
        return True

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.unlink(missing_ok=True)  # never write through whatever sits at that name
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps({"manifest": self.manifest_id, "done": self.done}))
        os.replace(tmp, self.path)


def _partial_path(staging: Path, rel: str) -> Path:
    """Where ``rel`` is written before it is complete: a hidden name, which no target file can
    have (manifest paths never start with a dot), so it can never clobber a finished file."""
    final = staging / rel
    return final.with_name(f".{final.name}{INCOMPLETE}")


def _prune(staging: Path, manifest: Manifest) -> None:
    """Remove from a resumed staging folder everything the manifest does not describe (stale
    partial files, anything planted there): only the model's files get published. Symbolic
    links are removed, never followed."""
    keep = {STATE_NAME}
    for f in manifest.files:
        parts = f.path.split("/")
        keep.update("/".join(parts[:k]) for k in range(1, len(parts) + 1))
    for root, dirs, files in os.walk(staging):
        rel_root = Path(root).relative_to(staging)
        for name in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            if (rel_root / name).as_posix() not in keep:
                os.unlink(os.path.join(root, name))
        for d in list(dirs):
            if os.path.islink(os.path.join(root, d)) or (rel_root / d).as_posix() not in keep:
                if not os.path.islink(os.path.join(root, d)):
                    shutil.rmtree(os.path.join(root, d))
                dirs.remove(d)


def _open_new(staging: Path, rel: str) -> int:
    """Create ``staging/rel.incomplete`` for writing, never following a symlink."""
    parent = staging
    for part in rel.split("/")[:-1]:
        parent = parent / part
        if parent.is_symlink() or (parent.exists() and not parent.is_dir()):
            raise OutputError(f"{parent}: unexpected non-folder in the output; remove it and rerun")
        parent.mkdir(exist_ok=True)
    path = _partial_path(staging, rel)
    if path.is_symlink() or path.exists():
        path.unlink()
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)


def _finished(staging: Path, state: _State, f: FileEntry) -> bool:
    """A file of an interrupted run is kept only if the state records it AND it still hashes to
    the manifest's sha256: size and mtime alone would trust a file damaged between the runs
    (hashing is far cheaper than rebuilding, and keeps "every file matches" true on resume)."""
    rec = state.done.get(f.path)
    p = staging / f.path
    if rec is None or p.is_symlink() or not p.is_file():
        return False
    st = p.stat()
    return [st.st_size, st.st_mtime_ns] == rec and st.st_size == f.size and file_sha256(p) == f.sha256


def apply_diff(base: str | os.PathLike, diff: str | os.PathLike, out: str | os.PathLike, *, force: bool = False,
               threads: int | None = None, progress: bool | None = None) -> ApplyReport:
    """Rebuild the target model of ``diff`` from ``base`` into the folder ``out``."""
    t0 = time.perf_counter()
    diff_dir, out = Path(diff), Path(out)
    manifest = load_manifest(diff_dir)
    check_output(out, force, (base, diff_dir))
    check_payload_presence(diff_dir, manifest)
    threads = threads or default_threads()
    base_model = open_model(base)
    try:
        check_base(base_model, manifest, threads, progress)
        return _rebuild(base_model, manifest, diff_dir, out, force, threads, progress, t0)
    finally:
        base_model.close()


def _rebuild(base: ModelReader, manifest: Manifest, diff_dir: Path, out: Path, force: bool, threads: int,
             progress: bool | None, t0: float) -> ApplyReport:
    staging = staging_dir(out)
    state = _State(staging, hashlib.sha256(manifest.to_bytes()).hexdigest())
    if staging.is_symlink():
        raise OutputError(f"{staging}: is a symbolic link; remove it and rerun")
    try:  # nothing is created until the space is known to be there
        if staging.exists() and not state.load():
            shutil.rmtree(staging)  # our own hidden folder, from another diff or an unreadable state
        elif staging.exists():
            _prune(staging, manifest)
        todo = [f for f in manifest.files if not _finished(staging, state, f)]
        resumed = len(manifest.files) - len(todo)
        remaining = sum(f.size for f in todo)
        free = shutil.disk_usage(staging if staging.exists() else out.parent).free
        if free < remaining:
            raise OutputError(f"{out.parent}: needs {_human(remaining)} free to rebuild, has {_human(free)}; "
                              "free space and rerun (finished files are kept)")
        staging.mkdir(exist_ok=True)
    except OSError as exc:
        raise describe_os_error(exc, staging, "choose another --out") from None
    resume_hint = f"rerun the same command to resume (finished files are kept in {staging})"
    payloads = _Payloads(diff_dir, manifest.digest_algo)
    fd, h, path = -1, hashlib.sha256(), staging
    written = 0
    try:
        with byte_bar(remaining, "rebuilding", progress) as bar:
            for job, data in ordered_map(lambda j: (j, _decode(j, manifest, base, payloads)), _jobs(manifest, todo), threads):
                f = job.file
                if job.first:
                    path = _partial_path(staging, f.path)
                    fd = _open_new(staging, f.path)
                    h = hashlib.sha256()
                if len(data):
                    h.update(data)
                    _write_all(fd, data)
                    bar.update(len(data))
                    written += len(data)
                if job.last:
                    os.fsync(fd)
                    os.close(fd)
                    fd = -1
                    if h.hexdigest() != f.sha256:
                        raise VerificationError(f"{path}: {describe_file_mismatch(path, f, manifest)} after rebuilding; "
                                                "the diff or base changed while applying; rerun")
                    final = staging / f.path
                    os.replace(path, final)
                    st = final.stat()
                    state.done[f.path] = [st.st_size, st.st_mtime_ns]
                    state.save()
    except KeyboardInterrupt:
        raise InterruptedError_(f"interrupted; {resume_hint}") from None
    except OSError as exc:
        raise describe_os_error(exc, path, resume_hint) from None
    finally:
        if fd >= 0:
            os.close(fd)
        payloads.close()
    try:
        (staging / STATE_NAME).unlink(missing_ok=True)
        publish(staging, out, force)
    except OSError as exc:
        raise describe_os_error(exc, out, f"the complete result is in {staging}") from None
    return ApplyReport(out, len(manifest.files), written, resumed, time.perf_counter() - t0,
                       manifest.base.fingerprint, manifest.target_fingerprint)


def _write_all(fd: int, data: bytes | np.ndarray) -> None:
    view = memoryview(data).cast("B")
    while view:
        n = os.write(fd, view)
        view = view[n:]


__all__ = ["apply_diff", "ApplyReport", "file_sha256"]
