"""Hub commands of the CLI: ``catalog``, ``download`` and ``push`` (thin layers over orca_diff.hub)."""

from __future__ import annotations

import json

import click

from ..errors import UsageError

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
        out = {kind: {e.name: {"repo": e.repo, "revision": e.revision, "status": e.status, "fingerprint": e.fingerprint,
                               "license": e.license, "base": e.base, "description": e.description,
                               "source": str(e.source)} for e in entries.values()}
               for kind, entries in cat.items()}
        out["files"] = [str(p) for p in catalog_files()]
        click.echo(json.dumps(out, indent=2))
        return
    for kind in ("bases", "diffs"):
        click.echo(f"{kind}:")
        for e in sorted(cat[kind].values(), key=lambda e: e.name):
            extra = f" (base {e.base})" if e.base else ""
            click.echo(f"  {e.name:<14} {e.repo}@{e.revision}  [{e.status}]{extra}")
    click.echo("catalog files: " + ", ".join(str(p) for p in catalog_files()))


@click.command("download")
@click.argument("name")
@click.option("--kind", type=click.Choice(["auto", "base", "diff"]), default="auto", show_default=True,
              help="What NAME is; auto: catalog section, else a repo with orca-diff.json is a diff.")
@stall_option
@quiet_option
def download_cmd(name: str, kind: str, quiet: bool) -> None:
    """Fetch a base or a diff into the Hugging Face cache, without rebuilding anything.

    NAME is a catalog name (llama-13b, orca) or a Hub repo id org/name[@revision]. Only the
    files needed are fetched; rerunning after an interruption fetches only what is missing. The
    local folder is printed on stdout, so `$(orca-diff download NAME)` can be passed on.

    \b
    Examples:
      orca-diff download llama-13b
      orca-diff download my-org/orca-13b-diff@v1
    """
    from ..hub.catalog import is_repo_id, lookup
    from ..hub import RepoRef, download, parse_repo_spec

    progress = False if quiet else None
    base_entry = lookup(name, "base") if kind in ("auto", "base") else None
    diff_entry = lookup(name, "diff") if kind in ("auto", "diff") else None
    entry = diff_entry or base_entry
    if entry is not None:
        if entry.is_placeholder:
            from ..hub.resolve import _refuse_placeholder

            _refuse_placeholder(entry)
        ref, kind = RepoRef(entry.repo, entry.revision), entry.kind
    else:
        ref = parse_repo_spec(name)
        if not is_repo_id(ref.repo_id):
            raise UsageError(f"{name!r} is neither a catalog name (see `orca-diff catalog`) nor a Hub repo id"
                             " org/name[@revision]")
    got, folder = download(ref, kind, progress=progress)
    click.echo(f"fetched {got} {ref.repo_id} at commit {folder.name} into {folder}", err=True)
    click.echo(str(folder))


@click.command("push")
@click.argument("diff")
@click.option("--repo", "repo_id", required=True, help="Hub repo id to publish to: org/name (created if missing).")
@click.option("--private", is_flag=True, help="Create the repo as private.")
@click.option("--license", "license_", default=None,
              help="License for the model card (Hub license id; default: the base's, else 'other').")
@stall_option
@quiet_option
def push_cmd(diff: str, repo_id: str, private: bool, license_: str | None, quiet: bool) -> None:
    """Publish a diff: verify it, create the Hub repo, upload it with a model card.

    Needs a token with write access (`hf auth login`, or HF_TOKEN). The card says this is a
    diff, not a model, and gives the one command that rebuilds the model.

    \b
    Example:
      orca-diff push orca-13b-diff --repo my-org/orca-13b-diff
    """
    from ..hub.catalog import is_repo_id
    from ..hub import push_diff

    if not is_repo_id(repo_id):
        raise UsageError(f"--repo {repo_id!r}: expected a Hub repo id org/name")
    from pathlib import Path

    from ..errors import InputNotFoundError

    if not Path(diff).is_dir():
        raise InputNotFoundError(f"{diff}: no such diff folder (push publishes a diff made by `orca-diff make`)")
    r = push_diff(diff, repo_id, private=private, license=license_, progress=False if quiet else None)
    click.echo(f"pushed {r.files} files to {r.url} (commit {r.commit})")
    click.echo(f"rebuild with: orca-diff apply --diff {r.repo_id}@{r.commit} --out DIR")


COMMANDS = [catalog_cmd, download_cmd, push_cmd]
