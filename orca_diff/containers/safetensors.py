"""HF safetensors files: strict header parsing and ranged reads with ``pread`` (no torch).

Safetensors files are read by positional reads into fresh buffers, so the resident set is
bounded by what the caller holds.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import FormatError, InputNotFoundError
from .base import DTYPE_SIZES, DuplicateKeyError, TensorInfo, open_regular, read_exact, unique_keys

#: A safetensors header larger than this is refused (real ones are well under 1 MiB; the
#: reference implementation caps at 100 MB). Bounds memory against hostile files.
MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class SafetensorsEntry:
    info: TensorInfo
    begin: int  # offset of the tensor's bytes relative to the data section
    end: int


@dataclass(frozen=True)
class SafetensorsHeader:
    """A parsed safetensors header. ``raw`` is the header JSON bytes exactly as stored
    (including trailing padding), so a file can be rebuilt byte for byte."""

    raw: bytes
    entries: tuple[SafetensorsEntry, ...]  # sorted by offset
    metadata: dict[str, str] | None

    @property
    def data_start(self) -> int:
        return 8 + len(self.raw)

    @property
    def data_size(self) -> int:
        return self.entries[-1].end if self.entries else 0


def parse_safetensors_header(raw: bytes, where: str, file_size: int | None = None) -> SafetensorsHeader:
    """Validate and parse a safetensors header (the JSON bytes after the 8-byte length).

    Strict on purpose: offsets must tile the data section with no gap or overlap, sizes must
    match dtype x shape, and (when ``file_size`` is known) the data must fit the file. A header
    that fails any of this raises FormatError naming ``where``.
    """
    try:
        doc = json.loads(raw.decode("utf-8"), object_pairs_hook=unique_keys)
    except DuplicateKeyError as exc:
        raise FormatError(f"{where}: safetensors header names {exc.args[0]!r} twice") from None
    except (ValueError, RecursionError) as exc:  # bad UTF-8 or JSON, or an integer of > 4300 digits
        raise FormatError(f"{where}: safetensors header is not valid JSON ({str(exc)[:200]})") from None
    if not isinstance(doc, dict):
        raise FormatError(f"{where}: safetensors header is not a JSON object")
    metadata = doc.pop("__metadata__", None)
    if metadata is not None and not (
        isinstance(metadata, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    ):
        raise FormatError(f"{where}: safetensors __metadata__ must map strings to strings")
    entries = []
    for name, spec in doc.items():
        if not isinstance(spec, dict):
            raise FormatError(f"{where}: tensor {name!r}: header entry is not an object")
        dtype, shape, offsets = spec.get("dtype"), spec.get("shape"), spec.get("data_offsets")
        if dtype not in DTYPE_SIZES:
            raise FormatError(f"{where}: tensor {name!r}: unsupported dtype {dtype!r}")
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
            raise FormatError(f"{where}: tensor {name!r}: shape must be a list of non-negative ints")
        if not (
            isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int and o >= 0 for o in offsets)
        ):
            raise FormatError(f"{where}: tensor {name!r}: data_offsets must be two non-negative ints")
        info = TensorInfo(name, dtype, tuple(shape))
        begin, end = offsets
        if end - begin != info.nbytes:
            raise FormatError(
                f"{where}: tensor {name!r}: data_offsets span {end - begin} bytes but "
                f"{dtype} x {shape} needs {info.nbytes}"
            )
        entries.append(SafetensorsEntry(info, begin, end))
    entries.sort(key=lambda e: (e.begin, e.end))
    cursor = 0
    for e in entries:
        if e.begin != cursor:
            raise FormatError(
                f"{where}: tensor {e.info.name!r}: data_offsets leave a gap or overlap at byte {cursor}"
            )
        cursor = e.end
    if file_size is not None and 8 + len(raw) + cursor != file_size:
        raise FormatError(
            f"{where}: file is {file_size} bytes but its header describes {8 + len(raw) + cursor}"
            " (truncated or trailing data)"
        )
    return SafetensorsHeader(raw=bytes(raw), entries=tuple(entries), metadata=metadata)


def read_safetensors_header(path: Path) -> SafetensorsHeader:
    """Read and validate the header of a safetensors file without touching its data."""
    try:
        fd = open_regular(path, "safetensors file")
        size = os.fstat(fd).st_size
        with os.fdopen(fd, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise FormatError(f"{path}: too short to be a safetensors file ({size} bytes)")
            (n,) = struct.unpack("<Q", prefix)
            if n > MAX_HEADER_BYTES or n > size - 8:
                raise FormatError(f"{path}: safetensors header length {n} is impossible for a {size}-byte file")
            raw = f.read(n)
    except OSError as exc:
        raise InputNotFoundError(f"{path}: cannot read ({exc.strerror})") from None
    return parse_safetensors_header(raw, str(path), size)


class SafetensorsModel:
    """An HF model folder (or single file) of safetensors shards, memory-mapped."""

    def __init__(self, path: Path, files: list[Path], extra_files: dict[str, Path]):
        self.path = path
        self.extra_files = extra_files
        self.tensors: dict[str, TensorInfo] = {}
        self.headers: dict[str, SafetensorsHeader] = {}  # relative file name -> header
        self._where: dict[str, tuple[Path, int, int]] = {}  # tensor -> (file, abs begin, abs end)
        self._fds: dict[Path, int] = {}
        for file in files:
            header = read_safetensors_header(file)
            self._index(file, file.name if path.is_file() else file.relative_to(path).as_posix(), header)

    def _index(self, file: Path, rel: str, header: SafetensorsHeader) -> None:
        """Record one shard's header and where each of its tensors lies (a name in two shards is refused)."""
        self.headers[rel] = header
        for e in header.entries:
            if e.info.name in self.tensors:
                raise FormatError(f"{file}: tensor {e.info.name!r} also appears in another shard")
            self.tensors[e.info.name] = e.info
            self._where[e.info.name] = (file, header.data_start + e.begin, header.data_start + e.end)

    def read(self, name: str, start: int = 0, length: int | None = None) -> np.ndarray:
        """Bytes ``[start, start+length)`` of tensor ``name``, read with pread into a fresh
        buffer: memory is exactly what the caller holds (no mapped pages piling up in RSS)."""
        file, begin, end = self._where[name]
        size = end - begin
        if length is None:
            length = size - start
        if start < 0 or length < 0 or start + length > size:
            raise ValueError(f"range [{start}, {start + length}) outside tensor {name!r} of {size} bytes")
        buf = np.empty(length, dtype=np.uint8)
        fd = self._fds.get(file)
        if fd is None:
            fd = self._fds[file] = open_regular(file, "safetensors file")
        read_exact(fd, buf, begin + start, str(file))
        return buf

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> "SafetensorsModel":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


