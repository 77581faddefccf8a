#!/usr/bin/env python
"""Old code against new code, same session: run one orca-diff command from two source trees,
alternating fresh processes, and report each tree's best wall time (the interpreter's start
included, as a user sees it). Alternation spreads the machine's load over both; the output
folder is deleted before every run (so each writes into memory freed just before).

    git worktree add /tmp/old <commit> && cp orca_diff/_entropy*.so /tmp/old/orca_diff/   # same C code
    python scripts/ab_timing.py --old /tmp/old --new . --runs 5 -- \\
        make --base B --target T --out /tmp/ab-out -q

The command must write to ``--out`` (it is removed before each run). An editable install of
orca-diff is bypassed: each run imports the tree it is given.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

RUNNER = """
import sys
tree = sys.argv.pop(1)
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f) and "editable" not in getattr(f, "__module__", "")]
sys.path.insert(0, tree)
import orca_diff.cli
assert orca_diff.cli.__file__.startswith(tree), orca_diff.cli.__file__
sys.argv[0] = "orca-diff"
orca_diff.cli.main()
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", type=Path, required=True, help="source tree of the old code")
    ap.add_argument("--new", type=Path, required=True, help="source tree of the new code")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("command", nargs=argparse.REMAINDER, help="-- then the orca-diff arguments")
    args = ap.parse_args()
    cmd = [a for a in args.command if a != "--"]
    if "--out" not in cmd:
        ap.error("the command needs --out (removed before each run)")
    out = Path(cmd[cmd.index("--out") + 1])
    times: dict[str, list[float]] = {"old": [], "new": []}
    for _ in range(args.runs):
        for label, tree in (("old", args.old), ("new", args.new)):
            shutil.rmtree(out, ignore_errors=True)
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, "-c", RUNNER, str(tree.resolve()), *cmd], capture_output=True,
                                  text=True)
            elapsed = time.perf_counter() - t0
            if proc.returncode:
                raise SystemExit(f"{label} ({tree}) failed:\n{proc.stderr[-2000:]}")
            times[label].append(elapsed)
    shutil.rmtree(out, ignore_errors=True)
    for label in ("old", "new"):
        runs = " ".join(f"{t:.2f}" for t in times[label])
        print(f"{label}: best {min(times[label]):.2f} s  (runs {runs})")
    print(f"new / old = {min(times['new']) / min(times['old']):.3f}")


if __name__ == "__main__":
    main()
