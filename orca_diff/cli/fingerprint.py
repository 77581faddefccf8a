"""``orca-diff fingerprint``: identify a base by its weights, whatever form it is held in."""

from __future__ import annotations

import json

import click

from ..errors import OrcaDiffError

_FORMS = {"SafetensorsModel": "HF safetensors", "TorchBinModel": "HF .bin (torch)",
          "MetaCheckpoint": "Meta original (params.json + consolidated.*.pth)"}


@click.command("fingerprint", context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("base")
@click.option("--json", "as_json", is_flag=True, help="Print every tensor's dtype, shape and digest as JSON.")
@click.option("--digest", "algo", type=click.Choice(["blake3", "sha256"]), default="blake3", show_default=True,
              help="Tensor digest: blake3 for diffs of format version 2 (orca-diff >= 0.2), sha256 for version 1.")
@click.option("--threads", type=click.IntRange(1, 512), default=None,
              help="Worker threads (default: all cores, or $ORCA_DIFF_THREADS).")
@click.option("--model", "whole", is_flag=True, help="Print the model digest instead: the OpenSSF model-signing "
              "root digest over every file of the folder, the identity apply, verify and info print for a model.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def fingerprint(base: str, as_json: bool, algo: str, threads: int | None, quiet: bool, whole: bool) -> None:
    """Print the base fingerprint of a BASE model folder: a short digest over the digests of its
    tensors in HF canonical form (HF names, dtype and bytes as stored), computed from its bytes.
    With --model, print the model digest of the folder (every file's bytes) instead.

    The same weights give the same fingerprint as HF safetensors, HF .bin shards or Meta's
    original consolidated.*.pth (converted on the fly, as transformers does); a different
    conversion, dtype or download does not. Compare it with the base fingerprint a diff prints
    (`orca-diff info DIFF`). Definition: docs/bases.md.

    \b
    BASE is a folder, a catalog name or a Hub repo id[@rev] (its weights are fetched into the HF
    cache).

    \b
    Examples:
      orca-diff fingerprint ~/llama/7B
      orca-diff fingerprint meta-llama/Llama-2-13b-hf
      orca-diff fingerprint ~/llama-7b-hf --json > base-hashes.json
    """
    from ..fingerprint import base_fingerprint, base_fingerprint_full, hash_model
    from ..pipeline import default_threads
    from ..containers import open_model

    from ..hub.resolve import resolve_model_spec

    folder = resolve_model_spec(base, "base", progress=False if quiet else None)
    if whole:
        from ..identity import folder_sha256s, model_digest

        if not folder.is_dir():
            raise OrcaDiffError(f"{base}: --model needs the model's folder (the digest covers every file of it)")
        shas = folder_sha256s(folder)
        digest = model_digest(shas)
        click.echo(json.dumps({"model_digest": digest, "files": shas}, indent=2) if as_json else digest)
        return
    model = open_model(folder)
    try:
        if not model.tensors:
            raise OrcaDiffError(f"{base}: the model has no tensors to fingerprint")
        hashes = hash_model(model, threads or default_threads(), progress=False if quiet else None, algo=algo)
        form = _FORMS.get(type(model).__name__, type(model).__name__)
    finally:
        model.close()
    short = base_fingerprint(hashes)
    if as_json:
        doc = {"fingerprint": short, "base_fingerprint": short, "full": base_fingerprint_full(hashes), "digest": algo,
               "form": form,
               "tensors": {n: {"dtype": d, "shape": list(s), algo: h} for n, (d, s, h) in hashes.items()}}
        click.echo(json.dumps(doc, indent=2))
    else:
        click.echo(short)


COMMANDS = [fingerprint]
