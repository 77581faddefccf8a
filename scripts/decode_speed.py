"""Single-thread CPU-time throughput of the `ans` decoder (C path) on dense bf16 chunks.

Why: the decoder's speed goal (issue 23: >= 1.6 GB/s per core) is about the coder alone, so this
times `entropy.decode` on frames already in memory, by process CPU time (time.process_time) over
repeated decodes, and prints GB/s of decoded output. The pair is synthetic (orca_diff.synth's
fine-tune model: Adam-like drift + walk on N(0, 0.02) weights, cast to bf16), which is what the
CPU allows in minutes; pass --base/--target safetensors files to time a real pair's tensors
(--chunks whole chunks spread evenly over their same-name 2-D bf16/fp16 tensors).

    python scripts/decode_speed.py                      # synthetic, 4 chunks of 4 MiB
    python scripts/decode_speed.py --base B.safetensors --target T.safetensors
"""

from __future__ import annotations

import argparse
import os
import time

# single thread: idle BLAS worker threads spin and would count in the process's CPU time
for _v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import numpy as np

from orca_diff import entropy
from orca_diff.bits import cast_bits, float_to_bits
from orca_diff.synth import FineTune, finetune_weights


def synthetic_chunks(chunks: int, chunk_bytes: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """(target, base) uint8 pairs of bf16 elements from the synthetic fine-tune model."""
    rng = np.random.default_rng(seed)
    out = []
    for c in range(chunks):
        w = (rng.standard_normal(chunk_bytes // 2, dtype=np.float32) * np.float32(0.02))
        t = finetune_weights(f"model.layers.{c}.mlp.up_proj.weight", w, FineTune(seed=seed))
        b16 = cast_bits(float_to_bits(w, "F32"), "F32", "BF16")
        t16 = cast_bits(float_to_bits(t, "F32"), "F32", "BF16")
        out.append((np.ascontiguousarray(t16).view(np.uint8), np.ascontiguousarray(b16).view(np.uint8)))
    return out


def _safetensors_2d(path: str) -> dict[str, np.ndarray]:
    """The 2-byte-float 2-D tensors of a safetensors file as uint8 views of a memory map (read here:
    safetensors.numpy cannot hold bf16)."""
    import json
    import struct

    with open(path, "rb") as fh:
        (hlen,) = struct.unpack("<Q", fh.read(8))
        head = json.loads(fh.read(hlen))
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + hlen)
    out = {}
    for name, meta in head.items():
        if name == "__metadata__" or meta["dtype"] not in ("BF16", "F16") or len(meta["shape"]) != 2:
            continue
        a, b = meta["data_offsets"]
        out[name] = data[a:b]
    return out


def real_chunks(base: str, target: str, chunk_bytes: int, chunks: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(target, base) uint8 chunks of the same-name bf16/fp16 2-D tensors of two safetensors files:
    ``chunks`` whole chunks spread evenly over all of them (in name order), so that embeddings,
    attention and MLP weights all count."""
    bt, tt = _safetensors_2d(base), _safetensors_2d(target)
    cand = [(name, o) for name in sorted(tt) if name in bt and bt[name].size == tt[name].size
            for o in range(0, tt[name].size - chunk_bytes + 1, chunk_bytes)]
    if not cand:
        raise SystemExit("no same-name 2-D bf16/fp16 tensor of a whole chunk in both files")
    pick = [cand[(2 * i + 1) * len(cand) // (2 * chunks)] for i in range(min(chunks, len(cand)))]
    return [(np.array(tt[name][o:o + chunk_bytes]), np.array(bt[name][o:o + chunk_bytes])) for name, o in pick]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--chunk-mib", type=float, default=4.0)
    ap.add_argument("--seconds", type=float, default=3.0, help="CPU seconds per measurement")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--base")
    ap.add_argument("--target")
    a = ap.parse_args()
    cb = int(a.chunk_mib * (1 << 20)) & ~1
    pairs = (real_chunks(a.base, a.target, cb, a.chunks) if a.base else synthetic_chunks(a.chunks, cb))
    frames = [(entropy.encode(t, b, 2, "BF16"), b, t) for t, b in pairs]
    for f, b, t in frames:  # the decoder is exact or the figure is meaningless
        assert np.array_equal(entropy.decode(f, b, 2, t.size), t)
    raw = sum(t.size for _, _, t in frames)
    coded = sum(len(f) for f, _, _ in frames)
    print(f"{len(frames)} chunks, {raw / 1e6:.1f} MB, coded {100 * coded / raw:.2f} %, C in use: {entropy.c_in_use()}")
    for _ in range(a.repeats):
        n, t0 = 0, time.process_time()
        while time.process_time() - t0 < a.seconds:
            for f, b, t in frames:
                entropy.decode(f, b, 2, t.size)
            n += 1
        dt = time.process_time() - t0
        print(f"decode {n * raw / dt / 1e9:.3f} GB/s per core (CPU time, {n} passes)")


if __name__ == "__main__":
    main()
