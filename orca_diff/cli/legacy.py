"""``orca-diff convert``: re-publish a historic diff release as an orca-diff diff.

(``orca-diff apply --format fastchat|alpaca|oa-xor`` rebuilds such a release directly; both are
described in docs/legacy.md.)
"""

from __future__ import annotations

import click

FORMAT_CHOICE = click.Choice(["auto", "fastchat", "alpaca", "oa-xor"])


@click.command()
@click.argument("legacy")
@click.option("--base", default=None, help="The base the release was made from: a folder, a catalog name or a Hub repo "
              "id. Default: the base the catalog names for the release.")
@click.option("--out", required=True, type=click.Path(), help="The orca-diff diff folder to create.")
@click.option("--format", "fmt", type=FORMAT_CHOICE, default="auto", show_default=True,
              help="The release's format. auto: from the catalog, or detected where unambiguous (OpenAssistant XOR).")
@click.option("--base-name", default=None, help="Catalog name of the base, recorded in the manifest (e.g. llama-13b).")
@click.option("--base-repo", default=None, help="Hub repo id of the base, recorded in the manifest.")
@click.option("--base-revision", default=None, help="Hub revision (commit sha) of the base.")
@click.option("--level", type=click.IntRange(1, 22), default=None, help="zstd level of the chunks stored as zstd "
              "frames (default 1, as for make).")
@click.option("--force", is_flag=True, help="Replace --out if it exists and is not empty.")
@click.option("--threads", type=click.IntRange(1, 512), default=None,
              help="Worker threads (default: all cores, or $ORCA_DIFF_THREADS).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def convert(legacy: str, base: str | None, out: str, fmt: str, base_name: str | None, base_repo: str | None,
            base_revision: str | None, level: int | None, force: bool, threads: int | None, quiet: bool) -> None:
    """Re-encode LEGACY (a FastChat/Vicuna delta, an Alpaca/WizardLM weight diff or an OpenAssistant
    XOR release) as an orca-diff diff against the same base.

    The release's model is rebuilt exactly as its own script would (kept on disk only while
    converting), then encoded with a full manifest: base fingerprint and the hash of every file,
    so `orca-diff apply` of the new diff yields the same tensors, checked, from any copy of the
    base with the same weights. Prints the size ratio against the release.

    \b
    Example:
      orca-diff convert vicuna-13b-delta-v1.1 --format fastchat --base llama-13b-hf --out vicuna-13b-diff
    """
    from ..legacy import convert_legacy

    report = convert_legacy(fmt, legacy, base, out, force=force, threads=threads, progress=False if quiet else None,
                            level=level, base_name=base_name, base_repo=base_repo, base_revision=base_revision)
    click.echo(report.summary())


COMMANDS = [convert]
