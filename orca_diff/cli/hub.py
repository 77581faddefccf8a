"""Hub commands of the CLI: ``catalog``, ``download`` and ``push`` (thin layers over orca_diff.hub)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..errors import UsageError
from .provenance import sign_options

quiet_option = click.option("-q", "--quiet", is_flag=True, help="No progress bars.")


def _set_stall(ctx: click.Context, param: click.Parameter, value: float | None) -> None:
    if value is not None:
        import os

        from ..hub.stream import STALL_ENV

        os.environ[STALL_ENV] = repr(value)  # read by every Hub request of this process


stall_option = click.option(
    "--stall-timeout", type=click.FloatRange(min=0.1), default=None, expose_value=False, callback=_set_stall,
    is_eager=True, metavar="SECONDS", help="Hub transfers: seconds without a byte before a read is retried (then an "
    "error, exit 9). Default: $ORCA_DIFF_STALL_TIMEOUT, else $HF_HUB_DOWNLOAD_TIMEOUT, else 10.")


@click.command("catalog")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def catalog_cmd(as_json: bool) -> None:
    """List the names --base and --diff accept (bases and diffs on the Hub).

    The shipped catalog is extended or overridden by ~/.config/orca-diff/catalog.json and by
    the file named in $ORCA_DIFF_CATALOG (see docs/hub.md).

    \b
    Example:
      orca-diff catalog
    """
    from ..hub.catalog import catalog_files, load_catalog

    cat = load_catalog()
    if as_json:
        out = {kind: {e.name: {"repo": e.repo, "revision": e.revision, "status": e.status, "format": e.format,
                               "fingerprint": e.fingerprint,
                               "license": e.license, "base": e.base, "description": e.description,
                               "source": str(e.source)} for e in entries.values()}
               for kind, entries in cat.items()}
        out["files"] = [str(p) for p in catalog_files()]
        click.echo(json.dumps(out, indent=2))
        return
    for kind in ("bases", "diffs"):
        click.echo(f"{kind}:")
        entries = sorted(cat[kind].values(), key=lambda e: e.name)
        rows = [(e.name, f"{e.repo}@{e.revision}", e.format if kind == "diffs" else "", e.status,
                 e.base or "") for e in entries]
        if kind == "diffs":
            rows.insert(0, ("NAME", "REPO@REVISION", "FORMAT", "STATUS", "BASE"))
        else:
            rows.insert(0, ("NAME", "REPO@REVISION", "", "STATUS", ""))
        widths = [max(len(r[i]) for r in rows) for i in range(5)]  # columns as wide as their longest cell
        for r in rows:
            cells = [c.ljust(w) for c, w in zip(r, widths) if w]
            click.echo("  " + "  ".join(cells).rstrip())
    click.echo("catalog files: " + ", ".join(str(p) for p in catalog_files()))


def hub_options(*, revision: str | None = "Hub revision of NAME: a branch, a tag or a commit sha (the same as "
                "NAME@REV).", local_dir: bool = False, cache_dir: bool = True):
    """The options huggingface_hub's `hf download` has, with the same names and meanings."""

    def wrap(f):
        if local_dir:
            f = click.option("--local-dir", type=click.Path(file_okay=False), default=None,
                             help="Also place the files in this folder (copied from the HF cache), as `hf download "
                             "--local-dir` does; its path is printed instead of the cache's.")(f)
        if cache_dir:
            f = click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
                             help="The HF cache folder to use instead of $HF_HUB_CACHE (as for `hf download`).")(f)
        f = click.option("--token", default=None, help="Hub token to use instead of HF_TOKEN or the one of `hf auth "
                         "login`.")(f)
        if revision:
            f = click.option("--revision", default=None, help=revision)(f)
        return f

    return wrap


def with_revision(spec: str, revision: str | None, what: str) -> str:
    """``spec`` pinned to ``revision`` (``--revision REV`` is ``NAME@REV``); both given must agree."""
    if revision is None:
        return spec
    from ..hub.options import check_revision

    check_revision(revision, "--revision")
    base, sep, given = spec.partition("@")
    if sep and given != revision:
        raise UsageError(f"{what} {spec!r} names revision {given!r} and --revision says {revision!r}: give it once")
    return f"{base}@{revision}"


@click.command("download")
@click.argument("name")
@click.option("--kind", type=click.Choice(["auto", "base", "diff"]), default="auto", show_default=True,
              help="What NAME is; auto: catalog section, else a repo with orca-diff.json is a diff.")
@hub_options(local_dir=True)
@stall_option
@quiet_option
def download_cmd(name: str, kind: str, revision: str | None, token: str | None, cache_dir: str | None,
                 local_dir: str | None, quiet: bool) -> None:
    """Fetch a base or a diff into the Hugging Face cache, without rebuilding anything.

    NAME is a catalog name (llama-13b) or a Hub repo id org/name[@revision]. Only the files
    needed are fetched; rerunning after an interruption fetches only what is missing. The local
    folder is printed on stdout, so `$(orca-diff download NAME -q)` can be passed on.

    \b
    Examples:
      orca-diff download llama-13b
      orca-diff download my-org/orca-13b-diff --revision v1 --local-dir orca-13b-diff
    """
    from ..hub.catalog import lookup
    from ..hub import RepoRef, download, parse_repo_spec
    from ..hub.options import check_repo_id, hub_settings

    progress = False if quiet else None
    base_entry = lookup(name, "base") if kind in ("auto", "base") else None
    diff_entry = lookup(name, "diff") if kind in ("auto", "diff") else None
    entry = diff_entry or base_entry
    if entry is not None:
        if entry.is_placeholder:
            from ..hub.resolve import _refuse_placeholder

            _refuse_placeholder(entry)
        if entry.format != "orca-diff":
            kind = "base"  # a legacy release is an HF model folder: fetched as one (weights, config, tokenizer)
        else:
            kind = entry.kind
        ref = RepoRef(entry.repo, revision or entry.revision)
    else:
        ref = parse_repo_spec(with_revision(name, revision, "NAME"))
        if "/" not in ref.repo_id:
            raise UsageError(f"{name!r} is neither a catalog name (see `orca-diff catalog`) nor a Hub repo id"
                             " org/name[@revision]")
        check_repo_id(ref.repo_id, "NAME")
    with hub_settings(token=token, cache_dir=cache_dir), _quiet_client(quiet):
        if entry is not None and entry.format != "orca-diff":  # a legacy release: called what it is in errors
            from ..hub.transfer import download_base

            got, folder = f"{entry.format} release", download_base(ref, progress=progress, what=f"{entry.format} release")
        else:
            got, folder = download(ref, kind, progress=progress)
    if local_dir is not None:
        folder = _copy_to_local_dir(folder, Path(local_dir))
    if not quiet:
        click.echo(f"fetched {got} {ref.repo_id} at commit {_commit_of(folder)} into {folder}", err=True)
    click.echo(str(folder))


def _commit_of(folder: Path) -> str:
    from ..hub.resolve import identify_cached_repo

    cached = identify_cached_repo(folder)
    return cached[1] if cached else "?"


def _copy_to_local_dir(snapshot: Path, local_dir: Path) -> Path:
    """Copy a downloaded snapshot into ``local_dir`` (real files, not cache links), skipping files
    already there with the same size and content; returns ``local_dir``."""
    import filecmp
    import shutil

    from ..errors import OutputError

    try:
        local_dir.mkdir(parents=True, exist_ok=True)
        for src in sorted(snapshot.rglob("*")):
            if src.is_dir():
                continue
            dst = local_dir / src.relative_to(snapshot)
            if dst.is_file() and filecmp.cmp(src, dst, shallow=False):
                continue
            dst.parent.mkdir(parents=True, exist_ok=True)
            tmp = dst.with_name(f".{dst.name}.orca-diff-partial")
            shutil.copyfile(src, tmp)
            tmp.replace(dst)
    except OSError as exc:
        raise OutputError(f"--local-dir {local_dir}: cannot write ({exc.strerror or exc}); choose another folder") from None
    return local_dir


class _quiet_client:
    """With -q, huggingface_hub's own warnings (unauthenticated requests, symlinks...) are silenced too."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet

    def __enter__(self):
        if self.quiet:
            import logging
            import warnings

            # huggingface_hub sets its logger's level when its logging module is first imported
            # (lazily, by whichever of its modules loads first): load it now, then set ours
            from huggingface_hub.utils import logging as _hf_logging  # noqa: F401

            self._warnings = warnings.catch_warnings()
            self._warnings.__enter__()
            warnings.simplefilter("ignore")
            self._logger = logging.getLogger("huggingface_hub")
            self._level = self._logger.level
            self._logger.setLevel(logging.ERROR)
        return self

    def __exit__(self, *exc) -> None:
        if self.quiet:
            self._logger.setLevel(self._level)
            self._warnings.__exit__(*exc)


@click.command("push")
@click.argument("diff")
@click.option("--repo", "repo_id", required=True, help="Hub repo id to publish to: org/name (created if missing).")
@click.option("--private", is_flag=True, help="Create the repo as private.")
@click.option("--license", "license_", default=None,
              help="License for the model card (Hub license id; default: the base's, else 'other').")
@hub_options(revision="Branch to commit to (default: the repo's main branch), as for `hf upload --revision`.",
             cache_dir=False)
@stall_option
@quiet_option
@sign_options
def push_cmd(diff: str, repo_id: str, private: bool, license_: str | None, revision: str | None, token: str | None,
             quiet: bool, sign=None) -> None:
    """Publish a diff: verify it, create the Hub repo, upload it with a model card.

    Needs a token with write access (`hf auth login`, HF_TOKEN or --token). The card says this is
    a diff, not a model, and gives the one command that rebuilds the model. Pushing again to the
    same repo makes a new commit: payload files of the old diff that the new one does not use are
    deleted, and a card edited on the Hub is kept. The publisher's signatures (target.sig,
    derivation.sig) travel with it; --sign-key also signs the diff folder itself (diff.sig, OpenSSF
    model signing), so users can authenticate the diff before using it.

    \b
    Example:
      orca-diff push orca-13b-diff --repo my-org/orca-13b-diff
    """
    from ..hub import push_diff
    from ..hub.options import check_repo_id, check_revision, hub_settings

    check_repo_id(repo_id, "--repo")
    if revision is not None:
        check_revision(revision, "--revision")
    from ..errors import InputNotFoundError

    if not Path(diff).is_dir():
        raise InputNotFoundError(f"{diff}: no such diff folder (push publishes a diff made by `orca-diff make`)")
    progress = False if quiet else None
    from ..format import load_manifest
    from ..signing import DIFF_SIG, check_before_push, diff_signatures, sign_diff_folder, write_signature

    if sign is not None:
        from ..verify import verify_diff

        write_signature(Path(diff) / DIFF_SIG, sign_diff_folder(diff, verify_diff(diff, progress=progress), sign))
    check_before_push(diff, load_manifest(diff))  # never publish a signature that no longer matches
    with hub_settings(token=token), _quiet_client(quiet):
        r = push_diff(diff, repo_id, private=private, license=license_, progress=progress, revision=revision)
    commit = r.commit
    signed = f", signed ({', '.join(names)})" if (names := diff_signatures(Path(diff))) else ""
    click.echo(f"pushed {r.files} file{'s' if r.files != 1 else ''} to {r.url} (commit {commit}){signed}")
    if r.removed:
        click.echo(f"removed {len(r.removed)} file{'s' if len(r.removed) != 1 else ''} of the previous diff "
                   f"({', '.join(r.removed[:3])}{', ...' if len(r.removed) > 3 else ''})")
    if r.card_kept:
        click.echo("kept the repo's README.md (edited on the Hub); pass --license to replace it by a generated card")
    click.echo(f"rebuild with: orca-diff apply --diff {r.repo_id}@{commit} --out DIR"
               + (" --verify-key PUBLISHER.pub" if signed else ""))


COMMANDS = [catalog_cmd, download_cmd, push_cmd]
