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
from .hub import hub_options
from .provenance import sign_options, verify_options

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
    Make a diff of a fine-tune, rebuild it, check it:
      orca-diff make --base meta-llama/Llama-2-13b-hf --target microsoft/Orca-2-13b --out orca-2-13b-diff
      orca-diff apply --diff orca-2-13b-diff --out orca-2-13b
      orca-diff verify --diff orca-2-13b-diff --model orca-2-13b
    Rebuild a historic release (a FastChat delta, catalog names; see `orca-diff catalog`):
      orca-diff apply --diff vicuna-7b-v1.1 --out vicuna-7b
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
@click.option("--share-identical-files", is_flag=True, help="Take every non-weight file that the base holds "
              "byte-identical (tokenizer.json, config.json...) from the base instead of shipping it (default: only "
              "tokenizer.model). The smallest diff, e.g. between a fine-tune's checkpoints; users' bases must then "
              "hold those files (apply checks their sha256).")
@click.option("--force", is_flag=True, help="Replace --out if it exists and is not empty.")
@threads_option
@stall_option
@quiet_option
@hub_options(revision=None)
@sign_options
@verify_options
def make(base: str, target: str, out: str, base_name: str | None, base_repo: str | None, base_revision: str | None,
         level: int | None, share_identical_files: bool, force: bool, threads: int | None, quiet: bool,
         token: str | None, cache_dir: str | None, sign=None, verify=None) -> None:
    """Make a diff that rebuilds TARGET from BASE. The diff never contains base weights.

    \b
    Examples:
      orca-diff make --base ~/llama-13b-hf --target ~/my-finetune --out my-finetune-diff --base-name llama-13b
      orca-diff make --base meta-llama/Llama-2-13b-hf --target microsoft/Orca-2-13b --out orca-2-13b-diff

    A target carrying model.sig (OpenSSF model signing) has it checked against its files (and
    verified with --verify-key...); --sign-key signs the target and attests the derivation
    (docs/format.md section 9).
    """
    from .. import api

    r = api.make(base, target, out, base_name=base_name, base_repo=base_repo, base_revision=base_revision,
                 level=level, threads=threads, force=force, progress=False if quiet else None, token=token,
                 cache_dir=cache_dir, sign=sign, verify_target=verify, share_identical_files=share_identical_files)
    for note in r.notes:
        click.echo(f"orca-diff: note: {shown(note)}", err=True)
    m = r.manifest
    click.echo(f"wrote {out}: {len(m.tensors)} tensors, {_human(m.payload_bytes)} of payload for "
               f"{_human(m.target_bytes)} of model ({100 * m.payload_bytes / max(1, m.target_bytes):.1f}%) in "
               f"{r.seconds:.1f}s; base fingerprint {m.base.fingerprint}; {_model_digest_of(m, 'read')}")


def _describe(digest: str) -> str:
    from ..identity import describe

    return describe(digest)


def _model_digest_of(m, how: str) -> str:
    """The model identity of a manifest's target files (sha256s ``how``: "read" by make, "recorded")."""
    from ..identity import describe, model_digest

    return describe(model_digest({f.path: f.sha256 for f in m.files})) + f", {how}"


def _diff_arg(diff: str) -> str:
    """``--diff DIR/orca-diff.json`` (or a link to it) means the diff folder DIR."""
    from ..api import _diff_arg as diff_arg

    return diff_arg(diff)


@cli.command()
@click.option("--base", default=None, help="Base: a folder, a catalog name (llama-13b) or a Hub repo id[@rev]. "
              "Default: the base named in the diff.")
@click.option("--diff", "diff", required=True, help="Diff: a folder, a catalog name (vicuna-7b-v1.1) or a Hub repo id[@rev].")
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
@hub_options(revision="Hub revision of --diff: a branch, a tag or a commit sha (the same as --diff NAME@REV).")
@click.option("--skip-base-check", is_flag=True, help="Legacy releases only: rebuild even when the evidence of the "
              "bytes (statistics, integrity sums, md5 lists) says the base is not the release's.")
@verify_options
def apply(base: str | None, diff: str, out: str, fmt: str, force: bool, keep_diff: bool, threads: int | None,
          quiet: bool, revision: str | None, token: str | None, cache_dir: str | None, skip_base_check: bool,
          verify=None) -> None:
    """Rebuild the fine-tuned model from a base and a diff, byte-identical to the publisher's files.

    The base is checked tensor by tensor BEFORE anything is written; an interrupted run resumes
    where it stopped when rerun, and a finished one is checked and left as it is.

    \b
    Examples:
      orca-diff apply --diff orca-2-13b-diff --out orca-2-13b
      orca-diff apply --base ~/llama-2-13b-hf --diff my-org/orca-2-13b-diff --revision v1 --out orca-2-13b
      orca-diff apply --diff vicuna-7b-v1.1 --out vicuna-7b
    """
    from .. import api

    r = api.apply(diff, out, base=base, revision=revision, format=fmt, force=force, threads=threads,
                  progress=False if quiet else None, token=token, cache_dir=cache_dir,
                  check_base=not skip_base_check, verify=verify, keep_diff=keep_diff)
    digest = f"{_describe(r.model_digest)}, measured" if r.model_digest else "no file measured"
    if r.already_done and r.format != "orca-diff":
        click.echo(f"{out} already holds this {r.format} release's model: {r.files} file{'s' if r.files != 1 else ''} "
                   f"hash to what the first run wrote (checked now; {digest}); nothing to do")
        return
    if r.already_done:
        signed = "; every file matches the publisher's signature" if verify is not None else ""
        click.echo(f"{out} already holds this model: {r.files} file{'s' if r.files != 1 else ''} byte-identical to "
                   f"the publisher's{signed} (checked now; {digest}); nothing to do")
        for note in r.notes:
            click.echo(f"note: {shown(note)}", err=True)
        return
    if r.format != "orca-diff":
        lines = [f"rebuilt {r.out} from a legacy {r.format} release: {r.files} files, {_human(r.bytes_written)} "
                 f"written in {r.seconds:.1f}s; {digest}"]
        click.echo("\n".join(lines + [f"check: {c}" for c in r.checks] + [f"note: {n}" for n in r.notes]))
        return
    for note in r.notes:
        click.echo(f"note: {note}", err=True)
    for line in r.provenance:
        click.echo(f"signed: {line}")
    resumed = f" ({r.resumed_files} already done)" if r.resumed_files else ""
    click.echo(f"rebuilt {r.out}: {r.files} files{resumed}, {_human(r.bytes_written)} written in {r.seconds:.1f}s; "
               f"{r.checks[0]}; {_describe(r.model_digest)}, measured as written; {r.checks[1]}")


@cli.command()
@click.option("--diff", "diff", required=True, help="The diff: a folder, a catalog name or a Hub repo id[@rev].")
@click.option("--base", default=None, help="Also check this base against the diff (folder, catalog name or repo id).")
@click.option("--model", default=None, help="Also check this model: a rebuilt folder, or a Hub repo id[@rev] "
              "(byte-identical files).")
@threads_option
@stall_option
@quiet_option
@hub_options(revision="Hub revision of --diff: a branch, a tag or a commit sha (the same as --diff NAME@REV).")
@verify_options
def verify(diff: str, base: str | None, model: str | None, threads: int | None, quiet: bool, revision: str | None,
           token: str | None, cache_dir: str | None, verify=None) -> None:
    """Check a diff's integrity, and optionally a base or a rebuilt model against it.

    The diff check decodes every chunk it can and proves the payloads rebuild the manifest's
    tensor and file records; chunks coded against the base are decoded only with --base (what
    was not checked is said). With --verify-key (or another verify option) the publisher's
    signatures are checked first and every file of --model is held to the signed sha256s.

    \b
    Examples:
      orca-diff verify --diff orca-2-13b-diff
      orca-diff verify --diff orca-2-13b-diff --base ~/llama-2-13b-hf --model orca-2-13b --verify-key publisher.pub
    """
    from .. import api

    r = api.verify(diff, base=base, model=model, revision=revision, threads=threads,
                   progress=False if quiet else None, token=token, cache_dir=cache_dir, verify=verify)
    m = r.manifest
    n = len(m.payloads)
    click.echo(f"diff OK: {n} payload file{'s' if n != 1 else ''}, {len(m.tensors)} tensors, checksums match")
    for line in r.signed:
        click.echo(f"signed: {line}")
    for note in r.notes:
        click.echo(f"note: {note}", err=True)
    if base:
        said = f"; base fingerprint {r.base_fingerprint} (measured)" if r.base_fingerprint else ""
        click.echo(f"base OK: the {r.base_tensors_checked} tensors the diff needs match their {m.digest_algo} "
                   f"(measured){said}")
    click.echo(f"diff OK: {r.rebuild_summary}")
    if model:
        signed = "; every file matches the publisher's signature" if r.signed else ""
        click.echo(f"model OK: {len(r.model_files)} files byte-identical to the publisher's{signed}; "
                   f"{_describe(r.model_digest)}, measured")
        for extra in r.model_extra_files:
            click.echo(f"note: {shown(extra)} is not part of the diff's model (left alone)")


@cli.command()
@click.argument("diff_arg", metavar="DIFF", required=False)
@click.option("--diff", "diff_opt", default=None, help="The diff (same as the DIFF argument).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@stall_option
@quiet_option
@hub_options(revision="Hub revision of DIFF: a branch, a tag or a commit sha (the same as DIFF@REV).")
def info(diff_arg: str | None, diff_opt: str | None, as_json: bool, quiet: bool, revision: str | None,
         token: str | None, cache_dir: str | None) -> None:
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
    from ..hub.options import hub_settings
    from ..identity import model_digest
    from ..signing import diff_signatures
    from .hub import with_revision

    spec = with_revision(_diff_arg(diff_arg or diff_opt), revision, "DIFF")  # type: ignore[arg-type]
    with hub_settings(token=token, cache_dir=cache_dir):
        diff_dir = resolve_diff(spec, progress=False if quiet else None, manifest_only=True)
    m = load_manifest(diff_dir)
    digest = model_digest({f.path: f.sha256 for f in m.files})
    signatures = diff_signatures(diff_dir)
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
        "target": {"model_digest": digest, "tensor_fingerprint": m.target_fingerprint,
                   "fingerprint": m.target_fingerprint, "files": [f.path for f in m.files], "bytes": m.target_bytes,
                   "tensors": len(m.tensors), "dtypes": dtypes},
        "signatures": signatures,
        "fingerprints": "recorded in the manifest, consistent with its tensor records; not measured "
                        "(measure with verify --model or fingerprint); model_digest: from the recorded file sha256s",
        "encodings": encodings, "dropped": m.dropped,
        "payload_bytes": m.payload_bytes, "ratio": m.payload_bytes / max(1, m.target_bytes),
    }
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    # every manifest string goes through shown(): control characters could draw a fake line
    from ..hub.catalog import is_repo_id
    from ..hub.options import is_commit_sha

    b = m.base
    where = " ".join(x for x in (
        (f"Hub repo {shown(b.repo)}" if is_repo_id(b.repo) else f"repo {shown(b.repo)!r} (NOT a valid Hub repo id: "
         "apply will need --base)") if b.repo else "",
        (f"at commit {shown(b.revision)}" if is_commit_sha(b.revision) else f"at {shown(b.revision)!r} (a branch or "
         "tag, not a commit: the base may have moved)") if b.revision else "",
        f"named {shown(b.name)!r}" if b.name else "",
        "" if b.repo else "(no Hub repo recorded: apply looks the name up in the catalog, else needs --base)") if x)
    kinds: dict[str, int] = {"safetensors": 0, "segments": 0, "blob": 0}
    for f in m.files:  # a "segments" file that is not a .bin (make's inline model.sig) is an "other" file
        kind = "blob" if f.kind == "segments" and not f.path.endswith(".bin") else f.kind
        kinds[kind] = kinds.get(kind, 0) + 1
    words = {"ulp": "delta-coded against the base", "xor": "xor-coded against the base", "raw": "stored whole"}
    click.echo(f"orca-diff diff, format version {m.format_version}, made by {shown(m.tool)}")
    click.echo(f"base:     {where}")
    click.echo(f"          fingerprint {shown(b.fingerprint)} (recorded); {len(m.needed_base_tensors())} of its tensors "
               "needed" + (f", {len(b.files)} file(s) copied from it" if b.files else ""))
    click.echo(f"rebuilds: {len(m.files)} files ({kinds['safetensors']} safetensors, {kinds['segments']} .bin, "
               f"{kinds['blob']} other), {_human(m.target_bytes)}, {len(m.tensors)} tensors "
               f"({', '.join(f'{n} {d}' for d, n in sorted(dtypes.items()))})")
    click.echo(f"          {_describe(digest)}, recorded; tensor fingerprint {shown(m.target_fingerprint)} (recorded)")
    from ..hub.resolve import _local

    if _local(spec) is None:
        click.echo("signed:   not fetched by info (apply/verify --verify-key PUB fetch and check the signatures first)")
    else:
        click.echo("signed:   " + (", ".join(signatures) + " (check with apply/verify --verify-key PUB)" if signatures
                                 else "no signature in this folder"))
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
