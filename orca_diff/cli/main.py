"""The ``orca-diff`` command line: parse, call the library, map errors to exit codes.

Every expected failure is an OrcaDiffError, printed as one line ``orca-diff: error: ...`` with
the exit code of its class (see README.md). Commands of optional parts of the tool live in
``orca_diff/cli/<topic>.py`` modules (hub, fingerprint, train, legacy), registered at the end.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import click

from .. import __version__
from ..errors import InterruptedError_, OrcaDiffError, shown
from ..progress import human_bytes as _human

class _Group(click.Group):
    """Turns OrcaDiffError and Ctrl-C into one line and an exit code (no traceback)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except OrcaDiffError as exc:
            click.echo(f"orca-diff: error: {shown(str(exc))}", err=True)
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("orca-diff: interrupted; rerun the same command to resume", err=True)
            ctx.exit(InterruptedError_.exit_code)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="orca-diff")
def cli() -> None:
    """Publish fine-tuned LLaMA-family models as exact weight diffs, and rebuild them bit-exactly.

    \b
    Quick start (no download needed):
      orca-diff demo
    Rebuild a model:
      orca-diff apply --base llama-13b --diff orca --out orca-13b
    """


quiet_option = click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
from .hub import stall_option  # noqa: E402 - Hub transfers' stall timeout, shared by the Hub-aware commands
threads_option = click.option("--threads", type=click.IntRange(1, 512), default=None,
                              help="Worker threads (default: all cores, or $ORCA_DIFF_THREADS).")


@cli.command()
@click.option("--base", "base", required=True, help="The base model: a folder (safetensors, .bin or Meta .pth), a "
              "catalog name (llama-2-13b) or a Hub repo id[@rev] (its weights are fetched into the HF cache).")
@click.option("--target", required=True, help="The fine-tuned model: a folder (safetensors or .bin shards; every "
              "file in it is carried) or a Hub repo id[@rev] (all its files are fetched).")
@click.option("--out", required=True, type=click.Path(), help="The diff folder to create.")
@click.option("--base-name", default=None, help="Catalog name of the base, recorded in the manifest (e.g. llama-13b).")
@click.option("--base-repo", default=None, help="Hub repo id of the base, recorded in the manifest (default: the "
              "repo --base came from, when it is a Hub id, a catalog name or an HF cache folder).")
@click.option("--base-revision", default=None, help="Hub revision (commit sha) of the base (default: the resolved "
              "commit of --base).")
@click.option("--level", type=click.IntRange(1, 22), default=None, help="zstd level of the chunks stored as zstd frames (small tensors, raw rows, other files; float deltas use the `ans` coder). Default 1: tuned fast parameters; 4 and above use zstd's own, slow to encode.")
@click.option("--force", is_flag=True, help="Replace --out if it exists and is not empty.")
@threads_option
@stall_option
@quiet_option
def make(base: str, target: str, out: str, base_name: str | None, base_repo: str | None, base_revision: str | None,
         level: int | None, force: bool, threads: int | None, quiet: bool) -> None:
    """Make a diff that rebuilds TARGET from BASE. The diff never contains base weights.

    \b
    Examples:
      orca-diff make --base llama-13b-hf --target orca-13b --out orca-13b-diff --base-name llama-13b
      orca-diff make --base meta-llama/Llama-2-13b-hf --target microsoft/Orca-2-13b --out orca-2-13b-diff
    """
    from ..make import make_diff
    from ..codec import DEFAULT_LEVEL
    from ..hub.resolve import resolve_model_spec

    t0 = time.perf_counter()
    progress = False if quiet else None
    base_dir = resolve_model_spec(base, "base", progress=progress)
    target_dir = resolve_model_spec(target, "target", progress=progress)
    notes: list[str] = []
    m = make_diff(base_dir, target_dir, out, base_name=base_name or _catalog_base_name(base), base_repo=base_repo,
                  base_revision=base_revision, level=level or DEFAULT_LEVEL, threads=threads, progress=progress,
                  force=force, notes=notes)
    for note in notes:
        click.echo(f"orca-diff: note: {shown(note)}", err=True)
    dt = time.perf_counter() - t0
    click.echo(f"wrote {out}: {len(m.tensors)} tensors, {_human(m.payload_bytes)} of payload for "
               f"{_human(m.target_bytes)} of model ({100 * m.payload_bytes / max(1, m.target_bytes):.1f}%) in {dt:.1f}s; "
               f"base fingerprint {m.base.fingerprint}")


def _diff_arg(diff: str) -> str:
    """``--diff DIR/orca-diff.json`` means the diff folder DIR."""
    from ..format import MANIFEST_NAME

    p = Path(diff)
    return str(p.parent) if p.name == MANIFEST_NAME and p.is_file() else diff


def _already_rebuilt(out: Path, diff: str, quiet: bool):
    """A rerun of a finished ``apply`` (same command): if ``out`` already holds every file of the
    diff's model with its size, hash them all; the ModelReport when every one matches, else None
    (and apply then refuses the non-empty folder as usual). The base is not even resolved."""
    from ..errors import VerificationError
    from ..format import load_manifest
    from ..hub.resolve import resolve_diff
    from ..verify import verify_model

    try:
        if out.is_symlink() or not out.is_dir() or not any(out.iterdir()):
            return None
    except OSError:
        return None
    progress = False if quiet else None
    manifest = load_manifest(resolve_diff(diff, progress=progress, manifest_only=True))
    for f in manifest.files:
        p = out / f.path
        if p.is_symlink() or not p.is_file() or p.stat().st_size != f.size:
            return None
    from ..outdir import OutputLock

    try:  # under the output's lock: no other run may be replacing the folder while it is checked
        with OutputLock(out):
            return verify_model(out, manifest, progress=progress)
    except VerificationError:
        return None


def _catalog_base_name(spec: str) -> str | None:
    """The catalog name ``spec`` is, if it is one (recorded so users can type it back)."""
    from ..hub.catalog import lookup

    if Path(spec).expanduser().exists():
        return None
    entry = lookup(spec, "base")
    return entry.name if entry is not None else None


def _resolve(diff: str, base: str | None, quiet: bool, keep_diff: bool = False):
    """Resolve --diff then --base (local path, catalog name or Hub repo id): (diff folder, base
    folder, payload source: None, or a Hub stream when the diff's payloads are not cached)."""
    from ..format import load_manifest
    from ..hub.resolve import resolve_base, resolve_diff_streamed

    progress = False if quiet else None
    diff_dir, source = resolve_diff_streamed(diff, progress=progress, keep_diff=keep_diff)
    manifest = load_manifest(diff_dir)
    return diff_dir, resolve_base(base, manifest, progress=progress), source


@cli.command()
@click.option("--base", default=None, help="Base: a folder, a catalog name (llama-13b) or a Hub repo id[@rev]. "
              "Default: the base named in the diff.")
@click.option("--diff", "diff", required=True, help="Diff: a folder, a catalog name (orca) or a Hub repo id[@rev].")
@click.option("--out", required=True, type=click.Path(), help="Folder to write the rebuilt model to.")
@click.option("--format", "fmt", type=click.Choice(["auto", "orca", "fastchat", "alpaca", "oa-xor"]), default="auto",
              show_default=True, help="Diff format: orca-diff, or a legacy release (FastChat/Vicuna delta, "
              "Alpaca/WizardLM weight diff, OpenAssistant XOR). auto: orca-diff when the diff has a manifest.")
@click.option("--force", is_flag=True, help="Replace --out if it exists and is not empty.")
@click.option("--keep-diff", is_flag=True, help="A Hub diff: download it into the HF cache, then apply (default: "
              "stream its payloads into the rebuild, keeping no copy, unless the cache already holds them).")
@stall_option
@threads_option
@quiet_option
def apply(base: str | None, diff: str, out: str, fmt: str, force: bool, keep_diff: bool, threads: int | None,
          quiet: bool) -> None:
    """Rebuild the fine-tuned model from a base and a diff, byte-identical to the publisher's files.

    The base is checked tensor by tensor BEFORE anything is written; an interrupted run resumes
    where it stopped when rerun.

    \b
    Example:
      orca-diff apply --base llama-13b --diff orca --out orca-13b
    """
    from ..apply import apply_diff

    if fmt == "auto":  # legacy: a catalog entry with a legacy format, or an XOR payload folder (docs/legacy.md)
        from ..legacy import detect_format

        fmt = detect_format(diff) or fmt
    if fmt not in ("auto", "orca"):
        from ..legacy import apply_legacy  # legacy releases: see docs/legacy.md

        click.echo(apply_legacy(fmt, base, diff, out, force=force, threads=threads,
                                progress=False if quiet else None).summary())
        return
    if not force and (done := _already_rebuilt(Path(out), _diff_arg(diff), quiet)) is not None:
        click.echo(f"{out} already holds this model: {len(done.ok)} files byte-identical to the publisher's "
                   f"(checked now; model fingerprint {done.fingerprint}, measured); nothing to do")
        for extra in done.extra:
            click.echo(f"note: {shown(extra)} is not part of the diff's model (left alone)", err=True)
        return
    diff_dir, base_dir, source = _resolve(_diff_arg(diff), base, quiet, keep_diff)
    from ..hub.stream import PREFETCH_BUDGET

    r = apply_diff(base_dir, diff_dir, out, force=force, threads=threads, progress=False if quiet else None,
                   payloads=source, payload_memory=PREFETCH_BUDGET if source is not None else 0)
    for note in r.notes:
        click.echo(f"note: {note}", err=True)
    if source is not None and (said := source.summary()):
        click.echo(f"note: {said}", err=True)
    resumed = f" ({r.resumed_files} already done)" if r.resumed_files else ""
    base_said = (f"base fingerprint {r.base_fingerprint} (measured)" if r.base_fingerprint else
                 f"base: {r.base_tensors_checked} tensors checked")
    click.echo(f"rebuilt {r.out}: {r.files} files{resumed}, {_human(r.bytes_written)} written in {r.seconds:.1f}s; "
               f"every file matches its sha256 and every tensor its {r.digest_algo}; model fingerprint "
               f"{r.target_fingerprint} (measured from the rebuilt tensors); {base_said}")


@cli.command()
@click.option("--diff", "diff", required=True, help="The diff: a folder, a catalog name or a Hub repo id[@rev].")
@click.option("--base", default=None, help="Also check this base against the diff (folder, catalog name or repo id).")
@click.option("--model", default=None, help="Also check this model: a rebuilt folder, or a Hub repo id[@rev] "
              "(byte-identical files).")
@threads_option
@stall_option
@quiet_option
def verify(diff: str, base: str | None, model: str | None, threads: int | None, quiet: bool) -> None:
    """Check a diff's integrity, and optionally a base or a rebuilt model against it.

    \b
    Examples:
      orca-diff verify --diff orca-13b-diff
      orca-diff verify --diff orca-13b-diff --base llama-13b-hf --model orca-13b
    """
    from ..hub.resolve import resolve_base, resolve_diff
    from ..containers import open_model
    from ..verify import check_base, measured_base_fingerprint, verify_diff, verify_model

    progress = False if quiet else None
    if model is not None:  # a folder, or a model repo on the Hub (all its files are fetched)
        from ..hub.resolve import resolve_model_spec

        model = str(resolve_model_spec(model, "target", progress=progress))
    diff = str(resolve_diff(_diff_arg(diff), progress=progress))
    m = verify_diff(diff, progress=progress)
    click.echo(f"diff OK: {len(m.payloads)} payload files, {len(m.tensors)} tensors, checksums match")
    if base:
        reader = open_model(resolve_base(base, m, progress=progress))
        try:
            measured = check_base(reader, m, threads, progress)
        finally:
            reader.close()
        fp = measured_base_fingerprint(m, measured)
        said = f"; base fingerprint {fp} (measured)" if fp else ""
        click.echo(f"base OK: the {len(measured)} tensors the diff needs match their {m.digest_algo} (measured){said}")
    if model:
        report = verify_model(model, m, progress=progress)
        click.echo(f"model OK: {len(report.ok)} files byte-identical to the publisher's; model fingerprint "
                   f"{report.fingerprint} (measured from its tensors)")
        for extra in report.extra:
            click.echo(f"note: {shown(extra)} is not part of the diff's model (left alone)")


@cli.command()
@click.argument("diff_arg", metavar="DIFF", required=False)
@click.option("--diff", "diff_opt", default=None, help="The diff (same as the DIFF argument).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@stall_option
@quiet_option
def info(diff_arg: str | None, diff_opt: str | None, as_json: bool, quiet: bool) -> None:
    """Describe a diff: its base, the model it rebuilds, sizes and compression ratio.

    DIFF (or --diff DIFF) is a folder, a catalog name or a Hub repo id[@rev] (of which only the
    manifest is fetched).

    The fingerprints shown are what the manifest records (consistent with its own tensor
    records, which is checked); they are claims. To measure: `orca-diff verify --diff D --model
    MODEL` for a rebuilt model, `orca-diff fingerprint BASE` for a base.
    """
    from ..errors import UsageError
    from ..format import load_manifest
    from ..hub.resolve import resolve_diff

    if diff_arg and diff_opt and diff_arg != diff_opt:
        raise UsageError("give the diff once: as DIFF or as --diff")
    if not (diff_arg or diff_opt):
        raise UsageError("which diff? orca-diff info DIFF (a folder, a catalog name or a Hub repo id)")
    m = load_manifest(resolve_diff(_diff_arg(diff_arg or diff_opt), progress=False if quiet else None,  # type: ignore[arg-type]
                                   manifest_only=True))
    dtypes: dict[str, int] = {}
    encodings: dict[str, int] = {}
    for t in m.tensors.values():
        dtypes[t.dtype] = dtypes.get(t.dtype, 0) + 1
        encodings[t.encoding.transform] = encodings.get(t.encoding.transform, 0) + 1
    summary = {
        "format_version": m.format_version, "tool": m.tool,
        "base": {"name": m.base.name, "repo": m.base.repo, "revision": m.base.revision,
                 "fingerprint": m.base.fingerprint, "tensors_needed": len(m.needed_base_tensors()),
                 "files_copied": sorted(m.base.files), "weight_files": sorted(m.base.weight_files)},
        "target": {"fingerprint": m.target_fingerprint, "files": [f.path for f in m.files], "bytes": m.target_bytes,
                   "tensors": len(m.tensors), "dtypes": dtypes},
        "fingerprints": "recorded in the manifest, consistent with its tensor records; not measured "
                        "(measure with verify --model or fingerprint)",
        "encodings": encodings, "dropped": m.dropped,
        "payload_bytes": m.payload_bytes, "ratio": m.payload_bytes / max(1, m.target_bytes),
    }
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    # every manifest string goes through shown(): control characters could draw a fake line
    b = m.base
    where = " ".join(x for x in (
        f"Hub repo {shown(b.repo)}" if b.repo else "", f"at commit {shown(b.revision)}" if b.revision else "",
        f"named {shown(b.name)!r}" if b.name else "",
        "" if b.repo else "(no Hub repo recorded: apply looks the name up in the catalog, else needs --base)") if x)
    kinds: dict[str, int] = {"safetensors": 0, "segments": 0, "blob": 0}
    for f in m.files:
        kinds[f.kind] = kinds.get(f.kind, 0) + 1
    words = {"ulp": "delta-coded against the base", "xor": "xor-coded against the base", "raw": "stored whole"}
    click.echo(f"orca-diff diff, format version {m.format_version}, made by {shown(m.tool)}")
    click.echo(f"base:     {where}")
    click.echo(f"          fingerprint {shown(b.fingerprint)} (recorded); {len(m.needed_base_tensors())} of its tensors "
               "needed" + (f", {len(b.files)} file(s) copied from it" if b.files else ""))
    click.echo(f"rebuilds: {len(m.files)} files ({kinds['safetensors']} safetensors, {kinds['segments']} .bin, "
               f"{kinds['blob']} other), {_human(m.target_bytes)}, {len(m.tensors)} tensors "
               f"({', '.join(f'{n} {d}' for d, n in sorted(dtypes.items()))})")
    click.echo(f"          fingerprint {shown(m.target_fingerprint)} (recorded)")
    click.echo("tensors:  " + "; ".join(f"{n} {words.get(k, k)}" for k, n in sorted(encodings.items()))
               + (f"; {len(m.dropped)} base tensors not in the fine-tune" if m.dropped else ""))
    click.echo(f"size:     {_human(m.payload_bytes)} of payload = {100 * summary['ratio']:.2f}% of the model")
    click.echo("note: the fingerprints above are the manifest's records (consistent with its tensor records), "
               "not measurements; measure with `orca-diff verify --diff DIFF --model MODEL` (a rebuilt model) or "
               "`orca-diff fingerprint BASE` (a base)")


@cli.command()
@click.option("--workdir", type=click.Path(file_okay=False), default=None,
              help="Keep the demo's models and diff here (default: a temporary folder, removed afterwards).")
@click.option("--dtype", type=click.Choice(["F16", "BF16", "F32"]), default="BF16", show_default=True)
@click.option("--hidden", type=click.IntRange(32, 8192), default=512, show_default=True, help="Hidden size of the demo model.")
@click.option("--layers", type=click.IntRange(1, 80), default=4, show_default=True)
@quiet_option
def demo(workdir: str | None, dtype: str, hidden: int, layers: int, quiet: bool) -> None:
    """Run the whole job on an embedded, generated LLaMA-shaped model: make -> apply -> verify.

    Builds a random base and a fine-tune of it (AdamW-like updates, a pad row added: vocab
    32000 -> 32001), makes the diff, rebuilds the model from base + diff, and proves the rebuilt
    files are byte-identical. No download needed.
    """
    from ..apply import apply_diff
    from ..make import make_diff
    from ..synth import FineTune, LlamaShape, write_finetune, write_llama
    from ..verify import verify_model

    progress = False if quiet else None
    ctx = tempfile.TemporaryDirectory(prefix="orca-diff-demo-") if workdir is None else None
    root = Path(ctx.name if ctx else workdir)  # type: ignore[union-attr]
    root.mkdir(parents=True, exist_ok=True)
    try:
        shape = LlamaShape(vocab_size=32000, hidden_size=hidden, intermediate_size=hidden * 8 // 3 // 8 * 8,
                           num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                           num_key_value_heads=max(1, hidden // 64))
        t = time.perf_counter()
        base, target, diff, out = root / "base", root / "finetuned", root / "diff", root / "rebuilt"
        for p in (base, target, diff, out):
            if p.exists():
                raise click.UsageError(f"{p} exists; give an empty --workdir")
        write_llama(base, shape, dtype, seed=0, max_shard_bytes=32 << 20)
        write_finetune(target, shape, base_seed=0, dtype=dtype, ft=FineTune(add_pad_row=True), max_shard_bytes=32 << 20)
        click.echo(f"generated a LLaMA-shaped {dtype} base and fine-tune ({sum(f.stat().st_size for f in target.iterdir()) / 2**20:.1f} MiB) "
                   f"in {time.perf_counter() - t:.1f}s")
        t = time.perf_counter()
        m = make_diff(base, target, diff, base_name="demo-base", progress=progress)
        click.echo(f"make:   diff is {_human(m.payload_bytes)} = {100 * m.payload_bytes / m.target_bytes:.1f}% of the model "
                   f"({time.perf_counter() - t:.2f}s)")
        t = time.perf_counter()
        r = apply_diff(base, diff, out, progress=progress)
        click.echo(f"apply:  rebuilt {r.files} files, {_human(r.bytes_written)} ({time.perf_counter() - t:.2f}s)")
        t = time.perf_counter()
        report = verify_model(out, diff, progress=progress)
        click.echo(f"verify: {len(report.ok)} files byte-identical to the fine-tune ({time.perf_counter() - t:.2f}s)")
        click.echo(f"demo OK{'' if ctx else f'; files kept in {root}'}")
    finally:
        if ctx:
            ctx.cleanup()


def _register_topic_commands() -> None:
    """Add the commands that live beside their topic (imported here, after ``cli`` exists)."""
    from . import fingerprint, hub, legacy, train

    for module in (hub, fingerprint, train, legacy):
        for command in module.COMMANDS:
            cli.add_command(command)


_register_topic_commands()


def main() -> None:
    cli(prog_name="orca-diff")


if __name__ == "__main__":
    sys.exit(main())
