"""Resolution of --base / --diff arguments. (Local paths only; the Hub work extends this.)"""

from __future__ import annotations

from pathlib import Path

from .errors import InputNotFoundError


def resolve_diff(spec: str, *, progress: bool) -> Path:
    p = Path(spec)
    if not p.exists():
        raise InputNotFoundError(f"{spec}: no such diff folder")
    return p


def resolve_base(spec: str | None, manifest, *, progress: bool) -> Path:
    if spec is None:
        raise InputNotFoundError("no --base given and the diff names no local base; pass --base")
    p = Path(spec)
    if not p.exists():
        raise InputNotFoundError(f"{spec}: no such base folder")
    return p
