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

from .errors import BaseMismatchError, CorruptDiffError, InputNotFoundError, VerificationError
from .format import FileEntry, Manifest, load_manifest
from .pipeline import default_threads, ordered_map
from .progress import byte_bar
from .containers import ModelReader, file_sha256, open_model, read_exact, tensor_digest
from .digests import digest_bytes

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


def check_base(base: ModelReader, manifest: Manifest, threads: int | None = None, progress: bool | None = None) -> None:
    """Raise BaseMismatchError unless every base tensor and file the diff needs is bit-identical
    to the publisher's. Cheap checks (names, dtypes, shapes) run before any hashing."""
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
    names = list(needed)
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
    for rel, bf in manifest.base.files.items():
        path = base.extra_files[rel]
        if path.stat().st_size != bf.size or file_sha256(path) != bf.sha256:
            raise BaseMismatchError(f"{where}: file {rel!r} differs from the one the diff was made with; "
                                    "restore the original file from your base download")


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


def verify_diff(diff: str | os.PathLike, progress: bool | None = None) -> Manifest:
    """Check a diff's own integrity: manifest checksum and structure, every payload file's size
    and sha256 and, when a file is damaged, which chunk (and so which tensor) is affected."""
    diff_dir = Path(diff)
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


def verify_model(model_dir: str | os.PathLike, diff: str | os.PathLike | Manifest, progress: bool | None = None) -> ModelReport:
    """Prove a rebuilt (or downloaded) model is the publisher's: every file byte-identical.
    A mismatching safetensors file is examined tensor by tensor to name the culprit."""
    folder = Path(model_dir)
    manifest = diff if isinstance(diff, Manifest) else load_manifest(diff)
    if not folder.is_dir():
        raise InputNotFoundError(f"{folder}: no such model folder")
    report = ModelReport()
    with byte_bar(manifest.target_bytes, "verifying model", progress) as bar:
        for f in manifest.files:
            path = folder / f.path
            if not path.is_file():
                raise VerificationError(f"{path}: missing from the rebuilt model; run apply again")
            size = path.stat().st_size
            if size != f.size:
                raise VerificationError(f"{path}: is {size} bytes, expected {f.size}; run apply again")
            found = file_sha256(path)
            bar.update(f.size)
            if found != f.sha256:
                raise VerificationError(f"{path}: {describe_file_mismatch(path, f, manifest)}")
            report.ok.append(f.path)
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
