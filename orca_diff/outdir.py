"""Output folders that appear complete or not at all.

Everything is written into a hidden staging sibling (``.<name>.orca-diff-partial``), each file
fsynced, and the folder renamed into place at the end. An existing non-empty output is never
touched without ``force``; with ``force`` it is replaced only after the new one is complete.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from .errors import OutputError

PARTIAL_SUFFIX = ".orca-diff-partial"


def staging_dir(out: Path) -> Path:
    return out.parent / f".{out.name}{PARTIAL_SUFFIX}"


def check_output(out: Path, force: bool, inputs: tuple[object, ...] = ()) -> None:
    """Refuse an output that exists as a file, or as a non-empty folder without ``force``, and
    one that is, contains or lies inside an input (``--force`` would otherwise replace the
    user's base with the rebuilt model)."""
    resolved = out.resolve()
    for given in inputs:
        if given is None or not Path(str(given)).exists():
            continue
        src = Path(str(given)).resolve()
        if resolved == src or src.is_relative_to(resolved) or resolved.is_relative_to(src):
            raise OutputError(f"{out}: is, holds or lies inside the input {given}; choose an --out outside the inputs")
    if out.is_symlink():
        raise OutputError(f"{out}: output is a symbolic link; give a plain folder path")
    if out.exists():
        if not out.is_dir():
            raise OutputError(f"{out}: exists and is not a folder; choose another --out")
        if any(out.iterdir()) and not force:
            raise OutputError(f"{out}: folder exists and is not empty; choose another --out or pass --force to replace it")
    if not out.parent.exists():
        raise OutputError(f"{out.parent}: parent folder does not exist; create it first")
    if not out.parent.is_dir():
        raise OutputError(f"{out.parent}: is a file, not a folder; choose another --out")


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(staging: Path, out: Path, force: bool) -> None:
    """Move a complete staging folder to ``out`` (replacing it only if ``force``)."""
    fsync_path(staging)
    if out.exists():
        if any(out.iterdir()):
            if not force:
                raise OutputError(f"{out}: appeared while writing and is not empty; the result is kept in {staging}")
            old = out.parent / f".{out.name}.orca-diff-old"
            if old.is_symlink() or old.is_file():
                old.unlink()  # never follow a link planted at our name
            elif old.exists():
                shutil.rmtree(old)
            out.rename(old)
            staging.rename(out)
            shutil.rmtree(old, ignore_errors=True)
            fsync_path(out.parent)
            return
        out.rmdir()
    staging.rename(out)
    fsync_path(out.parent)


def describe_os_error(exc: OSError, path: Path, resume_hint: str) -> OutputError:
    """Turn a write failure into one actionable line."""
    if exc.errno == errno.ENOSPC:
        return OutputError(f"{path}: disk full; free space and {resume_hint}")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return OutputError(f"{path}: cannot write ({exc.strerror}); choose a writable --out")
    if exc.errno in (errno.ENOENT, errno.ENOTDIR):
        return OutputError(f"{path}: cannot create it ({exc.strerror}); choose an --out inside a writable folder")
    if exc.errno == errno.EFBIG:
        return OutputError(f"{path}: file too large for this file system or limit ({exc.strerror})")
    return OutputError(f"{path}: write failed ({exc.strerror}); {resume_hint}")
