#!/usr/bin/env python
"""Rebuild a fine-tuned model from a diff: download what is missing, check, apply, verify.

    python scripts/rebuild.py --diff orca --out orca-13b                    # base from the manifest
    python scripts/rebuild.py --base llama-13b --diff orca --out orca-13b
    python scripts/rebuild.py --base /data/llama-13b-hf --diff my-org/orca-13b-diff@v1 --out orca-13b

--base and --diff take a local folder, a catalog name or a Hub repo id[@revision]. The base is
checked tensor by tensor before anything is written, and every rebuilt file is checked against
the sha256 the manifest records. Same as `orca-diff apply`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
    import orca_diff  # noqa: F401
except ImportError:  # running from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orca_diff.apply import apply_diff
from orca_diff.errors import OrcaDiffError
from orca_diff.format import load_manifest
from orca_diff.hub.resolve import resolve_base, resolve_diff


def rebuild(diff: str, out: str, base: str | None = None, quiet: bool = False, force: bool = False):
    """Resolve ``diff`` and ``base``, rebuild into ``out``; returns apply's report."""
    progress = False if quiet else None
    diff_dir = resolve_diff(diff, progress=progress)
    base_dir = resolve_base(base, load_manifest(diff_dir), progress=progress)
    return apply_diff(base_dir, diff_dir, out, force=force, progress=progress)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--diff", required=True, help="diff: folder, catalog name or Hub repo id[@revision]")
    ap.add_argument("--base", help="base: folder, catalog name or Hub repo id[@revision] (default: the diff's)")
    ap.add_argument("--out", required=True, help="folder to write the rebuilt model to")
    ap.add_argument("--force", action="store_true", help="replace --out if it exists and is not empty")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    try:
        report = rebuild(args.diff, args.out, args.base, args.quiet, args.force)
    except OrcaDiffError as exc:
        print(f"rebuild: error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(f"rebuilt {report.out}: {report.files} files, every file matches its sha256")
    return 0


if __name__ == "__main__":
    sys.exit(main())
