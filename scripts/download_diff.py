#!/usr/bin/env python
"""Download an orca-diff diff from the Hugging Face Hub and print its local folder.

    python scripts/download_diff.py orca                      # a catalog name
    python scripts/download_diff.py my-org/orca-13b-diff@v1   # a Hub repo id[@revision]

Fetches the manifest and exactly the payload files it lists into the standard HF cache, checks
each against the manifest's sha256, and prints the folder. Rerun after an interruption: finished
files are kept. Environment: HF_TOKEN, HF_ENDPOINT, HF_HOME, HF_HUB_OFFLINE (docs/hub.md).
Same as `orca-diff download NAME --kind diff`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
    import orca_diff  # noqa: F401
except ImportError:  # running from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orca_diff.errors import OrcaDiffError
from orca_diff.hub.resolve import resolve_diff


def download_diff(spec: str, quiet: bool = False) -> Path:
    """The local folder of the diff ``spec`` (path, catalog name or repo id[@rev])."""
    return resolve_diff(spec, progress=False if quiet else None)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("diff", help="catalog name (see `orca-diff catalog`) or Hub repo id org/name[@revision]")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    try:
        print(download_diff(args.diff, args.quiet))
    except OrcaDiffError as exc:
        print(f"download_diff: error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
