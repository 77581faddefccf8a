"""The one output discipline of every command that writes a folder (apply, the legacy paths, make).

Promises, in the order a run meets them:

1. ``check_output``: the path makes sense before any input is read: not ``.``/``..``/a mount
   point (the staging sibling could not be renamed into it), a name that fits NAME_MAX, not a
   symbolic link, not an input nor inside one nor holding one (every symlink inside an input
   folder is resolved: the HF cache's snapshots/ are folders of links), and an existing
   non-empty folder only with ``force`` and only when it is a previous orca-diff output,
   unchanged: the ``.<name>.orca-diff-output`` marker beside it proves every entry (identity or
   sha256, :func:`entry_proof`), or, for a diff folder without one, a fully valid manifest
   proves its payloads (checked under the lock, after 3).
2. ``OutputLock``: one run at a time per output. A lock file beside ``out``
   (``.<name>.orca-diff-lock``, ``flock``, non-blocking) covers the output, its staging folder
   and its backup name; a second run refuses at once, naming the holder's pid and command. The
   lock file is never written unless this run created it (O_EXCL), and one that is not a regular
   file with a single name is refused.
3. ``recover_publish``, ``recover_marker``: a ``--force`` publish killed between its two renames
   is finished or undone, a marker left pending by a kill after them is promoted if it proves
   the folder, and said so; a marker write's temporaries are removed.
4. Everything is written into the hidden staging sibling (``.<name>.orca-diff-partial``) through
   :class:`StagedFile`: created with O_EXCL|O_NOFOLLOW, hashed while written through the
   descriptor this run holds, fsynced, and renamed to its final name only if the name still
   designates that very file (st_dev/st_ino of the path against fstat of the descriptor).
5. ``publish``: the marker that proves the staged files is written (pending), the staging
   folder is renamed to ``out`` (an old output moved aside first with ``force``), and the marker
   takes its name, so a later ``--force`` knows what it may replace.
6. ``describe_os_error``: an OSError of any of this is one actionable line (OutputError, exit 8).

``output_session`` bundles 1-3 for a command (make should use it too; see its docstring).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import stat
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator

if TYPE_CHECKING:
    from .pipeline import SerialWorker

from .errors import OrcaDiffError, OutputError, shown

PARTIAL_SUFFIX = ".orca-diff-partial"
OLD_SUFFIX = ".orca-diff-old"
LOCK_SUFFIX = ".orca-diff-lock"
#: Left beside every model folder orca-diff publishes (``.<name>.orca-diff-output``): the files it
#: wrote, so that ``--force`` replaces a previous output and nothing else. Beside, not inside: the
#: model folder holds exactly the publisher's files.
MARKER_SUFFIX = ".orca-diff-output"
#: A diff folder is recognised as orca-diff's own output by its manifest (make writes no marker).
_DIFF_MANIFEST = "orca-diff.json"
#: Entries of an input folder looked at (symlinks resolved) when checking that --out is not an input.
_MAX_INPUT_ENTRIES = 200_000
_MAX_MARKER_BYTES = 64 << 20


# --------------------------------------------------------------------------- names


def name_max(folder: Path) -> int:
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        return 255


def hidden_sibling_name(name: str, suffix: str, limit: int = 255) -> str:
    """``.<name><suffix>``, or, when that is longer than ``limit`` bytes, ``.<prefix>~<hash><suffix>``
    with a prefix of ``name`` cut at a character boundary: unique per name, always within NAME_MAX."""
    full = f".{name}{suffix}"
    if len(os.fsencode(full)) <= limit:
        return full
    tag = "~" + hashlib.sha256(os.fsencode(name)).hexdigest()[:16]
    room = limit - len(os.fsencode(f".{tag}{suffix}"))
    prefix = name
    while len(os.fsencode(prefix)) > room:
        prefix = prefix[:-1]
    return f".{prefix}{tag}{suffix}"


def _sibling(out: Path, suffix: str) -> Path:
    parent = out.parent
    return parent / hidden_sibling_name(out.name, suffix, name_max(parent) if parent.is_dir() else 255)


def staging_dir(out: Path) -> Path:
    """The hidden folder beside ``out`` where a run writes before publishing."""
    return _sibling(Path(out), PARTIAL_SUFFIX)


def old_dir(out: Path) -> Path:
    """Where a ``--force`` publish moves the previous output while it renames the new one in."""
    return _sibling(Path(out), OLD_SUFFIX)


def marker_path(out: Path) -> Path:
    """The list of files orca-diff published in ``out`` (see MARKER_SUFFIX)."""
    return _sibling(Path(out), MARKER_SUFFIX)


def lock_path(out: Path) -> Path:
    """The lock file of ``out``, beside it (its parent resolved, so every spelling shares it)."""
    out = Path(out)
    parent = out.parent.resolve()
    return parent / hidden_sibling_name(out.name, LOCK_SUFFIX, name_max(parent) if parent.is_dir() else 255)


# --------------------------------------------------------------------------- checks


def _lexists(p: Path) -> bool:
    return os.path.lexists(p)


def _resolved_inputs(given: object) -> Iterator[Path]:
    """The input itself, resolved, and the resolved target of every symbolic link inside it."""
    p = Path(str(given))
    yield p.resolve()
    if not p.is_dir():
        return
    seen = 0
    for root, dirs, files in os.walk(p):
        for name in dirs + files:
            q = Path(root) / name
            seen += 1
            if seen > _MAX_INPUT_ENTRIES:
                return
            if q.is_symlink():
                try:
                    yield q.resolve()
                except (OSError, RuntimeError):  # a link loop cannot lead into --out
                    continue


def _inside(a: Path, b: Path) -> bool:
    return a == b or a.is_relative_to(b)


def check_output(out: Path, force: bool, inputs: tuple[object, ...] = (), existing: bool = True) -> None:
    """Refuse, before any input is read, an output path that cannot or must not be written
    (see the module docstring, promise 1). Raises OutputError with one line saying what to do.
    ``existing=False`` leaves out the check of what an existing ``out`` holds (done under the
    lock, after an interrupted publish is recovered)."""
    try:
        _check_output(Path(out), force, inputs, existing)
    except OSError as exc:  # a path that cannot even be looked at (permissions, loops, names)
        raise describe_os_error(exc, Path(out), "choose another --out") from None
    except RuntimeError as exc:  # pathlib's symlink loop
        raise OutputError(f"{out}: cannot be resolved ({exc}); choose another --out") from None


def _check_output(out: Path, force: bool, inputs: tuple[object, ...], existing: bool = True) -> None:
    if out.name in ("", ".", ".."):
        raise OutputError(f"--out {shown(str(out))!r}: give the output folder by its own name (for example "
                          "../model or /data/model): the hidden staging folder is created beside it and renamed "
                          "into place, which '.', '..' or '/' cannot be")
    parent = out.parent
    if not parent.exists():
        raise OutputError(f"{parent}: parent folder does not exist; create it first")
    if not parent.is_dir():
        raise OutputError(f"{parent}: is a file, not a folder; choose another --out")
    limit = name_max(parent)
    if len(os.fsencode(out.name)) > limit:
        raise OutputError(f"{shown(out.name[:40])}...: the --out folder name is {len(os.fsencode(out.name))} bytes, "
                          f"more than this file system allows ({limit}); choose a shorter --out")
    if out.is_symlink():
        raise OutputError(f"{out}: output is a symbolic link; give a plain folder path")
    resolved = out.resolve()
    if out.is_dir() and os.path.ismount(resolved):
        raise OutputError(f"{out}: is a mount point: the staging folder beside it is on another file system and "
                          f"cannot be renamed into it; choose a folder inside it (for example {out / 'model'})")
    for given in inputs:
        if given is None or not Path(str(given)).exists():
            continue
        for src in _resolved_inputs(given):
            if _inside(resolved, src) or _inside(src, resolved):
                where = "" if src == Path(str(given)).resolve() else f" (through its link to {src})"
                raise OutputError(f"{out}: is, holds or lies inside the input {given}{where}; "
                                  "choose an --out outside the inputs")
    if out.exists():
        if not out.is_dir():
            raise OutputError(f"{out}: exists and is not a folder; choose another --out")
        if any(out.iterdir()):
            if not force:
                raise OutputError(f"{out}: folder exists and is not empty; choose another --out or pass --force "
                                  "to replace it")
            if existing:
                refuse_foreign(out)


#: The marker's format: every entry's proof (see :func:`entry_proof`). A marker of another
#: version (the plain file list of orca-diff < 0.9) proves nothing and makes nothing replaceable.
MARKER_VERSION = 2
_HASH_BLOCK = 1 << 20


def _file_sha256(p: Path) -> str:
    """sha256 of the regular file ``p``, never following a link (1 MiB reads)."""
    fd = os.open(p, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        h = hashlib.sha256()
        while block := os.read(fd, _HASH_BLOCK):
            h.update(block)
        return h.hexdigest()
    finally:
        os.close(fd)


def entry_proof(p: Path, sha256: str | None = None) -> dict:
    """What a marker records of one published entry: its identity when published (device,
    inode, size, mtime and ctime: ctime moves on every write, chmod or rename of the inode and
    cannot be set back) and, for a file, its sha256 (computed when not given). A later
    ``--force`` accepts the entry if its identity is unchanged, or if it still hashes to it."""
    st = p.lstat()
    proof = {"dev": st.st_dev, "ino": st.st_ino, "size": st.st_size, "mtime_ns": st.st_mtime_ns,
             "ctime_ns": st.st_ctime_ns}
    if stat.S_ISLNK(st.st_mode):
        proof["kind"] = "link"
    elif stat.S_ISREG(st.st_mode):
        proof["kind"] = "file"
        proof["sha256"] = sha256 or _file_sha256(p)
    else:
        raise OutputError(f"{p}: is neither a file nor a symbolic link; orca-diff publishes only files")
    return proof


def marker_body(folder: Path, files: "dict[str, str | None] | Iterable[str]") -> bytes:
    """The marker's bytes for the entries ``files`` (relative names; with a dict, name -> sha256
    already known, so a model is not read twice) as they are now in ``folder``."""
    known = files if isinstance(files, dict) else dict.fromkeys(files)
    entries = {rel: entry_proof(folder / rel, sha if isinstance(sha, str) else None) for rel, sha in sorted(known.items())}
    return (json.dumps({"written_by": "orca-diff", "marker_version": MARKER_VERSION, "files": entries},
                       indent=0, sort_keys=True) + "\n").encode()


def _read_marker(path: Path) -> dict[str, dict] | None:
    """The entries of a marker file, or None when there is none or it is not one of this version."""
    try:
        st = path.lstat()
        if not stat.S_ISREG(st.st_mode) or st.st_size > _MAX_MARKER_BYTES:
            return None
        doc = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(doc, dict) or doc.get("marker_version") != MARKER_VERSION or not isinstance(doc.get("files"), dict):
        return None
    files = doc["files"]
    for rel, proof in files.items():
        if not isinstance(proof, dict) or proof.get("kind") not in ("file", "link") or not _safe_rel(rel):
            return None
    return files


def _safe_rel(rel: object) -> bool:
    return isinstance(rel, str) and bool(rel) and all(c not in ("", ".", "..") for c in rel.split("/"))


def _proof_problem(p: Path, proof: dict) -> str | None:
    """Why the entry at ``p`` is not the one ``proof`` describes, or None when it is."""
    try:
        st = p.lstat()
    except FileNotFoundError:
        return None  # gone: nothing of it can be lost
    kind = "link" if stat.S_ISLNK(st.st_mode) else "file" if stat.S_ISREG(st.st_mode) else "other"
    if kind != proof.get("kind"):
        return f"is a {'folder' if stat.S_ISDIR(st.st_mode) else kind} where orca-diff published a {proof.get('kind')}"
    same = [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns] == \
        [proof.get(k) for k in ("dev", "ino", "size", "mtime_ns", "ctime_ns")]
    if same:
        return None
    if kind == "link":
        return "is not the symbolic link orca-diff left there"
    if st.st_size != proof.get("size"):
        return f"was changed since orca-diff published it ({st.st_size} bytes, {proof.get('size')} when published)"
    if _file_sha256(p) != proof.get("sha256"):
        return "was changed since orca-diff published it (its sha256 differs from the one recorded then)"
    return None


def _diff_entries(out: Path) -> dict[str, dict] | None:
    """A diff folder without a marker (made or downloaded by an older orca-diff): its manifest,
    if it is a FULLY valid one (checksum and structure: :func:`orca_diff.format.load_manifest`),
    proves its payload files by size and sha256, and a model card generated by ``make`` and not
    edited since proves itself. Nothing else of the folder is replaceable. None without a valid
    manifest."""
    from .format import load_manifest  # noqa: PLC0415 - format imports containers, which import this
    from .hub.card import is_generated_card  # noqa: PLC0415

    manifest_file = out / _DIFF_MANIFEST
    try:
        if not stat.S_ISREG(manifest_file.lstat().st_mode):
            return None
        manifest = load_manifest(out)
    except (OSError, OrcaDiffError):
        return None
    entries: dict[str, dict] = {_DIFF_MANIFEST: {"kind": "proved"}}
    for pl in manifest.payloads:
        entries[pl.path] = {"kind": "file", "size": pl.size, "sha256": pl.sha256}
    card = out / "README.md"
    try:
        if stat.S_ISREG(card.lstat().st_mode) and card.stat().st_size < (1 << 20) and \
                is_generated_card(card.read_text(encoding="utf-8")):
            entries["README.md"] = {"kind": "proved"}
    except (OSError, UnicodeDecodeError):
        pass
    return entries


def _with_folders(files: Iterable[str]) -> set[str]:
    out: set[str] = set()
    for f in files:
        parts = f.split("/")
        out.update("/".join(parts[:k]) for k in range(1, len(parts)))
    return out


def foreign_entry(out: Path) -> tuple[str, str] | None:
    """The first entry of the existing folder ``out`` that ``--force`` may not replace, with the
    reason, or None when every entry is proved to be one orca-diff published there: listed by
    the marker beside ``out`` with an unchanged identity or sha256 (:func:`entry_proof`), or, for
    a diff folder without a marker, proved by its valid manifest (:func:`_diff_entries`)."""
    entries = _read_marker(marker_path(out))
    source = f"{marker_path(out).name} (the list of files orca-diff published there)"
    if entries is None:
        entries = _diff_entries(out)
        source = "its orca-diff.json (a valid diff manifest)"
    if entries is None:
        if _lexists(marker_path(out)):
            why = (f"is not proved to be part of one: the marker {marker_path(out).name} beside it is damaged or was "
                   "written by an older orca-diff (a bare list of names, which cannot prove the files are unchanged)")
        else:
            why = f"is not part of one (neither {marker_path(out).name} nor a valid orca-diff.json lists it)"
        for root, dirs, files in os.walk(out):
            for name in sorted(dirs + files):
                return (Path(root, name).relative_to(out).as_posix(), why)
        return None
    return foreign_entry_in(out, entries, source)


def foreign_entry_in(out: Path, entries: dict[str, dict], source: str) -> tuple[str, str] | None:
    """The first entry of ``out`` that ``entries`` (a marker's, or a manifest's) does not prove."""
    folders = _with_folders(entries)
    for root, dirs, files in os.walk(out):
        rel_root = Path(root).relative_to(out)
        for name in sorted(dirs + files):
            rel = (rel_root / name).as_posix()
            p = Path(root, name)
            if rel in folders and p.is_dir() and not p.is_symlink():
                continue
            proof = entries.get(rel)
            if proof is None:
                return (rel, f"is not part of it ({source} does not list it)")
            if proof["kind"] == "proved":
                continue
            problem = _proof_problem(p, proof)
            if problem is not None:
                return (rel, problem)
        dirs[:] = [d for d in dirs if not os.path.islink(os.path.join(root, d))]
    return None


def refuse_foreign(out: Path) -> None:
    found = foreign_entry(out)
    if found is not None:
        rel, why = found
        raise OutputError(f"{out}: --force replaces only a previous orca-diff output, and {shown(rel)!r} in it {why}; "
                          "move it away or choose another --out")


# --------------------------------------------------------------------------- the lock


_HELD: dict[tuple[str, int], list] = {}  # (lock path, thread id) -> [fd, depth]
_HELD_LOCK = threading.Lock()


class OutputLock:
    """An exclusive, non-blocking lock on an output folder, held for the whole run.

    ``flock`` on ``.<name>.orca-diff-lock`` beside the output; the holder writes its pid and
    command into it so the refusal names it. Re-entrant in one thread (convert holds it while
    make writes the same output); exclusive between threads and processes. The file is removed
    when released (under the lock; an acquirer that locked a removed file retries)."""

    def __init__(self, out: Path):
        self.out = Path(out)
        self.path = lock_path(self.out)
        self._key = (str(self.path), threading.get_ident())

    def __enter__(self) -> "OutputLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> None:
        with _HELD_LOCK:
            held = _HELD.get(self._key)
            if held is not None:
                held[1] += 1
                return
        for _ in range(100):
            fd, created = self._open()
            if not _try_lock(fd):
                holder = _read_holder(fd)
                os.close(fd)
                raise OutputError(f"{self.out}: another orca-diff run ({holder}) is writing this output now; wait "
                                  f"for it to finish, or choose another --out (lock: {self.path})")
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path, follow_symlinks=False).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the previous holder removed it after we opened it: lock the new one
                os.close(fd)
                continue
            if not created and os.name != "nt":  # (Windows cannot unlink an open file: it rewrites it)
                # A lock file left by a killed run (a live one would hold the flock). It is not ours
                # to write into: drop its name while holding its lock and create a fresh one (a
                # run that opened the old one finds it unlinked and retries, like after a release).
                try:
                    os.unlink(self.path)
                except OSError as exc:
                    os.close(fd)
                    raise describe_os_error(exc, self.path, "remove it and rerun") from None
                os.close(fd)
                continue
            cmd = " ".join(sys.argv) if sys.argv and sys.argv[0] else "python"
            try:  # who holds it, for the refusal of a second run; best effort (a full disk is said later)
                if not created:
                    os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n{cmd}\n".encode("utf-8", "backslashreplace"))
            except OSError:
                pass
            with _HELD_LOCK:
                _HELD[self._key] = [fd, 1]
            return
        raise OutputError(f"{self.path}: could not take the output lock (it keeps being replaced); rerun")

    def _open(self, retry: int = 3) -> tuple[int, bool]:
        """The lock file's descriptor, and whether this call created it (O_EXCL). An existing one
        is opened without following a link, and refused unless it is a regular file with no other
        name (a hard link planted there would let a run write into a file elsewhere)."""
        flags = os.O_RDWR | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        try:
            try:
                return os.open(self.path, flags | os.O_CREAT | os.O_EXCL, 0o644), True
            except FileExistsError:
                mode = os.lstat(self.path).st_mode
                if stat.S_ISLNK(mode):
                    raise OutputError(f"{self.path}: the lock file is a symbolic link; remove it and rerun") from None
                if not stat.S_ISREG(mode):  # a device is never even opened
                    raise OutputError(f"{self.path}: the lock file is not a regular file; orca-diff will not open "
                                      "it: remove it and rerun") from None
                fd = os.open(self.path, flags | getattr(os, "O_NONBLOCK", 0))  # a FIFO must not block the open
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise OutputError(f"{self.path}: the lock file is a symbolic link; remove it and rerun") from None
            if exc.errno == errno.ENOENT and retry:  # removed between the two opens: try again
                return self._open(retry - 1)
            raise describe_os_error(exc, self.path, "choose another --out") from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            os.close(fd)
            what = "is not a regular file" if not stat.S_ISREG(st.st_mode) else \
                f"has {st.st_nlink} names (a hard link to a file elsewhere)"
            raise OutputError(f"{self.path}: the lock file {what}; orca-diff will not write into it: remove it "
                              "and rerun")
        return fd, False

    def release(self) -> None:
        with _HELD_LOCK:
            held = _HELD.get(self._key)
            if held is None:
                return
            held[1] -= 1
            if held[1]:
                return
            del _HELD[self._key]
        fd = held[0]
        try:
            if os.fstat(fd).st_ino == os.stat(self.path, follow_symlinks=False).st_ino:
                os.unlink(self.path)
        except OSError:
            pass
        os.close(fd)  # releases the flock


def _try_lock(fd: int) -> bool:
    try:
        import fcntl
    except ImportError:  # Windows
        try:
            import msvcrt

            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)  # type: ignore[attr-defined]
            return True
        except ImportError:
            raise OutputError("this platform has neither fcntl nor msvcrt locks; orca-diff cannot guard "
                              "its output against a concurrent run") from None
        except OSError:
            return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise


def _read_holder(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 4096).decode("utf-8", "replace")
    except OSError:
        text = ""
    lines = text.splitlines()
    if not lines or not lines[0].strip().isdigit():
        return "a process that is starting"
    cmd = shown(lines[1][:300]) if len(lines) > 1 else "?"
    return f"pid {lines[0].strip()}: {cmd}"


# --------------------------------------------------------------------------- staging and publishing


def remove_path(p: Path) -> None:
    """Remove whatever is at ``p`` (file, link or folder) without following a link."""
    try:
        st = p.lstat()
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(p)
    else:
        p.unlink()


def recover_publish(out: Path) -> str | None:
    """Finish or undo a ``--force`` publish that was killed between its renames (call under the
    lock). Returns a note for the user, or None when there was nothing to do."""
    old = old_dir(out)
    try:
        st = old.lstat()
    except FileNotFoundError:
        return None
    if stat.S_ISDIR(st.st_mode) and not _lexists(out):
        old.rename(out)
        return (f"restored the previous {out} from {old.name}: an earlier --force run was interrupted while "
                "replacing it")
    remove_path(old)
    if stat.S_ISDIR(st.st_mode):
        return f"removed {old.name}, the previous output left behind by an interrupted --force run"
    return None


def create_staging(out: Path) -> Path:
    """A fresh, empty staging folder for ``out`` (anything at its name is removed, links unfollowed)."""
    staging = staging_dir(out)
    remove_path(staging)
    staging.mkdir()
    return staging


def pending_marker_path(out: Path) -> Path:
    """Where a publish writes the marker of the folder it is about to rename into ``out``: it
    becomes the marker once the rename is done (:func:`recover_marker` finishes or drops it)."""
    return _sibling(Path(out), MARKER_SUFFIX + "-pending")


def _write_file(path: Path, body: bytes) -> None:
    with StagedFile(path.parent, path.name) as f:
        f.write(body)
        f.commit()


def write_marker(out: Path, files: "dict[str, str | None] | Iterable[str]") -> None:
    """Record beside ``out`` the entries ``files`` of it, with their proofs (see MARKER_SUFFIX
    and :func:`entry_proof`): what a later ``--force`` may replace."""
    _write_file(marker_path(out), marker_body(Path(out), files))


def _staged_files(staging: Path) -> list[str]:
    """Every file and link in a staging folder (relative names), for a diff folder's marker."""
    found = []
    for root, dirs, files in os.walk(staging):
        for name in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            found.append(Path(root, name).relative_to(staging).as_posix())
    return found


def recover_marker(out: Path) -> str | None:
    """Under the lock: remove what a kill while a marker was written left (its temporaries), and
    finish a publish killed between its last rename and the marker's: the pending marker becomes
    the marker only if it proves exactly what ``out`` now holds, else it is dropped. Returns a
    note for the user, or None."""
    marker, pending = marker_path(out), pending_marker_path(out)
    for m in (marker, pending):
        remove_path(m.parent / hidden_sibling_name(m.name, ".incomplete", name_max(m.parent)))
    if not _lexists(pending):
        return None
    entries = _read_marker(pending)
    if entries is not None and out.is_dir() and not out.is_symlink() and _entries_match(out, entries):
        os.replace(pending, marker)
        return f"recorded {marker.name}: an earlier run was interrupted just after publishing {out}"
    remove_path(pending)
    return None


def _entries_match(out: Path, entries: dict[str, dict]) -> bool:
    """Whether ``out`` holds exactly the entries a marker lists, each proved (:func:`_proof_problem`)."""
    for rel, proof in entries.items():
        p = out / rel
        if not _lexists(p) or _proof_problem(p, proof) is not None:
            return False
    try:
        return foreign_entry_in(out, entries, "") is None
    except OSError:
        return False


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(staging: Path, out: Path, force: bool, files: "dict[str, str | None] | Iterable[str] | None" = None) -> None:
    """Move a complete staging folder to ``out`` (call under the output lock) and leave the
    marker beside it that proves its entries (``files``: relative names, or names -> known
    sha256; None: every file of the folder). An existing non-empty ``out`` is replaced only with
    ``force`` and only if it is a previous orca-diff output; it is moved aside first, so a kill
    between the two renames leaves both (see :func:`recover_publish`). The marker is written
    (as the pending marker) before the renames, from the staged files, whose identities the
    renames keep, and takes its name after them (:func:`recover_marker`)."""
    if staging.is_symlink() or not staging.is_dir():
        raise OutputError(f"{staging}: the staging folder was replaced while this run wrote it; nothing was published")
    pending = pending_marker_path(out)
    _write_file(pending, marker_body(staging, _staged_files(staging) if files is None else files))
    fsync_path(staging)
    try:
        _publish_renames(staging, out, force)
    except BaseException:
        if _lexists(staging):  # nothing was renamed: the pending marker describes nothing
            remove_path(pending)
        raise
    os.replace(pending, marker_path(out))
    fsync_path(out.parent)


def _publish_renames(staging: Path, out: Path, force: bool) -> None:
    if _lexists(out):
        if out.is_symlink() or not out.is_dir():
            raise OutputError(f"{out}: appeared while writing and is not a folder; the result is kept in {staging}")
        if any(out.iterdir()):
            if not force:
                raise OutputError(f"{out}: appeared while writing and is not empty; the result is kept in {staging}")
            refuse_foreign(out)
            old = old_dir(out)
            remove_path(old)  # never follow a link planted at our name
            out.rename(old)
            staging.rename(out)
            fsync_path(out.parent)
            remove_path(old)
            return
        out.rmdir()
    staging.rename(out)
    fsync_path(out.parent)


class StagedFile:
    """A new file written in ``folder`` under a hidden temporary name, through one descriptor.

    ``write`` hashes (sha256) what it writes; ``commit`` fsyncs and renames the temporary to
    ``name`` only if the temporary name still designates the file this descriptor wrote: a file
    someone else put there is never published. With ``hasher`` the sha256 of each write runs on
    that thread while the caller writes the next bytes (hashlib releases the GIL): the same
    bytes, hashed in the same order, one update in flight, off the writer's path. One file at a
    time per hasher."""

    def __init__(self, folder: Path, name: str, temp: Path | None = None, hasher: "SerialWorker | None" = None):
        self.final = folder / name
        self.temp = temp or folder / hidden_sibling_name(name, ".incomplete", name_max(folder))
        remove_path(self.temp)
        self.fd = os.open(self.temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
                          | getattr(os, "O_CLOEXEC", 0), 0o644)
        st = os.fstat(self.fd)
        self._id = (st.st_dev, st.st_ino)
        self._sha256 = hashlib.sha256()
        self._hasher = hasher
        self.size = 0

    def write(self, data: bytes | memoryview | object) -> None:
        view = memoryview(data).cast("B")  # type: ignore[arg-type]
        if self._hasher is None:
            self._sha256.update(view)
        else:
            self._hasher.submit(self._sha256.update, view)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]
            self.size += n

    def hexdigest(self) -> str:
        """sha256 of everything written so far."""
        if self._hasher is not None:
            self._hasher.wait()
        return self._sha256.hexdigest()

    def commit(self) -> os.stat_result:
        """fsync, check identity, rename into place; returns the final file's stat."""
        os.fsync(self.fd)
        st = os.stat(self.temp, follow_symlinks=False)
        if (st.st_dev, st.st_ino) != self._id:
            raise OutputError(f"{self.temp}: was replaced by another process while this run wrote it; nothing was "
                              "published. Is another program writing this output?")
        os.replace(self.temp, self.final)
        st = os.stat(self.final, follow_symlinks=False)
        if (st.st_dev, st.st_ino) != self._id:
            raise OutputError(f"{self.final}: was replaced by another process while it was published; rerun")
        self.close()
        return st

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "StagedFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------- a whole session


@dataclass
class OutputSession:
    """What :func:`output_session` hands a command: where to write, and notes to show the user."""

    out: Path
    force: bool
    staging: Path
    lock: OutputLock
    notes: list[str] = field(default_factory=list)

    def publish(self, files: "dict[str, str | None] | Iterable[str] | None" = None) -> None:
        """Publish the staging folder and record the proofs of its files beside it (``files``:
        the model's relative names, or names -> their sha256 when already measured; None for a
        diff folder: all of its files)."""
        try:
            publish(self.staging, self.out, self.force, files)
        except OSError as exc:
            raise describe_os_error(exc, self.out, f"the complete result is in {self.staging}") from None


@contextmanager
def output_session(out: str | os.PathLike, force: bool, inputs: tuple[object, ...] = ()) -> Iterator[OutputSession]:
    """Check ``out``, take its lock for the duration, and recover an interrupted ``--force``
    publish. Every command that writes an output folder runs inside one::

        with output_session(out, force, (base, target)) as s:   # refusals happen here, before any input is read
            ... expensive checks of the inputs ...
            staging = create_staging(out)       # or resume s.staging
            ... write with StagedFile(staging, name) ...; describe_os_error for OSError
            s.publish(files)                    # files=None for a diff folder (its manifest is its marker)
    """
    out = Path(out)
    check_output(out, force, inputs, existing=False)
    lock = OutputLock(out)
    lock.acquire()
    try:
        session = OutputSession(out, force, staging_dir(out), lock)
        try:
            note = recover_publish(out)
            marker_note = recover_marker(out)
        except OSError as exc:
            raise describe_os_error(exc, old_dir(out), "remove it and rerun") from None
        session.notes += [n for n in (note, marker_note) if n]
        check_output(out, force, inputs)  # under the lock, and what was restored is checked like any output
        yield session
    finally:
        lock.release()


def describe_os_error(exc: OSError, path: Path, resume_hint: str) -> OrcaDiffError:
    """Turn a write failure into one actionable line."""
    where = path
    if exc.errno == errno.ENOSPC:
        return OutputError(f"{where}: disk full; free space and {resume_hint}")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return OutputError(f"{where}: cannot write ({exc.strerror}); choose a writable --out")
    if exc.errno in (errno.ENOENT, errno.ENOTDIR):
        return OutputError(f"{where}: cannot create it ({exc.strerror}); choose an --out inside a writable folder")
    if exc.errno == errno.EFBIG:
        return OutputError(f"{where}: file too large for this file system or limit ({exc.strerror})")
    if exc.errno == errno.ENAMETOOLONG:
        return OutputError(f"{where}: name too long for this file system; choose a shorter --out")
    if exc.errno in (errno.EBUSY, errno.EXDEV):
        return OutputError(f"{where}: cannot be renamed into place ({exc.strerror}; a mount point?); choose a folder "
                           "inside that file system as --out")
    if exc.errno == errno.ELOOP:
        return OutputError(f"{where}: a symbolic link is in the way; remove it and rerun")
    return OutputError(f"{where}: write failed ({exc.strerror}); {resume_hint}")
