"""HF ``.bin`` checkpoints (torch's zip format) seen as byte segments, so they can be rebuilt
byte for byte without torch and without unpickling.

A file written by ``torch.save`` (every ``pytorch_model*.bin`` since torch 1.6) is a zip archive
with no compression: a small pickle (``<prefix>/data.pkl``), a few small records, one record per
tensor *storage* (``<prefix>/data/<key>``, raw little-endian bytes, aligned by padding in the
local header's extra field), then the central directory. This module parses the zip structure
itself (no torch; ``zipfile`` is not used because it hides the data offsets) and cuts the file
into segments: every byte outside a storage record is *verbatim* (headers, pickle, central
directory), every storage record is a candidate tensor.

Which tensor a storage holds is known only from the pickle; :func:`name_storages` asks torch
(``torch.load(weights_only=True, mmap=True)``, make only) and names a record's bytes after the
largest contiguous tensor held in it (normally one that covers it exactly; for a view, the bytes
around it stay verbatim). A storage holding no contiguous tensor (a transposed or strided view,
an unsupported dtype) stays verbatim: it is still rebuilt byte for byte, only not delta-coded.
Tied weights (two names, one storage) give one tensor, named after the first name in the
pickle's order.
"""

from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import FormatError, InputNotFoundError
from .base import DTYPE_SIZES, TensorInfo, open_regular, read_exact

_EOCD = 0x06054B50
_EOCD64 = 0x06064B50
_EOCD64_LOCATOR = 0x07064B50
_CENTRAL = 0x02014B50
_LOCAL = 0x04034B50
#: Records a zip of tensors can have; bounds the work on hostile files (a 70B shard has ~400).
MAX_RECORDS = 1 << 20
_STORAGE_RE = re.compile(r"^[^/]+/data/[0-9]+$")


class UncutZipError(FormatError):
    """A valid zip that cannot be cut into segments: a member is compressed (torch loads a
    deflated archive, though ``torch.save`` never writes one) or encrypted. ``make`` carries such
    a file verbatim instead."""


@dataclass(frozen=True)
class ZipRecord:
    """One stored (uncompressed) member: its bytes are ``[data_offset, data_offset + size)``."""

    name: str
    header_offset: int
    data_offset: int
    size: int

    @property
    def is_storage(self) -> bool:
        return bool(_STORAGE_RE.match(self.name))


def is_torch_zip(path: Path) -> bool:
    try:
        fd = open_regular(path, "checkpoint")  # a FIFO or device is refused, never blocked on
    except OSError:
        return False
    try:
        return os.pread(fd, 4, 0) == b"PK\x03\x04"
    finally:
        os.close(fd)


def read_zip_records(path: Path) -> list[ZipRecord]:
    """The members of a torch zip, sorted by data offset. Refuses (FormatError) compressed or
    encrypted members, overlapping members and anything that does not fit the file."""
    try:
        size = path.stat().st_size
        fd = open_regular(path, "checkpoint")
    except OSError as exc:
        raise InputNotFoundError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        return _records(fd, size, str(path))
    finally:
        os.close(fd)


def _pread(fd: int, offset: int, n: int, where: str) -> bytes:
    if offset < 0 or n < 0:
        raise FormatError(f"{where}: not a valid zip file (negative offset)")
    buf = np.empty(n, dtype=np.uint8)
    read_exact(fd, buf, offset, where)
    return buf.tobytes()


def _records(fd: int, size: int, where: str) -> list[ZipRecord]:
    bad = f"{where}: not a torch zip checkpoint"
    tail_len = min(size, 22 + 65535)
    tail = _pread(fd, size - tail_len, tail_len, where)
    pos = tail.rfind(struct.pack("<I", _EOCD))
    if pos < 0 or pos + 22 > len(tail):
        raise FormatError(f"{bad} (no end of central directory)")
    eocd_at = size - tail_len + pos
    (_sig, disk, cd_disk, n_disk, n_total, cd_size, cd_offset, _clen) = struct.unpack("<IHHHHIIH", tail[pos:pos + 22])
    if disk != 0 or cd_disk != 0 or n_disk != n_total:
        raise FormatError(f"{bad} (multi-disk archive)")
    if n_total == 0xFFFF or cd_size == 0xFFFFFFFF or cd_offset == 0xFFFFFFFF:
        if eocd_at < 20:
            raise FormatError(f"{bad} (zip64 locator missing)")
        loc = _pread(fd, eocd_at - 20, 20, where)
        sig, _d, eocd64_at, _disks = struct.unpack("<IIQI", loc)
        if sig != _EOCD64_LOCATOR or eocd64_at + 56 > size:
            raise FormatError(f"{bad} (zip64 locator missing)")
        rec = _pread(fd, eocd64_at, 56, where)
        sig, _rsize, _vm, _vn, _d1, _d2, _n1, n_total, cd_size, cd_offset = struct.unpack("<IQHHIIQQQQ", rec)
        if sig != _EOCD64:
            raise FormatError(f"{bad} (zip64 end record missing)")
    if n_total > MAX_RECORDS or cd_offset + cd_size > size or cd_size > 64 * MAX_RECORDS:
        raise FormatError(f"{bad} (central directory outside the file)")
    cd = _pread(fd, cd_offset, cd_size, where)
    records: list[ZipRecord] = []
    names: set[str] = set()
    p = 0
    for _ in range(n_total):
        if p + 46 > len(cd):
            raise FormatError(f"{bad} (central directory truncated)")
        (sig, _vm, _vn, flags, method, _t, _d, _crc, csize, usize, nlen, xlen, clen, _disk, _ia, _ea,
         lho) = struct.unpack("<IHHHHHHIIIHHHHHII", cd[p:p + 46])
        if sig != _CENTRAL:
            raise FormatError(f"{bad} (bad central directory entry)")
        name_b = cd[p + 46:p + 46 + nlen]
        extra = cd[p + 46 + nlen:p + 46 + nlen + xlen]
        p += 46 + nlen + xlen + clen
        if p > len(cd):
            raise FormatError(f"{bad} (central directory truncated)")
        usize, csize, lho = _zip64_fields(extra, usize, csize, lho, bad)
        name = name_b.decode("utf-8", "replace")
        if method != 0 or flags & 1 or csize != usize:
            raise UncutZipError(f"{where}: member {name!r} is compressed or encrypted; torch.save never writes such "
                                "files (re-save it with torch.save or save_pretrained to get a small diff)")
        local = _pread(fd, lho, 30, where) if lho + 30 <= size else b""
        if len(local) != 30 or struct.unpack("<I", local[:4])[0] != _LOCAL:
            raise FormatError(f"{bad} (member {name!r}: local header missing)")
        lnlen, lxlen = struct.unpack("<HH", local[26:30])
        data_offset = lho + 30 + lnlen + lxlen
        if data_offset + usize > size:
            raise FormatError(f"{bad} (member {name!r} runs past the end of the file)")
        if name in names:  # two members of one name: zip readers disagree on which is meant (torch never writes it)
            raise FormatError(f"{bad} (member {name!r} appears twice)")
        names.add(name)
        records.append(ZipRecord(name, lho, data_offset, usize))
    records.sort(key=lambda r: r.header_offset)
    end = 0
    for r in records:
        if r.header_offset < end:
            raise FormatError(f"{bad} (members overlap at {r.name!r})")
        end = r.data_offset + r.size
    if end > cd_offset:
        raise FormatError(f"{bad} (a member overlaps the central directory)")
    return records


def _zip64_fields(extra: bytes, usize: int, csize: int, lho: int, bad: str) -> tuple[int, int, int]:
    q = 0
    while q + 4 <= len(extra):
        tag, n = struct.unpack("<HH", extra[q:q + 4])
        body = extra[q + 4:q + 4 + n]
        q += 4 + n
        if tag != 1:
            continue
        vals = [struct.unpack("<Q", body[i:i + 8])[0] for i in range(0, len(body) - 7, 8)]
        for field in ("u", "c", "o"):
            current = {"u": usize, "c": csize, "o": lho}[field]
            if current == 0xFFFFFFFF:
                if not vals:
                    raise FormatError(f"{bad} (zip64 field missing)")
                v = vals.pop(0)
                usize, csize, lho = (v, csize, lho) if field == "u" else (usize, v, lho) if field == "c" else (usize, csize, v)
    return usize, csize, lho


# --------------------------------------------------------------------------- naming storages (make only)
@dataclass(frozen=True)
class StorageTensor:
    """A tensor held contiguously in a storage record: its bytes are the record's bytes
    ``[offset, offset + info.nbytes)`` (the whole record when it covers it exactly)."""

    record: ZipRecord
    info: TensorInfo
    offset: int = 0


def name_storages(path: Path, records: list[ZipRecord]) -> tuple[dict[str, StorageTensor], list[str]]:
    """Map storage records to the tensors that cover them exactly, by loading the file with
    ``torch.load(weights_only=True, mmap=True)`` and matching each tensor's storage address in the
    memory map against the records' data offsets. Returns ({record name: StorageTensor}, notes on
    storages left verbatim). Needs torch (make only; apply never calls this)."""
    from .pickled import _dtype_names, _load, _torch  # noqa: PLC0415 - optional, needs torch

    torch = _torch()
    dtypes = _dtype_names(torch)
    notes: list[str] = []
    storages = [r for r in records if r.is_storage and r.size > 0]
    byteorder = _small_record(path, records, "byteorder")
    if byteorder not in (None, b"little"):
        return {}, [f"{path.name}: storages are {byteorder!r}-endian; stored verbatim"]
    sd, mapped = _load(path)
    if not mapped:
        return {}, [f"{path.name}: not memory-mappable; storages stored verbatim"]
    by_ptr: dict[int, list[tuple[str, Any]]] = {}
    for name, t in sd.items():
        st = t.untyped_storage()
        if st.nbytes() > 0:
            by_ptr.setdefault(st.data_ptr(), []).append((name, t))
    shift = _address_shift(sorted(by_ptr), {r.data_offset: r for r in storages},
                           {p: ts[0][1].untyped_storage().nbytes() for p, ts in by_ptr.items()})
    out: dict[str, StorageTensor] = {}
    if shift is None:
        return {}, [f"{path.name}: could not match tensors to storage records; stored verbatim"]
    at = {r.data_offset: r for r in storages}
    for ptr, tensors in by_ptr.items():
        rec = at[ptr - shift]
        best: StorageTensor | None = None
        for name, t in tensors:  # in the pickle's order: the first of equal ones wins (tied weights)
            dtype = dtypes.get(t.dtype)
            if dtype is None or not t.is_contiguous() or t.numel() == 0:
                continue
            info = TensorInfo(name, dtype, tuple(int(d) for d in t.shape))
            offset = t.storage_offset() * DTYPE_SIZES[dtype]
            if offset + info.nbytes <= rec.size and (best is None or info.nbytes > best.info.nbytes):
                best = StorageTensor(rec, info, offset)
        if best is None:
            notes.append(f"{path.name}: storage {rec.name} ({', '.join(n for n, _ in tensors)}) holds no contiguous "
                         "tensor; stored verbatim")
            continue
        if best.info.nbytes != rec.size:
            notes.append(f"{path.name}: storage {rec.name} is larger than the tensor {best.info.name!r} it holds "
                         "(a view); the rest of it is stored verbatim")
        out[rec.name] = best
    del sd
    return out, notes


def _address_shift(ptrs: list[int], records_at: dict[int, ZipRecord], nbytes_of: dict[int, int]) -> int | None:
    """The constant (memory address - file offset) of torch's whole-file memory map, found by
    trying each record against the lowest storage address; None if no shift maps every storage
    onto a record of its size."""
    if not ptrs:
        return 0
    first = ptrs[0]
    for off in sorted(records_at):
        shift = first - off
        if all((r := records_at.get(p - shift)) is not None and r.size == nbytes_of[p] for p in ptrs):
            return shift
    return None


def _small_record(path: Path, records: list[ZipRecord], suffix: str) -> bytes | None:
    for r in records:
        if r.name.endswith("/" + suffix) and r.size <= 64:
            with open(path, "rb") as f:
                f.seek(r.data_offset)
                return f.read(r.size)
    return None


# --------------------------------------------------------------------------- a .bin target
@dataclass(frozen=True)
class Piece:
    """A run of a file's bytes: a named tensor's storage, or verbatim bytes (``tensor`` None)."""

    offset: int
    size: int
    tensor: str | None = None


def file_pieces(file_size: int, records: list[ZipRecord], named: dict[str, StorageTensor]) -> list[Piece]:
    """Cut a file into pieces that tile it: each named storage record a tensor piece, every other
    run of bytes one verbatim piece."""
    pieces: list[Piece] = []
    cursor = 0
    for r in sorted((r for r in records if r.name in named), key=lambda r: r.data_offset):
        st = named[r.name]
        begin = r.data_offset + st.offset
        if begin > cursor:
            pieces.append(Piece(cursor, begin - cursor))
        pieces.append(Piece(begin, st.info.nbytes, st.info.name))
        cursor = begin + st.info.nbytes
    if file_size > cursor:
        pieces.append(Piece(cursor, file_size - cursor))
    return pieces


class TorchZipModel:
    """HF ``.bin`` shards of a *target* seen as byte segments: ``pieces[rel]`` tiles file ``rel``;
    ``tensors`` are the storages named by :func:`name_storages`; ``read`` serves a tensor's bytes
    straight from its file (pread, no torch). Making this needs torch; reading does not."""

    def __init__(self, path: Path, files: list[Path], extra_files: dict[str, Path]):
        self.path = path
        self.extra_files = extra_files
        self.tensors: dict[str, TensorInfo] = {}
        self.pieces: dict[str, list[Piece]] = {}
        self.files: dict[str, Path] = {}
        self.notes: list[str] = []
        self._where: dict[str, tuple[Path, int]] = {}
        self._fds: dict[Path, int] = {}
        for file in files:
            rel = file.relative_to(path).as_posix()
            size = file.stat().st_size
            if not is_torch_zip(file):  # torch's pre-1.6 format: no zip to cut, the file travels whole
                self.notes.append(f"{file.name}: not in torch's zip format (saved by torch < 1.6?); carried verbatim")
                self.pieces[rel] = file_pieces(size, [], {})
                self.files[rel] = file
                continue
            try:
                records = read_zip_records(file)
            except UncutZipError as exc:  # its bytes travel all the same, as one verbatim segment
                self.notes.append(f"{exc}; carried verbatim (not delta-coded: a large diff)")
                self.pieces[rel] = file_pieces(size, [], {})
                self.files[rel] = file
                continue
            try:
                named, notes = name_storages(file, records)
            except FormatError as exc:  # a pickle torch refuses to load safely: its bytes still travel
                named, notes = {}, [f"{exc}; its bytes are carried verbatim (not delta-coded)"]
            self.notes += notes
            for st in named.values():
                if st.info.name in self.tensors:
                    raise FormatError(f"{file}: tensor {st.info.name!r} also appears in another shard")
                self.tensors[st.info.name] = st.info
                self._where[st.info.name] = (file, st.record.data_offset + st.offset)
            self.pieces[rel] = file_pieces(size, records, named)
            self.files[rel] = file

    def read(self, name: str, start: int = 0, length: int | None = None) -> np.ndarray:
        file, begin = self._where[name]
        size = self.tensors[name].nbytes
        if length is None:
            length = size - start
        if start < 0 or length < 0 or start + length > size:
            raise ValueError(f"range [{start}, {start + length}) outside tensor {name!r} of {size} bytes")
        return self.read_file(file, begin + start, length)

    def read_file(self, file: Path, offset: int, length: int) -> np.ndarray:
        buf = np.empty(length, dtype=np.uint8)
        fd = self._fds.get(file)
        if fd is None:
            fd = self._fds[file] = open_regular(file, "checkpoint")
        read_exact(fd, buf, offset, str(file))
        return buf

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


__all__ = ["UncutZipError", "ZipRecord", "StorageTensor", "Piece", "TorchZipModel", "read_zip_records", "name_storages",
           "file_pieces", "is_torch_zip", "MAX_RECORDS"]
