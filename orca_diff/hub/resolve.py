"""What ``--base`` and ``--diff`` mean: a local path, a catalog name, or a Hub repo id.

Resolution order (docs/hub.md): 1. an existing local path; 2. a name in the catalog
(:mod:`orca_diff.catalog`); 3. a Hub repo id ``org/name``, optionally ``@revision`` (branch, tag
or commit sha). Anything else is refused with the list of names the catalog knows. Without
``--base``, the base is the one the diff's manifest names (its Hub repo and revision, else its
catalog name). Hub downloads go through :mod:`orca_diff.hub`, so they are cached and resumable.
"""

from __future__ import annotations

import os
from pathlib import Path

from .catalog import CatalogEntry, is_repo_id, lookup, names
from ..errors import BaseMismatchError, InputNotFoundError, UsageError
from ..format import Manifest
from .transfer import RepoRef, download_base, download_diff, download_model, parse_repo_spec


def identify_cached_repo(folder: Path) -> tuple[str, str] | None:
    """(repo id, commit sha) of a folder that is an HF cache snapshot
    (``.../models--ORG--NAME/snapshots/<40-hex sha>``), else None. Read from the path alone."""
    folder = Path(folder).expanduser().absolute()
    sha, snaps, repo_dir = folder.name, folder.parent.name, folder.parent.parent.name
    if (snaps == "snapshots" and repo_dir.startswith("models--") and len(sha) == 40
            and all(c in "0123456789abcdef" for c in sha)):
        org_name = repo_dir[len("models--"):]
        if "--" in org_name:
            repo = org_name.replace("--", "/", 1)
            if is_repo_id(repo):
                return repo, sha
    return None


def _local(spec: str) -> Path | None:
    path = Path(spec).expanduser()
    return path if path.exists() else None


def _looks_like_path(spec: str) -> bool:
    return spec.startswith((".", "/", "~", "\\")) or "\\" in spec or spec.count("/") > 1 or (len(spec) > 1 and spec[1] == ":")


def _hub_ref(spec: str) -> RepoRef | None:
    """The Hub repo ``spec`` names (``org/name[@rev]``, checked as huggingface_hub checks ids and
    git checks revisions), None when it does not look like one at all; a bad id or revision of
    something that does look like one is a UsageError saying why."""
    from .options import check_revision, repo_id_problem

    ref = parse_repo_spec(spec)
    if ref.repo_id.count("/") != 1 or _looks_like_path(ref.repo_id):
        return None
    problem = repo_id_problem(ref.repo_id)
    if problem:
        raise UsageError(f"{spec!r} is not a local path, and not a Hub repo id either: {problem}")
    if "@" in spec:
        check_revision(ref.revision or "", f"{spec!r}: revision")
    return ref


def _refuse_placeholder(entry: CatalogEntry) -> None:
    """One short paragraph: what the name is, and the two ways on (a repo id, or one's own catalog)."""
    if entry.is_placeholder:
        reason = entry.description.split("PLACEHOLDER:", 1)[-1].strip() if entry.description else ""
        reason = reason if reason and len(reason) <= 240 else "no public repo is known for this name."
        flag = "--diff" if entry.kind == "diff" else "--base"
        raise InputNotFoundError(
            f"catalog {entry.kind} {entry.name!r} is a placeholder, not a real repo: {reason} Pass {flag} ORG/REPO,"
            f" or give the name a real repo in your own catalog (ORCA_DIFF_CATALOG=file.json, docs/hub.md).")


def _unknown(spec: str, kind: str) -> InputNotFoundError:
    if _looks_like_path(spec):
        return InputNotFoundError(f"{spec}: no such file or folder")
    known = ", ".join(names("base" if kind == "model" else kind)) or "none"
    return InputNotFoundError(f"{kind} {spec!r} is not a local path, a catalog name (known {kind}s: {known})"
                              f" or a Hub repo id org/name[@revision]")


def _diff_ref(spec: str) -> RepoRef:
    """The Hub repo a --diff that is not a local path names (catalog name or repo id)."""
    entry = lookup(spec, "diff")
    if entry is not None:
        _refuse_placeholder(entry)
        if entry.format != "orca-diff":
            raise UsageError(
                f"{entry.name!r} is a legacy {entry.format} release, not an orca-diff diff: rebuild it with "
                f"`orca-diff apply --diff {entry.name} --out DIR` (the format comes from the catalog) or "
                f"re-publish it with `orca-diff convert` (docs/legacy.md)")
        return RepoRef(entry.repo, entry.revision)
    if (ref := _hub_ref(spec)) is not None:
        return ref
    raise _unknown(spec, "diff")


def resolve_diff(spec: str, *, progress: bool | None = None, manifest_only: bool = False) -> Path:
    """The local folder of the diff ``spec`` names, downloading (and verifying) it if needed
    (``manifest_only``: only its manifest, for ``info``)."""
    if (path := _local(spec)) is not None:
        return path
    return download_diff(_diff_ref(spec), progress=progress, manifest_only=manifest_only)


def resolve_diff_streamed(spec: str, *, progress: bool | None = None, keep_diff: bool = False):
    """(folder holding the manifest, payload source for ``apply_diff`` or None) for ``apply``: a
    Hub diff whose payloads are not all in the cache is streamed (nothing of it is written but
    the manifest), unless ``keep_diff``, which downloads it into the cache first."""
    if (path := _local(spec)) is not None:
        return path, None
    from .stream import payload_source
    from .transfer import fetch_manifest, payloads_cached
    from ..format import load_manifest

    ref = _diff_ref(spec)
    folder = fetch_manifest(ref, progress=progress)
    if keep_diff or payloads_cached(folder, load_manifest(folder)):
        return download_diff(ref, progress=progress), None  # the cached copy is checked and used
    return folder, payload_source(ref.repo_id, folder.name)


def _check_catalog_fingerprint(entry: CatalogEntry, manifest: Manifest) -> None:
    """Refuse, before downloading tens of GB, a catalog base known to differ from the diff's base."""
    a, b = (entry.fingerprint or "").lower(), (manifest.base.fingerprint or "").lower()
    if a and b and not (a.startswith(b) or b.startswith(a)):
        raise BaseMismatchError(
            f"catalog base {entry.name!r} ({entry.repo}) has fingerprint {a[:16]}, but this diff was made from a"
            f" base with fingerprint {b[:16]} (named {manifest.base.name or manifest.base.repo!r}); drop --base to"
            " use the base the diff names, or pass the right one")


def resolve_base(spec: str | None, manifest: Manifest, *, progress: bool | None = None, stream: bool = False):
    """The local folder of the base for ``manifest``: ``spec`` if given, else the base the
    manifest names. Downloads only the files ``apply`` needs. ``stream`` (apply): a Hub base
    proven by its listing and not cached is returned as a StreamedBase still downloading
    (``hub.basestream``)."""
    needed = tuple(manifest.base.files)
    b = manifest.base
    recorded = (f"{b.repo}@{b.revision}" if b.repo and b.revision else b.repo) or (repr(b.name) if b.name else
                                                                                "the one it was made from")
    kw = {"needed": needed, "progress": progress, "expected": b.weight_files, "recorded": recorded,
          "stream_for": manifest if stream and os.environ.get("ORCA_DIFF_BASE_STREAM", "1").strip() != "0" else None}
    if spec is None:
        if b.repo:
            return download_base(RepoRef(b.repo, b.revision), **kw)
        entry = lookup(b.name, "base") if b.name else None
        if entry is None:
            raise UsageError(f"the diff names its base {b.name!r} without a Hub repo, and the catalog has no base of"
                             " that name: pass --base PATH_OR_NAME")
        _refuse_placeholder(entry)
        _check_catalog_fingerprint(entry, manifest)
        return download_base(RepoRef(entry.repo, entry.revision), **kw)
    if (path := _local(spec)) is not None:
        return path
    entry = lookup(spec, "base")
    if entry is not None:
        _refuse_placeholder(entry)
        _check_catalog_fingerprint(entry, manifest)
        return download_base(RepoRef(entry.repo, entry.revision), **kw)
    if (ref := _hub_ref(spec)) is not None:
        return download_base(ref, **kw)
    raise _unknown(spec, "base")


def resolve_model_spec(spec: str, role: str, *, progress: bool | None = None) -> Path:
    """A model for ``make``, ``info``-like commands: ``role`` "base" fetches what make needs of a
    base (one weight form, side files), "target" every file of the repo. A local path wins."""
    if (path := _local(spec)) is not None:
        return path
    if role == "base":
        return resolve_base_spec(spec, progress=progress)
    entry = lookup(spec, "base")  # a catalog name may name a model to diff against another
    if entry is not None:
        _refuse_placeholder(entry)
        return download_model(RepoRef(entry.repo, entry.revision), progress=progress)
    if (ref := _hub_ref(spec)) is not None:
        return download_model(ref, progress=progress)
    raise _unknown(spec, "model")


def resolve_base_spec(spec: str, *, progress: bool | None = None) -> Path:
    """A base on its own (``orca-diff download``): local path, catalog name or repo id."""
    if (path := _local(spec)) is not None:
        return path
    entry = lookup(spec, "base")
    if entry is not None:
        _refuse_placeholder(entry)
        return download_base(RepoRef(entry.repo, entry.revision), progress=progress)
    if (ref := _hub_ref(spec)) is not None:
        return download_base(ref, progress=progress)
    raise _unknown(spec, "base")


__all__ = ["resolve_diff", "resolve_diff_streamed", "resolve_base", "resolve_base_spec", "resolve_model_spec", "identify_cached_repo"]
