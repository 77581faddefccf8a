"""Hugging Face Hub downloads and uploads, through ``huggingface_hub`` only (no home-made HTTP).

Everything goes through the standard HF cache (``HF_HOME`` / ``HF_HUB_CACHE``), honours
``HF_ENDPOINT``, ``HF_TOKEN`` (or ``hf auth login``) and ``HF_HUB_OFFLINE=1``, and fetches only
what is needed:

* a diff: its manifest first, then exactly the payload files the manifest lists, all at the
  commit the manifest came from; every payload is then checked against the manifest's size and
  sha256 (a damaged cached file is fetched again once);
* a base: one weight format only (safetensors, else ``pytorch_model*.bin``, else Meta
  ``consolidated.*.pth``), its index, config and tokenizer files, and the files the diff copies
  from the base.

Resume: payload files and base weight files (the big ones) are fetched by
:func:`orca_diff.hub.stream.fetch_to_cache` into the same cache layout, through the client's
session: a dropped, short or stalled transfer is retried from where it stopped, and a file
interrupted across runs (Ctrl-C, crash) is continued from its partial blob, where
huggingface_hub (2.4.0, as tested) would delete it and start again. Small files (manifest,
config, tokenizer) go through the client. Every request has a stall timeout
(:func:`orca_diff.hub.stream.install_timeouts`, docs/hub.md).

Every client exception is turned into one :class:`~orca_diff.errors.HubError` line that says
what to do. Environment variables are read by huggingface_hub when it is first imported: set them
before running orca-diff, not from inside it.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from ..errors import BaseMismatchError, CorruptDiffError, HubError, OrcaDiffError
from ..format import MANIFEST_NAME, Manifest, load_manifest
from ..progress import bars_enabled, byte_bar

#: Weight formats in order of preference: (label, weight globs, index file). Only top-level files.
WEIGHT_FORMATS: tuple[tuple[str, tuple[str, ...], str | None], ...] = (
    ("safetensors", ("*.safetensors",), "model.safetensors.index.json"),
    ("pytorch .bin", ("pytorch_model*.bin",), "pytorch_model.bin.index.json"),
    ("Meta .pth", ("consolidated.*.pth",), "params.json"),
)
#: Small files a usable base folder carries besides its weights (fetched when present).
BASE_SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.model", "tokenizer.json",
                   "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")
CARD_NAME = "README.md"


@dataclass(frozen=True)
class RepoRef:
    """A Hub repo at a revision (``None``: the default branch)."""

    repo_id: str
    revision: str | None = None

    def __str__(self) -> str:
        return f"{self.repo_id}@{self.revision}" if self.revision else self.repo_id


def parse_repo_spec(spec: str) -> RepoRef:
    """``org/name`` or ``org/name@revision`` -> RepoRef (no validation of the id's characters)."""
    repo_id, _, revision = spec.partition("@")
    return RepoRef(repo_id, revision or None)


# --------------------------------------------------------------------------- client access
def _hf():
    import huggingface_hub  # noqa: PLC0415 - imported late so env vars set by callers apply

    from .stream import install_timeouts

    install_timeouts()  # the client's own requests get a stall timeout (it sends them with none)
    return huggingface_hub


def endpoint() -> str:
    return _hf().constants.ENDPOINT.rstrip("/")


def offline() -> bool:
    return bool(_hf().constants.HF_HUB_OFFLINE)


def repo_url(repo_id: str) -> str:
    return f"{endpoint()}/{repo_id}"


@contextlib.contextmanager
def _progress(progress: bool | None) -> Iterator[None]:
    """Switch huggingface_hub's own bars off for the duration of a call when ours are off
    (``--quiet``, a non-TTY stderr, or the env vars of :mod:`orca_diff.progress`)."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_disabled = are_progress_bars_disabled()
    if progress is False or (progress is None and not bars_enabled(None)):
        disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            enable_progress_bars()


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _server_message(exc: BaseException) -> str:
    msg = getattr(exc, "server_message", None) or ""
    return " ".join(msg.split())


def _login_hint() -> str:
    return "log in with `hf auth login` (older huggingface_hub: `huggingface-cli login`) or set HF_TOKEN"


def describe_hub_error(exc: BaseException, ref: RepoRef, what: str) -> HubError:
    """One actionable line for any exception the client raises while working on ``ref``
    (``what``: "diff", "base", ... or "push", which words the lines for an upload)."""
    from huggingface_hub import errors as e

    pushing = what == "push"
    if pushing:
        what = "diff repo"

    where = f"{ref} on {endpoint()}"
    chain = list(_chain(exc))
    if pushing and (offline() or any(isinstance(c, e.OfflineModeIsEnabled) for c in chain)):
        return HubError(f"HF_HUB_OFFLINE=1 is set, so nothing can be pushed to {ref.repo_id}; unset it and run the"
                        " command again")
    if any(isinstance(c, e.OfflineModeIsEnabled) for c in chain) or (
            isinstance(exc, (e.LocalEntryNotFoundError, e.IncompleteSnapshotError)) and offline()):
        return HubError(f"HF_HUB_OFFLINE=1 and {what} {ref} is not (fully) in the HF cache"
                        f" ({_hf().constants.HF_HUB_CACHE}); unset HF_HUB_OFFLINE to download it")
    for cause in chain:
        if isinstance(cause, e.HfHubHTTPError):
            break  # the server answered: what it said matters more than an earlier dropped transfer
        name = type(cause).__name__
        if name in ("ConnectError", "ConnectTimeout", "ProxyError") or isinstance(cause, ConnectionError):
            if pushing:
                return HubError(f"cannot reach the Hub at {endpoint()} to push to {ref.repo_id} ({name}); check"
                                " your connection or HF_ENDPOINT, then run the command again (nothing was published)")
            return HubError(f"cannot reach the Hub at {endpoint()} to fetch {what} {ref} ({name}: {cause}); check"
                            " your connection or HF_ENDPOINT (files already in the cache are used when they"
                            " are complete; HF_HUB_OFFLINE=1 uses the cache only)")
        if pushing and name in ("ReadTimeout", "TimeoutException", "PoolTimeout", "WriteTimeout"):
            return HubError(f"the Hub at {endpoint()} timed out while pushing to {ref.repo_id} ({name}); run the"
                            " command again: nothing is published until its one commit is made")
        if pushing and name in ("RemoteProtocolError", "ReadError", "WriteError", "NetworkError"):
            return HubError(f"the connection to {endpoint()} broke while pushing to {ref.repo_id} ({name}); run the"
                            " command again: nothing is published until its one commit is made")
        if name in ("RemoteProtocolError", "ReadError", "WriteError", "NetworkError"):
            return HubError(f"the connection to {endpoint()} broke while fetching {what} {ref} ({name}); run the"
                            " command again: finished files are kept and only the missing ones are fetched")
        if name in ("ReadTimeout", "TimeoutException", "PoolTimeout", "WriteTimeout"):
            return HubError(f"the Hub at {endpoint()} timed out while fetching {what} {ref}; run the command"
                            " again (finished files are kept) or raise HF_HUB_DOWNLOAD_TIMEOUT")
    if isinstance(exc, e.GatedRepoError):  # before RepositoryNotFoundError: it is a subclass
        status = exc.response.status_code if exc.response is not None else None
        who = "you are not logged in" if status == 401 else "your token has not been granted access"
        return HubError(f"{what} {ref.repo_id} is a gated repo and {who}: request access at {repo_url(ref.repo_id)},"
                        f" then {_login_hint()}")
    if isinstance(exc, e.RevisionNotFoundError):
        return HubError(f"revision {ref.revision!r} not found in {ref.repo_id} on {endpoint()}: check the branch,"
                        " tag or commit sha after '@'")
    if isinstance(exc, e.RepositoryNotFoundError):
        return HubError(f"{what} repo {ref.repo_id} not found on {endpoint()}: check the name (private repos"
                        f" need a token: {_login_hint()})")
    if isinstance(exc, e.RemoteEntryNotFoundError):
        return HubError(f"a file is missing from {what} {where}: {_server_message(exc) or exc}")
    if isinstance(exc, e.IncompleteSnapshotError):
        return HubError(f"the cached copy of {what} {ref} is incomplete and the Hub cannot be reached; run"
                        " the command again with network access to fetch the missing files")
    if isinstance(exc, e.LocalEntryNotFoundError):
        return HubError(f"could not fetch {what} {where} and it is not in the HF cache: the Hub answered with"
                        " an error or could not be reached; run the command again (finished files are kept)")
    if isinstance(exc, e.HfHubHTTPError):
        status = exc.response.status_code if exc.response is not None else "?"
        detail = _server_message(exc) or str(exc).splitlines()[0]
        if status == 401:
            return HubError(f"the Hub refused the request for {what} {where} (401 unauthorized: {detail});"
                            f" {_login_hint()}")
        if status == 403:
            return HubError(f"the Hub refused the request for {what} {where} (403 forbidden: {detail}); your"
                            " token lacks the permission (write access is needed to push)")
        return HubError(f"the Hub answered {status} for {what} {where}: {detail}; run the command again later")
    if isinstance(exc, e.HFValidationError):
        return HubError(f"{ref.repo_id!r} is not a valid Hub repo id ('org/name'): {str(exc).splitlines()[0]}")
    if isinstance(exc, OSError):
        return HubError(f"{what} {ref}: {exc.__class__.__name__}: {' '.join(str(exc).split())}")
    return HubError(f"{what} {where}: {exc.__class__.__name__}: {' '.join(str(exc).split())}")


@contextlib.contextmanager
def hub_errors(ref: RepoRef, what: str) -> Iterator[None]:
    """Let OrcaDiffErrors through; turn every other exception of the Hub client into a HubError."""
    try:
        yield
    except (OrcaDiffError, KeyboardInterrupt):
        raise
    except Exception as exc:  # the client raises httpx, OSError, ValueError and its own classes
        raise describe_hub_error(exc, ref, what) from exc


# --------------------------------------------------------------------------- diffs
class NotADiffError(HubError):
    """The repo exists but holds no orca-diff.json."""


def download_diff(ref: RepoRef, *, progress: bool | None = None, manifest_only: bool = False) -> Path:
    """Fetch a diff (manifest + payload files, nothing else) into the HF cache, verify every
    payload against the manifest, and return the snapshot folder. ``manifest_only``: just the
    manifest (what ``info`` and a streamed ``apply`` need)."""
    folder = fetch_manifest(ref, progress=progress)
    manifest = load_manifest(folder)
    if manifest_only:
        return folder
    commit = folder.name  # the snapshot folder is named after the commit the manifest came from
    pinned = RepoRef(ref.repo_id, commit)
    missing = [p for p in manifest.payloads if not _cached(folder / p.path, p.size)]
    if missing:
        with _progress(progress), hub_errors(pinned, "diff"):
            _fetch_files(pinned, [(p.path, p.size, p.sha256) for p in missing], progress, "downloading diff")
    # files fetched now were checked as they landed; the ones found in the cache are checked here
    _verify_payloads(folder, manifest, pinned, progress, skip={p.path for p in missing})
    return folder


def fetch_manifest(ref: RepoRef, *, progress: bool | None = None) -> Path:
    """The snapshot folder holding the diff's manifest (fetched, or from the cache)."""
    hf = _hf()
    with _progress(progress), hub_errors(ref, "diff"):
        # snapshot_download rather than hf_hub_download for the manifest: when the Hub is down it
        # falls back to the cache at once, where hf_hub_download retries for ~20 s first. Its
        # warning for a repo without a manifest is ours to word (NotADiffError below).
        import logging

        log = logging.getLogger("huggingface_hub._snapshot_download")
        level = log.level
        log.setLevel(logging.ERROR)
        try:
            folder = Path(hf.snapshot_download(ref.repo_id, revision=ref.revision, allow_patterns=[MANIFEST_NAME]))
        finally:
            log.setLevel(level)
    if not (folder / MANIFEST_NAME).is_file():
        raise NotADiffError(f"{ref} on {endpoint()} has no {MANIFEST_NAME}: it is not an orca-diff diff"
                            " (a model repo? pass it as --base; a legacy delta such as FastChat/Vicuna or an"
                            " Alpaca/WizardLM weight diff? add --format fastchat|alpaca|oa-xor, docs/legacy.md)")
    return folder


def payloads_cached(folder: Path, manifest: Manifest) -> bool:
    """Whether every payload file of ``manifest`` is in the snapshot ``folder`` with its size."""
    return all(_cached(folder / p.path, p.size) for p in manifest.payloads)


def _cached(path: Path, size: int) -> bool:
    try:
        return path.is_file() and path.stat().st_size == size
    except OSError:
        return False


def _fetch_files(ref: RepoRef, files: list[tuple[str, int, str | None]], progress: bool | None, label: str,
                 revision: str | None = None, force: bool = False, meta: dict | None = None, **kw) -> None:
    """Fetch (path, size, sha256) files of ``ref`` (at a commit) into the cache, resumably, each
    under the blob name the Hub gives it (its LFS sha256, else its git oid)."""
    from .stream import RemoteFile, fetch_to_cache, run_parallel

    assert ref.revision is not None
    if meta is None:
        _sha, meta = repo_files_meta(ref)
    for path, size, _sha256 in files:
        m = meta.get(path)
        if m is None:
            raise HubError(f"{path} is missing from {ref} on {endpoint()} (the manifest lists it): the upload is"
                           f" incomplete; tell the publisher ({repo_url(ref.repo_id)})")
        if m.size != size:
            raise CorruptDiffError(f"{path} of {ref} on {endpoint()} is {m.size} bytes, the manifest says {size}:"
                                   f" the repo does not hold this diff's files; tell the publisher ({repo_url(ref.repo_id)})")
    with byte_bar(sum(size for _p, size, _s in files), label, progress) as bar:
        def one(item: tuple[str, int, str | None], stop) -> None:
            path, size, sha256 = item
            m = meta[path]
            fetch_to_cache(RemoteFile(ref.repo_id, ref.revision, path, size), m.sha256 or m.blob_id or "",
                           sha256 or m.sha256, revision=revision, force=force, on_bytes=bar.update, stop=stop, **kw)

        run_parallel(files, one)


def _exact_patterns(paths: Iterable[str]) -> list[str]:
    """allow_patterns that match exactly these paths (fnmatch specials escaped)."""
    return ["".join(f"[{c}]" if c in "*?[" else c for c in p) for p in paths]


def _verify_payloads(folder: Path, manifest: Manifest, ref: RepoRef, progress: bool | None,
                     skip: set[str] = frozenset()) -> None:  # type: ignore[assignment]
    """Size + sha256 of every payload (but ``skip``) against the manifest; a bad file is fetched
    again once."""
    from ..containers import file_sha256

    def bad_files() -> list[str]:
        bad = []
        todo = [p for p in manifest.payloads if p.path not in skip]
        with byte_bar(sum(p.size for p in todo), "verifying diff", progress) as bar:
            for p in todo:
                path = folder / p.path
                if not path.is_file() or path.stat().st_size != p.size or file_sha256(path) != p.sha256:
                    bad.append(p.path)
                bar.update(p.size)
        return bad

    bad = bad_files()
    if not bad:
        return
    sizes = {p.path: (p.size, p.sha256) for p in manifest.payloads}
    with _progress(progress), hub_errors(ref, "diff"):
        _fetch_files(ref, [(path, *sizes[path]) for path in bad], progress, "downloading diff", force=True, fetches=1)
    still = bad_files()
    if still:
        raise CorruptDiffError(f"{ref}: payload {still[0]} does not match the manifest's sha256 even after a fresh"
                               f" download: the copy on the Hub is damaged; tell the publisher ({repo_url(ref.repo_id)})")


# --------------------------------------------------------------------------- bases
def select_base_files(repo_files: Iterable[str], needed: Iterable[str] = ()) -> tuple[str, list[str]]:
    """Choose what to download from a base repo: one weight format (safetensors preferred over
    ``.bin`` over Meta ``.pth``), its index, the side files present and the ``needed`` files.
    Returns (format label, sorted paths). Only top-level files are considered for weights."""
    files = set(repo_files)
    top = sorted(f for f in files if "/" not in f)
    for label, globs, index in WEIGHT_FORMATS:
        weights = [f for f in top if any(fnmatch.fnmatchcase(f, g) for g in globs)]
        if weights:
            chosen = set(weights)
            chosen.update(f for f in (index, *BASE_SIDE_FILES) if f and f in files)
            missing = [n for n in needed if n not in files]
            if missing:
                raise HubError(f"the base repo has no {missing[0]}, which the diff copies from its base:"
                               " is it the right base?")
            chosen.update(needed)
            return label, sorted(chosen)
    raise HubError("the repo holds no model weights (*.safetensors, pytorch_model*.bin or consolidated.*.pth"
                   " at its top level): is it a base model repo?")


@dataclass(frozen=True)
class RepoFileMeta:
    """What the Hub says of one file without sending it: size, and the LFS sha256 (None for files
    kept in git, which are small)."""

    path: str
    size: int
    sha256: str | None
    blob_id: str | None = None  # the git oid: the name of a non-LFS file's blob in the HF cache


def repo_files_meta(ref: RepoRef) -> tuple[str, dict[str, RepoFileMeta]]:
    """(resolved commit sha, {path: RepoFileMeta}) of a model repo: two metadata requests
    (``model_info`` for the commit, the recursive tree at that commit), no file content."""
    from huggingface_hub.hf_api import RepoFile

    api = _hf().HfApi()
    sha = api.model_info(ref.repo_id, revision=ref.revision).sha or ref.revision
    files = {}
    for f in api.list_repo_tree(ref.repo_id, revision=sha, recursive=True):
        if isinstance(f, RepoFile):
            files[f.path] = RepoFileMeta(f.path, int(f.size), f.lfs.sha256 if f.lfs is not None else None,
                                         getattr(f, "blob_id", None))
    return sha, files  # type: ignore[return-value]


def _human(n: int) -> str:
    from ..progress import human_bytes

    return human_bytes(n)


def match_base_files(ref: RepoRef, expected: dict, files: dict[str, RepoFileMeta], recorded: str) -> list[str] | None:
    """The repo paths holding the base weight files a diff records (``expected``: {path:
    BaseFile(size, sha256)}), matched by sha256 and size so that a mirror under other file names
    is accepted. None when the repo holds no file of the recorded form (e.g. only ``.bin`` where
    the diff was made from safetensors): the metadata cannot decide, the tensor check after the
    download will. A repo that holds that form but not those files is refused
    (BaseMismatchError) before anything is downloaded."""
    if not expected:
        return None
    by_sha = {(m.sha256, m.size): path for path, m in files.items() if m.sha256}
    found, missing = [], []
    for rel, bf in sorted(expected.items()):
        path = by_sha.get((bf.sha256, bf.size))
        (found if path else missing).append(path or rel)
    if not missing:
        return found
    suffixes = {Path(rel).suffix for rel in expected}
    if not any(Path(p).suffix in suffixes for p in files):
        return None
    # files kept in git rather than LFS have no sha256 in the listing: one of them may be it
    unknown_sizes = {m.size for p, m in files.items() if m.sha256 is None and Path(p).suffix in suffixes}
    if all(expected[rel].size in unknown_sizes for rel in missing):
        return None
    rel = missing[0]
    bf = expected[rel]
    raise BaseMismatchError(
        f"{ref} is not the base this diff was made from: it has no file with the sha256 of the base's {rel} "
        f"({bf.sha256[:12]}…, {_human(bf.size)}; {len(missing)} of {len(expected)} weight files missing), so "
        f"nothing was downloaded; the diff's base is {recorded} (drop --base to use it, or pass a copy of it)")


def download_base(ref: RepoRef, *, needed: Iterable[str] = (), progress: bool | None = None,
                  expected: dict | None = None, recorded: str = "the one `orca-diff info` names",
                  what: str = "base", stream_for: Manifest | None = None):
    """Fetch the files of a base model that ``apply`` needs into the HF cache; return the folder.

    With ``expected`` (a diff's ``base.weight_files``), the repo's file listing is first compared
    with it (:func:`match_base_files`): a repo that is not the base is refused before any weight
    is fetched, and of a repo that is, exactly the recorded weight files are fetched.

    ``stream_for`` (apply's manifest): when the listing proves the base (every recorded weight
    file found by sha256 and size), the weights are safetensors and some are not cached, the
    side files are fetched now and the weights start downloading into the cache in the
    background; a :class:`~orca_diff.hub.basestream.StreamedBase` is returned, which apply reads
    while it downloads (docs/hub.md)."""
    hf = _hf()
    needed = tuple(needed)
    with _progress(progress), hub_errors(ref, what):
        listing_error: Exception | None = None
        meta: dict[str, RepoFileMeta] | None = None
        if not offline():
            try:
                _commit, meta = repo_files_meta(ref)
            except Exception as exc:  # unreachable Hub: the cache may still hold the files
                if not _is_connection_error(exc):
                    raise
                listing_error = exc
        if meta is not None:
            matched = match_base_files(ref, expected or {}, meta, recorded)
            try:
                if matched is not None:
                    files = _with_side_files(matched, list(meta), needed)
                else:
                    _label, files = select_base_files(list(meta), needed)
            except HubError as exc:
                raise HubError(f"{what} {ref}: {exc}") from None
            # the weights (LFS, big) resumably and checked as they land; the rest through the client,
            # at the revision as given (a branch gets its ref in the cache, so offline runs find it)
            big = [(f, meta[f].size, meta[f].sha256) for f in files if meta[f].sha256]
            pinned = RepoRef(ref.repo_id, _commit)
            if stream_for is not None and matched:
                streamed = _stream_base(pinned, ref.revision, matched, files, big, meta, stream_for, progress)
                if streamed is not None:
                    return streamed
            _fetch_base_weights(pinned, big, progress, ref.revision, meta)
            return Path(hf.snapshot_download(ref.repo_id, revision=ref.revision, allow_patterns=_exact_patterns(files)))
        return _cached_base(ref, needed, listing_error, what)


def _stream_base(pinned: RepoRef, revision: str | None, weights: list[str], files: list[str],
                 big: list[tuple[str, int, str]], meta: dict, manifest: Manifest, progress: bool | None):
    """Start the streamed download of a base proven by its listing (see :func:`download_base`);
    None when there is nothing to stream (every weight cached) or it cannot be streamed."""
    from .basestream import start_streamed_base
    from .stream import _link, cache_paths

    if not all(w.endswith(".safetensors") and "/" not in w for w in weights):
        return None  # a pickled base is read whole: downloaded first, as before
    commit = pinned.revision or ""
    missing, cached = [], []
    for w in weights:
        m = meta[w]
        _storage, blob, _pointer = cache_paths(pinned.repo_id, commit, w, m.sha256)
        (cached if _cached(blob, m.size) else missing).append(w)
    if not missing:
        return None
    for w in cached:  # checked once, as on the download-first path; a damaged blob: that path refetches it
        _storage, blob, _pointer = cache_paths(pinned.repo_id, commit, w, meta[w].sha256)
        if not blob_verified(blob, meta[w].sha256, progress):
            return None
    from .stream import write_ref

    weight_set = set(weights)
    side = [f for f in files if f not in weight_set]
    hf = _hf()
    revision = revision or hf.constants.DEFAULT_REVISION  # the branch whose ref the cache records ("main")
    _storage, _blob, first = cache_paths(pinned.repo_id, commit, weights[0], meta[weights[0]].sha256)
    folder = first.parent  # snapshots/<commit>: everything below is fetched at that commit
    index = "model.safetensors.index.json"
    if index in side:  # the read order comes from its weight map: fetched first (small)
        hf.hf_hub_download(pinned.repo_id, index, revision=commit)
    for w in cached:
        _storage, blob, pointer = cache_paths(pinned.repo_id, commit, w, meta[w].sha256)
        _link(blob, pointer)
    # the weights start now; the other side files (config, tokenizer) come meanwhile
    streamed = start_streamed_base(pinned.repo_id, commit, revision, folder,
                                   [(w, meta[w].size, meta[w].sha256) for w in missing], cached, manifest)
    try:
        _fetch_base_weights(pinned, [b for b in big if b[0] not in weight_set], progress, revision, meta)
        hf.snapshot_download(pinned.repo_id, revision=commit, allow_patterns=_exact_patterns(side))
        write_ref(pinned.repo_id, revision, commit)
    except BaseException:
        streamed.close()
        raise
    return streamed


def _fetch_base_weights(ref: RepoRef, files: list[tuple[str, int, str]], progress: bool | None,
                        revision: str | None, meta: dict) -> None:
    """Fetch the base's LFS files into the cache (resumable, sha256 checked as they land); a
    cached blob is checked once against the sha256 that names it (a damaged one is fetched again,
    once, then refused naming the server)."""
    from .stream import cache_paths

    todo, fetched = [], set()
    for path, size, sha in files:
        _storage, blob, _pointer = cache_paths(ref.repo_id, ref.revision or "", path, sha)
        if not _cached(blob, size):
            todo.append((path, size, sha))
    if todo:
        _fetch_files(ref, todo, progress, "downloading base", revision=revision, meta=meta, error=HubError)
        fetched = {p for p, _s, _h in todo}
    damaged = []
    for path, size, sha in files:
        _storage, blob, _pointer = cache_paths(ref.repo_id, ref.revision or "", path, sha)
        if path not in fetched and not blob_verified(blob, sha, progress):
            damaged.append((path, size, sha))
    if damaged:
        # a cached blob that does not hash to its name: fetched again once, then refused
        _fetch_files(ref, damaged, progress, "downloading base", revision=revision, force=True, meta=meta,
                     fetches=1, error=HubError)
    for path, _size, sha in files:
        _storage, blob, _pointer = cache_paths(ref.repo_id, ref.revision or "", path, sha)
        _mark_verified(blob)


def _verified_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "orca-diff" / "verified-blobs"


def _stamp(blob: Path) -> str:
    st = blob.stat()
    return f"{st.st_size} {st.st_mtime_ns} {st.st_ino} {st.st_dev}"


def _mark_verified(blob: Path) -> None:
    """Remember that ``blob`` (as it is now: size, mtime, inode) hashes to its name."""
    try:
        d = _verified_dir()
        d.mkdir(parents=True, exist_ok=True)
        (d / blob.name).write_text(_stamp(blob))
    except OSError:
        pass  # only a cache of work done: next time the blob is hashed again


def blob_checked_before(blob: Path) -> bool:
    """Whether orca-diff hashed this very blob (same size, mtime, inode) and found its name right."""
    try:
        return (_verified_dir() / blob.name).read_text() == _stamp(blob)
    except OSError:
        return False


def blob_verified(blob: Path, sha256: str, progress: bool | None = None) -> bool:
    """Whether an HF cache blob hashes to the sha256 that names it: from orca-diff's record of an
    earlier check of this very file, else measured (and recorded)."""
    from ..containers import file_sha256

    if blob_checked_before(blob):
        return True
    with byte_bar(blob.stat().st_size, f"checking cached {blob.name[:12]}", progress) as bar:
        ok = file_sha256(blob) == sha256
        bar.update(blob.stat().st_size)
    if ok:
        _mark_verified(blob)
    return ok


def _with_side_files(weights: list[str], repo_files: list[str], needed: tuple[str, ...]) -> list[str]:
    """``weights`` plus their form's index, the side files present and the ``needed`` files."""
    files = set(repo_files)
    chosen = set(weights)
    for _label, globs, index in WEIGHT_FORMATS:
        if index and any(fnmatch.fnmatchcase(Path(w).name, g) for w in weights for g in globs) and index in files:
            chosen.add(index)
    chosen.update(f for f in BASE_SIDE_FILES if f in files)
    missing = [n for n in needed if n not in files]
    if missing:
        raise HubError(f"the base repo has no {missing[0]}, which the diff copies from its base: is it the right base?")
    chosen.update(needed)
    return sorted(chosen)


def download_model(ref: RepoRef, *, progress: bool | None = None) -> Path:
    """Fetch every file of a model repo (a fine-tune given to ``make --target``); return the folder."""
    hf = _hf()
    with _progress(progress), hub_errors(ref, "model"):
        return Path(hf.snapshot_download(ref.repo_id, revision=ref.revision))


def _is_connection_error(exc: BaseException) -> bool:
    """Network failures and offline mode: cases where the cache may stand in for the Hub."""
    return any(type(c).__name__ in ("ConnectError", "ConnectTimeout", "ReadTimeout", "TimeoutException")
               or isinstance(c, ConnectionError) for c in _chain(exc))


def _cached_base(ref: RepoRef, needed: tuple[str, ...], listing_error: Exception | None, what: str = "base") -> Path:
    """Offline or Hub unreachable: find a complete cached copy, trying formats in preference order."""
    hf = _hf()
    last: Exception | None = listing_error
    for _label, globs, index in WEIGHT_FORMATS:
        patterns = [*globs, *(p for p in (index, *needed) if p)]
        try:
            folder = Path(hf.snapshot_download(ref.repo_id, revision=ref.revision, allow_patterns=patterns,
                                               local_files_only=True))
        except Exception as exc:
            last = exc
            continue
        if any(folder.glob(g) for g in globs):
            return folder
    if listing_error is not None:  # the Hub was unreachable and the cache cannot stand in
        raise describe_hub_error(listing_error, ref, what) from last
    if last is None:
        raise HubError(f"{what} {ref}: no cached copy")
    raise describe_hub_error(last, ref, what) from last


def download(ref: RepoRef, kind: str = "auto", *, progress: bool | None = None) -> tuple[str, Path]:
    """Fetch a diff or a complete usable base; ``kind="auto"`` takes a repo holding an
    ``orca-diff.json`` for a diff and anything else for a base. Returns (kind, folder)."""
    if kind == "diff":
        return "diff", download_diff(ref, progress=progress)
    if kind == "base":
        return "base", download_base(ref, progress=progress)
    try:
        return "diff", download_diff(ref, progress=progress)
    except NotADiffError:
        return "base", download_base(ref, progress=progress)


# --------------------------------------------------------------------------- push
@dataclass(frozen=True)
class PushResult:
    repo_id: str
    url: str
    commit: str
    files: int
    removed: tuple[str, ...] = ()      # payload files of the previous diff that this push deleted
    card_kept: bool = False            # the repo's README.md was edited on the Hub and left as it was


def _remote_state(api, repo_id: str, revision: str | None) -> tuple[set[str], set[str], str | None]:
    """(files of the repo now, payload paths of the diff it holds, its README.md text or None):
    what an update of an existing diff repo must know before committing. Empty for a new repo."""
    import json

    files = set(api.list_repo_files(repo_id, revision=revision))
    old_payloads: set[str] = set()
    card = None
    hf = _hf()
    if MANIFEST_NAME in files:
        path = hf.hf_hub_download(repo_id, MANIFEST_NAME, revision=revision)
        try:
            doc = json.loads(Path(path).read_text(encoding="utf-8"))
            old_payloads = {p["path"] for p in doc.get("payloads", []) if isinstance(p.get("path"), str)}
        except (ValueError, TypeError, AttributeError, KeyError):
            old_payloads = set()  # a damaged manifest on the Hub: replace it, delete nothing else
    if CARD_NAME in files:
        card = Path(hf.hf_hub_download(repo_id, CARD_NAME, revision=revision)).read_text(encoding="utf-8",
                                                                                          errors="replace")
    return files, old_payloads, card


def push_diff(diff_dir: str | os.PathLike, repo_id: str, *, private: bool = False, license: str | None = None,
              progress: bool | None = None, revision: str | None = None) -> PushResult:
    """Verify a diff, create the repo (``exist_ok``) and commit the manifest, the payload files and
    a model card in one commit (on ``revision``, a branch; default the main branch).

    Updating a repo that already holds a diff: the payload files of the old manifest that the new
    one does not list are deleted in the same commit (other files are left alone), and a card
    edited on the Hub (not a generated one) is kept unless ``license`` asks for a new card. A
    local README.md edited by hand is published as it is."""
    from .card import is_generated_card, render_card
    from ..verify import verify_diff

    diff_dir = Path(diff_dir)
    manifest = verify_diff(diff_dir, progress=progress)  # never publish a damaged diff
    card_path = diff_dir / CARD_NAME
    card: str | None = render_card(manifest, repo_id=repo_id, license=license)
    local_edited = False
    if card_path.is_file() and license is None:
        existing = card_path.read_text(encoding="utf-8")
        if not is_generated_card(existing):  # written or edited by the publisher: keep theirs
            card, local_edited = existing, True
    hf = _hf()
    ref = RepoRef(repo_id, revision)
    new_paths = {MANIFEST_NAME, *(p.path for p in manifest.payloads)}
    with _progress(progress), hub_errors(ref, "push"):
        api = hf.HfApi()
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        if revision is not None:  # as `hf upload --revision` does: the branch is created when missing
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        remote_files, old_payloads, remote_card = _remote_state(api, repo_id, revision)
        card_kept = (remote_card is not None and not local_edited and license is None
                     and not is_generated_card(remote_card))
        if card_kept:
            card = None  # edited on the Hub by the publisher: theirs stays
        # the publisher's signature files travel in the same commit; one the new diff lacks goes, so
        # that a stale signature of the previous release is never left beside this diff
        from ..signing import DIFF_SIGNATURE_FILES

        signatures = [n for n in DIFF_SIGNATURE_FILES if (diff_dir / n).is_file()]
        removed = sorted({*(p for p in old_payloads if p not in new_paths and p in remote_files),
                          *(n for n in DIFF_SIGNATURE_FILES if n not in signatures and n in remote_files)})
        ops: list = [hf.CommitOperationAdd(path_in_repo=MANIFEST_NAME, path_or_fileobj=str(diff_dir / MANIFEST_NAME))]
        ops += [hf.CommitOperationAdd(path_in_repo=p.path, path_or_fileobj=str(diff_dir / p.path))
                for p in manifest.payloads]
        ops += [hf.CommitOperationAdd(path_in_repo=n, path_or_fileobj=str(diff_dir / n)) for n in signatures]
        if card is not None:
            ops.append(hf.CommitOperationAdd(path_in_repo=CARD_NAME, path_or_fileobj=card.encode("utf-8")))
        ops += [hf.CommitOperationDelete(path_in_repo=p) for p in removed]
        what = "update" if old_payloads else "diff"
        info = api.create_commit(repo_id, ops, revision=revision,
                                 commit_message=f"orca-diff: {what} against {manifest.base.repo or manifest.base.name}",
                                 commit_description="Uploaded with `orca-diff push`.")
    return PushResult(repo_id, str(url), info.oid, len(ops) - len(removed), tuple(removed), card_kept)


__all__ = ["RepoRef", "parse_repo_spec", "download_diff", "download_base", "download_model", "download",
           "repo_files_meta", "match_base_files", "RepoFileMeta", "push_diff", "PushResult",
           "select_base_files", "describe_hub_error", "NotADiffError", "hub_errors", "endpoint", "repo_url", "offline"]
