"""Encode and decode one chunk: pure functions from bytes to bytes.

A chunk of a target tensor is rebuilt from its payload and, for delta chunks, the matching
elements of the base tensor cast to the target dtype (:func:`base_prediction`):

    encode: transform(target, base) -> symbols -> layout -> one zstd frame (or one ANS frame)
    decode: frame (size-checked) -> un-layout -> inverse transform(., base)

Codecs (``Encoding.codec``, docs/format.md §3a/§3b):

* ``zstd``: the symbols, laid out as below, in one zstd frame (format version 1).
* ``ans``: for ``ulp`` deltas of floats, a context-modelled rANS frame (:mod:`orca_diff.entropy`:
  tokens conditioned on the base element's exponent and the previous element, raw low bits):
  0.81-0.95x the size of the zstd frames, 0.85x (bf16) / 0.89x (fp16) the order-0 entropy floor
  on a real fine-tune (docs/performance.md §0). Chunks with few changed elements may be a
  sparse frame instead (:mod:`orca_diff.sparse`: gaps + changed deltas, ~their entropy at 0.1-1 %
  changed, performance.md §5). A chunk of a 2-D (or wider) 16-bit tensor may instead predict the
  target from the base plus a low-rank update carried in its frame (:mod:`orca_diff.lowrank`,
  format §3e: the embedding / LM-head rows a fine-tune moves together). A chunk where neither
  frame would be smaller (tiny chunks) is stored as a zstd frame with the tensor's ``layout``
  instead; the magic number tells them apart.

Raw float chunks (nothing predicts them) are the no-base frame (:mod:`orca_diff.nobase`:
exponent coding, below ZipNN) where it is smaller than byte planes + zstd.

Layouts (docs/format.md, "Layouts"; measurements in docs/performance.md):

* ``planes``: byte ``k`` of every symbol stored together. The high bytes of small deltas are
  almost all zero and compress to nearly nothing. Used for raw data, xor and 32/64-bit deltas.
* ``escape``: for 16-bit ulp deltas, whose symbols are almost all below 255. Each symbol becomes
  one byte ``min(s, 255)``; the symbols >= 255 follow, in order, as byte planes. One byte stream
  then carries the joint 16-bit distribution, so zstd's Huffman literals reach the order-0
  entropy of the 16-bit symbols, which byte planes cannot (a 97 %-zero high plane costs zstd
  about twice its entropy, and splitting the bytes loses their correlation).
* ``bytes``: stored as they are (blobs, 1-byte elements).

Compression uses fast zstd parameters tuned for these streams: they are literal-dominated, and
zstd's default match finder at levels 1-3 spends bits on short spurious matches (level 3 is
10 % larger than level 1 with min_match 7 on bf16 deltas). Decoding refuses a frame whose
declared size is not the one the manifest implies, and never produces more (decompression
bombs).
"""

from __future__ import annotations

import os
import threading

import numpy as np
import zstandard

from . import entropy, lowrank, nobase, sparse
from .bits import UINT_FOR_SIZE, cast_bits, ulp_delta, ulp_undelta
from .errors import CorruptDiffError

#: zstd level used unless the caller asks for another. Levels <= 3 use the tuned fast
#: parameters below; higher levels are zstd's own (slow to encode, rarely smaller here).
DEFAULT_LEVEL = 1
LAYOUTS = ("planes", "escape", "bytes")
CODECS = ("zstd", "ans")
ESCAPE = 255
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
#: Chunks under this many raw bytes are also compressed with zstd and the smaller frame kept;
#: larger ones only when their ANS frame is under 1/ANS_TRY_ZSTD_RATIO of the chunk (see
#: ``_ans_or_zstd``).
ANS_TRY_ZSTD_BYTES = 64 << 10
#: An ANS frame under 1/this of its chunk (constant or near-constant data) is also tried as zstd.
ANS_TRY_ZSTD_RATIO = 64
#: Chunks under this many bytes are not worth an ANS frame (its tables cost about as much as the
#: context saves): zstd only.
ANS_MIN_BYTES = 8 << 10
#: Bytes of a sample that choose the zstd layout of a tensor coded with ans (its fallback chunks).
LAYOUT_FALLBACK_SAMPLE_BYTES = 64 << 10
_local = threading.local()


def compression_params(level: int) -> zstandard.ZstdCompressionParameters:
    """zstd parameters for ``level``: for fast levels, a 128 KiB window (one Huffman table per
    block either way), a small hash and min_match 7, so literals are Huffman-coded instead of
    being cut into short matches that cost more than they save."""
    if level <= 3:
        return zstandard.ZstdCompressionParameters(
            window_log=17, hash_log=8 + 2 * (level - 1), chain_log=6 + 2 * (level - 1), search_log=1,
            min_match=7, strategy=1 if level == 1 else 2, target_length=0, write_content_size=True,
            write_checksum=False)
    return zstandard.ZstdCompressionParameters.from_level(level, write_content_size=True, write_checksum=False)


def _compressor(level: int) -> zstandard.ZstdCompressor:
    cache = getattr(_local, "cctx", None)
    if cache is None:
        cache = _local.cctx = {}
    c = cache.get(level)
    if c is None:
        c = cache[level] = zstandard.ZstdCompressor(compression_params=compression_params(level))
    return c


def _decompressor() -> zstandard.ZstdDecompressor:
    d = getattr(_local, "dctx", None)
    if d is None:
        d = _local.dctx = zstandard.ZstdDecompressor()
    return d


def base_prediction(base_raw: np.ndarray, base_dtype: str, target_dtype: str) -> np.ndarray:
    """The base elements as bit patterns of the target dtype (a specified cast when they differ)."""
    if base_dtype == target_dtype:
        return base_raw
    from .containers import DTYPE_SIZES

    bits = base_raw.view(UINT_FOR_SIZE[DTYPE_SIZES[base_dtype]])
    return cast_bits(bits, base_dtype, target_dtype).view(np.uint8)


# --------------------------------------------------------------------------- layouts


def to_planes(raw: np.ndarray, itemsize: int, out: np.ndarray | None = None) -> np.ndarray:
    """``raw`` (n*w bytes) -> w planes of n bytes, plane 0 = least significant bytes."""
    if itemsize == 1:
        return raw
    n = raw.size // itemsize
    planes = np.empty((itemsize, n), dtype=np.uint8) if out is None else out.reshape(itemsize, n)
    elems = raw.reshape(n, itemsize)
    for k in range(itemsize):  # strided copies: 5-10x faster than a transposed copy
        planes[k] = elems[:, k]
    return planes.reshape(-1)


def from_planes(planes: np.ndarray, itemsize: int) -> np.ndarray:
    """Inverse of :func:`to_planes`."""
    if itemsize == 1:
        return planes
    n = planes.size // itemsize
    out = np.empty((n, itemsize), dtype=np.uint8)
    p = planes.reshape(itemsize, n)
    for k in range(itemsize):
        out[:, k] = p[k]
    return out.reshape(-1)


def _escape_split(sym: np.ndarray, itemsize: int) -> np.ndarray:
    """symbols (uint of ``itemsize``) -> min(s, 255) bytes followed by the planes of s >= 255."""
    s = sym.view(UINT_FOR_SIZE[itemsize])
    n = s.size
    big = s[s >= ESCAPE]
    frame = np.empty(n + big.size * itemsize, dtype=np.uint8)
    np.minimum(s, ESCAPE, out=frame[:n], casting="unsafe")
    to_planes(big.view(np.uint8), itemsize, out=frame[n:])
    return frame


def _escape_join(frame: np.ndarray, itemsize: int, n: int, where: str) -> np.ndarray:
    head = frame[:n]
    sym = head.astype(UINT_FOR_SIZE[itemsize])
    pos = np.flatnonzero(head == ESCAPE)
    if pos.size * itemsize != frame.size - n:
        raise CorruptDiffError(f"{where}: escape stream holds {(frame.size - n) // itemsize} symbols but "
                               f"{pos.size} are announced; the diff is corrupt, download it again")
    big = from_planes(frame[n:], itemsize).view(UINT_FOR_SIZE[itemsize])
    if big.size and int(big.min()) < ESCAPE:
        raise CorruptDiffError(f"{where}: escaped symbol below {ESCAPE}; the diff is corrupt, download it again")
    sym[pos] = big
    return sym.view(np.uint8)


def layout_size_range(layout: str, size: int, itemsize: int) -> tuple[int, int]:
    """The smallest and largest frame content size a chunk of ``size`` bytes can have."""
    if layout == "escape":
        n = size // itemsize
        return n, n + size
    return size, size


# --------------------------------------------------------------------------- transforms


def forward(target: np.ndarray, base: np.ndarray | None, itemsize: int, transform: str) -> np.ndarray:
    """The delta symbols (as raw bytes) of ``target`` given ``base`` (both uint8, same length)."""
    if transform == "raw":
        return target
    t = target.view(UINT_FOR_SIZE[itemsize])
    b = base.view(UINT_FOR_SIZE[itemsize])  # type: ignore[union-attr]
    if transform == "xor":
        return (t ^ b).view(np.uint8)
    return ulp_delta(t, b).view(np.uint8)


def inverse(delta: np.ndarray, base: np.ndarray | None, itemsize: int, transform: str) -> np.ndarray:
    if transform == "raw":
        return delta
    d = delta.view(UINT_FOR_SIZE[itemsize])
    b = base.view(UINT_FOR_SIZE[itemsize])  # type: ignore[union-attr]
    if transform == "xor":
        return (d ^ b).view(np.uint8)
    return ulp_undelta(d, b).view(np.uint8)


def _check_layout(layout: str, itemsize: int) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}")
    if layout == "escape" and itemsize < 2:
        raise ValueError("the escape layout needs elements of 2 bytes or more")


def _check_codec(codec: str, transform: str, itemsize: int) -> None:
    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r}")
    if codec == "ans" and (transform != "ulp" or itemsize not in (2, 4, 8)):
        raise ValueError("the ans codec is for ulp deltas of 2-, 4- and 8-byte floats")


def encode_chunk(target: np.ndarray, base: np.ndarray | None, itemsize: int, transform: str,
                 layout: str = "planes", level: int = DEFAULT_LEVEL, codec: str = "zstd",
                 dtype: str | None = None, grid: tuple[int, int] | None = None) -> bytes:
    """Compress one chunk. ``target`` and ``base`` are uint8 arrays of equal length (``base`` is
    the prediction already cast to the target dtype, or None for raw chunks). With ``codec="ans"``
    (ulp deltas only) ``layout`` is the zstd layout of the chunks that fall back to zstd, and
    ``dtype`` (the target's, e.g. "BF16") tells where the exponent field is; ``grid`` = (columns
    of the tensor's last dimension, column of the chunk's first element) lets a 16-bit chunk try
    the low-rank frame. A raw chunk of a float ``dtype`` (given) in byte planes is the no-base
    ANS frame where that is smaller."""
    _check_layout(layout, itemsize)
    _check_codec(codec, transform, itemsize)
    if codec == "ans" and target.size:
        return _ans_or_zstd(target, base, itemsize, layout, level, dtype, grid)  # type: ignore[arg-type]
    if (transform == "raw" and layout == "planes" and dtype in nobase.DTYPES and target.size >= ANS_MIN_BYTES
            and os.environ.get("ORCA_DIFF_CODEC") != "zstd"):
        return _nobase_or_zstd(target, itemsize, level, dtype)  # type: ignore[arg-type]
    sym = forward(target, base, itemsize, transform)
    if layout == "planes":
        sym = to_planes(sym, itemsize)
    elif layout == "escape":
        sym = _escape_split(sym, itemsize)
    if not sym.flags.c_contiguous:
        sym = np.ascontiguousarray(sym)
    return _compressor(level).compress(sym.data)


def _ans_or_zstd(target: np.ndarray, pred: np.ndarray, itemsize: int, layout: str, level: int,
                 dtype: str | None, grid: tuple[int, int] | None = None) -> bytes:
    """The ANS frame, or the zstd frame when that is smaller: zstd alone under ANS_MIN_BYTES;
    both tried for chunks under ANS_TRY_ZSTD_BYTES and for ANS frames under 1/64 of the chunk
    (constant or near-constant data, where zstd's matches win); elsewhere the ANS frame is
    smaller in practice, and the zstd trial is skipped. On the real MiniLM (bf16/fp16/fp32) and
    SmolLM2 (bf16/fp16) pairs zstd won only on chunks whose ANS frame was under 0.7 % of the
    chunk, and lost by 0.3-60 % on every chunk above 1/64 (docs/performance.md §0), so this picks
    the same frames as always trying zstd there."""
    if target.size < ANS_MIN_BYTES:
        return encode_chunk(target, pred, itemsize, "ulp", layout, level)
    frame = ans_frame(target, pred, itemsize, dtype, grid)
    if target.size < ANS_TRY_ZSTD_BYTES or len(frame) * ANS_TRY_ZSTD_RATIO < target.size:
        z = encode_chunk(target, pred, itemsize, "ulp", layout, level)
        if len(z) <= len(frame):
            return z
    return frame


def _nobase_or_zstd(target: np.ndarray, itemsize: int, level: int, dtype: str) -> bytes:
    """A raw float chunk (nothing predicts it): the no-base ANS frame (exponent coding,
    docs/format.md §3d) or the byte-plane zstd frame, whichever is smaller."""
    z = encode_chunk(target, None, itemsize, "raw", "planes", level)
    a = nobase.encode(target, dtype)
    return a if len(a) < len(z) else z


def ans_frame(target: np.ndarray, pred: np.ndarray, itemsize: int, dtype: str | None,
              grid: tuple[int, int] | None = None) -> bytes:
    """The smallest of the dense ANS frame, for chunks with at most 1/sparse.MAX_FRACTION of
    their elements changed the sparse one (gaps + changed deltas, docs/format.md §3c), and with a
    ``grid`` (16-bit floats) the low-rank frame around either (§3e): measured per chunk, so each
    chunk pays about its entropy under the model that suits it and the rest are unaffected."""
    frame = _plain_ans_frame(target, pred, itemsize, dtype)
    if grid is None or itemsize != 2 or dtype not in lowrank.DTYPE_CODES or os.environ.get("ORCA_DIFF_LOWRANK") == "0":
        return frame
    lr = lowrank.encode(target.view(np.uint16), pred.view(np.uint16), dtype, grid[0], grid[1],
                        lambda t, p: _plain_ans_frame(t.view(np.uint8), p.view(np.uint8), itemsize, dtype))
    return lr if lr is not None and len(lr) < len(frame) else frame


def _plain_ans_frame(target: np.ndarray, pred: np.ndarray, itemsize: int, dtype: str | None) -> bytes:
    if sparse.changed_count(target, pred, itemsize) * sparse.MAX_FRACTION <= target.size // itemsize:
        dense = entropy.encode(target, pred, itemsize, dtype)
        s = sparse.encode(target, pred, itemsize, dtype)
        return s if s is not None and len(s) < len(dense) else dense
    return entropy.encode(target, pred, itemsize, dtype)


def decode_chunk(payload: bytes | memoryview | np.ndarray, base: np.ndarray | None, itemsize: int,
                 transform: str, size: int, layout: str = "planes", where: str = "chunk",
                 codec: str = "zstd") -> np.ndarray:
    """Decompress and invert one chunk into exactly ``size`` target bytes (uint8 array)."""
    _check_layout(layout, itemsize)
    if codec == "ans" and (transform != "ulp" or itemsize not in (2, 4, 8)):
        raise CorruptDiffError(f"{where}: the ans codec is only for ulp deltas of 2-, 4- and 8-byte floats; "
                               "the manifest is corrupt")
    _check_codec(codec, transform, itemsize)
    if codec == "ans" and bytes(memoryview(payload)[:4]) != ZSTD_MAGIC:
        if base is None or base.size != size:
            raise ValueError("an ANS chunk needs the base prediction of its size")
        if lowrank.is_frame(payload):
            return lowrank.decode(payload, base.view(np.uint16) if itemsize == 2 else base, itemsize, size, where,
                                  lambda body, pred: _decode_plain_ans(body, pred.view(np.uint8), itemsize, size, where))
        return _decode_plain_ans(payload, base, itemsize, size, where)
    if transform == "raw" and layout == "planes" and itemsize in (2, 4, 8) and nobase.is_frame(payload):
        return nobase.decode(payload, itemsize, size, where)
    lo, hi = layout_size_range(layout, size, itemsize)
    try:
        declared = zstandard.get_frame_parameters(payload).content_size
        if not lo <= declared <= hi or (declared - lo) % itemsize:
            expect = f"{lo}" if lo == hi else f"{lo} + a multiple of {itemsize} up to {hi}"
            raise CorruptDiffError(f"{where}: frame declares {declared} bytes, the manifest implies {expect}; "
                                   "the diff is corrupt, download it again")
        out = _decompressor().decompress(payload, max_output_size=declared)
    except zstandard.ZstdError as exc:
        raise CorruptDiffError(f"{where}: cannot decompress ({exc}); the diff is corrupt, download it again") from None
    if len(out) != declared:
        raise CorruptDiffError(f"{where}: decompressed to {len(out)} bytes, expected {declared}; the diff is corrupt")
    sym = np.frombuffer(out, dtype=np.uint8)
    if layout == "planes":
        sym = from_planes(sym, itemsize)
    elif layout == "escape":
        sym = _escape_join(sym, itemsize, size // itemsize, where)
    return inverse(sym, base, itemsize, transform)


def _decode_plain_ans(payload: bytes | memoryview | np.ndarray, pred: np.ndarray, itemsize: int, size: int,
                      where: str) -> np.ndarray:
    """A dense or sparse ANS frame (the body of a low-rank frame is one of these, never another)."""
    if entropy.is_frame(payload):
        return entropy.decode(payload, pred, itemsize, size, where)
    if sparse.is_frame(payload):
        return sparse.decode(payload, pred, itemsize, size, where)
    raise CorruptDiffError(f"{where}: payload is neither an ANS (dense, sparse or low-rank) nor a zstd frame; the diff "
                           "is corrupt (download it again), or made by a newer orca-diff (pip install -U orca-diff)")


def _layout_sizes(target: np.ndarray, base: np.ndarray | None, itemsize: int, transform: str,
                  level: int) -> dict[str, int]:
    """{layout: zstd frame bytes of the sample} for the layouts the data has a choice of."""
    if transform != "ulp" or itemsize != 2:
        lay = "planes" if itemsize > 1 else "bytes"
        return {lay: -1}
    return {lay: len(encode_chunk(target, base, itemsize, transform, lay, level)) for lay in ("planes", "escape")}


def _smallest_layout(sizes: dict[str, int]) -> str:
    if "escape" in sizes and sizes["escape"] < sizes["planes"]:
        return "escape"
    return next(iter(sizes))


def choose_layout(target: np.ndarray, base: np.ndarray | None, itemsize: int, transform: str,
                  level: int = DEFAULT_LEVEL) -> str:
    """The layout that compresses a sample chunk smallest (the per-tensor choice make stores in
    the manifest). Only ulp deltas of 16-bit floats have a choice; ties keep planes."""
    return _smallest_layout(_layout_sizes(target, base, itemsize, transform, level))


def choose_encoding(target: np.ndarray, base: np.ndarray | None, itemsize: int, transform: str,
                    level: int = DEFAULT_LEVEL, dtype: str | None = None) -> tuple[str, str]:
    """(layout, codec) that compress a sample chunk smallest: ``ans`` for float ulp deltas when
    its frame is smaller than the zstd frame of the best layout (:func:`choose_layout`), which
    is kept for the chunks that fall back to zstd. A sample of at least ANS_TRY_ZSTD_BYTES whose
    ANS frame is over 1/ANS_TRY_ZSTD_RATIO of it is ``ans`` without a zstd trial (the rule of
    ``_ans_or_zstd``, where zstd never won); its layout then only serves fallback chunks (small
    or near-constant ones) and is chosen on the sample's first LAYOUT_FALLBACK_SAMPLE_BYTES. A
    sample with at most 1/sparse.MAX_FRACTION of its elements changed is ``ans`` too (each chunk
    then keeps the smallest of its dense, sparse and zstd frames).
    ``ORCA_DIFF_CODEC=zstd`` keeps zstd (the format-version-1 encoding; for comparisons)."""
    if transform != "ulp" or itemsize not in (2, 4, 8) or not target.size or os.environ.get("ORCA_DIFF_CODEC") == "zstd":
        return choose_layout(target, base, itemsize, transform, level), "zstd"
    a = len(ans_frame(target, base, itemsize, dtype))  # type: ignore[arg-type]
    if target.size >= ANS_TRY_ZSTD_BYTES and a * ANS_TRY_ZSTD_RATIO >= target.size:
        k = min(target.size, LAYOUT_FALLBACK_SAMPLE_BYTES) // itemsize * itemsize
        return choose_layout(target[:k], None if base is None else base[:k], itemsize, transform, level), "ans"
    sizes = _layout_sizes(target, base, itemsize, transform, level)
    layout = _smallest_layout(sizes)
    # the chosen layout's sample frame was compressed once already (16-bit); 4/8-byte have one layout
    z = sizes[layout] if sizes[layout] >= 0 else len(encode_chunk(target, base, itemsize, transform, layout, level))
    # a near-identical sample is ans whatever its size: its fixed frame costs (tables, headers)
    # weigh on a sample far more than on a whole chunk, and its chunks try zstd anyway (its frame
    # is under 1/ANS_TRY_ZSTD_RATIO of the chunk) and keep the smaller
    near_identical = sparse.changed_count(target, base, itemsize) * sparse.MAX_FRACTION <= target.size // itemsize
    return layout, ("ans" if a < z or near_identical else "zstd")
