"""base + fine-tuned target -> a diff folder (manifest + payload files + model card).

The data path reads in one direction: target/base chunk reader -> codec (worker threads) ->
payload writer, with the digest of every target tensor and the sha256 of every target file
computed on the way, from the very bytes that are encoded (one read: a file changing under make
cannot give a diff that verifies but never applies). A target is safetensors shards (headers
kept verbatim) or torch ``.bin`` shards (zip structure and pickle kept verbatim, storages coded
as tensors: docs/format.md "segments"); every other file of its folder travels too. Memory is
bounded by ``threads + 2`` chunks in flight (``chunk_bytes`` each, 16 MiB by default, times a
small constant for the codec's temporaries), whatever the model size.
"""

from __future__ import annotations

import difflib
import errno
import hashlib
import os
import struct
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np

from . import __version__, lowrank
from .basecheck import SampledHasher
from .codec import DEFAULT_LEVEL, base_prediction, choose_encoding, encode_chunk
from .digests import TENSOR_DIGEST_OF_VERSION, Hasher, digest_bytes, new_hasher
from .bits import UINT_FOR_SIZE, ulp_delta
from .errors import (BaseMismatchError, FormatError, InputChangedError, InputNotFoundError, InterruptedError_,
                     OrcaDiffError, UsageError)
from .fingerprint import base_fingerprint
from .format import (
    FORMAT_VERSION, LOW_RANK_VERSION, MANIFEST_NAME, MAX_CHUNK_BYTES, MAX_INLINE_BYTES, BaseFile, BaseIdentity, BaseTensor, Chunk, Encoding, FileEntry, Manifest, PayloadFile,
    Segment, TensorEntry,
)
from .outdir import OutputSession, create_staging, describe_os_error, fsync_path, output_session, remove_path
from .pipeline import default_threads, ordered_map
from .progress import byte_bar
from .containers import (
    FLOAT_DTYPES, ModelReader, SafetensorsModel, TensorInfo, file_sha256, hash_tensor_range, open_model, open_target,
    read_exact, read_range,
)
from .containers.torchzip import TorchZipModel

if TYPE_CHECKING:
    from .signing import SignWith, VerifyWith

CHUNK_BYTES = 16 << 20
#: Non-weight files taken from the base (when byte-identical there) instead of shipped in the
#: diff: the tokenizer model is part of the base release, and every base form (HF folder or
#: Meta's original) carries it. Everything else (config and tokenizer JSON, a few KB) travels
#: in the diff, so a base in any form can rebuild it.
BASE_COPIED_FILES = frozenset({"tokenizer.model"})
#: ``make`` suggests --share-identical-files when at least this much could be left out.
SHAREABLE_NOTE_BYTES = 64 << 10
#: Payload files are cut at about this size so uploads/downloads retry per file, not per model.
PAYLOAD_FILE_BYTES = 1 << 30


def plan_encoding(t: TensorInfo, b: TensorInfo | None) -> Encoding:
    """Choose how a target tensor is encoded given the base tensor of the same name (pure).

    Same shape, or the same trailing dims with rows added or removed along dim 0 (a pad token):
    a delta over the shared rows (ulp for floats, after casting the base to the target dtype;
    xor for equal non-float dtypes), the rest raw. Anything else is stored raw: it is target data.
    """
    if b is None:
        return Encoding("raw")
    same_rows_layout = len(t.shape) == len(b.shape) and (len(t.shape) == 0 or t.shape[1:] == b.shape[1:])
    if not same_rows_layout:
        return Encoding("raw")
    shared_elems = min(t.numel, b.numel)
    if t.dtype in FLOAT_DTYPES and b.dtype in FLOAT_DTYPES:
        transform = "ulp"
    elif t.dtype == b.dtype:
        transform = "xor"
    else:
        return Encoding("raw")
    if shared_elems == 0:
        return Encoding("raw")
    return Encoding(transform, base_tensor=b.name, base_dtype=b.dtype, shared_bytes=shared_elems * t.itemsize)


#: Bytes of a tensor's shared region that make compresses both ways to choose its layout.
LAYOUT_SAMPLE_BYTES = 256 << 10


def _with_layout(name: str, enc: Encoding, target: ModelReader, base: ModelReader, level: int) -> Encoding:
    """``enc`` with the layout and codec that compress a sample of the tensor smallest: the
    per-tensor choice stored in the manifest (16-bit ulp deltas choose a zstd layout, float ulp
    deltas choose between zstd and ans; see codec.choose_encoding)."""
    info = target.tensors[name]
    if enc.transform == "raw" or enc.base_tensor is None:
        return enc
    if enc.transform != "ulp":
        return replace(enc, layout="planes")
    b_info = base.tensors[enc.base_tensor]
    size = min(enc.shared_bytes, LAYOUT_SAMPLE_BYTES)
    raw = read_range(target, name, 0, size)
    b_raw = read_range(base, b_info.name, 0, size // info.itemsize * b_info.itemsize)
    pred = base_prediction(b_raw, b_info.dtype, info.dtype)
    layout, codec = choose_encoding(raw, pred, info.itemsize, enc.transform, level, info.dtype)
    return replace(enc, layout=layout, codec=codec)


#: Bytes of a tensor compared with candidate base tensors when it has none of its own name (or
#: duplicates another target tensor), and of each tensor when judging how related the pair is.
CANDIDATE_SAMPLE_BYTES = 64 << 10
RELATEDNESS_SAMPLE_BYTES = 16 << 10
#: Candidate base tensors scored per tensor without a base tensor of its name (the most similar
#: names first): bounds make's planning time on models with hundreds of same-shape tensors.
MAX_CANDIDATES = 32


def _compatible(t: TensorInfo, b: TensorInfo) -> bool:
    """Whether ``b`` can predict ``t`` at all (the rows rule of plan_encoding, non-empty)."""
    return plan_encoding(t, b).transform != "raw"


def _sample_cost(t: TensorInfo, enc: Encoding, target: ModelReader, base: ModelReader, level: int) -> int:
    """Compressed bytes of the first CANDIDATE_SAMPLE_BYTES of ``t`` under ``enc`` (lower is better)."""
    size = min(t.nbytes, CANDIDATE_SAMPLE_BYTES) // t.itemsize * t.itemsize
    raw = read_range(target, t.name, 0, size)
    if enc.transform == "raw" or enc.base_tensor is None:
        return len(encode_chunk(raw, None, t.itemsize, "raw", "planes", level))
    b = base.tensors[enc.base_tensor]
    shared = min(size, enc.shared_bytes)
    b_raw = read_range(base, b.name, 0, shared // t.itemsize * b.itemsize)
    pred = base_prediction(b_raw, b.dtype, t.dtype)
    cost = len(encode_chunk(raw[:shared], pred, t.itemsize, enc.transform, "planes", level))
    if size > shared:
        cost += len(encode_chunk(raw[shared:], None, t.itemsize, "raw", "planes", level))
    return cost


def _duplicated(target: ModelReader) -> set[str]:
    """Target tensors whose first bytes equal those of another target tensor of the same dtype and
    shape (an untied lm_head saved as a copy of the embeddings): their same-name base tensor may
    not be their best predictor."""
    groups: dict[tuple, list[str]] = {}
    for n, t in target.tensors.items():
        if t.nbytes >= 64:
            head = read_range(target, n, 0, min(t.nbytes, 4096)).tobytes()
            groups.setdefault((t.dtype, t.shape, hashlib.sha256(head).digest()), []).append(n)
    return {n for names in groups.values() if len(names) > 1 for n in names}


def plan_all(target: ModelReader, base: ModelReader, level: int, threads: int) -> dict[str, Encoding]:
    """The encoding of every target tensor (before layouts). A tensor with a base tensor of its
    own name uses it (plan_encoding); one without, or one that duplicates another target tensor,
    is delta-coded against the base tensor of a compatible shape and dtype whose delta compresses
    a sample smallest, and stored raw only if no base tensor predicts it better than nothing:
    make never stores raw a tensor the base predicts."""
    plans = {n: plan_encoding(info, base.tensors.get(n)) for n, info in target.tensors.items()}
    dups = _duplicated(target)
    search = [n for n in target.tensors if n not in base.tensors or n in dups]

    def best(name: str) -> Encoding:
        t = target.tensors[name]
        cands = [b for b in base.tensors.values() if b.name != name and _compatible(t, b)]
        cands.sort(key=lambda b: -difflib.SequenceMatcher(None, name, b.name).ratio())
        options = [plans[name]] + [plan_encoding(t, b) for b in cands[:MAX_CANDIDATES]]
        costs = [_sample_cost(t, e, target, base, level) for e in options]
        return options[costs.index(min(costs))]

    for name, enc in zip(search, ordered_map(best, search, threads)):
        plans[name] = enc
    return plans


def _median(x: np.ndarray) -> float:
    """np.median of a non-empty integer array without its NaN check (which imports numpy.ma:
    25 ms, a tenth of a small make)."""
    k = x.size // 2
    part = np.partition(x.astype(np.float64), [k - 1, k] if x.size % 2 == 0 else [k])
    return float((part[k - 1] + part[k]) / 2 if x.size % 2 == 0 else part[k])


def relatedness_notes(target: ModelReader, base: ModelReader, plans: dict[str, Encoding]) -> list[str]:
    """Warnings when the pair does not look like base -> its fine-tune: rows removed (a swapped
    pair: fine-tunes add tokens, they do not remove them), or most same-name tensors far apart
    (median distance in ulps over a sample larger than a quarter of the mantissa's range:
    unrelated models, or a different base)."""
    notes = []
    shrunk = [n for n, t in target.tensors.items() if (b := base.tensors.get(n)) is not None and len(t.shape) >= 1
              and len(b.shape) == len(t.shape) and t.shape[1:] == b.shape[1:] and t.shape[0] < b.shape[0]]
    if shrunk:
        n = shrunk[0]
        notes.append(f"the fine-tune has fewer rows than the base in {len(shrunk)} tensor(s) (e.g. {n!r}: "
                     f"{target.tensors[n].shape[0]} vs {base.tensors[n].shape[0]}): are --base and --target swapped?")
    mantissa = {"F16": 10, "BF16": 7, "F32": 23, "F64": 52}
    far = total = 0
    for n, enc in plans.items():
        t = target.tensors[n]
        if enc.transform != "ulp" or enc.base_tensor != n or t.dtype not in mantissa or t.numel < 16:
            continue
        b = base.tensors[n]
        size = min(enc.shared_bytes, RELATEDNESS_SAMPLE_BYTES) // t.itemsize * t.itemsize
        pred = base_prediction(read_range(base, n, 0, size // t.itemsize * b.itemsize), b.dtype, t.dtype)
        raw = read_range(target, n, 0, size)
        width = UINT_FOR_SIZE[t.itemsize]
        dist = _median(ulp_delta(raw.view(width).copy(), pred.view(width).copy())) / 2
        total += 1
        far += dist > 2.0 ** (mantissa[t.dtype] - 2)
    if total and far > total / 2:
        notes.append(f"{far} of {total} tensors are far from the base tensor of the same name (median distance over "
                     "a quarter of their mantissa range): the fine-tune does not look derived from this base; "
                     "check --base (the diff is still exact, but large)")
    elif not total and base.tensors and not any(p.transform != "raw" for p in plans.values()):
        notes.append("no tensor of the fine-tune could be predicted from the base: the diff holds the whole model")
    return notes


@dataclass(frozen=True)
class _Job:
    """One step of reading the target in file order. ``kind``: "tensor" (bytes of a tensor,
    encoded as a delta or raw), "bytes" (verbatim bytes of a file, stored in payload chunks) or
    "data" (verbatim bytes held in the manifest; ``data`` was read while planning)."""

    kind: str
    name: str   # tensor name, or the key of the verbatim run
    start: int  # offset inside the tensor or run
    size: int
    mode: str   # "delta" | "raw"
    file: str   # the target file these bytes belong to
    src: Path | None = None  # "bytes": the file to read, at src_offset + start
    src_offset: int = 0
    data: bytes | None = None


def _chunk_ranges(begin: int, end: int, chunk_bytes: int) -> Iterator[tuple[int, int]]:
    for s in range(begin, end, chunk_bytes):
        yield s, min(chunk_bytes, end - s)


def input_read_error(exc: OSError, path: Path) -> OrcaDiffError:
    """An input file make could not open or read: named, and the output not blamed."""
    what = InputNotFoundError if exc.errno == errno.ENOENT else FormatError
    return what(f"{path}: {exc.strerror or exc} while make was reading it (was the model folder changed during the "
                "run?); nothing was written; make sure the folder is complete and run make again")


def _names_output(filename: object, out: Path, staging: Path) -> bool:
    """Whether an OSError's file is make's own: in ``out`` or its staging folder, or one of the
    hidden siblings beside ``out`` (lock, marker)."""
    p = Path(os.fsdecode(filename)).absolute()  # type: ignore[arg-type]
    hidden_sibling = p.parent == out.absolute().parent and p.name.startswith(".")
    return hidden_sibling or any(p.is_relative_to(q) for q in (out.absolute(), staging.absolute()))


def base_identities(base: ModelReader) -> dict[Path, tuple[int, ...] | None]:
    """Device, inode, size, mtime and ctime of every file make reads the base from. A base file
    written while make reads it would give a diff whose base digests describe a mixture of two
    files: one that verifies but that no base applies to (and apply would blame the user's base).
    Any write, truncation or replacement changes one of these, so make compares them after its
    last read (:func:`refuse_changed_base`)."""
    out: dict[Path, tuple[int, ...] | None] = {}
    for p in [*base_weight_files(base), *base.extra_files.values()]:
        try:
            st = os.stat(p)
            out[Path(p)] = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        except OSError:
            out[Path(p)] = None
    return out


def refuse_changed_base(before: dict[Path, tuple[int, ...] | None], after: dict[Path, tuple[int, ...] | None]) -> None:
    for p, ident in before.items():
        if after.get(p) != ident:
            raise InputChangedError(f"{p}: the base file changed while make read it (written, replaced or removed); "
                                    "the diff would describe neither version, so nothing was written. Let whatever "
                                    "writes the base finish (a download, a copy) and run make again")


def _read_file(path: Path, offset: int, size: int) -> np.ndarray:
    """``size`` bytes of ``path`` at ``offset``; a file that shrank since make looked at it is an
    error naming it (make hashes and encodes the same bytes, so the diff stays self-consistent)."""
    buf = np.empty(size, dtype=np.uint8)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:  # an input, not the output: named as such
        raise input_read_error(exc, path) from None
    try:
        read_exact(fd, buf, offset, f"{path} (changed while make was reading it?)")
    finally:
        os.close(fd)
    return buf


def base_weight_files(base: ModelReader) -> list[Path]:
    """The files a base reader takes its tensors from."""
    if isinstance(base, SafetensorsModel):
        return [base.path / rel if base.path.is_dir() else base.path for rel in base.headers]
    files = getattr(base, "_file_of", None)
    if isinstance(files, dict):
        return sorted(set(files.values()))
    shards = getattr(base, "shards", None) or getattr(base, "_shards", None)
    if shards:
        return sorted(Path(p) for p in shards)
    return []


def _hf_blob_sha256(path: Path) -> str | None:
    """The sha256 an HF cache snapshot file claims, from the name of the blob it links to (the
    Hub's LFS oid, which names blobs), without reading it. A claim, not a measurement."""
    if not path.is_symlink():
        return None
    target = path.resolve()
    if target.parent.name == "blobs" and len(target.name) == 64 and all(c in "0123456789abcdef" for c in target.name):
        return target.name
    return None


def _weight_file_sha256(p: Path, stop: threading.Event | None) -> str:
    """The sha256 of a base weight file, measured, or taken from its HF cache blob's name only when
    orca-diff has hashed that very blob before (``hub.transfer.blob_verified``'s record). A blob
    that does not hash to its name is refused: the cached copy is damaged."""
    from .hub.transfer import blob_checked_before

    claimed = _hf_blob_sha256(p)
    if claimed is not None and blob_checked_before(p.resolve()):
        return claimed
    sha = file_sha256(p, stop=stop)
    if claimed is not None and sha != claimed:
        raise BaseMismatchError(f"{p}: links to the HF cache blob {claimed[:12]}…, whose bytes hash to {sha[:12]}…: the "
                                "cached copy is damaged; fetch it again (`orca-diff download ORG/NAME` re-downloads a "
                                "damaged blob) and rerun")
    return sha


def record_base_weight_files(base: ModelReader, known: dict[str, BaseFile] | None, threads: int,
                             stop: threading.Event | None = None) -> dict[str, BaseFile]:
    """{path relative to the base folder: size, sha256} of the base's weight files: from ``known``
    (the Hub's listing), else measured (:func:`_weight_file_sha256`). Never from an HF cache blob's
    name alone: the cache names a blob after the sha256 the server claimed, and what is recorded
    here is what a signed derivation attests."""
    files = base_weight_files(base)
    root = base.path if base.path.is_dir() else base.path.parent

    def one(p: Path) -> tuple[str, BaseFile]:
        rel = p.relative_to(root).as_posix()
        size = p.stat().st_size
        if known and rel in known and known[rel].size == size:
            return rel, known[rel]
        return rel, BaseFile(size, _weight_file_sha256(p, stop))

    return dict(ordered_map(one, files, threads))


class _BaseFilesInBackground:
    """record_base_weight_files on one daemon thread, started before encoding: the base's files
    are hashed while the target is encoded instead of after it (on a one-file base that tail ran
    on one core). ``result`` joins it; ``stop`` (on any failure of make) makes it give up within
    one 16 MiB block, so Ctrl-C never waits for a base hash."""

    def __init__(self, base: ModelReader, known: dict[str, BaseFile] | None):
        self._stop = threading.Event()
        self._out: dict[str, BaseFile] | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(base, known), name="orca-diff-base-files",
                                        daemon=True)
        self._thread.start()

    def _run(self, base: ModelReader, known: dict[str, BaseFile] | None) -> None:
        try:
            self._out = record_base_weight_files(base, known, 1, self._stop)
        except BaseException as exc:  # handed to result()
            self._error = exc

    def result(self) -> dict[str, BaseFile]:
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._out is not None
        return self._out

    def stop(self) -> None:
        self._stop.set()


class _PayloadWriter:
    """Appends compressed chunks to payload-NNNNN.odz files, cutting at PAYLOAD_FILE_BYTES."""

    def __init__(self, folder: Path, limit: int):
        self.folder, self.limit = folder, limit
        self.done: list[PayloadFile] = []
        self._f = None
        self._name = ""
        self._size = 0
        self._hash = hashlib.sha256()

    def append(self, data: bytes) -> tuple[str, int]:
        if self._f is None or self._size >= self.limit:
            self._close()
            self._name = f"payload-{len(self.done) + 1:05d}.odz"
            self._f = open(self.folder / self._name, "xb")
            self._size, self._hash = 0, hashlib.sha256()
        offset = self._size
        self._f.write(data)
        self._hash.update(data)
        self._size += len(data)
        return self._name, offset

    def _close(self) -> None:
        if self._f is not None:
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()
            self.done.append(PayloadFile(self._name, self._size, self._hash.hexdigest()))
            self._f = None

    def close(self) -> list[PayloadFile]:
        self._close()
        return self.done


def make_diff(base: str | os.PathLike, target: str | os.PathLike, out: str | os.PathLike, *,
              base_name: str | None = None, base_repo: str | None = None, base_revision: str | None = None,
              level: int = DEFAULT_LEVEL, chunk_bytes: int = CHUNK_BYTES, threads: int | None = None,
              progress: bool | None = None, force: bool = False,
              payload_file_bytes: int = PAYLOAD_FILE_BYTES, notes: list[str] | None = None,
              base_files_known: dict[str, BaseFile] | None = None, sign: "SignWith | None" = None,
              verify_target: "VerifyWith | None" = None, share_identical_files: bool = False) -> Manifest:
    """Write the diff that turns ``base`` into ``target`` to the folder ``out`` and return its manifest.

    ``target`` is an HF folder of safetensors or ``.bin`` shards (every file of it is rebuilt byte
    for byte; ``.bin`` needs torch here, never in apply); ``base`` may be any form
    :func:`orca_diff.containers.open_model` reads. ``out`` appears only when complete. When the
    base folder is an HF cache snapshot (``.../models--ORG--NAME/snapshots/SHA``) its repo and
    commit are recorded unless given. Warnings (files excluded, a pair that looks swapped or
    unrelated) are appended to ``notes``. A target carrying ``model.sig`` (an OpenSSF signature)
    has it checked against the files read (and verified with ``verify_target``); ``sign`` signs the
    target and attests the derivation (orca_diff.signing.MakeProvenance). ``share_identical_files``
    takes every non-weight file that the base holds byte-identical (tokenizer.json, config.json...)
    from the base instead of the diff (``BASE_COPIED_FILES`` only, by default): the smallest diff,
    for users whose base has the same files (a fine-tune's successive checkpoints).
    """
    out = Path(out)
    notes = notes if notes is not None else []
    if chunk_bytes <= 0 or chunk_bytes % 8 or chunk_bytes > MAX_CHUNK_BYTES:
        raise UsageError(f"chunk size must be a positive multiple of 8 bytes, at most {MAX_CHUNK_BYTES}")
    with output_session(out, force, (base, target)) as session:  # checked and locked before any input is read
        notes.extend(session.notes)
        return _make_locked(session, base, target, out, notes, base_name, base_repo, base_revision, level, chunk_bytes,
                            threads, progress, payload_file_bytes, base_files_known, sign, verify_target,
                            share_identical_files)


def _make_locked(session: OutputSession, base: str | os.PathLike, target: str | os.PathLike, out: Path,
                 notes: list[str], base_name: str | None, base_repo: str | None, base_revision: str | None,
                 level: int, chunk_bytes: int, threads: int | None, progress: bool | None, payload_file_bytes: int,
                 base_files_known: dict[str, BaseFile] | None, sign: "SignWith | None" = None,
                 verify_target: "VerifyWith | None" = None, share_identical_files: bool = False) -> Manifest:
    from .hub.resolve import identify_cached_repo
    from .signing import MakeProvenance

    threads = threads or default_threads()
    if base_repo is None and (cached := identify_cached_repo(Path(base))) is not None:
        base_repo, base_revision = cached[0], base_revision or cached[1]
    if base_repo is None:
        notes.append(f"the base {base} is not identified as a Hub repo: users will have to pass --base "
                     "(a path, a catalog name or ORG/NAME@SHA); record it with --base-repo ORG/NAME --base-revision SHA")
    base_model = open_model(base)
    try:
        target_model, target_notes = open_target(target)
    except BaseException:
        base_model.close()
        raise
    notes.extend(target_notes)
    staging = session.staging
    provenance = MakeProvenance(sign, verify_target, notes)
    try:
        provenance.start(target_model.extra_files)
        try:
            staging = create_staging(out)
        except OSError as exc:
            raise describe_os_error(exc, staging, "choose another --out") from None
        manifest = _make_into(base_model, target_model, staging, base_name or Path(base).name, base_repo,
                              base_revision, level, chunk_bytes, threads, progress, payload_file_bytes, notes,
                              base_files_known, share_identical_files)
        from .hub.card import render_card

        provenance.files(manifest, staging, Path(target).name)
        (staging / "README.md").write_text(render_card(manifest), encoding="utf-8")
        (staging / MANIFEST_NAME).write_bytes(manifest.to_bytes())
        provenance.diff(manifest, staging)
        notes.extend(provenance.lines)
        for p in staging.iterdir():
            fsync_path(p)
        session.publish(None)  # a diff folder: its manifest is its marker
        return manifest
    except KeyboardInterrupt:
        remove_path(staging)
        raise InterruptedError_(f"interrupted; nothing was written to {out} (make does not resume: run it again "
                                "to start over)") from None
    except OSError as exc:
        remove_path(staging)
        if exc.filename is not None and not _names_output(exc.filename, out, staging):
            raise input_read_error(exc, Path(os.fsdecode(exc.filename))) from None
        raise describe_os_error(exc, out, "run make again") from None
    except BaseException:
        remove_path(staging)
        raise
    finally:
        base_model.close()
        target_model.close()


def _make_into(base: ModelReader, target: ModelReader, folder: Path, base_name: str, base_repo: str | None,
               base_revision: str | None, level: int, chunk_bytes: int, threads: int, progress: bool | None,
               payload_file_bytes: int, notes: list[str], base_files_known: dict[str, BaseFile] | None,
               share_identical_files: bool = False) -> Manifest:
    algo = TENSOR_DIGEST_OF_VERSION[FORMAT_VERSION]  # tensor, chunk and base digests
    base_files_job = _BaseFilesInBackground(base, base_files_known) if threads > 1 else None
    before = base_identities(base)
    try:
        manifest = _make_body(base, target, folder, base_name, base_repo, base_revision, level, chunk_bytes, threads,
                              progress, payload_file_bytes, notes, base_files_known, algo, base_files_job,
                              share_identical_files)
        refuse_changed_base(before, base_identities(base))
        return manifest
    finally:
        if base_files_job is not None:
            base_files_job.stop()  # a no-op once its result was taken


def _make_body(base: ModelReader, target: ModelReader, folder: Path, base_name: str, base_repo: str | None,
               base_revision: str | None, level: int, chunk_bytes: int, threads: int, progress: bool | None,
               payload_file_bytes: int, notes: list[str], base_files_known: dict[str, BaseFile] | None, algo: str,
               base_files_job: _BaseFilesInBackground | None, share_identical_files: bool = False) -> Manifest:
    plans = plan_all(target, base, level, threads)
    notes.extend(relatedness_notes(target, base, plans))
    plans = dict(zip(plans, ordered_map(lambda n: _with_layout(n, plans[n], target, base, level), list(plans), threads)))
    needed = {p.base_tensor for p in plans.values() if p.base_tensor}

    # The target's files in rebuild order, each as the jobs that read it in file order.
    jobs: list[_Job] = []
    inline: dict[str, bytes] = {}  # verbatim runs held in the manifest, by key
    layouts: list[tuple[str, str, object]] = []  # (rel, kind, detail) for building FileEntries

    def tensor_jobs(name: str, rel: str) -> None:
        info, enc = target.tensors[name], plans[name]
        for s, n in _chunk_ranges(0, enc.shared_bytes, chunk_bytes):
            jobs.append(_Job("tensor", name, s, n, "delta", rel))
        for s, n in _chunk_ranges(enc.shared_bytes, info.nbytes, chunk_bytes):
            jobs.append(_Job("tensor", name, s, n, "raw", rel))

    def bytes_jobs(key: str, rel: str, src: Path, offset: int, size: int) -> None:
        jobs.extend(_Job("bytes", key, s, n, "raw", rel, src, offset) for s, n in _chunk_ranges(0, size, chunk_bytes))

    if isinstance(target, SafetensorsModel):
        for rel in sorted(target.headers):
            h = target.headers[rel]
            jobs.append(_Job("data", rel, 0, h.data_start, "raw", rel, data=struct.pack("<Q", len(h.raw)) + h.raw))
            for e in h.entries:
                tensor_jobs(e.info.name, rel)
            layouts.append((rel, "safetensors", h))
    else:
        assert isinstance(target, TorchZipModel)
        for rel in sorted(target.pieces):
            src = target.files[rel]
            for i, piece in enumerate(target.pieces[rel]):
                if piece.tensor is not None:
                    tensor_jobs(piece.tensor, rel)
                elif piece.size <= MAX_INLINE_BYTES:
                    data = inline[f"{rel}#{i}"] = _read_file(src, piece.offset, piece.size).tobytes()
                    jobs.append(_Job("data", f"{rel}#{i}", 0, piece.size, "raw", rel, data=data))
                else:
                    bytes_jobs(f"{rel}#{i}", rel, src, piece.offset, piece.size)
            layouts.append((rel, "segments", target.pieces[rel]))
    base_files: dict[str, BaseFile] = {}
    shareable: list[tuple[str, int]] = []  # shipped although the base holds them byte-identical
    for rel, path in target.extra_files.items():
        size = path.stat().st_size
        bpath = base.extra_files.get(rel)
        if bpath is not None and bpath.stat().st_size == size:
            sha = file_sha256(path)
            if file_sha256(bpath) == sha:
                if rel in BASE_COPIED_FILES or share_identical_files:
                    base_files[rel] = BaseFile(size, sha)
                    layouts.append((rel, "base", BaseFile(size, sha)))
                    continue
                shareable.append((rel, size))
        bytes_jobs(f"{rel}#0", rel, path, 0, size)
        layouts.append((rel, "blob", size))
    if shareable and (n := sum(size for _, size in shareable)) >= SHAREABLE_NOTE_BYTES:
        shareable.sort(key=lambda f: -f[1])  # the largest named first
        notes.append(f"{len(shareable)} file(s) of {n:,} bytes ({', '.join(r for r, _ in shareable[:3])}"
                     f"{', ...' if len(shareable) > 3 else ''}) are byte-identical in the base and travel in the diff;"
                     " --share-identical-files takes them from the base instead (users' base folders must then hold"
                     " them)")

    def encode(job: _Job) -> tuple[_Job, bytes | None, str, np.ndarray | bytes, np.ndarray | None]:
        """One chunk -> (job, payload or None, payload digest, target bytes, base bytes used or None)."""
        if job.kind == "data":
            return job, None, "", job.data or b"", None
        if job.kind == "bytes":
            raw = _read_file(job.src, job.src_offset + job.start, job.size)  # type: ignore[arg-type]
            payload = encode_chunk(raw, None, 1, "raw", "bytes", level=level)
            return job, payload, digest_bytes(payload, algo), raw, None
        info, enc = target.tensors[job.name], plans[job.name]
        raw = read_range(target, job.name, job.start, job.size)
        b_raw = None
        if job.mode == "delta":
            b_info = base.tensors[enc.base_tensor]  # type: ignore[index]
            b_start = job.start // info.itemsize * b_info.itemsize
            b_raw = read_range(base, b_info.name, b_start, job.size // info.itemsize * b_info.itemsize)
            pred = base_prediction(b_raw, b_info.dtype, info.dtype)
            cols = info.shape[-1] if len(info.shape) >= 2 else 0
            grid = (cols, job.start // info.itemsize % cols) if cols else None
            payload = encode_chunk(raw, pred, info.itemsize, enc.transform, enc.layout, level, enc.codec, info.dtype,
                                   grid)
            if lowrank.is_frame(payload):
                low_rank_chunks.append(job.name)  # the diff needs a version-4 reader
        else:
            # float rows nothing predicts: the no-base ANS frame where it is smaller (codec.encode_chunk)
            payload = encode_chunk(raw, None, info.itemsize, "raw", "planes", level, dtype=info.dtype)
        return job, payload, digest_bytes(payload, algo), raw, b_raw

    writer = _PayloadWriter(folder, payload_file_bytes)
    low_rank_chunks: list[str] = []
    chunks: dict[str, list[Chunk]] = {}
    tensor_hash: dict[str, Hasher] = {n: new_hasher(algo) for n in target.tensors}
    file_hash: dict[str, "hashlib._Hash"] = {}
    total = sum(j.size for j in jobs)
    # Base tensors are hashed on the way: the bytes the delta chunks of ONE target tensor read
    # (the first that uses it; its chunks read it in order), then whatever no chunk read. So the
    # base is read about once. Every file's sha256 comes from the very bytes that were encoded.
    hashing_user: dict[str, str] = {}
    for n, p in plans.items():
        if p.base_tensor:
            hashing_user.setdefault(p.base_tensor, n)
    # ... and the needed ones' sampled digests picked out of the same bytes (apply's check before writing)
    base_hash = {n: SampledHasher(base.tensors[n].nbytes, algo) for n in base.tensors}
    base_hashed: dict[str, int] = {n: 0 for n in base.tensors}
    with byte_bar(total, "encoding", progress) as bar:
        for job, payload, digest, raw, b_raw in ordered_map(encode, jobs, threads):
            if payload is not None:
                name, offset = writer.append(payload)
                chunks.setdefault(f"{job.kind}:{job.name}", []).append(
                    Chunk(job.start, job.size, job.mode, name, offset, len(payload), digest))
            if job.kind == "tensor":
                tensor_hash[job.name].update(raw)
            file_hash.setdefault(job.file, hashlib.sha256()).update(raw)
            b_name = plans[job.name].base_tensor if job.kind == "tensor" else None
            if b_raw is not None and hashing_user.get(b_name) == job.name:  # type: ignore[arg-type]
                base_hash[b_name].update(b_raw)  # type: ignore[index]
                base_hashed[b_name] += len(b_raw)  # type: ignore[index]
            bar.update(job.size)
    payloads = writer.close()
    rest = [n for n in base.tensors if base_hashed[n] < base.tensors[n].nbytes]
    with byte_bar(sum(base.tensors[n].nbytes - base_hashed[n] for n in rest), "hashing base", progress) as bar:
        def finish_hash(n: str) -> None:
            hash_tensor_range(base, n, base_hash[n], base_hashed[n])
            bar.update(base.tensors[n].nbytes - base_hashed[n])
        for _ in ordered_map(finish_hash, rest, threads):
            pass
    base_tensors = {n: BaseTensor(i.dtype, i.shape, base_hash[n].hexdigest(), n in needed,
                                  base_hash[n].sampled_hexdigest() if n in needed else None)
                    for n, i in base.tensors.items()}

    tensors = {}
    for n, info in target.tensors.items():
        tensors[n] = TensorEntry(n, info.dtype, info.shape, tensor_hash[n].hexdigest(), plans[n],
                                 tuple(chunks.get(f"tensor:{n}", ())))
    empty = hashlib.sha256().hexdigest()
    files = []
    for rel, kind, detail in layouts:
        sha = file_hash[rel].hexdigest() if rel in file_hash else empty
        if kind == "safetensors":
            h = detail
            files.append(FileEntry(rel, h.data_start + h.data_size, sha, "safetensors",  # type: ignore[attr-defined]
                                   header=h.raw.decode("utf-8")))  # type: ignore[attr-defined]
        elif kind == "segments":
            segs = []
            for i, piece in enumerate(detail):  # type: ignore[arg-type]
                if piece.tensor is not None:
                    segs.append(Segment(piece.offset, piece.size, tensor=piece.tensor))
                elif piece.size <= MAX_INLINE_BYTES:
                    segs.append(Segment(piece.offset, piece.size, data=inline[f"{rel}#{i}"]))
                else:
                    segs.append(Segment(piece.offset, piece.size, chunks=tuple(chunks[f"bytes:{rel}#{i}"])))
            files.append(FileEntry(rel, sum(p.size for p in detail), sha, "segments", segments=tuple(segs)))  # type: ignore[union-attr]
        elif kind == "base":
            files.append(FileEntry(rel, detail.size, detail.sha256, "blob", source="base"))  # type: ignore[attr-defined]
        else:
            files.append(FileEntry(rel, detail, sha, "blob", source="diff",  # type: ignore[arg-type]
                                   chunks=tuple(chunks.get(f"bytes:{rel}#0", ()))))

    base_id = BaseIdentity(base_name, base_repo, base_revision,
                           base_fingerprint({n: (t.dtype, t.shape, t.digest) for n, t in base_tensors.items()}),
                           base_tensors, base_files,
                           base_files_job.result() if base_files_job is not None
                           else record_base_weight_files(base, base_files_known, threads))
    target_fp = base_fingerprint({n: (t.dtype, t.shape, t.digest) for n, t in tensors.items()})
    dropped = sorted(set(base.tensors) - set(target.tensors))
    # a diff without low-rank frames stays version 3, so that every 0.3 reader applies it
    version = LOW_RANK_VERSION if low_rank_chunks else FORMAT_VERSION
    return Manifest(tool=f"orca-diff {__version__}", chunk_bytes=chunk_bytes, base=base_id,
                    target_fingerprint=target_fp, files=files, tensors=tensors, dropped=dropped, payloads=payloads,
                    format_version=version)


__all__ = ["make_diff", "plan_encoding", "plan_all", "CHUNK_BYTES"]
