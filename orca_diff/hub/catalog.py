"""The catalog: short names (``llama-13b``, ``orca``) for well-known bases and diffs on the Hub.

The package ships ``catalog.json``; users extend or override it with their own file in the same
format. Files are read in this order, a later entry replacing an earlier one of the same name:

1. the shipped ``orca_diff/catalog.json``;
2. the user config file ``$XDG_CONFIG_HOME/orca-diff/catalog.json`` (default
   ``~/.config/orca-diff/catalog.json``; on Windows ``%APPDATA%\\orca-diff\\catalog.json``),
   if it exists;
3. the file named by ``$ORCA_DIFF_CATALOG``, which must exist when the variable is set.

Format (docs/hub.md)::

    {"bases": {"NAME": {"repo": "org/name", "revision": "main", "fingerprint": null, ...}},
     "diffs": {"NAME": {"repo": "org/name", "revision": "main", "base": "BASE-NAME", ...}}}

An entry's ``status`` says whether the repo is real ("public", "gated") or a "placeholder" that
only reserves the name; resolving a placeholder is refused with a message saying so.
"""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from ..errors import FormatError, InputNotFoundError

SHIPPED_CATALOG = Path(__file__).with_name("catalog.json")
ENV_VAR = "ORCA_DIFF_CATALOG"
KINDS = ("bases", "diffs")
STATUSES = ("public", "gated", "placeholder", "private", "user")

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,95}$")
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")


@dataclass(frozen=True)
class CatalogEntry:
    """One named base or diff. ``source`` is the catalog file that defined it."""

    name: str
    kind: str  # "base" or "diff"
    repo: str
    revision: str
    status: str
    source: Path
    fingerprint: str | None = None
    license: str | None = None
    base: str | None = None  # diffs: the catalog name of their base
    description: str = ""
    format: str = "orca-diff"  # diffs: or a legacy release format (fastchat, alpaca, oa-xor; docs/legacy.md)

    @property
    def is_placeholder(self) -> bool:
        return self.status == "placeholder"

    @property
    def spec(self) -> str:
        """The ``org/name@revision`` this entry stands for."""
        return f"{self.repo}@{self.revision}"


def user_config_path() -> Path:
    """Where the user's own catalog lives when ``$ORCA_DIFF_CATALOG`` is not set."""
    if sys.platform == "win32" and os.environ.get("APPDATA"):
        return Path(os.environ["APPDATA"]) / "orca-diff" / "catalog.json"
    root = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(root) / "orca-diff" / "catalog.json"


def catalog_files() -> list[Path]:
    """The catalog files in the order they are read (later ones override earlier ones)."""
    files = [SHIPPED_CATALOG]
    config = user_config_path()
    if config.is_file():
        files.append(config)
    env = os.environ.get(ENV_VAR)
    if env:
        path = Path(env).expanduser()
        if not path.is_file():
            raise InputNotFoundError(f"{ENV_VAR}={env}: no such file; point it at a catalog JSON file or unset it")
        files.append(path)
    return files


def is_repo_id(text: str) -> bool:
    """An ``org/name`` model repo id that huggingface_hub's own validator accepts."""
    if not _REPO_ID.match(text):
        return False
    from .options import repo_id_problem

    return repo_id_problem(text) is None


def _parse_file(path: Path) -> dict[str, dict[str, CatalogEntry]]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(f"{path}: not a readable catalog JSON file ({exc})") from None
    if not isinstance(doc, dict):
        raise FormatError(f"{path}: a catalog must be a JSON object with 'bases' and/or 'diffs'")
    out: dict[str, dict[str, CatalogEntry]] = {k: {} for k in KINDS}
    for kind in KINDS:
        section = doc.get(kind, {})
        if not isinstance(section, dict):
            raise FormatError(f"{path}: '{kind}' must be an object mapping names to entries")
        for name, e in section.items():
            where = f"{path}: {kind[:-1]} {name!r}"
            if not _NAME.match(name):
                raise FormatError(f"{where}: names may use letters, digits and . _ + - only")
            if not isinstance(e, dict):
                raise FormatError(f"{where}: entry must be an object with at least 'repo'")
            repo, revision = e.get("repo"), e.get("revision") or "main"
            if not isinstance(repo, str) or not is_repo_id(repo):
                raise FormatError(f"{where}: 'repo' must be a Hub repo id 'org/name', found {repo!r}")
            if not isinstance(revision, str):
                raise FormatError(f"{where}: 'revision' must be a string")
            status = e.get("status", "user")
            if status not in STATUSES:
                raise FormatError(f"{where}: 'status' must be one of {', '.join(STATUSES)}, found {status!r}")
            for key in ("fingerprint", "license", "base", "description", "format"):
                if e.get(key) is not None and not isinstance(e.get(key), str):
                    raise FormatError(f"{where}: '{key}' must be a string or null")
            out[kind][name.lower()] = CatalogEntry(
                name=name, kind=kind[:-1], repo=repo, revision=revision, status=status, source=path,
                fingerprint=e.get("fingerprint"), license=e.get("license"), base=e.get("base"),
                description=e.get("description") or "", format=e.get("format") or "orca-diff")
    return out


def load_catalog() -> dict[str, dict[str, CatalogEntry]]:
    """``{"bases": {name: entry}, "diffs": {name: entry}}`` merged from every catalog file."""
    merged: dict[str, dict[str, CatalogEntry]] = {k: {} for k in KINDS}
    for path in catalog_files():
        for kind, entries in _parse_file(path).items():
            merged[kind].update(entries)
    return merged


def lookup(name: str, kind: str) -> CatalogEntry | None:
    """The entry called ``name`` among "base" or "diff" entries, or None."""
    return load_catalog()[kind + "s"].get(name.lower())


def names(kind: str) -> list[str]:
    return sorted(e.name for e in load_catalog()[kind + "s"].values())


__all__ = ["CatalogEntry", "load_catalog", "lookup", "names", "catalog_files", "user_config_path",
           "is_repo_id", "ENV_VAR", "SHIPPED_CATALOG"]
