"""huggingface_hub's own conventions for naming repos and revisions, and its per-call settings.

Repo ids are checked with huggingface_hub's validator (``validate_repo_id``), so orca-diff
accepts exactly what the Hub client accepts. ``--token`` and ``--cache-dir`` mean what they mean
for ``hf download``: the token sent with every request of the command, and the cache folder used
instead of ``HF_HUB_CACHE``. They are applied for the duration of one call (:func:`hub_settings`)
because the client reads both at call time (``get_token()`` reads ``HF_TOKEN``;
``snapshot_download`` reads ``constants.HF_HUB_CACHE`` when no ``cache_dir`` is passed).
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import Iterator

from ..errors import UsageError

_SHA = re.compile(r"^[0-9a-f]{40}$")


def is_commit_sha(revision: str | None) -> bool:
    """A full 40-hex git commit id (what the manifest records), not a branch or a tag."""
    return bool(revision and _SHA.match(revision))


def repo_id_problem(repo_id: str) -> str | None:
    """Why ``repo_id`` is not a Hub model repo id ``org/name``, per huggingface_hub; None if it is."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if repo_id.count("/") != 1:
        return "expected 'org/name'"
    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        return " ".join(str(exc).split())
    return None


def check_repo_id(repo_id: str, what: str) -> str:
    """``repo_id`` when it is a valid Hub repo id; else a UsageError naming ``what`` (an option)."""
    problem = repo_id_problem(repo_id)
    if problem:
        raise UsageError(f"{what} {repo_id!r} is not a Hub repo id: {problem}")
    return repo_id


def check_revision(revision: str, what: str) -> str:
    """A revision as git and the Hub accept it (branch, tag or commit): no spaces, no control
    characters, no '..' and no leading '-'. Branches are resolved to commits later."""
    if (not revision or revision != revision.strip() or any(c.isspace() or ord(c) < 32 for c in revision)
            or ".." in revision or revision.startswith("-") or revision.endswith((".lock", "/"))
            or any(c in revision for c in "~^:?*[\\")):
        raise UsageError(f"{what} {revision!r} is not a git revision (a branch, a tag or a commit sha)")
    return revision


@contextlib.contextmanager
def hub_settings(token: str | None = None, cache_dir: str | os.PathLike | None = None) -> Iterator[None]:
    """Within the block, the Hub client uses ``token`` and ``cache_dir`` (None: its defaults)."""
    if token is None and cache_dir is None:
        yield
        return
    from huggingface_hub import constants

    saved_env = {k: os.environ.get(k) for k in ("HF_TOKEN",)}
    saved_cache = constants.HF_HUB_CACHE
    try:
        if token is not None:
            os.environ["HF_TOKEN"] = token
        if cache_dir is not None:
            constants.HF_HUB_CACHE = str(Path(cache_dir).expanduser())
        yield
    finally:
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        constants.HF_HUB_CACHE = saved_cache


def resolve_commit(repo_id: str, revision: str | None) -> str:
    """The commit sha a branch or tag of ``repo_id`` points to now (a sha is returned as given)."""
    if is_commit_sha(revision):
        return revision  # type: ignore[return-value]
    from .transfer import RepoRef, _hf, hub_errors

    ref = RepoRef(repo_id, revision)
    with hub_errors(ref, "base"):
        sha = _hf().HfApi().model_info(repo_id, revision=revision).sha
    if not sha:
        from ..errors import HubError

        raise HubError(f"the Hub gave no commit for {ref}; pass --base-revision SHA")
    return sha


__all__ = ["is_commit_sha", "repo_id_problem", "check_repo_id", "check_revision", "hub_settings", "resolve_commit"]
