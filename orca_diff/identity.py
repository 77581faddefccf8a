"""The identity of a model: one digest over every byte of every file it is made of.

What users compare must bind the whole model (weights, ``data.pkl``, config, tokenizer, code),
not only its tensor records: a ``.bin`` whose pickle maps storages to other names, or a
``config.json`` pointing at added code, keeps every tensor. So the model identity is the
OpenSSF model-signing root digest (PyPI ``model-signing`` 1.1.1, the subject digest of the
in-toto statement it signs), computed from the files' sha256s, which orca-diff measures anyway
(make while encoding, apply while writing, verify while reading): no extra read, and any other
tool can recompute it. Definition (normative; docs/format.md section 6 repeats it)::

    files   = every file of the model folder, as POSIX paths relative to it, except the
              OpenSSF defaults' ignored paths: top-level .git/, .github/, .gitattributes,
              .gitignore, and the signature file model.sig
    order   = by path components (a/b before a-b: "a" < "a-b"), as pathlib orders them
    digest  = sha256( concatenation of the 32 raw sha256 bytes of each file, in that order )

printed as 64 lowercase hex digits ("model digest"). The tensor-level fingerprint
(:mod:`orca_diff.fingerprint`) survives only as the identity of a *base* across containers.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterable, Mapping

#: The signature file of a signed model folder (the OpenSSF CLI's default name).
SIGNATURE_NAME = "model.sig"
#: Paths model_signing ignores by default (``ignore_git_paths``): relative to the model root only.
GIT_PATHS = (".git", ".gitattributes", ".github", ".gitignore")
#: Everything the model digest leaves out, as written in a signed statement's ``ignore_paths``.
IDENTITY_IGNORED = (SIGNATURE_NAME, *GIT_PATHS)


def ignored(rel: str, ignore_paths: Iterable[str] = IDENTITY_IGNORED) -> bool:
    """Whether the file ``rel`` (POSIX, relative to the model root) is left out: it is one of
    ``ignore_paths`` or inside one of them (model_signing's ``Path.is_relative_to`` rule)."""
    parts = rel.split("/")
    for p in ignore_paths:
        q = [c for c in str(p).replace("\\", "/").split("/") if c not in ("", ".")]
        if q and parts[:len(q)] == q:
            return True
    return False


def order_key(rel: str) -> tuple[str, ...]:
    """The order model_signing lists files in: PurePosixPath's, i.e. by path components."""
    return tuple(rel.split("/"))


def model_digest(file_sha256: Mapping[str, str], ignore_paths: Iterable[str] = IDENTITY_IGNORED) -> str:
    """The model digest (64 hex) of files ``{relative POSIX path: sha256 hex}``."""
    keep = sorted((rel for rel in file_sha256 if not ignored(rel, ignore_paths)), key=order_key)
    h = hashlib.sha256()
    for rel in keep:
        h.update(bytes.fromhex(file_sha256[rel]))
    return h.hexdigest()


def covered_files(paths: Iterable[str], ignore_paths: Iterable[str] = IDENTITY_IGNORED) -> list[str]:
    """The paths the digest covers, in its order."""
    return sorted((p for p in paths if not ignored(p, ignore_paths)), key=order_key)


def folder_sha256s(folder: str | os.PathLike) -> dict[str, str]:
    """``{relative POSIX path: sha256}`` of every regular file under ``folder`` (one read each),
    for commands that have no measured sha256s at hand (``fingerprint`` of a folder). Symbolic
    links to files are followed (an HF cache snapshot is made of them)."""
    from .containers import file_sha256

    root = Path(folder)
    out: dict[str, str] = {}
    for dirpath, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            p = Path(dirpath) / name
            rel = p.relative_to(root).as_posix()
            if p.is_file() and not ignored(rel):
                out[rel] = file_sha256(p)
    return out


def describe(digest: str) -> str:
    """How every command prints the identity (one wording everywhere)."""
    return f"model digest {digest} (OpenSSF model-signing root digest over every file)"


__all__ = ["SIGNATURE_NAME", "GIT_PATHS", "IDENTITY_IGNORED", "ignored", "order_key", "model_digest",
           "covered_files", "folder_sha256s", "describe"]
