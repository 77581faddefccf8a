"""base + diff -> the fine-tuned model, byte-identical to the publisher's files.

Order of events, each a promise:
1. the manifest is validated, its chunk sizes are held to apply's memory bound, ``--out`` is
   checked and locked (``outdir.output_session``: a concurrent run on the same output refuses at
   once), and the payload files are checked for presence and size;
2. the base is checked before any output exists: names, dtypes, shapes and (when the manifest
   records them) the sampled digests of every needed tensor (``basecheck``), else every needed
   tensor's full digest (``check_base``, older manifests); base files are hashed; a base that is
   still downloading from the Hub (``hub.basestream.StreamedBase``, proven by its listing) gets
   names, dtypes, shapes and base files here, and its full digests and file sha256s while rebuilding;
3. files are rebuilt into a hidden staging folder beside ``out`` (decode in worker threads,
   write and sha256 in order, each tensor's digest measured on a helper thread as its bytes go
   by and checked when it completes), each file fsynced, checked against its sha256 and only then
   given its final name, if that name still holds the file this run wrote; an append-only log in
   the staging folder records finished files so an interrupted run resumes (finished files are
   re-read once, measuring their sha256 and their tensors);
   with sampled digests, each needed base tensor's full digest is measured from the bytes the
   predictions read (the base is read once) and checked when its tensor completes, and every
   one before publishing; a mismatch removes the staging folder (BaseMismatchError, exit 6);
4. the staging folder is renamed to ``out``. The fingerprint reported is derived from the
   measured tensor digests, never copied from the manifest.
Memory: at most ``window`` chunks in flight, ``window`` chosen so that their working set stays
within ``MEMORY_BUDGET`` (see :func:`memory_plan`).
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np

from .basecheck import StreamedBaseDigests, check_base_samples, samples_usable, stream_users
from .codec import base_prediction, decode_chunk
from .digests import digest_bytes, new_hasher
from .errors import (BaseMismatchError, CorruptDiffError, FormatError, InputNotFoundError, InterruptedError_, OrcaDiffError,
                     OutputError, VerificationError, shown)
from .format import Chunk, FileEntry, Manifest, file_segments, load_manifest
from .outdir import (OutputSession, StagedFile, describe_os_error, hidden_sibling_name, output_session,
                     remove_path)
from .pipeline import SerialWorker, default_threads, ordered_map
from .prefetch import EarlyWriteback, ReadAhead, Range, announced
from .progress import byte_bar, human_bytes as _human
from .containers import DTYPE_SIZES, ModelReader, SafetensorsModel, file_sha256, open_model, read_exact, read_range
from .containers.base import open_regular
from .identity import model_digest
from .verify import (check_base, check_base_files, check_base_layout, check_measured_tensors, check_payload_presence,
                     describe_file_mismatch, diff_folder,
                     measure_file, measured_base_fingerprint, measured_target_fingerprint)

if TYPE_CHECKING:
    from .signing import SignedModel, VerifyWith

#: The staging folder's log of finished files (append-only: one line per file, so recording a
#: file costs the same whatever the number of files).
STATE_NAME = ".orca-diff-state.log"
INCOMPLETE = ".incomplete"
#: Apply's working set: chunks in flight x their per-chunk buffers (payload, base bytes, the
#: prediction, the decoded bytes) stays under this; fewer chunks are kept in flight when chunks are big.
MEMORY_BUDGET = 1 << 30
#: The largest chunk apply accepts (make writes 16 MiB ones; the format allows up to 1 GiB, whose
#: decoding alone would need several GiB): refused, naming the bound, before anything is read.
MAX_APPLY_CHUNK_BYTES = 256 << 20
#: Bytes of a base file copied per step (a base file is never read whole into memory).
BASE_COPY_BLOCK = 16 << 20


@dataclass
class ApplyReport:
    out: Path
    files: int
    bytes_written: int
    resumed_files: int
    seconds: float
    base_fingerprint: str | None  # measured: only when every base tensor of the manifest was checked
    target_fingerprint: str       # measured tensor fingerprint (a manifest consistency check, not the identity: model_digest)
    base_tensors_checked: int = 0
    digest_algo: str = "blake3"
    notes: list[str] = field(default_factory=list)
    #: the model identity (orca_diff.identity), from the sha256 of every file as written
    model_digest: str = ""
    #: what the publisher's signature proved (empty: no verify option given)
    provenance: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Job:
    """One step of rebuilding a file: a chunk of a tensor or of verbatim bytes, verbatim bytes
    held in the manifest, or a block of a base file. Each yields the next bytes of the file."""

    file: FileEntry
    chunk: Chunk | None = None
    tensor: str | None = None  # the tensor these bytes belong to
    data: bytes | None = None  # verbatim bytes from the manifest
    from_base: bool = False
    span: tuple[int, int] = (0, 0)  # (offset, size) of a base-file block
    first: bool = False        # first job of its file
    last: bool = False         # last job of its file
    tensor_last: bool = False  # last job of its tensor: its digest is checked after it


class _Payloads:
    """Thread-safe positional reads of payload chunks, digest-checked before decoding. A payload
    that cannot be opened or read is a corrupt or incomplete diff (never an output problem)."""

    def __init__(self, diff_dir: Path, algo: str):
        self.diff_dir, self.algo = diff_dir, algo
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()

    def read(self, c: Chunk, owner: str) -> np.ndarray:
        path = self.diff_dir / c.payload
        with self._lock:  # one descriptor per payload file, whichever worker opens it first
            fd = self._fds.get(c.payload)
            if fd is None:
                try:
                    fd = self._fds[c.payload] = os.open(path, os.O_RDONLY)
                except OSError as exc:
                    raise CorruptDiffError(f"{path}: payload file cannot be read ({exc.strerror}; removed or changed "
                                           "while applying?); the diff is incomplete: download it again and rerun "
                                           "(finished files are kept)") from None
        buf = np.empty(c.length, dtype=np.uint8)
        try:
            read_exact(fd, buf, c.offset, str(path))
        except OrcaDiffError as exc:
            raise CorruptDiffError(f"{exc}; download the diff again") from None
        except OSError as exc:
            raise CorruptDiffError(f"{path}: payload file cannot be read ({exc.strerror}); download the diff again") from None
        if digest_bytes(buf, self.algo) != c.digest:
            raise CorruptDiffError(f"{path}: chunk at offset {c.offset} ({owner}) fails its "
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
                chunks = manifest.tensors[seg.tensor].chunks
                if chunks:
                    steps += [_Job(f, c, seg.tensor) for c in chunks[:-1]]
                    steps.append(_Job(f, chunks[-1], seg.tensor, tensor_last=True))
                else:  # an empty tensor: no bytes, but its digest is measured and checked too
                    steps.append(_Job(f, tensor=seg.tensor, data=b"", tensor_last=True))
            elif seg.data is not None:
                steps.append(_Job(f, data=seg.data))
            elif seg.from_base:
                steps += [_Job(f, from_base=True, span=(o, min(BASE_COPY_BLOCK, seg.size - o)))
                          for o in range(0, seg.size, BASE_COPY_BLOCK)]
            else:
                steps += [_Job(f, c) for c in seg.chunks]
        if not steps:  # an empty file
            steps = [_Job(f, data=b"")]
        for i, s in enumerate(steps):
            yield replace(s, first=i == 0, last=i == len(steps) - 1)


#: The base bytes a delta chunk read, (offset in the base tensor, bytes): fed to its digest.
BaseRead = tuple[int, np.ndarray]


def _decode(job: _Job, manifest: Manifest, base: ModelReader, payloads: _Payloads
            ) -> bytes | np.ndarray | tuple[np.ndarray, BaseRead]:
    f, c = job.file, job.chunk
    if job.data is not None:
        return job.data
    if job.from_base:
        return _read_base_file(base.extra_files[f.path], *job.span)
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
        b_start = c.start // itemsize * b_item
        b_raw = read_range(base, enc.base_tensor, b_start, c.size // itemsize * b_item)  # type: ignore[arg-type]
        pred = base_prediction(b_raw, bt.dtype, t.dtype)
        return (decode_chunk(payload, pred, itemsize, enc.transform, c.size, enc.layout, where=owner, codec=enc.codec),
                (b_start, b_raw))
    return decode_chunk(payload, None, itemsize, "raw", c.size, "planes", where=owner)


def _base_locations(base: ModelReader) -> dict[str, tuple[Path, int]]:
    """tensor -> (file, offset of its first byte) for a safetensors base (empty for others)."""
    if not isinstance(base, SafetensorsModel):
        return {}
    where = {}
    for rel, h in base.headers.items():
        path = base.path if base.path.is_file() else base.path / rel
        for e in h.entries:
            where[e.info.name] = (path, h.data_start + e.begin)
    return where


def _job_ranges(job: _Job, manifest: Manifest, diff_dir: Path | None,
                located: dict[str, tuple[Path, int]]) -> list[Range]:
    """The file ranges ``_decode`` will read for ``job`` (for readahead): its payload chunk (when
    the payloads are files in ``diff_dir``) and, for a delta chunk, the base bytes it predicts from."""
    c = job.chunk
    if c is None:
        return []
    ranges: list[Range] = [] if diff_dir is None else [(diff_dir / c.payload, c.offset, c.length)]
    if c.mode == "delta" and job.tensor is not None:
        t = manifest.tensors[job.tensor]
        loc = located.get(t.encoding.base_tensor or "")
        if loc is not None:
            b_item = DTYPE_SIZES[manifest.base.tensors[t.encoding.base_tensor].dtype]  # type: ignore[index]
            ranges.append((loc[0], loc[1] + c.start // t.info.itemsize * b_item, c.size // t.info.itemsize * b_item))
    return ranges


def _read_base_file(path: Path, offset: int, size: int) -> np.ndarray:
    buf = np.empty(size, dtype=np.uint8)
    fd = open_regular(path, "base file")
    try:
        read_exact(fd, buf, offset, str(path))
    finally:
        os.close(fd)
    return buf


def _decode_job(job: _Job, manifest: Manifest, base: ModelReader, payloads: _Payloads, diff_dir: Path
                ) -> tuple[_Job, bytes | np.ndarray, BaseRead | None]:
    """``_decode`` in a worker, with the base bytes it read (None if none); an OSError there is an
    input that vanished or broke while applying, said as such (never blamed on the output)."""
    try:
        out = _decode(job, manifest, base, payloads)
        return (job, *out) if isinstance(out, tuple) else (job, out, None)
    except OSError as exc:
        name = exc.filename or ""
        if name and Path(str(name)).resolve().is_relative_to(diff_dir.resolve()):
            raise CorruptDiffError(f"{name}: cannot be read ({exc.strerror}); the diff is incomplete: download it "
                                   "again and rerun (finished files are kept)") from None
        raise InputNotFoundError(f"base {base.path}: {name or 'a file'} cannot be read ({exc.strerror}); was the "
                                 "base changed or removed while applying? Restore it and rerun") from None


class _TensorHashes:
    """Digests of the tensors being rebuilt, computed on one helper thread while the consumer
    writes and sha256-hashes the same bytes (BLAKE3 and zstd release the GIL): the measurement
    costs no wall time. At most one update is pending, so no buffer is held longer than the
    write loop holds it."""

    def __init__(self, algo: str):
        self.algo = algo
        self._worker = SerialWorker("orca-diff-digest")
        self._hashers: dict[str, object] = {}

    def update(self, tensor: str, data: bytes | np.ndarray) -> None:
        h = self._hashers.get(tensor)
        if h is None:
            h = self._hashers[tensor] = new_hasher(self.algo)
        if len(data):
            self._worker.submit(h.update, data)  # type: ignore[attr-defined]
        else:
            self._worker.wait()

    def finish(self, tensor: str) -> str:
        self._worker.wait()
        h = self._hashers.pop(tensor, None) or new_hasher(self.algo)
        return h.hexdigest()  # type: ignore[attr-defined]

    def close(self) -> None:
        self._worker.close()


class _State:
    """The staging folder's append-only log of finished files, for one manifest.

    Line 1: ``{"manifest": <id>}``; then one ``[path, size, mtime_ns]`` per finished file. A torn
    last line (a kill while appending) is ignored; the file it names is rebuilt."""

    def __init__(self, staging: Path, manifest_id: str):
        self.path = staging / STATE_NAME
        self.manifest_id = manifest_id
        self.done: dict[str, list[int]] = {}
        self._fd = -1

    def load(self) -> bool:
        try:
            if self.path.is_symlink():
                return False
            lines = self.path.read_bytes().split(b"\n")
            head = json.loads(lines[0])
        except (OSError, ValueError):
            return False
        if not isinstance(head, dict) or head.get("manifest") != self.manifest_id:
            return False
        for line in lines[1:]:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if (isinstance(rec, list) and len(rec) == 3 and isinstance(rec[0], str)
                    and all(type(x) is int for x in rec[1:])):
                self.done[rec[0]] = rec[1:]
        return True

    def open(self, resumed: bool) -> None:
        flags = os.O_WRONLY | os.O_APPEND | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        if resumed:
            self._fd = os.open(self.path, flags)
        else:
            remove_path(self.path)
            self._fd = os.open(self.path, flags | os.O_CREAT | os.O_EXCL, 0o644)
            os.write(self._fd, (json.dumps({"manifest": self.manifest_id}) + "\n").encode())

    def record(self, rel: str, st: os.stat_result) -> None:
        self.done[rel] = [st.st_size, st.st_mtime_ns]
        os.write(self._fd, (json.dumps([rel, st.st_size, st.st_mtime_ns]) + "\n").encode())

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def finished_files(staging: Path) -> dict[str, list[int]]:
    """What the staging folder's log records as finished (for tools and tests): {path: [size, mtime_ns]}."""
    state = _State(staging, "")
    try:
        head = json.loads(state.path.read_bytes().split(b"\n")[0])
        state.manifest_id = head.get("manifest")
    except (OSError, ValueError, AttributeError):
        return {}
    state.load()
    return state.done


def _partial_path(staging: Path, rel: str) -> Path:
    """Where ``rel`` is written before it is complete: a hidden name that no target file can have
    (the manifest path rule reserves every ``.<name>.incomplete`` form, hashed ones included:
    ``format.path_problem``), so it can never clobber a finished file."""
    final = staging / rel
    return final.with_name(hidden_sibling_name(final.name, INCOMPLETE, 255))


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


def _open_new(staging: Path, rel: str, hasher: SerialWorker | None = None) -> StagedFile:
    """Create ``staging/.rel.incomplete`` for writing, never following a symlink."""
    parent = staging
    for part in rel.split("/")[:-1]:
        parent = parent / part
        if parent.is_symlink() or (parent.exists() and not parent.is_dir()):
            raise OutputError(f"{parent}: unexpected non-folder in the output; remove it and rerun")
        parent.mkdir(exist_ok=True)
    return StagedFile(parent, rel.split("/")[-1], temp=_partial_path(staging, rel), hasher=hasher)


def _finished(staging: Path, state: _State, f: FileEntry, manifest: Manifest) -> dict[str, str] | None:
    """A file of an interrupted run is kept only if the log records it AND it still hashes to
    the manifest's sha256 (size and mtime alone would trust a file damaged between the runs).
    The same read measures its tensors: returns their digests, or None to rebuild the file."""
    rec = state.done.get(f.path)
    p = staging / f.path
    if rec is None or p.is_symlink() or not p.is_file():
        return None
    st = p.stat()
    if [st.st_size, st.st_mtime_ns] != rec or st.st_size != f.size:
        return None
    sha, digests = measure_file(p, f, manifest.digest_algo)
    if sha != f.sha256:
        return None
    check_measured_tensors(p, manifest, digests)
    return digests


def memory_plan(manifest: Manifest, threads: int, budget: int = MEMORY_BUDGET) -> tuple[int, int]:
    """(threads, window) for rebuilding ``manifest`` within MEMORY_BUDGET.

    A chunk in flight holds its compressed bytes, the base bytes it predicts from (up to 8x the
    chunk for an F64 base of a 1-byte target), the prediction and the decoded bytes (and about
    as much again inside the decoder: a low-rank frame's moved prediction, the tokens). Chunks
    over MAX_APPLY_CHUNK_BYTES are refused.

    The coder in use counts too (issue 20.5): the pure-numpy ``ans`` decoder needs, per decoding
    thread, ``entropy.NUMPY_DECODE_SCRATCH`` bytes beyond a token byte per element (which the 4x
    covers), so with it the threads are capped to keep that scratch within a quarter of the budget
    and the window is planned on what is left. The C coder needs nothing beyond its output."""
    from . import entropy

    worst = 1
    for t in manifest.tensors.values():
        ratio = 0
        if t.encoding.transform != "raw" and t.encoding.base_dtype:
            ratio = DTYPE_SIZES[t.encoding.base_dtype] / t.info.itemsize
        for c in t.chunks:
            if c.size > MAX_APPLY_CHUNK_BYTES:
                raise FormatError(f"manifest: tensor {shown(t.name)!r} has a {_human(c.size)} chunk; orca-diff apply "
                                  f"accepts chunks of at most {_human(MAX_APPLY_CHUNK_BYTES)} (its memory bound; make "
                                  "writes 16 MiB ones). Remake the diff with smaller chunks")
            worst = max(worst, c.length + int(c.size * ((ratio if c.mode == "delta" else 0) + 4)))
    for f in manifest.files:
        segment_chunks = [c for seg in getattr(f, "segments", ()) or () for c in seg.chunks]
        for c in [*f.chunks, *segment_chunks]:
            if c.size > MAX_APPLY_CHUNK_BYTES:
                raise FormatError(f"manifest: file {shown(f.path)!r} has a {_human(c.size)} chunk; orca-diff apply "
                                  f"accepts chunks of at most {_human(MAX_APPLY_CHUNK_BYTES)} (its memory bound)")
            worst = max(worst, c.length + 3 * c.size)
    worst = max(worst, 2 * BASE_COPY_BLOCK)
    if not entropy.c_in_use():
        if any(t.encoding.codec == "ans" for t in manifest.tensors.values()):
            threads = max(1, min(threads, budget // 4 // entropy.NUMPY_DECODE_SCRATCH))
            budget -= threads * entropy.NUMPY_DECODE_SCRATCH
    window = max(1, min(threads + 2, budget // worst))
    return max(1, min(threads, window)), window


#: Where apply's payload chunks come from when not from files beside the manifest: called with
#: the manifest and the chunks apply will probably read, in order (those of files an interrupted
#: run recorded as finished are left out); returns an object with ``read(chunk, owner)`` (checked
#: bytes, any chunk) and ``close()``. It is called before the base check, so that a Hub stream's
#: first bytes arrive while the base is being read (hub.stream.payload_source).
PayloadSource = Callable[[Manifest, list[Chunk]], "_Payloads"]


def _planned_chunks(manifest: Manifest, staging: Path) -> list[Chunk]:
    """The chunks a rebuild into ``staging`` will read, in order: every file's but those the
    staging log records as finished (they are re-hashed later, and re-read if that fails)."""
    state = _State(staging, manifest.identity())
    done = state.done if not staging.is_symlink() and staging.is_dir() and state.load() else {}
    return [j.chunk for j in _jobs(manifest, [f for f in manifest.files if f.path not in done]) if j.chunk is not None]


def apply_diff(base: str | os.PathLike, diff: str | os.PathLike, out: str | os.PathLike, *, force: bool = False,
               threads: int | None = None, progress: bool | None = None, verify: "VerifyWith | None" = None,
               payloads: PayloadSource | None = None, payload_memory: int = 0) -> ApplyReport:
    """Rebuild the target model of ``diff`` from ``base`` into the folder ``out``. With ``verify``
    the publisher's signature is checked first (orca_diff.signing.check_release: the diff's own
    signature before its manifest is used, the target's before any payload or base byte is read)
    and every rebuilt file's sha256 is held to the signed statement before it is published.
    ``payloads``: read the chunks from there (a Hub stream) instead of from the payload files
    beside the manifest, which then need not exist; ``payload_memory``: what that source holds at
    most. ``base`` may be a ``hub.basestream.StreamedBase`` (a Hub base downloading into the HF
    cache): read as it lands, and waited for (every file's sha256 checked) before publishing."""
    from .signing import check_diff_signature, check_release, unsigned_note

    t0 = time.perf_counter()
    diff_dir, out = diff_folder(diff), Path(out)
    diff_signed = check_diff_signature(diff_dir, verify) if verify is not None else None
    manifest = load_manifest(diff_dir)
    release = check_release(diff_dir, manifest, verify, diff_signed) if verify is not None else None
    threads, window = memory_plan(manifest, threads or default_threads(), MEMORY_BUDGET - payload_memory)
    streamed_base = hasattr(base, "open") and hasattr(base, "wait_complete")  # hub.basestream.StreamedBase
    with output_session(out, force, (Path(os.fspath(base)), diff_dir)) as session:
        if payloads is None:
            check_payload_presence(diff_dir, manifest)
            stream = None
        else:  # fetching starts now: the first chunks arrive while the base is checked
            stream = payloads(manifest, _planned_chunks(manifest, session.staging))
        try:
            base_model = base.open() if streamed_base else open_model(base)  # type: ignore[union-attr]
        except BaseException:
            if stream is not None:
                stream.close()
            raise
        try:
            try:
                # The base is read once (full digests measured while rebuilding) when it is still
                # downloading (proven by its listing; its headers have landed) or the manifest
                # records sampled digests (checked now); otherwise (older diffs, a pickled base)
                # every needed tensor's full digest is checked first.
                once = streamed_base or samples_usable(manifest, base_model)
                measured_base: dict[str, str] = {}
                if once:
                    check_base_layout(base_model, manifest)
                    if not streamed_base:
                        check_base_samples(base_model, manifest, threads)
                    check_base_files(base_model, manifest)
                else:
                    measured_base = check_base(base_model, manifest, threads, progress)
                report = _rebuild(base_model, manifest, diff_dir, session, threads, window, progress, t0,
                                  measured_base if once else None, release.model if release is not None else None,
                                  stream)
            except BaseMismatchError as exc:
                if not streamed_base:
                    raise
                # bytes of a file downloading now that are not its listing's: discard that partial file
                raise base.refused(exc, base_model.file_of(getattr(exc, "tensor", None) or "")) from None  # type: ignore[union-attr]
        finally:
            base_model.close()
            if stream is not None:
                stream.close()
    report.base_tensors_checked = len(measured_base)
    report.base_fingerprint = measured_base_fingerprint(manifest, measured_base)
    report.notes = session.notes
    if release is not None:
        report.provenance = release.lines + [f"every rebuilt file matches its signed sha256 ({release.model.signer})"]  # type: ignore[union-attr]
    elif (note := unsigned_note(diff_dir)) is not None:
        report.notes.append(note)
    return report


def _rebuild(base: ModelReader, manifest: Manifest, diff_dir: Path, session: OutputSession, threads: int,
             window: int, progress: bool | None, t0: float, measured_base: dict[str, str] | None = None,
             signed: "SignedModel | None" = None, stream: _Payloads | None = None) -> ApplyReport:
    """Rebuild into the staging folder and publish it. With ``measured_base`` (a dict to fill),
    every needed base tensor's full digest is measured on the way and checked before publishing;
    a base tensor that differs removes the staging folder and raises BaseMismatchError. With
    ``signed``, every file's sha256 is held to the publisher's statement before it is named."""
    try:
        return _rebuild_checked(base, manifest, diff_dir, session, threads, window, progress, t0, measured_base,
                                signed, stream)
    except BaseMismatchError:
        try:
            remove_path(session.staging)  # built from a base that is not the diff's: nothing is kept
        except OSError:
            pass
        raise


def _rebuild_checked(base: ModelReader, manifest: Manifest, diff_dir: Path, session: OutputSession, threads: int,
                     window: int, progress: bool | None, t0: float, measured_base: dict[str, str] | None,
                     signed: "SignedModel | None", stream: _Payloads | None) -> ApplyReport:
    out, staging = session.out, session.staging
    file_sha256s: dict[str, str] = {}  # measured: what the model digest is made of
    state = _State(staging, manifest.identity())
    if staging.is_symlink():
        raise OutputError(f"{staging}: is a symbolic link; remove it and rerun")
    measured: dict[str, str] = {}
    try:  # nothing is created until the space is known to be there
        resumed_state = False
        if staging.exists() and not state.load():
            remove_path(staging)  # our own hidden folder (under our lock), from another diff or an unreadable log
        elif staging.exists():
            resumed_state = True
            _prune(staging, manifest)
        todo = []
        for f in manifest.files:
            digests = _finished(staging, state, f, manifest)
            if digests is None:
                todo.append(f)
            else:
                measured.update(digests)
                file_sha256s[f.path] = f.sha256  # re-read and matched by _finished
                if signed is not None:
                    signed.check_file(f.path, f.sha256, staging / f.path)
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
    try:
        state.open(resumed_state)
    except OSError as exc:
        raise describe_os_error(exc, state.path, resume_hint) from None
    payloads = _Payloads(diff_dir, manifest.digest_algo) if stream is None else stream
    base_digests = StreamedBaseDigests(base, manifest, stream_users(manifest, todo)) if measured_base is not None else None
    hashes = _TensorHashes(manifest.digest_algo)
    ahead = ReadAhead()  # the disk reads the next chunks' base and payload bytes while these decode
    located = _base_locations(base)
    local_payloads = diff_dir if stream is None else None  # streamed chunks are not on this disk
    jobs = announced(_jobs(manifest, todo), lambda j: _job_ranges(j, manifest, local_payloads, located), ahead)
    writeback = EarlyWriteback()  # so that each file's fsync finds little left to write
    # files' sha256 on a thread of their own: the consumer then only writes (and BLAKE3 has its own)
    file_hasher = SerialWorker("orca-diff-sha256") if threads > 1 else None
    sf: StagedFile | None = None
    path = staging
    written = 0
    try:
        with byte_bar(remaining, "rebuilding", progress) as bar:
            for job, data, base_read in ordered_map(lambda j: _decode_job(j, manifest, base, payloads, diff_dir),
                                                    jobs, threads, window, on_abort=_releaser(base, stream)):
                f = job.file
                if job.first:
                    path = _partial_path(staging, f.path)
                    sf = _open_new(staging, f.path, file_hasher)
                assert sf is not None
                if job.tensor is not None:
                    hashes.update(job.tensor, data)
                    if base_digests is not None and base_read is not None:
                        base_digests.feed(job.tensor, *base_read)
                if len(data):
                    _write_all(sf, data)
                    writeback.wrote(sf.fd, sf.size)
                    bar.update(len(data))
                    written += len(data)
                if job.tensor_last:
                    name = job.tensor
                    if base_digests is not None:  # a wrong base is named as such, before its effect
                        base_digests.users_tensor_done(name)
                    found = hashes.finish(name)  # type: ignore[arg-type]
                    want = manifest.tensors[name].digest  # type: ignore[index]
                    if found != want:
                        raise VerificationError(
                            f"tensor {shown(name)!r} of {f.path}: rebuilt bytes hash to {manifest.digest_algo} "  # type: ignore[arg-type]
                            f"{found[:12]}…, the manifest records {want[:12]}…; nothing was published (the diff or "
                            "the base changed while applying, or the manifest contradicts itself); rerun")
                    measured[name] = found  # type: ignore[index]
                if job.last:
                    if sf.hexdigest() != f.sha256:
                        sf.close()
                        raise VerificationError(f"{path}: {describe_file_mismatch(path, f, manifest)} after rebuilding; "
                                                "the diff or base changed while applying; rerun")
                    if signed is not None:  # the publisher's statement, before the file gets its name
                        signed.check_file(f.path, sf.hexdigest(), path)
                    file_sha256s[f.path] = sf.hexdigest()
                    writeback.forget(sf.fd)
                    state.record(f.path, sf.commit())
                    sf = None
        if base_digests is not None:  # what no chunk of this run read (resumed files' bases): read once, checked
            measured_base.update(base_digests.complete_all(threads))  # type: ignore[union-attr]
        source = getattr(base, "source", None)
        if source is not None:  # a base downloading into the HF cache: every file there, its sha256 checked
            source.wait_complete()
    except KeyboardInterrupt:
        raise InterruptedError_(f"interrupted; {resume_hint}") from None
    except OSError as exc:
        raise describe_os_error(exc, path, resume_hint) from None
    finally:
        if sf is not None:
            sf.close()
        if file_hasher is not None:
            file_hasher.close()
        hashes.close()
        ahead.close()
        if base_digests is not None:
            base_digests.close()
        payloads.close()
        state.close()
    target_fp = measured_target_fingerprint(manifest, measured)
    if target_fp != manifest.target_fingerprint:  # cannot happen once every tensor matched; kept as a guard
        raise VerificationError(f"measured tensor fingerprint {target_fp} differs from the manifest's "
                                f"{shown(manifest.target_fingerprint)}; nothing was published")
    try:
        (staging / STATE_NAME).unlink(missing_ok=True)
    except OSError as exc:
        raise describe_os_error(exc, staging, resume_hint) from None
    session.publish({f.path: f.sha256 for f in manifest.files})  # each measured equal to its sha256
    return ApplyReport(out, len(manifest.files), written, resumed, time.perf_counter() - t0,
                       None, target_fp, digest_algo=manifest.digest_algo, model_digest=model_digest(file_sha256s))


def _releaser(base: ModelReader, stream: object | None) -> Callable[[], None] | None:
    """What frees decode workers waiting on the network when the rebuild stops early (Ctrl-C, a
    refusal): the Hub stream and the base still downloading stop, and their waiting readers raise."""
    source = getattr(base, "source", None)
    if source is None and stream is None:
        return None

    def release() -> None:
        if stream is not None:
            stream.close()  # type: ignore[attr-defined]
        if source is not None:
            source.close()

    return release


def _write_all(sf: StagedFile, data: bytes | np.ndarray) -> None:
    """Hash and write the next bytes of the file being rebuilt (one seam for fault injection)."""
    sf.write(data)


__all__ = ["apply_diff", "ApplyReport", "file_sha256", "finished_files", "memory_plan"]
