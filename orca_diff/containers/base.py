"""What every container shares: dtypes, the tensor table, the reader interface, hashing.

A model checkpoint is seen through one small interface, :class:`ModelReader`, whatever holds it
(safetensors in :mod:`.safetensors`; HF ``.bin`` and Meta ``.pth`` in :mod:`.pickled`): a table of
tensors in HF canonical names and a ranged ``read``. Nothing here needs torch.
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import threading

import numpy as np

from ..errors import FormatError


#: Bytes per element of each safetensors dtype we accept. Float dtypes are the ones deltas
#: are computed on as numbers; every other dtype is diffed by byte-wise XOR.
DTYPE_SIZES: dict[str, int] = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}
FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})

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



def open_regular(path: Path | str, what: str = "file") -> int:
    """Open ``path`` for reading, refusing (FormatError naming it) anything but a regular file: a
    FIFO, device or socket given as a checkpoint would otherwise block or stream forever. The
    open itself cannot block (O_NONBLOCK, which regular files ignore)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        from ..errors import InputNotFoundError

        raise InputNotFoundError(f"{path}: no such file") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise FormatError(f"{path}: is not a regular file (a {_kind(st.st_mode)}); a {what} must be a plain file")
    if hasattr(os, "set_blocking"):
        os.set_blocking(fd, True)
    return fd


def require_regular(path: Path | str, what: str = "file") -> None:
    """Refuse ``path`` unless it is a regular file (symlinks to one are fine), without blocking."""
    os.close(open_regular(path, what))


def _kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "FIFO"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device"
    if stat.S_ISDIR(mode):
        return "folder"
    return "special file"


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


def tensor_digest(reader: "ModelReader", name: str, algo: str, block: int = 16 << 20) -> str:
    """The digest (``algo``: "sha256" or "blake3", see :mod:`orca_diff.digests`) of a tensor's bytes."""
    from ..digests import new_hasher

    h = new_hasher(algo)
    hash_tensor_range(reader, name, h, 0, block)
    return h.hexdigest()


def tensor_sha256(reader: "ModelReader", name: str, block: int = 16 << 20) -> str:
    """sha256 of a tensor's bytes (format version 1's tensor digest)."""
    return tensor_digest(reader, name, "sha256", block)


def file_sha256(path: Path, block: int = 16 << 20, stop: "threading.Event | None" = None) -> str:
    """sha256 of a file's bytes; with ``stop``, gives up (InterruptedError) once it is set, so a
    background hash never outlives the command that started it by more than one block."""
    h = hashlib.sha256()
    buf = bytearray(block)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            if stop is not None and stop.is_set():
                raise InterruptedError(f"{path}: hashing stopped")
            h.update(view[:n])
    return h.hexdigest()



def list_extra_files(folder: Path) -> dict[str, Path]:
    """Non-weight files of a model folder (config, tokenizer, index...), top level, no hidden files."""
    out = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and not p.name.startswith(".") and not p.name.endswith(WEIGHT_SUFFIXES):
            out[p.name] = p
    return out


#: Folders of a model folder that are not part of the model: git's own, huggingface_hub's
#: local-dir metadata, Python caches. Never carried by make (and reported).
NOT_MODEL_FOLDERS = frozenset({".git", ".cache", "__pycache__"})


def list_target_files(folder: Path, weight_files: set[Path]) -> tuple[dict[str, Path], list[str]]:
    """Every file of a fine-tuned model folder except ``weight_files``: subfolders and dotfiles
    included, symbolic links to files followed (an HF cache snapshot is made of them), folders in
    NOT_MODEL_FOLDERS skipped. Returns ({relative POSIX path: path}, [skipped folders]). A FIFO,
    socket, device, dangling link or linked folder is refused by name: make carries every file
    or stops."""
    import stat as stat_

    out: dict[str, Path] = {}
    skipped: list[str] = []
    for root, dirs, files in os.walk(folder):
        rel_root = Path(root).relative_to(folder)
        for d in sorted(dirs):
            path = Path(root) / d
            if d in NOT_MODEL_FOLDERS:
                skipped.append((rel_root / d).as_posix() + "/")
                dirs.remove(d)
            elif path.is_symlink():
                raise FormatError(f"{path}: is a link to a folder; make does not follow linked folders "
                                  "(copy it into the model folder, or remove it)")
        dirs.sort()
        for name in sorted(files):
            path = Path(root) / name
            if path in weight_files:
                continue
            try:
                st = os.stat(path)  # follows a link: HF cache snapshots link to blobs
            except OSError as exc:
                raise FormatError(f"{path}: cannot be read ({exc.strerror}; a dangling link?); fix or remove it") from None
            if not stat_.S_ISREG(st.st_mode):
                raise FormatError(f"{path}: is not a regular file (a FIFO, socket or device); remove it from the "
                                  "model folder")
            out[(rel_root / name).as_posix()] = path
    return out, skipped

