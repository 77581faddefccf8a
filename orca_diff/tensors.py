"""Streaming access to model checkpoints as raw little-endian tensor bytes.

Every model form (HF safetensors here; HF ``.bin`` and Meta ``.pth`` in :mod:`orca_diff.torch_io`)
is read through one small interface, :class:`ModelReader`: a table of tensors in HF canonical names
and a ``read(name)`` that returns that tensor's bytes. Safetensors files are memory-mapped and
sliced, so reading a tensor costs no copy and the resident set is bounded by what the caller holds.
The core never needs torch: bf16 and friends are handled as plain bit patterns.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Protocol

import numpy as np

from .errors import FormatError, InputNotFoundError, UsageError

#: Bytes per element of each safetensors dtype we accept. Float dtypes are the ones deltas
#: are computed on as numbers; every other dtype is diffed by byte-wise XOR.
DTYPE_SIZES: dict[str, int] = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}
FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})

#: A safetensors header larger than this is refused (real ones are well under 1 MiB; the
#: reference implementation caps at 100 MB). Bounds memory against hostile files.
MAX_HEADER_BYTES = 100 * 1024 * 1024

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")


@dataclass(frozen=True)
class TensorInfo:
    """What a tensor is, independent of where it is stored."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def itemsize(self) -> int:
        return DTYPE_SIZES[self.dtype]

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize


class ModelReader(Protocol):
    """A checkpoint seen as named tensors (HF names, row-major, little-endian bytes).

    ``read`` returns a 1-D ``uint8`` array of exactly ``tensors[name].nbytes`` bytes. It may be a
    view of a memory map: callers hold one (or a few) at a time, which bounds memory.
    ``extra_files`` maps relative names of non-weight files (config.json, tokenizer files...) to
    their paths.
    """

    path: Path
    tensors: dict[str, TensorInfo]
    extra_files: dict[str, Path]

    def read(self, name: str) -> np.ndarray: ...

    def close(self) -> None: ...


# --------------------------------------------------------------------------- safetensors


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


class DuplicateKeyError(ValueError):
    """A JSON object names the same key twice (parsers disagree on which one wins)."""


def unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """``object_pairs_hook`` for json.loads that refuses duplicate keys instead of keeping the
    last one, so no two tools can read one header or manifest two ways."""
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise DuplicateKeyError(k)
        out[k] = v
    return out


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
        size = path.stat().st_size
        with open(path, "rb") as f:
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
            rel = file.name if path.is_file() else file.relative_to(path).as_posix()
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
            fd = self._fds[file] = os.open(file, os.O_RDONLY)
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


def read_exact(fd: int, buf: np.ndarray, offset: int, where: str) -> None:
    """Fill ``buf`` from ``fd`` at ``offset``; a short file is a FormatError naming ``where``."""
    view = memoryview(buf).cast("B")
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            raise FormatError(f"{where}: file ended early at byte {offset + done} (truncated?)")
        done += n


def read_range(reader: "ModelReader", name: str, start: int, length: int) -> np.ndarray:
    """A byte range of a tensor from any reader (readers without ranged reads are sliced)."""
    try:
        return reader.read(name, start, length)  # type: ignore[call-arg]
    except TypeError:
        return reader.read(name)[start:start + length]


def hash_tensor_range(reader: "ModelReader", name: str, h, start: int = 0, block: int = 16 << 20) -> None:
    """Feed bytes ``[start, end)`` of a tensor to the hash object ``h``, ``block`` bytes at a
    time (bounded memory)."""
    size = reader.tensors[name].nbytes
    for s in range(start, size, block):
        h.update(read_range(reader, name, s, min(block, size - s)))


def tensor_sha256(reader: "ModelReader", name: str, block: int = 16 << 20) -> str:
    """sha256 of a tensor's bytes."""
    import hashlib

    h = hashlib.sha256()
    hash_tensor_range(reader, name, h, 0, block)
    return h.hexdigest()


def file_sha256(path: Path, block: int = 16 << 20) -> str:
    import hashlib

    h = hashlib.sha256()
    buf = bytearray(block)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


# --------------------------------------------------------------------------- discovery


def list_extra_files(folder: Path) -> dict[str, Path]:
    """Non-weight files of a model folder (config, tokenizer, index...), top level, no hidden files."""
    out = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and not p.name.startswith(".") and not p.name.endswith(WEIGHT_SUFFIXES):
            out[p.name] = p
    return out


def open_model(path: str | os.PathLike) -> ModelReader:
    """Open a model in any supported form: a safetensors file or folder, an HF ``.bin`` folder,
    or a Meta original checkpoint folder (``params.json`` + ``consolidated.*.pth``).

    Safetensors is preferred when a folder holds several forms. The torch-based forms need the
    ``orca-diff[torch]`` extra and are loaded with ``weights_only=True`` only.
    """
    p = Path(path)
    if not p.exists():
        raise InputNotFoundError(f"{p}: no such file or folder")
    if p.is_file():
        if p.suffix == ".safetensors":
            return SafetensorsModel(p, [p], {})
        raise UsageError(f"{p}: give a model folder or a .safetensors file")
    shards = sorted(p.glob("*.safetensors"))
    if shards:
        return SafetensorsModel(p, shards, list_extra_files(p))
    if sorted(p.glob("*.bin")) or sorted(p.glob("consolidated.*.pth")):
        from . import torch_io  # noqa: PLC0415 - optional, needs torch

        return torch_io.open_torch_model(p)
    raise InputNotFoundError(
        f"{p}: no model weights found (expected *.safetensors, pytorch_model*.bin, or params.json + consolidated.*.pth)"
    )


def iter_tensor_names(model: ModelReader) -> Iterator[str]:
    return iter(model.tensors)
