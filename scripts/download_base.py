#!/usr/bin/env python
"""Download a base model from the Hugging Face Hub and print its local folder.

    python scripts/download_base.py llama-13b                       # a catalog name
    python scripts/download_base.py huggyllama/llama-13b@main       # a Hub repo id[@revision]
    python scripts/download_base.py --for-diff orca                 # the base a diff names

Fetches one weight format only (safetensors, else pytorch_model*.bin, else Meta
consolidated.*.pth) with its index, config and tokenizer files into the standard HF cache, and
prints the folder. With --for-diff, the base is the one the diff's manifest names and the files
the diff copies from its base are fetched too. Gated bases (LLaMA-2) need an access request on
their Hub page and HF_TOKEN or `hf auth login`. Rerun after an interruption: finished files are
kept. Same as `orca-diff download NAME --kind base`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
    import orca_diff  # noqa: F401
except ImportError:  # running from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orca_diff.errors import OrcaDiffError, UsageError
from orca_diff.format import load_manifest
from orca_diff.hub.resolve import resolve_base, resolve_base_spec, resolve_diff


def download_base(spec: str | None, for_diff: str | None = None, quiet: bool = False) -> Path:
    """The local folder of a base: ``spec`` (path, catalog name or repo id[@rev]), or the base
    named by the diff ``for_diff`` when ``spec`` is None."""
    progress = False if quiet else None
    if for_diff is None:
        if spec is None:
            raise UsageError("name a base, or pass --for-diff DIFF")
        return resolve_base_spec(spec, progress=progress)
    manifest = load_manifest(resolve_diff(for_diff, progress=progress))
    return resolve_base(spec, manifest, progress=progress)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("base", nargs="?", help="catalog name (see `orca-diff catalog`) or Hub repo id org/name[@revision]")
    ap.add_argument("--for-diff", help="fetch the base this diff names (and the files it copies from it)")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    try:
        print(download_base(args.base, args.for_diff, args.quiet))
    except OrcaDiffError as exc:
        print(f"download_base: error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
