"""The library face: ``orca_diff.make``, ``orca_diff.apply``, ``orca_diff.verify``.

What the CLI can do, as three functions a script can call (the CLI is a thin layer over them):
inputs are what the command line takes — a local folder, a catalog name (``llama-13b``) or a Hub
repo id ``org/name`` with ``revision=`` or ``@rev`` — and each returns a typed report of what
was done and measured. Every expected failure raises a subclass of
:class:`orca_diff.errors.OrcaDiffError` (exported from the package root) whose message says what
to do; nothing is printed (pass ``progress=True`` for tqdm bars). See docs/library.md.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Union

from .errors import OrcaDiffError, OutputError, UsageError, VerificationError
from .format import MANIFEST_NAME, Manifest

if TYPE_CHECKING:
    from .signing import SignWith, VerifyWith

PathLike = Union[str, os.PathLike]


# --------------------------------------------------------------------------- reports


@dataclass
class MakeReport:
    """What :func:`make` wrote: the diff folder and its manifest (sizes, fingerprints)."""

    out: Path
    manifest: Manifest
    seconds: float
    notes: list[str] = field(default_factory=list)  # warnings (base not identified, files excluded...)

    @property
    def payload_bytes(self) -> int:
        return self.manifest.payload_bytes

    @property
    def target_bytes(self) -> int:
        return self.manifest.target_bytes

    @property
    def base_fingerprint(self) -> str:
        return self.manifest.base.fingerprint


@dataclass
class ApplyReport:
    """What :func:`apply` did. ``already_done``: ``out`` held the model already (every file was
    hashed now and matched), so nothing was written. Fingerprints are measured, never copied."""

    out: Path
    format: str                      # "orca-diff" or a legacy format (fastchat, alpaca, oa-xor)
    files: int
    bytes_written: int
    seconds: float
    target_fingerprint: str | None
    base_fingerprint: str | None = None
    already_done: bool = False
    resumed_files: int = 0
    checks: list[str] = field(default_factory=list)  # what was verified, one line each
    notes: list[str] = field(default_factory=list)
    model_digest: str = ""           # the model identity (orca_diff.identity), measured from the files
    provenance: list[str] = field(default_factory=list)  # the publisher's signatures checked, one line each


@dataclass
class VerifyReport:
    """What :func:`verify` checked: the diff always, the base and the model when given."""

    diff: Path
    manifest: Manifest
    base_tensors_checked: int = 0
    base_fingerprint: str | None = None    # measured (when every base tensor of the manifest was checked)
    model_files: list[str] = field(default_factory=list)
    model_fingerprint: str | None = None   # measured from the model's tensors
    model_extra_files: list[str] = field(default_factory=list)
    model_digest: str = ""                 # the model identity, measured from every file of the model
    rebuild_summary: str = ""              # what the payloads were proven to rebuild (verify.check_rebuild)
    signed: list[str] = field(default_factory=list)  # the publisher's signatures checked, one line each
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- helpers


def _spec(spec: PathLike, revision: str | None, what: str) -> str:
    """``spec`` as resolution takes it: a path as given, ``NAME@REV`` with ``revision``."""
    text = os.fspath(spec)
    if revision is None:
        return text
    if Path(text).expanduser().exists():
        raise UsageError(f"{what} {text} is a local folder: a revision applies only to a Hub repo id")
    from .hub.options import check_revision

    check_revision(revision, "revision")
    name, sep, given = text.partition("@")
    if sep and given != revision:
        raise UsageError(f"{what} {text!r} names revision {given!r} but revision={revision!r}: give it once")
    return f"{name}@{revision}"


def _diff_arg(diff: str) -> str:
    """``DIR/orca-diff.json`` means the diff folder DIR, and so does a link to that manifest under
    any name (verify.diff_folder: the payloads lie beside the manifest)."""
    from .verify import diff_folder

    p = Path(diff)
    return str(diff_folder(p)) if p.is_file() else diff


def _hub_settings(token: str | None, cache_dir: PathLike | None):
    from .hub.options import hub_settings

    return hub_settings(token=token, cache_dir=cache_dir)


def _pinned(folder: Path, spec: str) -> str:
    """A diff fetched by name, pinned to the commit its manifest came from (so the payloads
    fetched next are of the same commit even if the branch moves meanwhile)."""
    from .hub.resolve import identify_cached_repo

    if Path(spec).expanduser().exists():
        return spec
    cached = identify_cached_repo(folder)
    return f"{cached[0]}@{cached[1]}" if cached else spec


def default_base_name(base: PathLike, base_repo: str | None) -> str:
    """The name a diff records for its base: the catalog's name for that repo, else the repo id,
    else the folder's name. Never an HF cache snapshot's commit sha."""
    from .hub.catalog import load_catalog
    from .hub.resolve import identify_cached_repo

    text = os.fspath(base)
    if not Path(text).expanduser().exists():
        from .hub.catalog import lookup

        entry = lookup(text, "base")
        if entry is not None:
            return entry.name
    repo = base_repo or (cached[0] if (cached := identify_cached_repo(Path(text))) else None)
    if repo is None and not Path(text).expanduser().exists() and "/" in text:
        repo = text.partition("@")[0]
    if repo:
        try:
            for e in load_catalog()["bases"].values():
                if e.repo.lower() == repo.lower():
                    return e.name
        except Exception:  # noqa: BLE001 - a broken user catalog must not stop make
            pass
        return repo
    return Path(text).expanduser().resolve().name


# --------------------------------------------------------------------------- make


def make(base: PathLike, target: PathLike, out: PathLike, *, base_name: str | None = None,
         base_repo: str | None = None, base_revision: str | None = None, target_revision: str | None = None,
         level: int | None = None, threads: int | None = None, force: bool = False, progress: bool | None = False,
         token: str | None = None, cache_dir: PathLike | None = None, sign: "SignWith | None" = None,
         verify_target: "VerifyWith | None" = None, share_identical_files: bool = False) -> MakeReport:
    """Make the diff that rebuilds ``target`` from ``base`` in the folder ``out``.

    ``base``/``target``: folders, catalog names or Hub repo ids (``org/name[@rev]``; the files
    needed are fetched into the HF cache). ``base_repo``/``base_revision`` are recorded in the
    manifest so users need no ``--base``: checked as huggingface_hub checks repo ids, and a branch
    or tag is resolved to the commit it points to now (a diff pins its base to a commit). By
    default they come from ``base`` itself when it is a Hub id, a catalog name or an HF cache
    snapshot. ``sign`` (orca_diff.signing.SignWith) signs the target and attests the derivation;
    a target carrying model.sig has it checked (with ``verify_target``, verified) first.
    ``share_identical_files``: non-weight files byte-identical in the base are taken from it
    (orca_diff.make.make_diff).
    """
    from .codec import DEFAULT_LEVEL
    from .hub.options import check_repo_id, check_revision, is_commit_sha, resolve_commit
    from .hub.resolve import resolve_model_spec
    from .make import make_diff

    t0 = time.perf_counter()
    if base_repo is not None:
        check_repo_id(base_repo, "base_repo")
    if base_revision is not None:
        check_revision(base_revision, "base_revision")
        if base_repo is None:
            raise UsageError("base_revision without base_repo: give the Hub repo id the revision belongs to")
    with _hub_settings(token, cache_dir):
        base_dir = resolve_model_spec(os.fspath(base), "base", progress=progress)
        target_dir = resolve_model_spec(_spec(target, target_revision, "target"), "target", progress=progress)
        if base_repo is not None and base_revision is not None and not is_commit_sha(base_revision):
            base_revision = resolve_commit(base_repo, base_revision)
    if base_dir.resolve() == target_dir.resolve():
        raise UsageError(f"the target {target} is the base {base} itself: a diff of a model with itself rebuilds "
                         "the base; give the fine-tuned model as the target")
    notes: list[str] = []
    manifest = make_diff(base_dir, target_dir, out, base_name=base_name or default_base_name(base, base_repo),
                         base_repo=base_repo, base_revision=base_revision, level=level or DEFAULT_LEVEL,
                         threads=threads, progress=progress, force=force, notes=notes, sign=sign,
                         verify_target=verify_target, share_identical_files=share_identical_files)
    return MakeReport(Path(out), manifest, time.perf_counter() - t0, notes)


# --------------------------------------------------------------------------- apply


def _already_rebuilt(out: Path, manifest: Manifest, progress: bool | None, verify: "VerifyWith | None" = None,
                     diff_dir: Path | None = None):
    """For a rerun of a finished apply: the ModelReport when ``out`` holds every file of the
    model byte-identical (hashed now, under the output's lock); None when ``out`` is not such a
    folder. A folder with every file at its size but one damaged is an OutputError naming it."""
    from .outdir import OutputLock
    from .verify import verify_model

    try:
        if out.is_symlink() or not out.is_dir() or not any(out.iterdir()):
            return None
    except OSError:
        return None
    for f in manifest.files:
        p = out / f.path
        if p.is_symlink() or not p.is_file() or p.stat().st_size != f.size:
            return None
    signed = None
    if verify is not None and diff_dir is not None:
        from .signing import check_diff_signature, check_release

        signed = check_release(diff_dir, manifest, verify, check_diff_signature(diff_dir, verify)).model
    try:  # under the output's lock: no other run may be replacing the folder while it is checked
        with OutputLock(out):
            return verify_model(out, manifest, progress=progress, signed=signed)
    except VerificationError as exc:
        raise OutputError(f"{out}: is not this diff's model as it stands ({exc}); pass --force to rebuild it, "
                          "or choose another --out") from None


def apply(diff: PathLike, out: PathLike, *, base: PathLike | None = None, revision: str | None = None,
          format: str = "auto", force: bool = False, threads: int | None = None, progress: bool | None = False,
          token: str | None = None, cache_dir: PathLike | None = None, check_base: bool = True,
          verify: "VerifyWith | None" = None, keep_diff: bool = False) -> ApplyReport:
    """Rebuild the fine-tuned model of ``diff`` into the folder ``out``, byte-identical.

    ``diff``: a folder, a catalog name or a Hub repo id (``revision``: its branch, tag or commit,
    the same as ``@rev``). ``base``: a folder, a catalog name or a Hub repo id; default the base
    the diff names. The base is checked before anything is written (a wrong Hub repo by its file
    listing, before any weight or payload is downloaded). ``format``: "auto", "orca", or a
    legacy release format (fastchat, alpaca, oa-xor; docs/legacy.md), where ``check_base=False``
    overrides a refusal based on the evidence of the bytes. Rerunning a finished apply checks
    ``out`` and returns ``already_done=True``. ``verify`` (orca_diff.signing.VerifyWith): the
    publisher's signatures are checked before any payload is fetched, and every rebuilt file is
    held to the signed sha256s before it is published. A Hub diff whose payloads are not in the
    cache is streamed into the rebuild (no copy kept) unless ``keep_diff``.
    """
    from .apply import apply_diff
    from .format import load_manifest
    from .hub.resolve import resolve_base, resolve_diff, resolve_diff_streamed
    from .legacy import detect_format

    t0 = time.perf_counter()
    spec = _diff_arg(_spec(diff, revision, "diff"))
    out = Path(out)
    with _hub_settings(token, cache_dir):
        fmt = format
        if fmt == "auto":
            fmt = detect_format(spec) or "orca"
        if fmt not in ("orca", "orca-diff"):
            from .legacy import apply_legacy

            if verify is not None:
                from .errors import SignatureError

                raise SignatureError(f"a legacy {fmt} release carries no OpenSSF signature to verify; convert it "
                                     "(`orca-diff convert`) and sign the result, or drop the --verify option")
            r = apply_legacy(fmt, None if base is None else os.fspath(base), spec, out, force=force,
                             threads=threads, progress=progress, check_integrity=check_base)
            return ApplyReport(Path(r.out), r.format, r.files, r.bytes_written, r.seconds, r.target_fingerprint,
                               already_done=r.already_done, checks=list(r.checks), notes=list(r.notes),
                               model_digest=r.model_digest)
        if verify is not None:  # a Hub diff: its signatures are checked before any payload is downloaded
            from .signing import fetch_signed_release

            spec = fetch_signed_release(spec, verify, progress=progress)  # pinned to the commit checked
        manifest_dir = resolve_diff(spec, progress=progress, manifest_only=True)
        manifest = load_manifest(manifest_dir)
        if not force and (done := _already_rebuilt(out, manifest, progress, verify, manifest_dir)) is not None:
            notes = [f"{extra} is not part of the diff's model (left alone)" for extra in done.extra]
            return ApplyReport(out, "orca-diff", len(done.ok), 0, time.perf_counter() - t0, done.fingerprint,
                               already_done=True, notes=notes, model_digest=done.model_digest)
        # the base first: a wrong Hub repo is refused by its listing before the payloads are fetched
        # a Hub base proven by its listing and not cached starts downloading into the HF cache now,
        # and the rebuild reads it as it lands (hub.basestream)
        base_dir = resolve_base(None if base is None else os.fspath(base), manifest, progress=progress, stream=True)
        try:
            diff_dir, source = resolve_diff_streamed(_pinned(manifest_dir, spec), progress=progress,
                                                     keep_diff=keep_diff)
        except BaseException:
            if hasattr(base_dir, "close"):
                base_dir.close()
            raise
    from .hub.stream import PREFETCH_BUDGET

    try:
        r = apply_diff(base_dir, diff_dir, out, force=force, threads=threads, progress=progress, verify=verify,
                       payloads=source, payload_memory=PREFETCH_BUDGET if source is not None else 0)
    except OrcaDiffError as exc:
        raise _with_staging_said(exc, out) from None
    finally:
        if hasattr(base_dir, "close"):
            base_dir.close()
    if hasattr(base_dir, "summary") and (said := base_dir.summary()):
        r.notes.append(said)
    if source is not None and (said := source.summary()):
        r.notes.append(said)
    checks = [f"every file matches its sha256 and every tensor its {r.digest_algo}",
              f"base fingerprint {r.base_fingerprint} (measured)" if r.base_fingerprint else
              f"base: {r.base_tensors_checked} tensors checked"]
    return ApplyReport(Path(r.out), "orca-diff", r.files, r.bytes_written, r.seconds, r.target_fingerprint,
                       base_fingerprint=r.base_fingerprint, resumed_files=r.resumed_files, checks=checks,
                       notes=list(r.notes), model_digest=r.model_digest, provenance=list(r.provenance))


def _with_staging_said(exc: OrcaDiffError, out: Path) -> OrcaDiffError:
    """A refusal after some files were rebuilt keeps them for resuming in a hidden folder beside
    ``out``: say where it is and how much disk it holds (gigabytes at 13B), so nobody is left
    with it unknowingly."""
    from .errors import InterruptedError_
    from .outdir import staging_dir
    from .progress import human_bytes

    staging = staging_dir(out)
    if isinstance(exc, InterruptedError_) or str(staging) in str(exc):
        return exc
    try:
        if staging.is_symlink() or not staging.is_dir():
            return exc
        size = sum(p.stat().st_size for p in staging.rglob("*") if p.is_file() and not p.is_symlink())
    except OSError:
        return exc
    if not size:
        return exc
    said = (f"{exc} ({human_bytes(size)} already rebuilt are kept in {staging} so that the same command resumes "
            "once the cause is fixed; delete that folder if you will not rerun)")
    new = type(exc)(said)
    return new


# --------------------------------------------------------------------------- verify


def verify(diff: PathLike, *, base: PathLike | None = None, model: PathLike | None = None,
           revision: str | None = None, model_revision: str | None = None, threads: int | None = None,
           progress: bool | None = False, token: str | None = None,
           cache_dir: PathLike | None = None, verify: "VerifyWith | None" = None) -> VerifyReport:
    """Check a diff's integrity (every chunk decoded that can be: the payloads rebuild the
    manifest's records; chunks coded against the base only with ``base``) and, when given, a base
    (every tensor the diff needs) and a model (every file byte-identical to the publisher's).
    Inputs are named as for :func:`apply`; ``verify``: the publisher's signatures are checked
    first (from the Hub before any payload is fetched) and every model file is held to them.
    Raises CorruptDiffError, BaseMismatchError, VerificationError or SignatureError on the first
    problem."""
    from .containers import open_model
    from .errors import BaseMismatchError
    from .hub.resolve import resolve_base, resolve_diff, resolve_model_spec
    from .signing import check_diff_signature, check_release, fetch_signed_release, unsigned_note
    from .verify import check_base, check_rebuild, measured_base_fingerprint, verify_diff, verify_model

    with _hub_settings(token, cache_dir):
        model_dir = None
        if model is not None:
            model_dir = resolve_model_spec(_spec(model, model_revision, "model"), "target", progress=progress)
            if (model_dir / MANIFEST_NAME).is_file():
                raise UsageError(f"{model} is a diff folder (it holds {MANIFEST_NAME}), not a model: check it with "
                                 f"`verify --diff {model}`, or pass the rebuilt model folder as the model")
        spec = _diff_arg(_spec(diff, revision, "diff"))
        diff_signed = None
        if verify is not None:
            spec = fetch_signed_release(spec, verify, progress=progress)  # Hub: before any payload is fetched
        diff_dir = resolve_diff(spec, progress=progress)
        if verify is not None:
            diff_signed = check_diff_signature(diff_dir, verify)  # before the manifest is trusted
        manifest = verify_diff(diff_dir, progress=progress)
        report = VerifyReport(diff_dir, manifest)
        release = None
        if verify is not None:
            release = check_release(diff_dir, manifest, verify, diff_signed)
            report.signed = list(release.lines)
        elif (note := unsigned_note(diff_dir)) is not None:
            report.notes.append(note)
        reader = None
        if base is not None:
            reader = open_model(resolve_base(os.fspath(base), manifest, progress=progress))
        try:
            if reader is not None:
                try:
                    measured = check_base(reader, manifest, threads, progress)
                except BaseMismatchError as exc:  # verify writes nothing: no "nothing was written" here
                    raise BaseMismatchError(_verify_words(str(exc))) from None
                report.base_tensors_checked = len(measured)
                report.base_fingerprint = measured_base_fingerprint(manifest, measured)
            report.rebuild_summary = check_rebuild(diff_dir, manifest, reader, threads, progress).summary()
        finally:
            if reader is not None:
                reader.close()
    if model_dir is not None:
        signed = release.model if release is not None else None
        m = verify_model(model_dir, manifest, progress=progress, signed=signed)
        if signed is not None:
            from .errors import SignatureError

            unsigned = [x for x in m.extra if signed.covers(x)]
            if unsigned:
                raise SignatureError(f"{model_dir / unsigned[0]}: in the model folder but not signed by the "
                                     "publisher (nor part of the diff's model); remove it: loaders may read it")
        report.model_files, report.model_fingerprint, report.model_extra_files = m.ok, m.fingerprint, m.extra
        report.model_digest = m.model_digest
    return report


def _verify_words(message: str) -> str:
    """A base refusal worded for apply, reworded for verify (which writes nothing)."""
    for said in ("; nothing was written", ", nothing was written", "nothing was written; ", "nothing was written"):
        message = message.replace(said, "")
    return message


__all__ = ["make", "apply", "verify", "MakeReport", "ApplyReport", "VerifyReport", "default_base_name"]
