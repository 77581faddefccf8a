"""Low-rank predicted ANS frames (codec ``"ans"``, docs/format.md §3e).

Why: a real fine-tune's update is not independent noise everywhere. With a large vocabulary most
rows of the embedding / LM head never see their token in the data; their gradient is the
probability-weighted mean hidden state, the same direction for every such row, and AdamW turns it
into a rank-one move (the sign of a rank-one matrix is rank one). On SmolLM2's tied embedding a
rank-4 prediction of the update codes the residual 25 % smaller than the base alone predicts it.
Other tensors gain little or nothing, so the frame is chosen per chunk by measured size.

The frame carries, for the rows of a 2-D tensor its chunk touches, two integer factors ``a``
(rows x r) and ``b`` (r x cols), each int16 with one power-of-two scale, and then a dense or
sparse ANS frame of the target against the *predicted* bits

    P = round_to_dtype(float32(base) + float32(a @ b * 2^(ea + eb)))

The product is exact in float64 whatever the summation order or FMA use (|a|, |b| <= 2^15, r <= 32:
every partial sum is an integer within +-2^35), so every BLAS and every machine computes the same P;
the remaining steps are single IEEE roundings. Elements whose base is not finite keep the base
bits. Everything read from the frame is checked before it sizes an allocation.
"""

from __future__ import annotations

import math
import struct
from typing import Callable

import numpy as np

from . import entropy
from .bits import cast_bits
from .errors import CorruptDiffError

MAGIC = b"ODR1"
MAX_RANK = 32
#: Ranks make tries (the estimate picks one; 0 = the plain frame).
RANKS = (1, 2, 4, 8, 16)
#: magic, rank, dtype code, exponent of a, exponent of b, columns, column of the first element, rows.
_HEAD = struct.Struct("<4sBBbbIII")
DTYPE_CODES = {"BF16": 0, "F16": 1}
_DTYPE_OF_CODE = {v: k for k, v in DTYPE_CODES.items()}
#: Chunks under this many elements, or with fewer rows or columns, are not tried: the factors and
#: the trials cost more than they can save.
MIN_ELEMS = 1 << 18
MIN_SIDE = 16
#: Nor are rows wider than this: a sample holds at least MIN_SIDE whole rows, so this bounds its
#: memory whatever the chunk size (the gains are in embeddings and LM heads, at most 16 Ki wide).
MAX_COLS = 1 << 16
#: Elements of the rank-1 gate's estimate, and of each rank's trial estimate (rows spread over
#: the chunk).
GATE_ELEMS = 1 << 15
SAMPLE_ELEMS = 1 << 19
#: Elements of predicted bits computed at a time (bounds the float64 scratch: 8 bytes each).
BLOCK_ELEMS = 1 << 20
#: A rank is kept only if its estimate is below this fraction of the plain frame's; the rank-1
#: gate asks for more (on SmolLM2 the MLP and q projections passed a 1 % gate to gain 0.4 %, at
#: 6x their plain encoding time).
MIN_GAIN = 0.99
GATE_GAIN = 0.98


def _use_kernel(pure: bool | None) -> bool:
    """Whether the C kernel computes the prediction: the extension is in use (entropy's rule,
    ORCA_DIFF_PURE_PYTHON included) and was built with it (plain IEEE float arithmetic)."""
    return entropy._use_c(pure) and hasattr(entropy._c, "lowrank_predict")


def is_frame(payload: bytes | memoryview | np.ndarray) -> bool:
    return bytes(memoryview(payload)[:4]) == MAGIC


def _as_f32(bits: np.ndarray, dtype: str) -> np.ndarray:
    """16-bit patterns as float32 values (exact: format §5's cast)."""
    return cast_bits(bits, dtype, "F32").view(np.float32)


def _finite(bits: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "BF16":
        return (bits & np.uint16(0x7F80)) != np.uint16(0x7F80)
    return (bits & np.uint16(0x7C00)) != np.uint16(0x7C00)


def _to_bits(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values -> 16-bit patterns, round to nearest even (format §5's cast)."""
    return cast_bits(x.view(np.uint32), "F32", dtype)


def predict(pred: np.ndarray, dtype: str, a: np.ndarray, b: np.ndarray, ea: int, eb: int, col0: int,
            cols: int, block_elems: int = BLOCK_ELEMS, pure: bool | None = None) -> np.ndarray:
    """The predicted bits of a chunk: ``pred`` (the base's bits in the target dtype, one per
    element, the first at column ``col0`` of a ``cols``-wide row) moved by ``a @ b * 2^(ea+eb)``,
    computed ``block_elems`` (rounded to whole rows) at a time: the bits do not depend on it. The
    C kernel (``orca_diff._entropy``) gives the same bits 2-35x faster (scripts/lowrank_speed.py);
    ``pure`` (or ORCA_DIFF_PURE_PYTHON=1) forces numpy."""
    n = pred.size
    if _use_kernel(pure):
        out = np.empty(n, dtype=np.uint16)
        entropy._c.lowrank_predict(out, np.ascontiguousarray(pred, dtype=np.uint16), np.ascontiguousarray(a, dtype="<i2"),
                           np.ascontiguousarray(b, dtype="<i2"), a.shape[1], ea, eb, col0, cols, DTYPE_CODES[dtype])
        return out
    out = pred.copy()
    af = a.astype(np.float64)
    bf = b.astype(np.float64)
    step = max(1, block_elems // cols)
    for i0 in range(0, a.shape[0], step):
        i1 = min(i0 + step, a.shape[0])
        m = (af[i0:i1] @ bf).reshape(-1)  # exact: integers within +-2^35
        lo = i0 * cols - col0  # chunk element of the block's first matrix entry
        s0, s1 = max(lo, 0), min(lo + m.size, n)
        if s0 >= s1:
            continue
        out[s0:s1] = _moved(pred[s0:s1], dtype, m[s0 - lo:s1 - lo], ea + eb)
    return out


def _quantize(x: np.ndarray) -> tuple[np.ndarray, int]:
    """float factor -> (int16 values, exponent e) with x ~ values * 2^e and |values| < 2^15."""
    peak = float(np.max(np.abs(x))) if x.size else 0.0
    if not peak or not math.isfinite(peak):
        return np.zeros(x.shape, dtype=np.int16), 0
    e = math.frexp(peak)[1] - 15  # peak < 2^(e + 15)
    e = min(max(e, -100), 100)
    q = np.clip(np.rint(np.ldexp(x.astype(np.float64), -e)), -32767, 32767).astype(np.int16)
    return q, e


def _updates(target: np.ndarray, pred: np.ndarray, dtype: str) -> np.ndarray:
    """target - base in float32, 0 where either side is not finite."""
    with np.errstate(invalid="ignore", over="ignore"):  # inf - inf, or a difference past float32's range
        d = _as_f32(target, dtype) - _as_f32(pred, dtype)
    if not np.isfinite(d).all():
        d[~np.isfinite(d)] = 0
    return d


def _runs(rows: np.ndarray, cols: int, col0: int, n: int) -> list[tuple[int, int, int]]:
    """The chunk's elements of the sorted rows ``rows`` x cols as slices: (first row's place in
    ``rows`` x cols, chunk start, chunk end) per run of consecutive rows, clipped to the chunk.
    Slices instead of an index per element: the samples and blocks are a few runs of rows."""
    if rows.size == 0:
        return []
    cut = np.flatnonzero(np.diff(rows) != 1) + 1
    out = []
    for lo, hi in zip(np.concatenate(([0], cut)).tolist(), np.concatenate((cut, [rows.size])).tolist()):
        start, end = int(rows[lo]) * cols - col0, (int(rows[hi - 1]) + 1) * cols - col0
        a, b = max(start, 0), min(end, n)
        if a < b:
            out.append((lo * cols + a - start, a, b))
    return out


def _row_values(x: np.ndarray, runs: list[tuple[int, int, int]]) -> np.ndarray:
    """The elements of ``x`` inside the chunk, run after run (row-major order)."""
    return np.concatenate([x[a:b] for _, a, b in runs]) if runs else x[:0]


def _matrix(target: np.ndarray, pred: np.ndarray, dtype: str, rows: np.ndarray, cols: int, col0: int) -> np.ndarray:
    """The updates of the given rows (sorted) as a (len(rows), cols) matrix, zero outside the chunk."""
    d = np.zeros(rows.size * cols, dtype=np.float32)
    for at, a, b in _runs(rows, cols, col0, target.size):
        d[at:at + b - a] = _updates(target[a:b], pred[a:b], dtype)
    return d.reshape(rows.size, cols)


def _right_factor(d: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """The top ``k`` right singular vectors of ``d`` (k x cols, orthonormal rows) by randomised
    subspace iteration (two power steps, 8 extra directions): a few thin products instead of a
    full SVD, which took 0.4 s on a 336 x 1536 sample. Rank 1 (the gate) by plain power iteration:
    six matrix-vector products."""
    if k == 1:
        x = rng.standard_normal(d.shape[1], dtype=np.float32)
        for _ in range(6):
            x = d.T @ (d @ x)
            x /= np.float32(np.linalg.norm(x) or 1.0)
        return x[None, :]
    y = d @ rng.standard_normal((d.shape[1], min(k + 8, d.shape[1])), dtype=np.float32)
    for _ in range(2):
        y = d @ (d.T @ np.linalg.qr(y)[0])
    q = np.linalg.qr(y)[0]
    return np.linalg.svd(q.T @ d, full_matrices=False)[2][:k].astype(np.float32)


def _left_factor(target: np.ndarray, pred: np.ndarray, dtype: str, v: np.ndarray, col0: int, cols: int) -> np.ndarray:
    """Every row's update projected on the right factor ``v`` (r x cols, orthonormal rows):
    (rows x r), computed BLOCK_ELEMS at a time so that make's memory does not grow with the chunk."""
    n = target.size
    rows = -(-(col0 + n) // cols)
    out = np.empty((rows, v.shape[0]), dtype=np.float32)
    step = max(1, BLOCK_ELEMS // cols)
    for i0 in range(0, rows, step):
        i1 = min(i0 + step, rows)
        out[i0:i1] = _matrix(target, pred, dtype, np.arange(i0, i1), cols, col0) @ v.T
    return out


def _sample_rows(rows: int, want: int) -> np.ndarray:
    """About ``want`` rows (at least MIN_SIDE) in 16 evenly spread runs (fine-tunes move rows
    unevenly: the vocabulary rows of frequent tokens come first)."""
    want = max(want, MIN_SIDE)
    if rows <= want:
        return np.arange(rows)
    run = max(1, want // 16)
    starts = np.linspace(0, rows - run, 16).astype(np.int64)
    return np.unique((starts[:, None] + np.arange(run)[None, :]).ravel())


def _moved(pred: np.ndarray, dtype: str, m: np.ndarray, e: int) -> np.ndarray:
    """pred moved by the exact integer products ``m`` (float64) times 2^e: the rounding steps of
    format §3e (signalling NaNs in the base and overflow to inf give defined bits, no warning)."""
    with np.errstate(all="ignore"):
        v = (m * math.ldexp(1.0, e)).astype(np.float32)
        return np.where(_finite(pred, dtype), _to_bits(_as_f32(pred, dtype) + v, dtype), pred)


def _best_rank(target: np.ndarray, pred: np.ndarray, dtype: str, rows: int, cols: int, col0: int,
               sample_elems: int, ranks: tuple[int, ...], min_gain: float) -> tuple[int, np.ndarray]:
    """(the rank of ``ranks`` whose estimate on a row sample of about ``sample_elems`` elements,
    scaled to the chunk and with the whole chunk's factors counted, is lowest and below
    ``min_gain`` x the plain frame's, or 0; the right factor). The estimates fall, then rise, with
    the rank: the first rise stops the search."""
    n = target.size
    sample = _sample_rows(rows, sample_elems // cols)
    ds = _matrix(target, pred, dtype, sample, cols, col0)
    k = min(max(ranks), *ds.shape)
    if not ds.any():
        return 0, np.zeros((0, cols), np.float32)
    v = _right_factor(ds, k, np.random.default_rng(0))
    a_s = ds @ v.T
    runs = _runs(sample, cols, col0, n)
    t_s, p_s = _row_values(target, runs), _row_values(pred, runs)
    scale = n / max(t_s.size, 1)
    best_bits, best = entropy.estimated_bits(t_s, p_s, dtype) * scale * min_gain, 0
    for r in ranks:
        if r > k:
            break
        a, ea = _quantize(a_s[:, :r])
        b, eb = _quantize(v[:r])
        full = (a.astype(np.float64) @ b.astype(np.float64)).ravel()
        m = np.concatenate([full[at:at + e - s] for at, s, e in runs]) if runs else full[:0]
        bits = entropy.estimated_bits(t_s, _moved(p_s, dtype, m, ea + eb), dtype) * scale + 16 * r * (rows + cols)
        if bits < best_bits:
            best_bits, best = bits, r
        elif r >= 2:
            break
    return best, v


def encode(target: np.ndarray, pred: np.ndarray, dtype: str, cols: int, col0: int,
           inner: Callable[[np.ndarray, np.ndarray], bytes]) -> bytes | None:
    """The low-rank frame of one chunk (16-bit elements as uint16), or None when no rank is
    estimated to pay (the caller measures a frame it gets against the plain one all the same).

    A gate first: rank 1 on a sample of GATE_ELEMS elements must gain 2 % (a few ms; most tensors
    stop here).
    Then the right factor from a sample of rows (SAMPLE_ELEMS elements), each rank scored on that
    sample, and only the winner computed for the whole chunk (its left factor: every row's update
    projected on the right factor)."""
    n = target.size
    rows = -(-(col0 + n) // cols) if cols > 0 else 0
    if dtype not in DTYPE_CODES or n < MIN_ELEMS or not MIN_SIDE <= cols <= MAX_COLS or rows < MIN_SIDE:
        return None
    if not _best_rank(target, pred, dtype, rows, cols, col0, GATE_ELEMS, (1,), GATE_GAIN)[0]:
        return None
    r, v = _best_rank(target, pred, dtype, rows, cols, col0, SAMPLE_ELEMS, RANKS, MIN_GAIN)
    if not r:
        return None
    b, eb = _quantize(v[:r])
    a, ea = _quantize(_left_factor(target, pred, dtype, v[:r], col0, cols))
    moved = predict(pred, dtype, a, b, ea, eb, col0, cols)
    head = _HEAD.pack(MAGIC, r, DTYPE_CODES[dtype], ea, eb, cols, col0, rows)
    return head + a.astype("<i2").tobytes() + b.astype("<i2").tobytes() + inner(target, moved)


def decode(payload: bytes | memoryview | np.ndarray, pred: np.ndarray, itemsize: int, size: int, where: str,
           inner: Callable[[memoryview, np.ndarray], np.ndarray]) -> np.ndarray:
    """Inverse of :func:`encode`: the chunk's ``size`` target bytes (uint8) from the frame and the
    base's bits in the target dtype; ``inner`` decodes the ANS frame that follows the factors."""
    buf = memoryview(payload).cast("B") if not isinstance(payload, np.ndarray) else memoryview(payload.reshape(-1))
    if len(buf) < _HEAD.size:
        raise CorruptDiffError(f"{where}: low-rank frame truncated; the diff is corrupt, download it again")
    magic, r, code, ea, eb, cols, col0, rows = _HEAD.unpack_from(buf, 0)
    n = size // itemsize
    if (magic != MAGIC or itemsize != 2 or size % 2 or code not in _DTYPE_OF_CODE or not 1 <= r <= MAX_RANK
            or not 1 <= cols or col0 >= cols or rows != -(-(col0 + n) // cols)
            or not -100 <= ea <= 100 or not -100 <= eb <= 100):
        raise CorruptDiffError(f"{where}: low-rank frame header is invalid for a chunk of {n} 16-bit elements; "
                               "the diff is corrupt, download it again")
    factors = 2 * r * (rows + cols)
    if len(buf) < _HEAD.size + factors:
        raise CorruptDiffError(f"{where}: low-rank frame truncated (its factors need {factors} bytes); "
                               "the diff is corrupt, download it again")
    if pred.size != n:
        raise ValueError("a low-rank chunk needs the base prediction of its size")
    at = _HEAD.size
    a = np.frombuffer(buf[at:at + 2 * r * rows], dtype="<i2").reshape(rows, r)
    b = np.frombuffer(buf[at + 2 * r * rows:at + factors], dtype="<i2").reshape(r, cols)
    body = buf[at + factors:]
    moved = predict(pred.view(np.uint16), _DTYPE_OF_CODE[code], a, b, ea, eb, col0, cols)
    return inner(body, moved)


__all__ = ["MAGIC", "MAX_RANK", "RANKS", "is_frame", "predict", "encode", "decode"]
