#!/usr/bin/env python
"""Single-thread speed of the low-rank prediction (format §3e) that apply runs before decoding a
low-rank chunk: the C kernel (vector path, its scalar path with ORCA_DIFF_NO_SIMD=1) and numpy.

Why: the prediction is computed for every element of such a chunk, on top of the decoder; its
speed is the price a low-rank frame asks of apply. A 16 MiB chunk (8 Mi elements) of random base
bits and factors, for BF16 and F16, ranks 1, 4, 16 and two row widths; wall time of the call,
best of --repeats; every path's bits are compared with the first one's.

    python scripts/lowrank_speed.py
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

for _v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from orca_diff import lowrank  # noqa: E402


def best_seconds(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure(elems: int, repeats: int, numpy_too: bool) -> list[dict]:
    rng = np.random.default_rng(0)
    out = []
    for dtype in ("BF16", "F16"):
        f32 = (rng.standard_normal(elems).astype(np.float32) * np.float32(0.02))
        pred = (f32.view(np.uint32) >> 16).astype(np.uint16) if dtype == "BF16" else f32.astype(np.float16).view(np.uint16)
        for cols in (576, 4096):
            rows = -(-elems // cols)
            for r in (1, 4, 16):
                a = rng.integers(-32767, 32768, (rows, r)).astype(np.int16)
                b = rng.integers(-32767, 32768, (r, cols)).astype(np.int16)
                paths = {"C": (False, ""), "C scalar": (False, "1")}
                if numpy_too:
                    paths["numpy"] = (True, "")
                row = {"dtype": dtype, "cols": cols, "rank": r}
                ref = None
                for label, (pure, no_simd) in paths.items():
                    if no_simd:  # (the kernel reads any value, even an empty one, as "no SIMD")
                        os.environ["ORCA_DIFF_NO_SIMD"] = no_simd
                    else:
                        os.environ.pop("ORCA_DIFF_NO_SIMD", None)
                    got = lowrank.predict(pred, dtype, a, b, -30, -20, 0, cols, pure=pure)
                    if ref is None:
                        ref = got
                    elif not np.array_equal(got, ref):
                        raise SystemExit(f"{label} gives other bits than C ({dtype}, cols {cols}, rank {r})")
                    s = best_seconds(lambda: lowrank.predict(pred, dtype, a, b, -30, -20, 0, cols, pure=pure), repeats)
                    row[label] = 2 * elems / s / 1e9
                os.environ.pop("ORCA_DIFF_NO_SIMD", None)
                out.append(row)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--elems", type=int, default=8 << 20)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--numpy", action="store_true", help="also time the numpy reference (slow)")
    a = ap.parse_args()
    if not hasattr(lowrank.entropy._c, "lowrank_predict"):
        raise SystemExit("the C kernel is not built: `python setup.py build_ext --inplace`")
    rows = measure(a.elems, a.repeats, a.numpy)
    labels = [k for k in rows[0] if k not in ("dtype", "cols", "rank")]
    print(f"{a.elems} elements, single thread, best of {a.repeats}; GB/s of predicted bits")
    print(f"  {'dtype':<6}{'cols':>6}{'rank':>6}" + "".join(f"{k:>11}" for k in labels))
    for r in rows:
        print(f"  {r['dtype']:<6}{r['cols']:>6}{r['rank']:>6}" + "".join(f"{r[k]:>11.2f}" for k in labels))


if __name__ == "__main__":
    main()
