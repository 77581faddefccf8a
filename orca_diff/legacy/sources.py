"""Where a legacy release and its base come from: the catalog, format detection, downloads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import InputNotFoundError, UsageError
from .common import FORMATS

# --------------------------------------------------------------------------- catalog


def catalog_legacy(name: str) -> dict[str, Any] | None:
    """The raw catalog entry of a legacy release called ``name`` (``diffs`` entries that carry a
    ``format`` other than orca-diff), later catalog files overriding earlier ones; else None.

    Read from the catalog files directly: the ``format`` and ``legacy`` keys are specific to
    these releases (docs/legacy.md), and the shared CatalogEntry does not carry them.
    """
    from ..hub.catalog import catalog_files

    found: dict[str, Any] | None = None
    for path in catalog_files():
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # the catalog module reports unreadable files itself
        diffs = doc.get("diffs") if isinstance(doc, dict) else None
        if not isinstance(diffs, dict):
            continue
        for key, entry in diffs.items():
            if key.lower() == name.lower() and isinstance(entry, dict):
                found = entry if entry.get("format") in FORMATS else None
    return found


def detect_format(spec: str) -> str | None:
    """The legacy format ``spec`` stands for, where that is unambiguous: a catalog entry with a
    legacy ``format``, or a local folder holding an OpenAssistant XOR payload (its config.json
    is not JSON but XOR noise). FastChat and Alpaca folders look alike (both are HF model
    folders of differences), so they need ``--format``. None: not a legacy release we know."""
    path = Path(spec).expanduser()
    if path.exists():
        if (path / "orca-diff.json").is_file():
            return None
        from .oa_xor import looks_like_xor_payload

        return "oa-xor" if looks_like_xor_payload(path) else None
    entry = catalog_legacy(spec)
    return entry["format"] if entry else None


# --------------------------------------------------------------------------- resolution


def resolve_legacy_diff(spec: str, fmt: str, *, progress: bool | None) -> tuple[Path, dict[str, Any] | None]:
    """The local folder of a legacy release (a path, a catalog name or a Hub repo id) and its
    catalog entry when it has one. Hub downloads go through :mod:`orca_diff.hub` (cached)."""
    path = Path(spec).expanduser()
    if path.exists():
        if fmt == "oa-xor":
            from .oa_xor import payload_folder

            path = payload_folder(path)  # a clone of the Hub repo keeps the files in a subfolder
        return path, None
    entry = catalog_legacy(spec)
    if entry is not None and entry.get("format") != fmt:
        raise UsageError(f"catalog diff {spec!r} is a {entry['format']} release, not {fmt}; "
                         f"use --format {entry['format']} (or leave --format out)")
    from ..hub.catalog import is_repo_id
    from ..hub import RepoRef, parse_repo_spec

    if entry is not None:
        ref = RepoRef(entry["repo"], entry.get("revision") or None)
    else:
        ref = parse_repo_spec(spec)
        if not is_repo_id(ref.repo_id):
            raise InputNotFoundError(f"{spec}: not a local folder, a catalog name or a Hub repo id org/name")
    return _download_release(ref, fmt, progress), entry


def _download_release(ref: Any, fmt: str, progress: bool | None) -> Path:
    from ..hub.transfer import _progress, download_base, hub_errors

    if fmt in ("fastchat", "alpaca"):
        # an HF model folder: weights, config, tokenizer; errors call it what it is, not a "base"
        return download_base(ref, progress=progress, what=f"{fmt} release")
    import huggingface_hub

    with _progress(progress), hub_errors(ref, "XOR release"):
        root = Path(huggingface_hub.snapshot_download(ref.repo_id, revision=ref.revision))
    from .oa_xor import payload_folder

    return payload_folder(root)


def resolve_base_for(base: str | None, entry: dict[str, Any] | None, *, progress: bool | None) -> Path:
    """``--base`` as given, or the base the catalog entry names. A Hub base other than the one the
    catalog pins (its base entry at a commit sha) is first compared with it by the Hub's file
    listings (LFS sha256 of the weight files): a different base is refused before any download."""
    from ..hub.resolve import resolve_base_spec

    if base is None:
        if entry is None or not entry.get("base"):
            raise UsageError("pass --base: the legacy release does not name its base")
        base = entry["base"]
    elif entry is not None and entry.get("base") and not Path(base).expanduser().exists():
        check_against_pinned_base(base, entry["base"])
    return resolve_base_spec(base, progress=progress)


def pinned_base(name: str) -> Any:
    """The catalog base entry ``name`` when it pins a commit (else None: a branch moves, so its
    files are not a fixed reference)."""
    from ..hub.catalog import lookup
    from ..hub.options import is_commit_sha

    entry = lookup(name, "base")
    return entry if entry is not None and is_commit_sha(entry.revision) else None


def check_against_pinned_base(given: str, base_name: str) -> None:
    """Refuse ``given`` (a catalog name or Hub id) when its weight files are not those of the
    pinned catalog base ``base_name``: two metadata listings, no file content."""
    from ..hub.catalog import lookup
    from ..hub.transfer import RepoRef, WEIGHT_FORMATS, hub_errors, match_base_files, offline, parse_repo_spec, \
        repo_files_meta, select_base_files

    pinned = pinned_base(base_name)
    if pinned is None or offline():
        return
    entry = lookup(given, "base")
    ref = RepoRef(entry.repo, entry.revision) if entry is not None else parse_repo_spec(given)
    if ref.repo_id == pinned.repo and ref.revision == pinned.revision:
        return
    want_ref = RepoRef(pinned.repo, pinned.revision)
    with hub_errors(want_ref, "base"):
        _sha, want = repo_files_meta(want_ref)
    with hub_errors(ref, "base"):
        _sha, have = repo_files_meta(ref)
    _label, files = select_base_files(list(want))
    globs = [g for _l, gs, _i in WEIGHT_FORMATS for g in gs]
    import fnmatch

    weights = {p: want[p] for p in files if want[p].sha256 and any(fnmatch.fnmatchcase(p, g) for g in globs)}
    match_base_files(ref, weights, have, f"{pinned.name!r} ({pinned.repo}@{pinned.revision[:12]}, pinned by the catalog)")


