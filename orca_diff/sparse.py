"""The sparse ANS frame (``ODS1``, docs/format.md §3c): near-identical chunks coded as the gaps
between changed elements plus the changed elements' deltas.

Why: the dense frame (:mod:`orca_diff.entropy`) codes one token per element, each of its up to
1024 lanes ending in a 32-bit state plus about 3 bytes of renormalisation slack. When 99.9 % of
elements are unchanged (successive releases of a fine-tune, an RL step, a re-save) a lane
carries ~14 bytes of information, so the lane overhead is +50 %; at 1 % changed the dense frame is
still ~3 % above the order-0 entropy. Here, with ``k`` changed elements:

* the ``k`` gaps ``g_i = p_i - p_(i-1) - 1`` (``p_-1 = -1``) are the symbols of one dense frame of
  4-byte elements (an exponent-free context: the base prediction is 0). Their token is the bit
  length plus two bits of the gap, so a geometric gap distribution costs its entropy, which is
  the entropy of "changed or not";
* the ``k`` changed elements are one dense frame over their own base elements, so their deltas
  keep the base-exponent context.

Only ``k`` tokens are decoded, so the frame also decodes faster than a dense one. Both frames are
what :func:`entropy.encode` writes, hence identical bytes from the C and numpy coders. The frame
is chosen per chunk when it is smaller (codec._ans_or_zstd); a decoder refuses any frame that is
not the one valid encoding (positions past the chunk, an unchanged element listed, more changed
elements than the encoder would ever send sparse, sizes that do not add up).
"""

from __future__ import annotations

import struct

import numpy as np

from . import entropy
from .bits import UINT_FOR_SIZE, ulp_undelta
from .errors import CorruptDiffError

MAGIC = b"ODS1"
#: magic, itemsize, reserved (0), elements, changed elements, bytes of the gap frame.
_HEAD = struct.Struct("<4sBBIII")
#: Sparse frames are written (and accepted) only for chunks with at most 1/MAX_FRACTION of their
#: elements changed: beyond that the dense frame is smaller, and the bound keeps the decoder's
#: temporaries (positions, gaps, values: ~16 bytes per changed element) under 2x the chunk.
MAX_FRACTION = 8


def is_frame(payload: bytes | memoryview | np.ndarray) -> bool:
    return bytes(memoryview(payload)[:4]) == MAGIC


def changed_count(target: np.ndarray, pred: np.ndarray, itemsize: int) -> int:
    """Elements of ``target`` that differ from ``pred`` (uint8 arrays of whole elements)."""
    u = UINT_FOR_SIZE[itemsize]
    return int(np.count_nonzero(target.view(u) != pred.view(u)))


def encode(target: np.ndarray, pred: np.ndarray, itemsize: int, dtype: str | None = None,
           pure: bool | None = None) -> bytes | None:
    """The sparse frame of ``target`` given ``pred``, or None where too many elements changed."""
    u = UINT_FOR_SIZE[itemsize]
    t_u = np.ascontiguousarray(target).view(u)
    p_u = np.ascontiguousarray(pred).view(u)
    n = t_u.size
    pos = np.flatnonzero(t_u != p_u)
    k = pos.size
    if n == 0 or n >= 1 << 31 or k * MAX_FRACTION > n:
        return None
    if k == 0:
        return _HEAD.pack(MAGIC, itemsize, 0, n, 0, 0)
    gaps = np.diff(pos, prepend=-1) - 1  # >= 0, < 2^31
    gap_elems = ulp_undelta(gaps.astype(np.uint32), np.zeros(k, dtype=np.uint32))  # ulp_delta(., 0) = gaps
    gap_frame = entropy.encode(gap_elems.view(np.uint8), np.zeros(4 * k, dtype=np.uint8), 4, None, pure)
    value_frame = entropy.encode(t_u[pos].view(np.uint8), p_u[pos].view(np.uint8), itemsize, dtype, pure)
    return b"".join((_HEAD.pack(MAGIC, itemsize, 0, n, k, len(gap_frame)), gap_frame, value_frame))


def decode(payload: bytes | memoryview | np.ndarray, pred: np.ndarray, itemsize: int, size: int,
           where: str = "chunk", pure: bool | None = None) -> np.ndarray:
    """Exactly ``size`` target bytes (uint8) from a sparse frame and the base prediction."""
    buf = bytes(payload) if not isinstance(payload, bytes) else payload
    bad = f"{where}: sparse ANS frame"
    if len(buf) < _HEAD.size:
        raise CorruptDiffError(f"{bad} is truncated ({len(buf)} bytes); the diff is corrupt, download it again")
    magic, w, reserved, n, k, gap_len = _HEAD.unpack_from(buf)
    if magic != MAGIC or w != itemsize or reserved or size % itemsize or n != size // itemsize or n == 0:
        raise CorruptDiffError(f"{bad} header is invalid (element size {w} vs {itemsize}, {n} elements vs "
                               f"{size // itemsize}); the diff is corrupt, download it again")
    if k * MAX_FRACTION > n or (k == 0) != (gap_len == 0) or (k == 0 and len(buf) != _HEAD.size) \
            or _HEAD.size + gap_len > len(buf):
        raise CorruptDiffError(f"{bad} declares {k} changed elements in {n} and a {gap_len}-byte gap frame in "
                               f"{len(buf)} bytes; the diff is corrupt, download it again")
    u = UINT_FOR_SIZE[itemsize]
    p_u = np.ascontiguousarray(pred).view(u)
    if p_u.size != n:
        raise ValueError("base prediction and chunk sizes differ")
    out = p_u.copy()
    if k == 0:
        return out.view(np.uint8)
    gap_frame = buf[_HEAD.size: _HEAD.size + gap_len]
    value_frame = buf[_HEAD.size + gap_len:]
    if not entropy.is_frame(gap_frame) or not entropy.is_frame(value_frame):
        raise CorruptDiffError(f"{bad}: its parts are not ANS frames; the diff is corrupt, download it again")
    gap_elems = entropy.decode(gap_frame, np.zeros(4 * k, dtype=np.uint8), 4, 4 * k, f"{where} (gaps)", pure)
    gaps = _symbols_over_zero(gap_elems.view(np.uint32))
    pos = np.cumsum(gaps.astype(np.int64) + 1) - 1
    if int(pos[-1]) >= n:
        raise CorruptDiffError(f"{bad}: a changed element lies past the chunk's {n} elements; the diff is corrupt")
    base_at = p_u[pos]
    values = entropy.decode(value_frame, base_at.view(np.uint8), itemsize, itemsize * k, f"{where} (values)",
                            pure).view(u)
    if (values == base_at).any():
        raise CorruptDiffError(f"{bad} lists an unchanged element; the diff is corrupt, download it again")
    out[pos] = values
    return out.view(np.uint8)


def _symbols_over_zero(elems: np.ndarray) -> np.ndarray:
    """The ulp-delta symbols of ``elems`` against a zero base: what the gap frame carries."""
    from .bits import ulp_delta

    return ulp_delta(elems.copy(), np.zeros_like(elems))


__all__ = ["encode", "decode", "is_frame", "changed_count", "MAGIC", "MAX_FRACTION"]
