"""Checks of a diff, of a base against a diff, and of a rebuilt model against a diff.

All three stream and hash; none writes anything. ``check_base`` is what ``apply`` runs before it
creates any output, so a wrong base is refused with the first differing tensor named.
"""

from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import BaseMismatchError, CorruptDiffError, InputNotFoundError, VerificationError
from .format import FileEntry, Manifest, file_segments, load_manifest
from .pipeline import default_threads, ordered_map
from .progress import byte_bar
from .containers import ModelReader, file_sha256, open_model, read_exact, tensor_digest
from .digests import digest_bytes, new_hasher
from .errors import shown
from .fingerprint import base_fingerprint
from .identity import model_digest

if TYPE_CHECKING:
    from .signing import SignedModel

import numpy as np


def _short(h: str | None) -> str:
    return (h or "?")[:12]


def _hint(manifest: Manifest, base: ModelReader, name: str, found_sha: str | None) -> str:
    from .diagnose import explain_base_mismatch

    expected = {n: (t.dtype, t.shape, t.digest) for n, t in manifest.base.tensors.items()}
    try:
        hint = explain_base_mismatch(expected, base.tensors, name, found_sha, reader=base)
    except Exception:  # a hint must never hide the real error
        return ""
    return f" {hint}" if hint else ""


def check_base(base: ModelReader, manifest: Manifest, threads: int | None = None,
               progress: bool | None = None) -> dict[str, str]:
    """Raise BaseMismatchError unless every base tensor and file the diff needs is bit-identical
    to the publisher's. Cheap checks (names, dtypes, shapes) run before any hashing. Returns the
    measured digest of every tensor checked (what may be reported as measured)."""
    check_base_layout(base, manifest)
    needed = manifest.needed_base_tensors()
    where = f"base {base.path}"
    names = list(needed)
    measured: dict[str, str] = {}
    total = sum(base.tensors[n].nbytes for n in names)
    with byte_bar(total, "checking base", progress) as bar:
        def one(name: str) -> tuple[str, str]:
            h = tensor_digest(base, name, manifest.digest_algo)
            bar.update(base.tensors[name].nbytes)
            return name, h

        for name, found_sha in ordered_map(one, names, threads or default_threads()):
            if found_sha != needed[name].digest:
                raise BaseMismatchError(
                    f"{where}: tensor {name!r} differs from the diff's base (expected {manifest.digest_algo} "
                    f"{_short(needed[name].digest)}…, found {_short(found_sha)}…); nothing was written."
                    f"{_hint(manifest, base, name, found_sha)}")
            measured[name] = found_sha
    check_base_files(base, manifest)
    return measured


def check_base_layout(base: ModelReader, manifest: Manifest) -> None:
    """The cheap half of :func:`check_base`: every needed base tensor is there with its dtype and
    shape, every base file the diff copies is there. Reads no tensor bytes."""
    needed = manifest.needed_base_tensors()
    where = f"base {base.path}"
    for name, t in needed.items():
        found = base.tensors.get(name)
        if found is None:
            raise BaseMismatchError(f"{where}: tensor {name!r} is missing (the diff needs it).{_hint(manifest, base, name, None)}")
        if found.dtype != t.dtype or tuple(found.shape) != tuple(t.shape):
            raise BaseMismatchError(
                f"{where}: tensor {name!r} is {found.dtype}{list(found.shape)}, the diff was made from "
                f"{t.dtype}{list(t.shape)}.{_hint(manifest, base, name, None)}")
    for rel, bf in manifest.base.files.items():
        path = base.extra_files.get(rel)
        if path is None:
            raise BaseMismatchError(f"{where}: file {rel!r} is missing (the diff copies it from the base); "
                                    "use the base folder the diff names, with its tokenizer files")


def check_base_files(base: ModelReader, manifest: Manifest) -> None:
    """Every base file the diff copies (tokenizer files: small) has its recorded size and sha256."""
    for rel, bf in manifest.base.files.items():
        path = base.extra_files[rel]
        if path.stat().st_size != bf.size or file_sha256(path) != bf.sha256:
            raise BaseMismatchError(f"base {base.path}: file {rel!r} differs from the one the diff was made with; "
                                    "restore the original file from your base download")


def measured_base_fingerprint(manifest: Manifest, measured: dict[str, str]) -> str | None:
    """The base fingerprint computed from measured digests, when every base tensor the manifest
    lists was measured; None otherwise (then only "N tensors checked" may be said)."""
    if set(measured) != set(manifest.base.tensors):
        return None
    return base_fingerprint({n: (t.dtype, t.shape, measured[n]) for n, t in manifest.base.tensors.items()})


#: Bytes read per step when a finished file is re-hashed.
_MEASURE_BLOCK = 16 << 20


def measure_file(path: Path, entry: FileEntry, algo: str) -> tuple[str, dict[str, str]]:
    """One read of a rebuilt file: its sha256 and the digest (``algo``) of every tensor it
    holds, found through :func:`file_segments` (whatever the file kind). A file shorter or
    longer than its entry gets a sha256 that cannot match."""
    h = hashlib.sha256()
    tensors: dict[str, str] = {}
    buf = bytearray(_MEASURE_BLOCK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as fh:
        for seg in file_segments(entry):
            th = new_hasher(algo) if seg.tensor is not None else None
            left = seg.size
            while left:
                n = fh.readinto(view[:min(left, _MEASURE_BLOCK)])
                if not n:
                    break
                h.update(view[:n])
                if th is not None:
                    th.update(view[:n])
                left -= n
            if th is not None:
                tensors[seg.tensor] = th.hexdigest()  # type: ignore[index]
        while n := fh.readinto(buf):  # bytes past the entry's size: the sha256 will differ
            h.update(view[:n])
    return h.hexdigest(), tensors


def check_measured_tensors(where: Path, manifest: Manifest, digests: dict[str, str]) -> None:
    """Every measured tensor digest must be the manifest's (a file whose sha256 matches but whose
    tensors do not means the manifest contradicts itself)."""
    for name, found in digests.items():
        want = manifest.tensors[name].digest
        if found != want:
            raise VerificationError(f"{where}: tensor {shown(name)!r} hashes to {manifest.digest_algo} {_short(found)}…, "
                                    f"the manifest records {_short(want)}…; the model differs from the publisher's "
                                    "(or the manifest contradicts itself)")


def measured_target_fingerprint(manifest: Manifest, measured: dict[str, str]) -> str:
    """The target fingerprint from measured tensor digests (every tensor must have been measured)."""
    missing = set(manifest.tensors) - set(measured)
    if missing:
        raise VerificationError(f"tensor {shown(sorted(missing)[0])!r} was never measured; the model is incomplete")
    return base_fingerprint({n: (t.dtype, t.shape, measured[n]) for n, t in manifest.tensors.items()})


def check_payload_presence(diff_dir: Path, manifest: Manifest) -> None:
    """Cheap check that every payload file is there with its recorded size."""
    for p in manifest.payloads:
        path = diff_dir / p.path
        if not path.is_file():
            raise CorruptDiffError(f"{path}: payload file missing from the diff; download the diff again")
        size = path.stat().st_size
        if size != p.size:
            raise CorruptDiffError(f"{path}: payload file is {size} bytes, expected {p.size} (truncated or "
                                   "incomplete download); download the diff again")


def diff_folder(diff: str | os.PathLike) -> Path:
    """The diff folder; ``DIR/orca-diff.json`` names it too (payloads are found beside the manifest)."""
    from .format import MANIFEST_NAME

    d = Path(diff)
    if d.is_file() and d.is_symlink() and d.resolve().name == MANIFEST_NAME:
        return d.resolve().parent  # a link to a manifest, under any name: its payloads lie beside the manifest
    return d.parent if d.name == MANIFEST_NAME and d.is_file() else d


def verify_diff(diff: str | os.PathLike, progress: bool | None = None) -> Manifest:
    """Check a diff's own integrity: manifest checksum and structure, every payload file's size
    and sha256 and, when a file is damaged, which chunk (and so which tensor) is affected."""
    diff_dir = diff_folder(diff)
    manifest = load_manifest(diff_dir)
    check_payload_presence(diff_dir, manifest)
    with byte_bar(manifest.payload_bytes, "verifying diff", progress) as bar:
        for p in manifest.payloads:
            found = file_sha256(diff_dir / p.path)
            bar.update(p.size)
            if found != p.sha256:
                raise CorruptDiffError(f"{diff_dir / p.path}: {_locate_bad_chunk(diff_dir, manifest, p.path)}; "
                                       "download the diff again")
    return manifest


def _locate_bad_chunk(diff_dir: Path, manifest: Manifest, payload: str) -> str:
    owners = [(f"tensor {t.name!r}", c) for t in manifest.tensors.values() for c in t.chunks]
    owners += [(f"file {f.path!r}", c) for f in manifest.files for c in f.chunks]
    owners += [(f"file {f.path!r}", c) for f in manifest.files for s in f.segments for c in s.chunks]
    fd = os.open(diff_dir / payload, os.O_RDONLY)
    try:
        for owner, c in sorted((o for o in owners if o[1].payload == payload), key=lambda o: o[1].offset):
            buf = np.empty(c.length, dtype=np.uint8)
            read_exact(fd, buf, c.offset, payload)
            if digest_bytes(buf, manifest.digest_algo) != c.digest:
                return f"chunk at offset {c.offset} ({owner}, bytes {c.start}..{c.start + c.size}) is corrupt"
    finally:
        os.close(fd)
    return "sha256 mismatch outside any chunk (damaged padding or metadata)"


@dataclass
class ModelReport:
    ok: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)  # files in the folder the diff does not describe
    fingerprint: str = ""  # tensor fingerprint, measured from the folder's bytes, never copied from the manifest
    sha256: dict[str, str] = field(default_factory=dict)  # every file's sha256, measured
    model_digest: str = ""  # the model identity (orca_diff.identity), from the measured sha256s


def verify_model(model_dir: str | os.PathLike, diff: str | os.PathLike | Manifest, progress: bool | None = None,
                 signed: "SignedModel | None" = None) -> ModelReport:
    """Prove a rebuilt (or downloaded) model is the publisher's: every file byte-identical, every
    tensor's digest measured (one read per file), and the model digest and tensor fingerprint
    derived from them. A mismatching safetensors file is examined tensor by tensor to name the
    culprit. ``signed``: a verified signature every file's measured sha256 must match too."""
    folder = Path(model_dir)
    manifest = diff if isinstance(diff, Manifest) else load_manifest(diff)
    if not folder.is_dir():
        raise InputNotFoundError(f"{folder}: no such model folder")
    report = ModelReport()
    measured: dict[str, str] = {}
    with byte_bar(manifest.target_bytes, "verifying model", progress) as bar:
        for f in manifest.files:
            path = folder / f.path
            if not path.is_file():
                raise VerificationError(f"{path}: missing from the rebuilt model; run apply again")
            size = path.stat().st_size
            if size != f.size:
                raise VerificationError(f"{path}: is {size} bytes, expected {f.size}; run apply again")
            found, digests = measure_file(path, f, manifest.digest_algo)
            bar.update(f.size)
            if found != f.sha256:
                raise VerificationError(f"{path}: {describe_file_mismatch(path, f, manifest)}")
            check_measured_tensors(path, manifest, digests)
            if signed is not None:
                signed.check_file(f.path, found, path)
            measured.update(digests)
            report.sha256[f.path] = found
            report.ok.append(f.path)
    report.fingerprint = measured_target_fingerprint(manifest, measured)
    report.model_digest = model_digest(report.sha256)
    described = {f.path for f in manifest.files}
    report.extra = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                          if p.is_file() and p.relative_to(folder).as_posix() not in described)
    return report


def describe_file_mismatch(path: Path, entry: FileEntry, manifest: Manifest) -> str:
    """Say which part of a file is wrong: the header, or the first tensor whose bytes differ."""
    if entry.kind != "safetensors":
        return f"sha256 differs from the manifest ({_short(entry.sha256)}…)"
    from .containers import read_safetensors_header, SafetensorsModel

    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        if fh.read(n) != (entry.header or "").encode("utf-8"):
            return "safetensors header differs from the publisher's"
    model = SafetensorsModel(path, [path], {})
    try:
        for e in read_safetensors_header(path).entries:
            if tensor_digest(model, e.info.name, manifest.digest_algo) != manifest.tensors[e.info.name].digest:
                return f"tensor {e.info.name!r} differs from the publisher's ({manifest.digest_algo} mismatch)"
    finally:
        model.close()
    return "sha256 differs from the manifest"


def verify_base(base: str | os.PathLike, diff: str | os.PathLike, threads: int | None = None,
                progress: bool | None = None) -> Manifest:
    manifest = load_manifest(diff)
    model = open_model(base)
    try:
        check_base(model, manifest, threads, progress)
    finally:
        model.close()
    return manifest


@dataclass
class RebuildCheck:
    """What ``check_rebuild`` proved: tensors whose chunks were decoded and whose digest matched
    the manifest's record, files whose every byte was produced and hashed to their sha256, and
    what it could not check without the base (delta chunks are predictions from it)."""

    tensors_checked: int = 0
    files_checked: int = 0
    tensors_skipped: list[str] = field(default_factory=list)
    files_skipped: list[str] = field(default_factory=list)

    def summary(self) -> str:
        said = (f"payloads rebuild the manifest's records: {self.tensors_checked} tensors decoded and matching "
                f"their digest, {self.files_checked} files hashing to their sha256")
        if self.tensors_skipped or self.files_skipped:
            said += (f"; NOT checked: {len(self.tensors_skipped)} tensors delta-coded against the base and the "
                     f"{len(self.files_skipped)} files holding them or copied from it (give --base to decode them)")
        return said


def check_rebuild(diff_dir: str | os.PathLike, manifest: Manifest, base: ModelReader | None = None,
                  threads: int | None = None, progress: bool | None = None) -> RebuildCheck:
    """Decode every chunk of the diff (each checked against its digest first) and prove the
    payloads rebuild the manifest's records: every tensor's digest, every file's sha256, nothing
    written. Delta chunks need ``base`` (already checked with ``check_base``); without it they
    are listed as not checked, never counted as checked."""
    from .codec import base_prediction, decode_chunk
    from .containers import DTYPE_SIZES, read_range

    diff_dir = Path(diff_dir)
    algo = manifest.digest_algo
    report = RebuildCheck()
    fds: dict[str, int] = {}

    def needs_base(seg) -> bool:
        return seg.from_base or (seg.tensor is not None and any(c.mode == "delta" for c in manifest.tensors[seg.tensor].chunks))

    def decode(item):
        kind, chunk, tensor, where = item
        if kind == "data":
            return item, chunk
        if kind == "base":
            return item, Path(base.extra_files[where]).read_bytes()  # type: ignore[union-attr]
        buf = np.empty(chunk.length, dtype=np.uint8)
        read_exact(fds[chunk.payload], buf, chunk.offset, str(diff_dir / chunk.payload))
        if digest_bytes(buf, algo) != chunk.digest:
            raise CorruptDiffError(f"{diff_dir / chunk.payload}: chunk at offset {chunk.offset} ({where}) fails its "
                                   f"{algo} check; download the diff again")
        if tensor is None:
            return item, decode_chunk(buf, None, 1, "raw", chunk.size, "bytes", where=where)
        t = manifest.tensors[tensor]
        if chunk.mode == "delta":
            enc, bt = t.encoding, manifest.base.tensors[t.encoding.base_tensor]  # type: ignore[index]
            b_item = DTYPE_SIZES[bt.dtype]
            b_raw = read_range(base, enc.base_tensor, chunk.start // t.info.itemsize * b_item,  # type: ignore[arg-type]
                               chunk.size // t.info.itemsize * b_item)
            pred = base_prediction(b_raw, bt.dtype, t.dtype)
            return item, decode_chunk(buf, pred, t.info.itemsize, enc.transform, chunk.size, enc.layout, where=where,
                                      codec=enc.codec)
        return item, decode_chunk(buf, None, t.info.itemsize, "raw", chunk.size, "planes", where=where)

    def items():
        for f in manifest.files:
            segs = file_segments(f)
            whole = base is not None or not any(needs_base(s) for s in segs)
            for seg in segs:
                if seg.tensor is not None:
                    if base is None and needs_base(seg):
                        continue
                    chunks = manifest.tensors[seg.tensor].chunks
                    for c in chunks:
                        yield ("chunk", c, seg.tensor, f"tensor {seg.tensor!r}")
                    yield ("end", None, seg.tensor, f.path)
                elif not whole:
                    continue
                elif seg.data is not None:
                    yield ("data", seg.data, None, f.path)
                elif seg.from_base:
                    yield ("base", None, None, f.path)
                else:
                    for c in seg.chunks:
                        yield ("chunk", c, None, f"file {f.path!r}")
            yield ("file", None, None, f.path) if whole else ("skip", None, None, f.path)

    try:
        for p in manifest.payloads:
            fds[p.path] = os.open(diff_dir / p.path, os.O_RDONLY)
        file_h = hashlib.sha256()
        tensor_h: dict[str, object] = {}
        with byte_bar(manifest.target_bytes, "decoding diff", progress) as bar:
            for item, data in ordered_map(lambda it: decode(it) if it[0] in ("chunk", "data", "base") else (it, None),
                                          items(), threads or default_threads()):
                kind, chunk, tensor, where = item
                if kind in ("chunk", "data", "base"):
                    if tensor is not None:
                        tensor_h.setdefault(tensor, new_hasher(algo)).update(data)  # type: ignore[attr-defined]
                    file_h.update(data)
                    bar.update(len(data))
                elif kind == "end":
                    found = tensor_h.pop(tensor, None) or new_hasher(algo)
                    if found.hexdigest() != manifest.tensors[tensor].digest:  # type: ignore[attr-defined]
                        raise CorruptDiffError(f"{diff_dir}: the payloads of tensor {shown(tensor)!r} decode to bytes "
                                               f"whose {algo} is not the manifest's record; the diff contradicts itself")
                    report.tensors_checked += 1
                elif kind == "file":
                    entry = next(f for f in manifest.files if f.path == where)
                    if file_h.hexdigest() != entry.sha256:
                        raise CorruptDiffError(f"{diff_dir}: file {shown(where)!r} rebuilt from the payloads does not "
                                               "hash to the manifest's sha256; the diff contradicts itself")
                    report.files_checked += 1
                    file_h = hashlib.sha256()
                else:  # a file that cannot be checked without the base
                    report.files_skipped.append(where)
                    file_h = hashlib.sha256()
    finally:
        for fd in fds.values():
            os.close(fd)
    report.tensors_skipped = sorted(s.tensor for f in manifest.files for s in file_segments(f)
                                    if s.tensor is not None and base is None and needs_base(s))
    return report
