"""Running a legacy release: ``apply --format X`` (rebuild exactly as the original tool did, with
orca-diff's checks) and ``convert`` (re-publish it as an orca-diff diff)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from ..errors import InputNotFoundError, InterruptedError_, OrcaDiffError, UsageError
from ..outdir import (OutputSession, check_output, create_staging, describe_os_error, hidden_sibling_name, name_max,
                      output_session, remove_path)
from .common import FORMATS, ConvertReport, LegacyReport
from .sources import detect_format, resolve_base_for, resolve_legacy_diff

# --------------------------------------------------------------------------- dispatch


def _module(fmt: str):
    if fmt == "fastchat":
        from . import fastchat as m
    elif fmt == "alpaca":
        from . import alpaca as m
    elif fmt == "oa-xor":
        from . import oa_xor as m
    else:
        raise UsageError(f"unknown legacy format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return m


def _settle_format(fmt: str | None, spec: str) -> tuple[str, Any]:
    if fmt in ("auto", None):
        fmt = detect_format(spec) or ""
        if not fmt:
            raise UsageError(f"{spec}: cannot tell which legacy format this is; pass --format fastchat|alpaca|oa-xor")
    return fmt, _module(fmt)


def _resolve_inputs(session: OutputSession, fmt: str, spec: str, base: str | None,
                    progress: bool | None) -> tuple[Path, dict[str, Any] | None, Path]:
    """Resolve (and download) the release and its base, then check the output against the
    resolved folders too (a catalog name or repo id only becomes a path here)."""
    diff_dir, entry = resolve_legacy_diff(spec, fmt, progress=progress)
    base_dir = resolve_base_for(base, entry, progress=progress)
    check_output(session.out, session.force, (diff_dir, base_dir))
    return diff_dir, entry, base_dir


def _os_error(exc: OSError, out: Path, work: Path, hint: str) -> OrcaDiffError:
    """An OSError of a legacy rebuild as one line: a file of the output side (the staging or
    work folder, ``out``) is an output problem; any other named file is an input that cannot be
    read; an error with no file name comes from a write."""
    name = Path(str(exc.filename)) if exc.filename else None
    if name is not None:
        resolved = name.resolve() if name.is_absolute() else (Path.cwd() / name).resolve()
        ours = [p.resolve() for p in (work, out)]
        if not any(resolved == p or resolved.is_relative_to(p) for p in ours) and resolved.parent != out.parent.resolve():
            return InputNotFoundError(f"{name}: cannot read ({exc.strerror}); check the release and base folders")
    return describe_os_error(exc, name or work, hint)


def apply_legacy(fmt: str, base: str | None, diff: str, out: str | os.PathLike, *, force: bool = False,
                 threads: int | None = None, progress: bool | None = None,
                 check_integrity: bool = True) -> LegacyReport:
    """Rebuild the model of a legacy release from ``base`` into ``out``, exactly as the release's
    own script would have (see docs/legacy.md), then verify it. ``out`` appears only when done.

    ``fmt`` is "fastchat", "alpaca" or "oa-xor" (``auto`` uses the catalog or detection).
    ``base`` and ``diff`` are local folders, catalog names or Hub repo ids. The output discipline
    is the main path's (:func:`orca_diff.outdir.output_session`): checked before anything is
    read, locked against a concurrent run, staged, published whole; an OSError is one line.
    """
    t0 = time.perf_counter()
    fmt, module = _settle_format(fmt, diff)
    out = Path(out)
    if not force and (done := _already_rebuilt(out, fmt, diff, base)) is not None:
        done.seconds = time.perf_counter() - t0
        return done
    with output_session(out, force, (diff, base)) as session:
        diff_dir, entry, base_dir = _resolve_inputs(session, fmt, diff, base, progress)
        staging = session.staging
        hint = "free space or fix the output, and run the command again"
        try:
            staging = create_staging(out)
            report = module.rebuild(base_dir, diff_dir, staging, entry=entry or {}, threads=threads,
                                    progress=progress, check_integrity=check_integrity)
            files = [p.relative_to(staging).as_posix() for p in sorted(staging.rglob("*")) if not p.is_dir()]
            record = _record(staging, files, fmt, diff, base)
            from ..identity import model_digest

            # the one identity, from the sha256s just measured of the written bytes
            report.model_digest = model_digest({rel: sha for rel, (_, sha) in record["files"].items()})
            session.publish(files)
            _write_record(out, record)
        except OSError as exc:
            _discard(staging)
            raise _os_error(exc, out, staging, hint) from None
        except KeyboardInterrupt:
            _discard(staging)
            raise InterruptedError_("interrupted; nothing was kept (a legacy rebuild does not resume): run the "
                                    "command again") from None
        except BaseException:
            _discard(staging)
            raise
    report.out = out
    report.format = fmt
    report.seconds = time.perf_counter() - t0
    report.notes += session.notes
    return report


# --------------------------------------------------------------------------- reruns

#: Beside each legacy rebuild: what it was rebuilt from and the sha256 of every file written, so
#: that the same command run again can prove the output is still that rebuild (a legacy release
#: carries no hashes of its result to check against).
RECORD_SUFFIX = ".orca-diff-legacy"


def _record_path(out: Path) -> Path:
    return out.parent / hidden_sibling_name(out.name, RECORD_SUFFIX, name_max(out.parent))


def _record(staging: Path, files: list[str], fmt: str, diff: str, base: str | None) -> dict[str, Any]:
    from ..containers import file_sha256

    return {"written_by": "orca-diff", "format": fmt, "release": str(diff), "base": base,
            "files": {rel: [(staging / rel).stat().st_size, file_sha256(staging / rel)] for rel in files}}


def _write_record(out: Path, record: dict[str, Any]) -> None:
    import json

    from ..outdir import StagedFile

    path = _record_path(out)
    with StagedFile(path.parent, path.name) as f:
        f.write((json.dumps(record, indent=1) + "\n").encode())
        f.commit()


def _already_rebuilt(out: Path, fmt: str, diff: str, base: str | None) -> LegacyReport | None:
    """A rerun of the same ``apply --format`` command on its finished output: hash every file
    the record lists (under the output's lock); the report when all match. A record of another
    release or base, or none, is None (the output is then refused as usual). A file that no
    longer matches is an OutputError naming it."""
    import json

    from ..containers import file_sha256
    from ..errors import OutputError
    from ..outdir import OutputLock

    try:
        if out.is_symlink() or not out.is_dir() or not any(out.iterdir()):
            return None
        record = json.loads(_record_path(out).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("format") != fmt or record.get("release") != str(diff):
        return None
    if base is not None and record.get("base") not in (None, base):
        return None
    files = record.get("files")
    if (not isinstance(files, dict) or not files
            or not all(isinstance(v, list) and len(v) == 2 and isinstance(v[0], int) and isinstance(v[1], str)
                       for v in files.values())):
        return None
    with OutputLock(out):
        for rel, (size, sha) in sorted(files.items()):
            path = out / rel
            if (not path.is_file() or path.is_symlink() or path.stat().st_size != size
                    or file_sha256(path) != sha):
                raise OutputError(f"{out}: holds this {fmt} release's rebuild, but {rel} is missing or differs from "
                                  "what was written; pass --force to rebuild the folder, or choose another --out")
    from ..identity import model_digest

    return LegacyReport(out, fmt, len(files), 0, 0.0, None,
                        [f"{len(files)} files hash to what the first run wrote (sha256, measured now)"], [],
                        model_digest=model_digest({rel: sha for rel, (_, sha) in files.items()}), already_done=True)


def _discard(folder: Path) -> None:
    try:
        remove_path(folder)
    except OSError:
        pass


def legacy_payload_bytes(diff_dir: Path) -> int:
    """Size of a legacy release as downloaded: every file of its folder (weights, config,
    tokenizer), excluding the model card and git metadata."""
    return sum(p.stat().st_size for p in diff_dir.iterdir()
               if p.is_file() and p.name not in ("README.md", ".gitattributes"))


def convert_legacy(fmt: str, legacy: str, base: str | None, out: str | os.PathLike, *, force: bool = False,
                   threads: int | None = None, progress: bool | None = None, level: int | None = None,
                   base_name: str | None = None, base_repo: str | None = None,
                   base_revision: str | None = None) -> ConvertReport:
    """Re-publish a legacy release as an orca-diff diff against ``base``.

    The legacy target is rebuilt (streaming, as ``apply --format`` does) into a hidden staging
    folder beside ``out`` as safetensors, ``make_diff(base, staging, out)`` encodes it, the
    staging files are checked against the new manifest (so the diff provably rebuilds these
    bytes), and the staging folder is deleted. Disk: one copy of the model, temporarily. The
    output lock is held throughout (make, called inside, takes the same lock re-entrantly).
    """
    t0 = time.perf_counter()
    fmt, module = _settle_format(fmt, legacy)
    out = Path(out)
    with output_session(out, force, (legacy, base)) as session:
        diff_dir, entry, base_dir = _resolve_inputs(session, fmt, legacy, base, progress)
        target = out.parent / hidden_sibling_name(out.name, ".legacy-target", name_max(out.parent))
        try:
            return _convert(fmt, module, out, diff_dir, entry, base_dir, base, target, force=force, threads=threads,
                            progress=progress, level=level, base_name=base_name, base_repo=base_repo,
                            base_revision=base_revision, t0=t0, notes=list(session.notes))
        except OSError as exc:
            raise _os_error(exc, out, target, "free space or fix the output, and run the command again") from None
        except KeyboardInterrupt:
            raise InterruptedError_("interrupted; nothing was kept (convert does not resume): run the command "
                                    "again") from None
        finally:
            _discard(target)


def _pinned_provenance(base_dir: Path, base_repo: str | None, base_revision: str | None) -> tuple[str | None, str | None]:
    """The base's repo and a commit sha for the manifest, never a branch (docs/hub.md): the
    snapshot's commit when the base folder is that repo's HF cache snapshot, else the branch or
    tag resolved on the Hub now; with no Hub to ask, the repo alone (make says so)."""
    from ..errors import HubError
    from ..hub.options import check_repo_id, is_commit_sha, resolve_commit
    from ..hub.resolve import identify_cached_repo

    if base_repo is None:
        return None, None
    check_repo_id(base_repo, "--base-repo")
    cached = identify_cached_repo(Path(base_dir))
    if cached is not None and cached[0].lower() == base_repo.lower() and (base_revision is None
                                                                          or not is_commit_sha(base_revision)):
        return base_repo, cached[1]
    if base_revision is None or is_commit_sha(base_revision):
        return base_repo, base_revision
    try:
        return base_repo, resolve_commit(base_repo, base_revision)
    except HubError:
        return base_repo, None


def _convert(fmt: str, module: Any, out: Path, diff_dir: Path, entry: dict[str, Any] | None, base_dir: Path,
             base: str | None, target: Path, *, force: bool, threads: int | None, progress: bool | None,
             level: int | None, base_name: str | None, base_repo: str | None, base_revision: str | None,
             t0: float, notes: list[str]) -> ConvertReport:
    from ..codec import DEFAULT_LEVEL
    from ..make import make_diff
    from ..verify import verify_model

    if entry:
        from ..hub.catalog import lookup

        b = lookup(entry.get("base") or "", "base") if entry.get("base") else None
        base_name = base_name or entry.get("base")
        if b is not None and base is None:
            base_repo, base_revision = base_repo or b.repo, base_revision or b.revision
    base_repo, base_revision = _pinned_provenance(base_dir, base_repo, base_revision)
    remove_path(target)  # our own work folder (we hold the output's lock), links not followed
    target.mkdir()
    report = module.rebuild(base_dir, diff_dir, target, entry=entry or {}, threads=threads,
                            progress=progress, check_integrity=True)
    notes += report.notes
    if fmt == "oa-xor":
        notes.append(module.resave_as_safetensors(target))
    from ..api import default_base_name

    manifest = make_diff(base_dir, target, out, base_name=base_name or default_base_name(base_dir, base_repo),
                         base_repo=base_repo,
                         base_revision=base_revision, level=level or DEFAULT_LEVEL, threads=threads,
                         progress=progress, force=force)
    verify_model(target, manifest, progress=progress)
    from ..identity import model_digest

    return ConvertReport(out, fmt, legacy_payload_bytes(diff_dir), manifest.payload_bytes, manifest.target_bytes,
                         time.perf_counter() - t0, manifest.base.fingerprint, manifest.target_fingerprint, notes,
                         model_digest({f.path: f.sha256 for f in manifest.files}))


