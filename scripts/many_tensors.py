"""Time and peak memory of `info` and `apply` on a diff of N one-element tensors (issue 20, item 6).

    python scripts/many_tensors.py 20000 /tmp/many        # make the pair and the diff, then measure
    python scripts/many_tensors.py 20000 /tmp/many --no-make

A mixture-of-experts model is many small tensors; this is the extreme case (every tensor one F16
element), which measures the per-tensor cost of parsing and rebuilding. Peak RSS is the child's
(``/usr/bin/time -f %M``). Prints one line per command; compare N and 5N to see the growth.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def _run(args: list[str]) -> tuple[int, float, float]:
    t = time.perf_counter()
    r = subprocess.run(["/usr/bin/time", "-f", "%M", sys.executable, "-m", "orca_diff.cli", *args],
                       capture_output=True, text=True)
    rss = int(r.stderr.strip().splitlines()[-1]) / 1024
    return r.returncode, time.perf_counter() - t, rss


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("n", type=int)
    ap.add_argument("root", type=Path)
    ap.add_argument("--no-make", action="store_true")
    a = ap.parse_args()
    base, target, diff, out = (a.root / x for x in ("base", "target", "diff", "out"))
    if not a.no_make:
        from safetensors.numpy import save_file

        shutil.rmtree(a.root, ignore_errors=True)
        base.mkdir(parents=True)
        target.mkdir()
        rng = np.random.default_rng(0)
        tensors = {f"model.layers.{i // 1000}.mlp.experts.{i % 1000}.w": rng.standard_normal(1).astype(np.float16)
                   for i in range(a.n)}
        save_file(tensors, str(base / "model.safetensors"))
        save_file({k: v + np.float16(0.001) for k, v in tensors.items()}, str(target / "model.safetensors"))
        (target / "config.json").write_text("{}")
        rc, s, rss = _run(["make", "--base", str(base), "--target", str(target), "--out", str(diff), "-q"])
        print(f"make   n={a.n}: exit {rc}, {s:.1f} s, peak {rss:.0f} MiB")
    size = (diff / "orca-diff.json").stat().st_size / 2**20
    rc, s, rss = _run(["info", str(diff)])
    print(f"info   n={a.n} ({size:.1f} MiB manifest): exit {rc}, {s:.1f} s, peak {rss:.0f} MiB")
    shutil.rmtree(out, ignore_errors=True)
    rc, s, rss = _run(["apply", "--base", str(base), "--diff", str(diff), "--out", str(out), "-q"])
    print(f"apply  n={a.n}: exit {rc}, {s:.1f} s, peak {rss:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
