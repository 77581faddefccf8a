#!/usr/bin/env python
"""How far could a richer context model take the ``ans`` codec on a real pair? Plug-in bounds.

The ``ans`` codec (docs/format.md section 3b) codes each ulp-delta symbol as a token plus raw
bits, with one table per context = the base element's exponent bucket x "the previous token was
0". This script measures, per tensor and summed, the plug-in conditional entropy of the tokens
(+ the raw bits as coded) under that context and under richer ones that a decoder could also
use (everything it already has: the base element's bits, and the tokens decoded before it):

* the previous token's magnitude class (4, 8 or 12 levels) instead of the zero flag;
* the larger, or the mean, of the two previous tokens' classes;
* the token of the element one row up (same column of a 2-D tensor) with the previous one;
* the base element's top 1-2 mantissa bits, or its sign, on top of the shipped context.
* the expected size of the element's change, sent as side information: per row and per column
  of a 2-D tensor the mean |target - base| (values, not ulps), their product over the tensor's
  mean as a rank-1 scale, in 16 classes of half a power of two, on top of the shipped context
  (the shipped context knows the ulp, this the value; AdamW's per-row and per-column spread is
  what it could catch; its side information, 1 byte per row and column, is not counted).

Plug-in entropies of many contexts are optimistic (they ignore the cost of the tables, printed
apart as an estimate of 1.2 bytes per used entry), so a context that does not beat the shipped
one here cannot beat it in a coder. 16-bit float tensors of at least 64 Ki elements with a
same-name, same-shape base tensor are measured (bf16 and fp16 pairs).

    python scripts/context_bounds.py /tmp/minilm/fp16/base /tmp/minilm/fp16/target
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from orca_diff.bits import ulp_delta  # noqa: E402
from orca_diff.containers import open_model  # noqa: E402
from orca_diff.entropy import MAX_BUCKETS, exponent_window, tokenize  # noqa: E402
from orca_diff.lowrank import _updates  # noqa: E402  (target - base in float32, 0 where not finite)

EXPONENT = {"BF16": (7, 8), "F16": (10, 5)}  # (shift, bits)
ALPHA = 64  # tokens of a 16-bit symbol


def magnitude_class(tok: np.ndarray) -> np.ndarray:
    """0 for token 0, 1-4 for tokens 1-15 by bit length, then one class per power of two."""
    t = tok.astype(np.int64)
    small = np.where(t == 0, 0, np.floor(np.log2(np.maximum(t, 1))).astype(np.int64) + 1)
    return np.where(t < 16, small, 5 + (t - 16) // 4)


def shifted(x: np.ndarray, k: int) -> np.ndarray:
    """x moved k places later (the value k elements before), zero-filled."""
    out = np.zeros_like(x)
    out[k:] = x[:-k]
    return out


def scale_class(target_u: np.ndarray, base_u: np.ndarray, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """Per element of a 2-D tensor, 0-15: log2(row mean |change| x column mean |change| / mean
    |change|) in half powers of two around the tensor's mean (0 everywhere for other shapes)."""
    if len(shape) != 2:
        return np.zeros(base_u.size, dtype=np.int64)
    d = np.abs(_updates(target_u, base_u, dtype)).astype(np.float64).reshape(shape)
    tiny = 1e-30
    r, c, m = d.mean(axis=1) + tiny, d.mean(axis=0) + tiny, d.mean() + tiny
    rel = np.log2(r / m)[:, None] + np.log2(c / m)[None, :]
    return np.clip(np.floor(2 * rel) + 8, 0, 15).astype(np.int64).ravel()


def contexts(tok: np.ndarray, base_u: np.ndarray, dtype: str, shape: tuple[int, ...],
             target_u: np.ndarray | None = None) -> dict[str, np.ndarray]:
    shift, bits = EXPONENT[dtype]
    e = ((base_u >> shift) & ((1 << bits) - 1)).astype(np.int64)
    bucket = np.clip(e - exponent_window(np.bincount(e, minlength=1 << bits)), 0, MAX_BUCKETS - 1)
    prev_tok = shifted(tok.astype(np.int64), 1)
    pc, pc2 = magnitude_class(prev_tok), magnitude_class(shifted(tok.astype(np.int64), 2))
    pz = (prev_tok == 0).astype(np.int64)
    cols = shape[-1] if len(shape) == 2 else 1
    ac = magnitude_class(shifted(tok.astype(np.int64), cols)) if cols > 1 and tok.size > cols else pc
    mant = 7 if dtype == "BF16" else 10
    top1 = ((base_u >> (mant - 1)) & 1).astype(np.int64)
    top2 = ((base_u >> (mant - 2)) & 3).astype(np.int64)
    sign = (base_u >> 15).astype(np.int64)
    shipped = bucket * 2 + pz
    return {
        "order 0 (tokens + raw bits)": np.zeros_like(bucket),
        "exponent bucket": bucket,
        "exponent x prev token is 0 (shipped)": shipped,
        "exponent x prev class (4)": bucket * 4 + np.minimum(pc, 3),
        "exponent x prev class (8)": bucket * 8 + np.minimum(pc, 7),
        "exponent x prev class (12)": bucket * 12 + np.minimum(pc, 11),
        "exponent x max class of 2 prev (8)": bucket * 8 + np.minimum(np.maximum(pc, pc2), 7),
        "exponent x mean class of 2 prev (8)": bucket * 8 + np.minimum((pc + pc2 + 1) // 2, 7),
        "exponent x prev class (4) x row above (4)": (bucket * 4 + np.minimum(pc, 3)) * 4 + np.minimum(ac, 3),
        "shipped x base's top mantissa bit": shipped * 2 + top1,
        "shipped x base's top 2 mantissa bits": shipped * 4 + top2,
        "shipped x base's sign": shipped * 2 + sign,
        **({} if target_u is None else {
            "shipped x row/col change scale (side info)":
                shipped * 16 + scale_class(target_u, base_u, dtype, shape)}),
    }


def plug_in_bits(ctx: np.ndarray, tok: np.ndarray) -> tuple[float, int]:
    """(sum over elements of -log2 p(token | context) with p the empirical frequencies, used entries)."""
    counts = np.bincount(ctx * ALPHA + tok, minlength=(int(ctx.max()) + 1) * ALPHA).reshape(-1, ALPHA)
    counts = counts.astype(np.float64)
    totals = counts.sum(axis=1, keepdims=True)
    p = np.where(counts > 0, counts / np.maximum(totals, 1), 1.0)
    return float(-(counts * np.log2(p)).sum()), int((counts > 0).sum())


def measure(base_dir: Path, target_dir: Path) -> dict:
    base, target = open_model(base_dir), open_model(target_dir)
    bits: dict[str, float] = {}
    entries: dict[str, int] = {}
    elements = raw_bits = tensors = 0
    try:
        for name, t in target.tensors.items():
            b = base.tensors.get(name)
            if (b is None or t.dtype not in EXPONENT or b.dtype != t.dtype or b.shape != t.shape
                    or t.numel < 1 << 16):
                continue
            tu = target.read(name).view(np.uint16)
            bu = base.read(name).view(np.uint16)
            tok, nb, _ = tokenize(ulp_delta(tu, bu))
            for label, ctx in contexts(tok, bu, t.dtype, t.shape, tu).items():
                s, used = plug_in_bits(ctx, tok.astype(np.int64))
                bits[label] = bits.get(label, 0.0) + s
                entries[label] = entries.get(label, 0) + used
            elements += tu.size
            raw_bits += int(nb.sum())
            tensors += 1
    finally:
        base.close()
        target.close()
    raw_bytes = 2 * elements
    return {"tensors": tensors, "elements": elements, "raw_bytes": raw_bytes,
            "contexts": {k: {"percent": 100 * (v + raw_bits) / 8 / raw_bytes,
                             "table_percent_estimate": 100 * 1.2 * entries[k] / raw_bytes} for k, v in bits.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("base", type=Path)
    ap.add_argument("target", type=Path)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    r = measure(args.base, args.target)
    print(f"{args.base} -> {args.target}: {r['tensors']} tensors, {r['raw_bytes'] / 1e6:.1f} MB of 16-bit weights")
    shipped = r["contexts"]["exponent x prev token is 0 (shipped)"]["percent"]
    print(f"  {'context of each token':<44} {'% raw':>7} {'vs shipped':>10} {'+ tables ~':>10}")
    for label, v in r["contexts"].items():
        print(f"  {label:<44} {v['percent']:6.2f}% {v['percent'] / shipped:10.3f} {v['table_percent_estimate']:9.2f}%")
    if args.json:
        args.json.write_text(json.dumps({"argv": sys.argv, **r}, indent=1) + "\n")


if __name__ == "__main__":
    main()
