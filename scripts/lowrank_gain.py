#!/usr/bin/env python
"""What the low-rank frame (docs/format.md §3e) saves, tensor kind by tensor kind.

Every 2-D 16-bit float tensor of the target with a same-name, same-shape base tensor is coded in
16 MiB chunks as ``make`` codes it (``codec.encode_chunk`` with the ans codec), once without and
once with the chunk's grid (which lets it try the low-rank frame); the table gives both sizes as a
% of the raw bytes, grouped by the tensor's kind (the second-to-last name component), and how many
chunks chose the low-rank frame. Frames are checked to decode to the target::

    python scripts/lowrank_gain.py /tmp/smollm2/bf16/base /tmp/smollm2/bf16/target
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from orca_diff import lowrank  # noqa: E402
from orca_diff.codec import decode_chunk, encode_chunk  # noqa: E402
from orca_diff.containers import open_model  # noqa: E402

CHUNK = 16 << 20


def measure(base_dir: Path, target_dir: Path) -> dict[str, list[int]]:
    """{kind: [plain bytes, low-rank bytes, chunks, low-rank chunks, raw bytes]}."""
    base, target = open_model(base_dir), open_model(target_dir)
    agg: dict[str, list[int]] = {}
    try:
        for name, ti in target.tensors.items():
            bi = base.tensors.get(name)
            if len(ti.shape) != 2 or ti.dtype not in lowrank.DTYPE_CODES or bi is None or bi.dtype != ti.dtype \
                    or bi.shape != ti.shape:
                continue
            tr = target.read(name).view(np.uint8).reshape(-1)
            br = base.read(name).view(np.uint8).reshape(-1)
            a = agg.setdefault(name.split(".")[-2], [0, 0, 0, 0, 0])
            for st in range(0, tr.size, CHUNK):
                tc, bc = tr[st:st + CHUNK], br[st:st + CHUNK]
                plain = encode_chunk(tc, bc, 2, "ulp", "escape", codec="ans", dtype=ti.dtype)
                lr = encode_chunk(tc, bc, 2, "ulp", "escape", codec="ans", dtype=ti.dtype,
                                  grid=(ti.shape[1], st // 2 % ti.shape[1]))
                if decode_chunk(lr, bc, 2, "ulp", tc.size, "escape", codec="ans").tobytes() != tc.tobytes():
                    raise SystemExit(f"{name}: the frame does not decode to the target")
                a[0] += len(plain)
                a[1] += len(lr)
                a[2] += 1
                a[3] += lowrank.is_frame(lr)
                a[4] += tc.size
    finally:
        base.close()
        target.close()
    return agg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("base", type=Path)
    ap.add_argument("target", type=Path)
    args = ap.parse_args()
    agg = measure(args.base, args.target)
    print("| tensors | raw MB | plain ans | with low-rank | ratio | chunks low-rank |")
    print("|---|---|---|---|---|---|")
    total = [0, 0, 0]
    for kind, (p, lr, chunks, lr_chunks, raw) in agg.items():
        print(f"| {kind} | {raw / 1e6:.1f} | {100 * p / raw:.2f} % | {100 * lr / raw:.2f} % | {lr / p:.3f} | "
              f"{lr_chunks}/{chunks} |")
        total = [total[0] + p, total[1] + lr, total[2] + raw]
    if total[2]:
        print(f"| all | {total[2] / 1e6:.1f} | {100 * total[0] / total[2]:.2f} % | {100 * total[1] / total[2]:.2f} % | "
              f"{total[1] / total[0]:.3f} | |")


if __name__ == "__main__":
    main()
