"""Context-modelled rANS coding of ulp-delta chunks (codec ``"ans"``; docs/format.md §3b).

Why: zstd's Huffman cannot spend less than one bit on a symbol, and the dominant ulp delta 0
has probability 0.5-0.7; nor can it use the base, although the decoder has it. Here each delta
symbol ``s`` is cut into a token (``s`` itself below 16, else its bit length and the two bits
below the leading one: an alphabet of at most 256) plus raw low bits, and the token is coded by
static rANS with one frequency table per *context*: the base element's exponent field (the
ulp delta of a weight scales with 2^-exponent), optionally times "the previous token of this lane
was 0" (unchanged elements come in runs). Tables are chosen per chunk and stored in its frame.

The chunk's elements are split into ``L = lane_count(n)`` contiguous lanes, each with its own
rANS state; each group of 8 lanes shares one word stream, read (and written, in reverse) step by
step in lane order, so that

* the C extension (``orca_diff._entropy``) codes a group's 8 lanes per AVX2 instruction (the
  table entries gathered, the group's next words loaded at once and spread to the lanes that need
  one), or runs independent lanes back to back in scalar code, and
* this module's pure-numpy path codes every lane one step at a time as vector operations.

Lanes are contiguous (not interleaved) because the previous-element context needs the previous
element's token, which an interleaved split would decode in the same step: on the real MiniLM
pair the context on the element one lane-stride back gains nothing, the previous element 5 %.

Both produce identical bytes (the frame is a function of the data alone; tests check it). The
numpy path is the reference and the fallback when the extension is not built; it is 40-100x
slower (about 10-30 MB/s, docs/performance.md).
``ORCA_DIFF_PURE_PYTHON=1`` (or ``pure=True``) forces it.

Everything a decoder reads is untrusted: sizes, tables and lane counts are checked before any
allocation that depends on them, and a frame that decodes to anything but exactly the chunk's
elements (with the rANS states back at their initial value) is refused.
"""

from __future__ import annotations

import os
import struct

import numpy as np

from .bits import UINT_FOR_SIZE, ulp_delta, ulp_undelta
from .errors import CorruptDiffError

try:  # the optional C extension (setup.py); the numpy path below is the reference
    from . import _entropy as _c  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - depends on the build
    _c = None

MAGIC = b"ODA1"
PROB_BITS = 12
PROB_SCALE = 1 << PROB_BITS
STATE_LOW = 1 << 16  # rANS state interval [2^16, 2^32), 16-bit renormalisation
MAX_BUCKETS = 16
LANE_ELEMS = 8192
MAX_LANES = 1024
GROUP_LANES = 8  # lanes sharing one word stream
#: The frame header: magic, itemsize, flags, exponent shift and bits, window start, bucket
#: shift, element count, raw-bit bytes.
_HEAD = struct.Struct("<4sBBBBBBII")
#: (shift, bits) of the exponent field of each float dtype (F64: its top 8 exponent bits).
EXPONENT_FIELD = {"BF16": (7, 8), "F16": (10, 5), "F32": (23, 8), "F64": (55, 8)}
_DEFAULT_FIELD = {2: (7, 8), 4: (23, 8), 8: (55, 8)}


def c_available() -> bool:
    """Whether the compiled coder is importable (``pip install .`` with a C compiler)."""
    return _c is not None


def c_in_use() -> bool:
    """Whether decoding uses the C coder now (built, and not forced off by ORCA_DIFF_PURE_PYTHON)."""
    return _use_c(None)


def _use_c(pure: bool | None) -> bool:
    if pure is None:
        pure = os.environ.get("ORCA_DIFF_PURE_PYTHON", "") not in ("", "0")
    return _c is not None and not pure


def lane_count(n: int) -> int:
    """Lanes of a chunk of ``n`` elements: ``k = n // 8192`` (at least 1) while under 8; from 8 on,
    ``k`` rounded down to 8 (k < 16) or to a multiple of 16, at most 1024. Whole groups of 8 and
    16 lanes are what the AVX2 coders run (two interleaved groups of 8); a leftover lane would run
    in scalar code at a third of the speed (300 KB chunks: 18 lanes, 2 of them scalar)."""
    k = n // LANE_ELEMS
    if k < 8:
        return max(1, k)
    return 8 if k < 16 else min(k - k % 16, MAX_LANES)


def lane_starts(n: int, lanes: int) -> np.ndarray:
    """First element of each lane (and n at the end): lanes are contiguous runs of elements, and
    the first ``n % lanes`` lanes hold one more."""
    q, r = divmod(n, lanes)
    i = np.arange(lanes + 1, dtype=np.int64)
    return i * q + np.minimum(i, r)


def alphabet(itemsize: int) -> int:
    """Number of tokens for symbols of ``itemsize`` bytes: 64, 128 or 256."""
    return 16 + (8 * itemsize - 4) * 4


# --------------------------------------------------------------------------- tokens


def _bit_length(s: np.ndarray) -> np.ndarray:
    """Exact bit length of unsigned integers (0 for 0), as int64."""
    s64 = s.astype(np.uint64, copy=False)
    hi = (s64 >> np.uint64(32)).astype(np.float64)
    lo = (s64 & np.uint64(0xFFFFFFFF)).astype(np.float64)
    bl_hi = np.frexp(hi)[1].astype(np.int64)
    bl_lo = np.frexp(lo)[1].astype(np.int64)
    return np.where(bl_hi > 0, bl_hi + 32, bl_lo)


def _token_tables16() -> tuple[np.ndarray, np.ndarray]:
    return _tokenize_slow(np.arange(1 << 16, dtype=np.uint64))


def _tokenize_slow(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s = s.astype(np.uint64, copy=False)
    big = s >= np.uint64(16)
    m = np.maximum(_bit_length(s) - 1, 4)
    top = ((s >> (m - 2).astype(np.uint64)) & np.uint64(3)).astype(np.int64)
    tok = np.where(big, 16 + (m - 4) * 4 + top, (s & np.uint64(15)).astype(np.int64))
    nb = np.where(big, m - 2, 0)
    return tok.astype(np.uint8), nb.astype(np.uint8)


_TOK16: tuple[np.ndarray, np.ndarray] | None = None


def tokenize(sym: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """symbols (unsigned ints) -> (tokens uint8, raw-bit counts uint8, raw bits uint64).

    ``s < 16``: token ``s``, no raw bits. Else with ``m = bit_length(s) - 1``: token
    ``16 + 4(m - 4) + ((s >> (m - 2)) & 3)`` and the ``m - 2`` bits below those as raw bits."""
    global _TOK16
    if sym.dtype.itemsize <= 2:
        if _TOK16 is None:
            _TOK16 = _token_tables16()
        tok, nb = _TOK16[0][sym], _TOK16[1][sym]
    else:
        tok, nb = _tokenize_slow(sym)
    s64 = sym.astype(np.uint64)
    extra = s64 & ((np.uint64(1) << nb.astype(np.uint64)) - np.uint64(1))
    return tok, nb, extra


def token_base(itemsize: int) -> tuple[np.ndarray, np.ndarray]:
    """For every token: the symbol with its raw bits zero (uint64), and its raw-bit count."""
    t = np.arange(alphabet(itemsize), dtype=np.int64)
    m = np.where(t < 16, 0, (t - 16) // 4 + 4)
    base = np.where(t < 16, t, (1 << m) | (((t - 16) & 3) << np.maximum(m - 2, 0)))
    nb = np.where(t < 16, 0, m - 2)
    return base.astype(np.uint64), nb.astype(np.uint8)


# --------------------------------------------------------------------------- tables


def quantize(counts: np.ndarray) -> np.ndarray:
    """Counts (rows = contexts) -> frequencies summing to ``PROB_SCALE`` per used row, every seen
    token >= 1 (integer arithmetic only, so every implementation gets the same tables)."""
    counts = np.asarray(counts, dtype=np.int64)
    totals = counts.sum(axis=1, keepdims=True)
    safe = np.maximum(totals, 1)
    f = (counts * (2 * PROB_SCALE) + safe) // (2 * safe)
    f = np.where(counts > 0, np.maximum(f, 1), 0)
    diff = PROB_SCALE - f.sum(axis=1)
    top = np.argmax(counts, axis=1)
    rows = np.arange(f.shape[0])
    simple = (totals[:, 0] > 0) & (f[rows, top] + diff >= np.maximum(1, f[rows, top] // 2))
    f[rows[simple], top[simple]] += diff[simple]  # the usual case: the most frequent token absorbs it
    for row in np.flatnonzero((totals[:, 0] > 0) & ~simple):
        fr = f[row]
        d = int(diff[row])
        while d != 0:  # rare: many tiny counts rounded up; take from the largest frequencies
            k = int(np.argmax(fr))
            if d > 0:
                fr[k] += d
                d = 0
            else:
                take = max(1, min(-d, int(fr[k]) // 2))
                fr[k] -= take
                d += take
    return f


def _table_lengths(freqs: np.ndarray) -> np.ndarray:
    """m of every context: 1 + its last token with a non-zero frequency (0 = unused)."""
    nz = freqs > 0
    return np.where(nz.any(axis=1), freqs.shape[1] - np.argmax(nz[:, ::-1], axis=1), 0)


def serialize_tables(freqs: np.ndarray) -> bytes:
    """Per context: varint m (1 + last token with a non-zero frequency; 0 = context unused),
    then the m frequencies as varints (LEB128, values < 16384: 1 or 2 bytes)."""
    m = _table_lengths(freqs)
    rows = np.concatenate((m[:, None], freqs), axis=1).astype(np.int64)  # m, then the frequencies
    values = rows[np.arange(rows.shape[1])[None, :] <= m[:, None]]  # row-major: context by context
    two = values >= 0x80
    out = np.empty(values.size + int(two.sum()), dtype=np.uint8)
    pos = np.arange(values.size) + np.concatenate(([0], np.cumsum(two)[:-1]))
    out[pos] = np.where(two, (values & 0x7F) | 0x80, values)
    out[pos[two] + 1] = values[two] >> 7
    return out.tobytes()


def _parse_tables(buf: bytes, pos: int, contexts: int, alpha: int, where: str) -> tuple[np.ndarray, int]:
    """The frequency tables at ``buf[pos:]`` -> ((contexts, 256) frequencies, end position).
    Varints are decoded vectorised: every value is at most 4096, so at most 2 bytes long."""
    freqs = np.zeros((contexts, 256), dtype=np.int64)
    bad = CorruptDiffError(f"{where}: the ANS frame's frequency tables are invalid or truncated; the diff is corrupt, "
                           "download it again")
    window = np.frombuffer(buf, dtype=np.uint8, count=min(len(buf) - pos, 2 * contexts * (alpha + 1)), offset=pos)
    ends = np.flatnonzero(window < 0x80)
    if ends.size == 0:  # no complete varint at all (a bare header, or only continuation bytes)
        raise bad
    starts = np.concatenate(([0], ends[:-1] + 1))
    too_long = np.flatnonzero((ends - starts) > 1)
    if too_long.size:  # a varint of 3+ bytes ends the values (an error if the tables need more)
        ends, starts = ends[: too_long[0]], starts[: too_long[0]]
    two = (ends - starts) == 1
    values = window[starts].astype(np.int64) & 0x7F
    values[two] |= window[ends[two]].astype(np.int64) << 7
    j = 0
    for c in range(contexts):
        if j >= values.size:
            raise bad
        m = int(values[j])
        if m > alpha or j + 1 + m > values.size:
            raise bad
        if m:
            row = values[j + 1: j + 1 + m]
            if int(row.sum()) != PROB_SCALE or row[-1] == 0:
                raise bad
            freqs[c, :m] = row
        j += 1 + m
    end = pos + (int(ends[j - 1]) + 1 if j else 0)
    return freqs, end


# --------------------------------------------------------------------------- contexts


def bucket_lut(ebits: int, lo: int, mshift: int) -> np.ndarray:
    """bucket(e) = min(max(e - lo, 0), 15) >> mshift for every exponent value e."""
    return (np.clip(np.arange(1 << ebits) - lo, 0, MAX_BUCKETS - 1) >> mshift).astype(np.uint8)


def exponent_window(exp_counts: np.ndarray) -> int:
    """The start ``lo`` of the window of 16 consecutive exponent values holding the most
    elements (the first such window); values outside it are clamped to its ends."""
    if exp_counts.size <= MAX_BUCKETS:
        return 0
    window = np.convolve(exp_counts, np.ones(MAX_BUCKETS, dtype=np.int64), mode="valid")
    return int(np.argmax(window))


def _contexts_numpy(tok: np.ndarray, pred_u: np.ndarray, shift: int, ebits: int, lut: np.ndarray, prev: bool,
                    lanes: int) -> np.ndarray:
    """Context of every element: its bucket, times 2 plus "the previous element of its lane has
    token 0" (1 for a lane's first element) when ``prev``."""
    e = (pred_u >> pred_u.dtype.type(shift)) & pred_u.dtype.type((1 << ebits) - 1)
    ctx = lut[e]
    if prev:
        ctx = ctx * np.uint8(2) + _prev_zero(tok, lanes)
    return ctx


def _prev_zero(tok: np.ndarray, lanes: int) -> np.ndarray:
    pz = np.empty(tok.size, dtype=np.uint8)
    pz[1:] = tok[:-1] == 0
    pz[lane_starts(tok.size, lanes)[:-1]] = 1
    return pz


def _histogram(target_u: np.ndarray, pred_u: np.ndarray, shift: int, ebits: int, lanes: int) -> np.ndarray:
    """Token counts per (exponent value, previous-token-in-lane-was-0), shape (2^ebits, 2, A)
    with A = alphabet(itemsize) (what the C extension's ``analyze`` returns)."""
    size, alpha = 1 << ebits, alphabet(target_u.dtype.itemsize)
    sym = ulp_delta(target_u, pred_u)
    tok = tokenize(sym)[0]
    e = (pred_u >> pred_u.dtype.type(shift)) & pred_u.dtype.type(size - 1)
    idx = (e.astype(np.int64) * 2 + _prev_zero(tok, lanes)) * alpha + tok
    return np.bincount(idx, minlength=size * 2 * alpha).reshape(size, 2, alpha)


def _bucket_counts(hist: np.ndarray, lo: int) -> np.ndarray:
    """(2^ebits, 2, A) counts -> per finest context (bucket * 2 + flag, A) as int64, bucket = the
    exponent clamped into [lo, lo + 15] (bucket b: exponent lo + b; the end buckets also take the
    tails), by differences of running sums over the exponent values."""
    size, alpha = hist.shape[0], hist.shape[2]
    run = np.zeros((size + 1, 2 * alpha), dtype=np.int64)
    np.cumsum(hist.reshape(size, 2 * alpha), axis=0, out=run[1:])
    b = np.arange(MAX_BUCKETS)
    first = np.where(b == 0, 0, lo + b)
    last = np.where(b == MAX_BUCKETS - 1, size - 1, lo + b)
    valid = (first <= last) & (first < size)  # else the bucket is empty
    out = run[np.minimum(last, size - 1) + 1] - run[np.minimum(first, size)]
    out[~valid] = 0
    return out.reshape(2 * MAX_BUCKETS, alpha)


def choose_model(counts: np.ndarray) -> tuple[int, bool, np.ndarray, float]:
    """The context model that minimises coded tokens + table bytes: the 16 buckets merged by
    ``mshift`` 0-4 (16/8/4/2/1 buckets), with or without the previous-token flag. ``counts`` are
    per finest context (bucket * 2 + flag), one column per token (any width up to 256). Returns
    (mshift, prev, frequencies (contexts, 256), the winner's estimated bytes).

    The estimate of a model is the plug-in entropy of its counts + its table bytes (about 1.2
    bytes per entry; the quantised tables cost a nearly constant fraction more, so they rank the
    same). The 10 candidates' rows are scored in one vectorised pass (this runs once per chunk,
    and on 300 KB chunks it was as slow as the coding); the first candidate, in the order
    (mshift, prev) = (0, True), (0, False), (1, True), …, that is more than 1e-9 byte below all
    before it wins."""
    cands = [(mshift, prev, model_counts(counts, mshift, prev)) for mshift in range(5) for prev in (True, False)]
    rows = np.concatenate([c for _, _, c in cands])
    est_rows = _entropy_bits_rows(rows) / 8 + 1.2 * (_table_lengths(rows) + (rows.sum(axis=1) > 0))
    starts = np.cumsum([0] + [c.shape[0] for _, _, c in cands[:-1]])
    est = np.add.reduceat(est_rows, starts)
    best = 0
    for i in range(1, len(cands)):
        if est[i] < est[best] - 1e-9:
            best = i
    mshift, prev, c = cands[best]
    return mshift, prev, _frequencies(c), float(est[best])


def model_counts(counts: np.ndarray, mshift: int, prev: bool) -> np.ndarray:
    """The finest counts (bucket * 2 + flag rows) merged into the rows of one model: 16 >> mshift
    buckets, with or without the previous-token flag."""
    width = counts.shape[1]
    k = MAX_BUCKETS >> mshift
    merged = counts.reshape(MAX_BUCKETS, 2, width).reshape(k, 1 << mshift, 2, width).sum(axis=1)
    return merged.reshape(2 * k, width) if prev else merged.sum(axis=1)


def _frequencies(rows: np.ndarray) -> np.ndarray:
    f = np.zeros((rows.shape[0], 256), dtype=np.int64)
    f[:, : rows.shape[1]] = quantize(rows)
    return f


def fixed_model(mshift: int, prev: bool):
    """A stand-in for :func:`choose_model` that always picks (mshift, prev), quantised alike: for
    tests and measurements of the other models (the frames stay valid)."""
    def choose(counts: np.ndarray) -> tuple[int, bool, np.ndarray, float]:
        return mshift, prev, _frequencies(model_counts(counts, mshift, prev)), 0.0
    return choose


def _entropy_bits_rows(counts: np.ndarray) -> np.ndarray:
    """Per row, the plug-in code length of its counts in bits: tot log2 tot - sum c log2 c."""
    c = counts.astype(np.float64)
    tot = c.sum(axis=1)
    clog = (c * np.log2(np.maximum(c, 1.0))).sum(axis=1)
    return tot * np.log2(np.maximum(tot, 1.0)) - clog


# --------------------------------------------------------------------------- numpy coder


def _decode_table(freqs: np.ndarray) -> np.ndarray:
    """Per context, per slot: token | (freq - 1) << 8 | (slot - cum) << 20 (uint32)."""
    contexts = freqs.shape[0]
    table = np.zeros((contexts, PROB_SCALE), dtype=np.uint32)
    for c in range(contexts):
        f = freqs[c]
        if f.sum() == 0:
            continue
        sym = np.repeat(np.arange(256, dtype=np.int64), f)
        cum = np.concatenate(([0], np.cumsum(f)[:-1]))
        slot = np.arange(PROB_SCALE, dtype=np.int64)
        table[c] = (sym | ((f[sym] - 1) << 8) | ((slot - cum[sym]) << 20)).astype(np.uint32)
    return table


def _lane_matrix(n: int, lanes: int) -> tuple[np.ndarray, int, int]:
    """Element index of (step j, lane k) = start(k) + j, for all steps (rows; the last row is
    partial when n % lanes != 0: only its first ``r`` lanes exist, the others point at element 0)."""
    q, r = divmod(n, lanes)
    rows = q + (1 if r else 0)
    idx = lane_starts(n, lanes)[None, :-1] + np.arange(rows, dtype=np.int64)[:, None]
    if r:
        idx[q, r:] = 0
    return idx, q, r


def _encode_numpy(tok: np.ndarray, nb: np.ndarray, extra: np.ndarray, ctx: np.ndarray, freqs: np.ndarray,
                  lanes: int) -> tuple[np.ndarray, np.ndarray, bytes]:
    n = tok.size
    idx, q, r = _lane_matrix(n, lanes)
    cum = np.zeros_like(freqs)
    cum[:, 1:] = np.cumsum(freqs, axis=1)[:, :-1]
    flat = ctx.astype(np.int64) * 256 + tok
    fm = freqs.reshape(-1)[flat][idx].astype(np.uint64)
    cm = cum.reshape(-1)[flat][idx].astype(np.uint64)
    rows = idx.shape[0]
    x = np.full(lanes, STATE_LOW, dtype=np.uint64)
    emitted = np.zeros((rows, lanes), dtype=bool)
    wmat = np.zeros((rows, lanes), dtype=np.uint16)
    pb, m16, sh16 = np.uint64(PROB_BITS), np.uint64(0xFFFF), np.uint64(16)
    lim = np.uint64(32 - PROB_BITS)  # x >= f << (32 - PROB_BITS) would overflow: emit 16 bits first
    for j in range(rows - 1, -1, -1):
        act = slice(None) if j < q else slice(0, r)
        f, c, xs = fm[j, act], cm[j, act], x[act]
        em = xs >= (f << lim)
        emitted[j, act] = em
        wmat[j, act] = np.where(em, xs & m16, 0)
        xs = np.where(em, xs >> sh16, xs)
        x[act] = ((xs // f) << pb) + xs % f + c
    # one stream per group of 8 lanes: the states (high, low word) of its lanes in order, then the
    # words the decoder reads, step by step, the group's lanes in order (row-major selection)
    streams = []
    for g in range(0, lanes, GROUP_LANES):
        ks = slice(g, min(g + GROUP_LANES, lanes))
        states = np.stack(((x[ks] >> sh16), (x[ks] & m16)), axis=1).reshape(-1).astype(np.uint16)
        streams.append(np.concatenate((states, wmat[:, ks][emitted[:, ks]])))
    counts = np.array([st.size for st in streams], dtype=np.uint32)
    return np.concatenate(streams), counts, _pack_bits(nb, extra)


def _pack_bits(nb: np.ndarray, extra: np.ndarray) -> bytes:
    """Raw bits, LSB-first, element after element (element i's bits at bit offset sum(nb[:i]))."""
    keep = nb > 0
    w, v = nb[keep].astype(np.int64), extra[keep]
    total = int(w.sum())
    if total == 0:
        return b""
    off = np.cumsum(w) - w
    word = off >> 6
    sh = (off & 63).astype(np.uint64)
    out = np.zeros((total + 63) // 64 + 1, dtype=np.uint64)
    lo = v << sh
    starts = np.flatnonzero(np.concatenate(([True], word[1:] != word[:-1])))
    out[word[starts]] = np.bitwise_or.reduceat(lo, starts)
    span = (sh > 0) & ((off & 63) + w > 64)
    if span.any():
        out[word[span] + 1] |= v[span] >> (np.uint64(64) - sh[span])
    return out.view(np.uint8)[: (total + 7) // 8].tobytes()


def _unpack_slice(words: np.ndarray, nb: np.ndarray, bit0: int) -> np.ndarray:
    """The raw bits of consecutive elements whose first bit is at ``bit0`` of ``words`` (the raw-bit
    stream as uint64 words, two zero words of padding after it)."""
    w = nb.astype(np.int64)
    off = np.cumsum(w) - w + bit0
    word = off >> 6
    sh = (off & 63).astype(np.uint64)
    v = words[word] >> sh
    hi = words[word + 1] << ((np.uint64(64) - sh) & np.uint64(63))
    v |= np.where(sh > 0, hi, np.uint64(0))
    return v & ((np.uint64(1) << w.astype(np.uint64)) - np.uint64(1))


#: Elements the numpy decoder handles per slice: its int64/uint64 temporaries (about 60 bytes an
#: element at the peak, in the raw-bit pass) then take ~16 MiB, whatever the chunk size
#: (issue 20.5: whole-chunk matrices cost ~40 bytes an element, 10 GiB for a 256 MiB chunk).
DECODE_SLICE = 1 << 18
#: Bytes of scratch one numpy decode needs beyond its output and one token byte per element
#: (the decode tables, (32, 4096) uint32, and the per-slice temporaries): apply's memory plan.
NUMPY_DECODE_SCRATCH = 32 << 20


def _decode_numpy(pred_u: np.ndarray, shift: int, ebits: int, lut: np.ndarray, prev: bool, freqs: np.ndarray,
                  lanes: int, counts: np.ndarray, words: np.ndarray, raw: bytes, itemsize: int,
                  where: str) -> np.ndarray:
    """The target elements (uint of ``itemsize``). Working set: the output, one token byte per
    element and O(DECODE_SLICE) temporaries: the lane steps are decoded a block of rows at a time
    and the raw bits are read a slice of elements at a time."""
    n = pred_u.size
    q, r = divmod(n, lanes)
    rows = q + (1 if r else 0)
    starts = lane_starts(n, lanes)[:-1]
    table = _decode_table(freqs).reshape(-1)
    valid = freqs.sum(axis=1) > 0
    groups = -(-lanes // GROUP_LANES)
    offs = np.concatenate(([0], np.cumsum(counts.astype(np.int64))))
    grp = np.arange(lanes) // GROUP_LANES
    first = offs[grp] + 2 * (np.arange(lanes) - grp * GROUP_LANES)  # lane k's state in its group
    x = (words[first].astype(np.uint64) << np.uint64(16)) | words[first + 1]
    ptr = offs[:-1] + 2 * np.minimum(GROUP_LANES, lanes - np.arange(groups) * GROUP_LANES)
    end = offs[1:]
    pz = np.ones(lanes, dtype=np.int64)
    tok = np.zeros(n, dtype=np.uint8)
    m12, pb, lo16 = np.uint64(PROB_SCALE - 1), np.uint64(PROB_BITS), np.uint64(STATE_LOW)
    ftype = pred_u.dtype.type
    block = max(1, DECODE_SLICE // lanes)
    bad_ctx = CorruptDiffError(f"{where}: the ANS frame uses a context it has no table for; the diff is corrupt")
    for j0 in range(0, rows, block):
        j1 = min(rows, j0 + block)
        idx = starts[None, :] + np.arange(j0, j1, dtype=np.int64)[:, None]  # element of (step, lane)
        live = np.ones(idx.shape, dtype=bool)
        if r and j1 > q:  # the last row: only its first r lanes exist
            live[q - j0, r:] = False
            idx[q - j0, r:] = 0
        e = (pred_u[idx] >> ftype(shift)) & ftype((1 << ebits) - 1)
        bucket = lut[e].astype(np.int32)
        if prev:
            bucket *= 2
        tmat = np.zeros(idx.shape, dtype=np.uint8)
        for jj in range(j1 - j0):
            act = slice(None) if j0 + jj < q else slice(0, r)
            xs = x[act]
            c = bucket[jj, act] + (pz[act] if prev else 0)
            if not valid[c].all():
                raise bad_ctx
            ent = table[c * PROB_SCALE + (xs & m12).astype(np.int64)]
            s = ent & np.uint32(255)
            xs = (((ent >> np.uint32(8)) & np.uint32(PROB_SCALE - 1)).astype(np.uint64) + np.uint64(1)) \
                * (xs >> pb) + (ent >> np.uint32(20)).astype(np.uint64)
            need = xs < lo16
            if need.any():  # the group's next words, to its needing lanes in lane order
                needs = np.zeros(groups * GROUP_LANES, dtype=np.int64)
                needs[: xs.size] = need
                needs = needs.reshape(groups, GROUP_LANES)
                rank = (np.cumsum(needs, axis=1) - 1).reshape(-1)[: xs.size]
                p = ptr[grp[: xs.size]] + rank
                ptr += needs.sum(axis=1)
                if (ptr > end).any():
                    raise CorruptDiffError(f"{where}: an ANS lane group reads past its words; the diff is corrupt")
                xs[need] = (xs[need] << np.uint64(16)) | words[p[need]].astype(np.uint64)  # p < end: checked
            x[act] = xs
            tmat[jj, act] = s
            if prev:
                pz[act] = s == 0
        tok[idx[live]] = tmat[live]
    if (ptr != end).any() or (x != lo16).any():
        raise CorruptDiffError(f"{where}: ANS lanes do not end where their words do; the diff is corrupt, "
                               "download it again")
    if int(tok.max(initial=0)) >= alphabet(itemsize):
        raise CorruptDiffError(f"{where}: ANS token out of range for {itemsize}-byte symbols; the diff is corrupt")
    base, nbits = token_base(itemsize)
    total = int(np.bincount(tok, minlength=256)[: nbits.size].astype(np.int64) @ nbits.astype(np.int64))
    if (total + 7) // 8 != len(raw):
        raise CorruptDiffError(f"{where}: ANS frame holds {len(raw)} bytes of raw bits, its tokens need "
                               f"{(total + 7) // 8}; the diff is corrupt, download it again")
    rwords = np.zeros((len(raw) + 7) // 8 + 2, dtype=np.uint64)
    rwords.view(np.uint8)[: len(raw)] = np.frombuffer(raw, dtype=np.uint8)
    out = np.empty(n, dtype=UINT_FOR_SIZE[itemsize])
    bit = 0
    for a in range(0, n, DECODE_SLICE):  # symbols, then the target elements, a slice at a time
        t = tok[a: a + DECODE_SLICE]
        nb = nbits[t]
        sym = (base[t] | _unpack_slice(rwords, nb, bit)).astype(out.dtype)
        bit += int(nb.sum(dtype=np.int64))
        out[a: a + t.size] = ulp_undelta(sym, pred_u[a: a + t.size])
    return out


# --------------------------------------------------------------------------- frames


def _context_counts(t_u: np.ndarray, p_u: np.ndarray, itemsize: int, shift: int, ebits: int, lanes: int,
                    use_c: bool) -> tuple[np.ndarray, int, np.ndarray | None, bytes | None]:
    """(token counts per finest context (bucket * 2 + flag, A) as int64, the exponent window's
    start, and with the C coder its tokens and raw-bit stream, else None twice): the C pass and
    the numpy histogram give the same counts."""
    if use_c:  # one pass: tokens (kept for the coder), raw bits, window, counts per bucket
        tok = np.empty(t_u.size, dtype=np.uint8)
        counts_raw, lo, raw = _c.analyze(t_u, p_u, itemsize, shift, ebits, lanes, tok)
        return np.frombuffer(counts_raw, dtype=np.uint32).reshape(2 * MAX_BUCKETS, -1).astype(np.int64), lo, tok, raw
    hist = _histogram(t_u, p_u, shift, ebits, lanes)
    lo = exponent_window(hist.sum(axis=(1, 2), dtype=np.int64))
    return _bucket_counts(hist, lo), lo, None, None


def estimated_bits(target_u: np.ndarray, pred_u: np.ndarray, dtype: str, pure: bool | None = None) -> float:
    """The plug-in code length in bits of a dense frame's tokens under its finest context (one
    lane), plus its raw bits: what the frame spends up to tables and slack. Both coders count
    alike, so a choice made on it is the same in both builds (orca_diff.lowrank ranks with it)."""
    itemsize = target_u.dtype.itemsize
    shift, ebits = EXPONENT_FIELD.get(dtype, _DEFAULT_FIELD[itemsize])
    counts = _context_counts(np.ascontiguousarray(target_u), np.ascontiguousarray(pred_u), itemsize, shift, ebits, 1,
                             _use_c(pure))[0]
    nb = token_base(itemsize)[1].astype(np.int64)
    return float(_entropy_bits_rows(counts).sum()) + float((counts.sum(axis=0) * nb[: counts.shape[1]]).sum())


def encode(target: np.ndarray, pred: np.ndarray, itemsize: int, dtype: str | None = None,
           pure: bool | None = None) -> bytes:
    """One ANS frame for the ulp delta of ``target`` given ``pred`` (uint8 arrays of equal length,
    a whole number of ``itemsize``-byte elements, at least one element)."""
    if itemsize not in (2, 4, 8):
        raise ValueError("the ans codec codes 2-, 4- and 8-byte float elements")
    use_c = _use_c(pure)
    t_u = np.ascontiguousarray(target).view(UINT_FOR_SIZE[itemsize])
    p_u = np.ascontiguousarray(pred).view(UINT_FOR_SIZE[itemsize])
    n = t_u.size
    if n == 0 or n >= 1 << 31:
        raise ValueError("an ANS frame holds 1 to 2^31 - 1 elements")
    shift, ebits = EXPONENT_FIELD.get(dtype or "", _DEFAULT_FIELD[itemsize])
    lanes = lane_count(n)
    counts, lo, tok, raw = _context_counts(t_u, p_u, itemsize, shift, ebits, lanes, use_c)
    mshift, prev, freqs, _ = choose_model(counts)
    if use_c:
        f16 = np.zeros((2 * MAX_BUCKETS, 256), dtype=np.uint16)
        f16[: freqs.shape[0]] = freqs
        words_b, counts_b = _c.encode(tok, p_u, itemsize, shift, ebits, lo, mshift, int(prev), lanes, f16.tobytes())
        group_words = np.frombuffer(counts_b, dtype=np.uint32)
        words = np.frombuffer(words_b, dtype=np.uint16)
    else:
        sym = ulp_delta(t_u, p_u)
        tok, nb, extra = tokenize(sym)
        ctx = _contexts_numpy(tok, p_u, shift, ebits, bucket_lut(ebits, lo, mshift), prev, lanes)
        words, group_words, raw = _encode_numpy(tok, nb, extra, ctx, freqs, lanes)
    head = _HEAD.pack(MAGIC, itemsize, int(prev), shift, ebits, lo, mshift, n, len(raw))
    return b"".join((head, serialize_tables(freqs), group_words.astype("<u4").tobytes(),
                     words.astype("<u2").tobytes(), raw))


def is_frame(payload: bytes | memoryview | np.ndarray) -> bool:
    return bytes(memoryview(payload)[:4]) == MAGIC


def decode(payload: bytes | memoryview | np.ndarray, pred: np.ndarray, itemsize: int, size: int,
           where: str = "chunk", pure: bool | None = None) -> np.ndarray:
    """Decode one ANS frame into exactly ``size`` target bytes (uint8), given the base
    prediction ``pred``. Refuses (CorruptDiffError) any frame that is not the one valid encoding
    of ``size // itemsize`` elements; allocates only what ``size`` implies."""
    buf = bytes(payload) if not isinstance(payload, bytes) else payload
    n = size // itemsize
    bad = f"{where}: ANS frame"
    if len(buf) < _HEAD.size:
        raise CorruptDiffError(f"{bad} is truncated ({len(buf)} bytes); the diff is corrupt, download it again")
    magic, w, flags, shift, ebits, lo, mshift, n_decl, raw_len = _HEAD.unpack_from(buf)
    if (magic != MAGIC or w != itemsize or flags > 1 or not 1 <= ebits <= 8 or shift + ebits > 8 * itemsize
            or lo >= 1 << ebits or mshift > 4):
        raise CorruptDiffError(f"{bad} header is invalid (magic, element size {w} vs {itemsize}, flags or exponent "
                               "field); the diff is corrupt, download it again")
    if n_decl != n or size % itemsize or n == 0:
        raise CorruptDiffError(f"{bad} declares {n_decl} elements, the manifest implies {n}; the diff is corrupt")
    pos = _HEAD.size
    prev = bool(flags & 1)
    contexts = (MAX_BUCKETS >> mshift) * (2 if prev else 1)
    freqs, pos = _parse_tables(buf, pos, contexts, alphabet(itemsize), where)
    lanes = lane_count(n)
    groups = -(-lanes // GROUP_LANES)
    if pos + 4 * groups > len(buf):
        raise CorruptDiffError(f"{bad} is truncated in its group table; the diff is corrupt, download it again")
    group_words = np.frombuffer(buf, dtype="<u4", count=groups, offset=pos).astype(np.int64)
    pos += 4 * groups
    total_words = int(group_words.sum())
    states = 2 * np.minimum(GROUP_LANES, lanes - GROUP_LANES * np.arange(groups))
    if (group_words < states).any() or pos + 2 * total_words + raw_len != len(buf):
        raise CorruptDiffError(f"{bad}: group sizes and raw bits do not add up to the frame's {len(buf)} bytes; "
                               "the diff is corrupt, download it again")
    words = np.frombuffer(buf, dtype="<u2", count=total_words, offset=pos)
    raw = buf[pos + 2 * total_words:]
    p_u = np.ascontiguousarray(pred).view(UINT_FOR_SIZE[itemsize])
    if p_u.size != n:
        raise ValueError("base prediction and chunk sizes differ")
    if _use_c(pure):
        out = np.empty(size, dtype=np.uint8)
        f16 = np.zeros((2 * MAX_BUCKETS, 256), dtype=np.uint16)
        f16[:contexts] = freqs
        try:
            _c.decode(out, p_u, itemsize, shift, ebits, lo, mshift, int(prev), lanes, f16.tobytes(),
                      group_words.astype(np.uint32).tobytes(), words, raw)
        except ValueError as exc:
            raise CorruptDiffError(f"{bad}: {exc}; the diff is corrupt, download it again") from None
        return out
    out_u = _decode_numpy(p_u, shift, ebits, bucket_lut(ebits, lo, mshift), prev, freqs, lanes, group_words,
                          words, raw, itemsize, where)
    return out_u.view(np.uint8)


__all__ = ["encode", "decode", "is_frame", "c_available", "lane_count", "tokenize", "quantize", "MAGIC"]
