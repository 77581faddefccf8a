"""The no-base ANS frame (``ODN1``, docs/format.md §3d): float chunks that nothing predicts (added
vocabulary rows, new heads, a model diffed against nothing) coded by exponent, as ZipNN and
DFloat11 do, with the ANS coder instead of Huffman.

Why: byte planes + zstd (the ``raw`` chunks of format v1) leave the exponent split across two
bytes for bf16 (sign + 7 exponent bits, then 1 exponent bit + mantissa), and Huffman cannot spend
less than a bit on a symbol. Here each element ``x`` (sign, exponent field ``e`` of ``ebits`` bits
at ``shift``, ``shift`` mantissa bits below it) is mapped to the symbol

    S(x) = ((c - e) mod 2^ebits) << (shift + 1) | mantissa << 1 | sign

with ``c`` a high exponent of the chunk (chosen below, stored in the header), so the distance of
the exponent below ``c`` leads: the dense coder's token (bit length + the two bits below the
leading one, docs/format.md §3b) then holds the whole distance for distances under 8 and the top
mantissa bits, and the rest of the mantissa and the sign are raw bits. The symbols are coded as
one dense frame against a zero prediction (``entropy.encode`` of ``ulp_undelta(S, 0)``), so the
C and numpy coders give the same bytes.
"""

from __future__ import annotations

import struct

import numpy as np

from . import entropy
from .bits import UINT_FOR_SIZE, ulp_delta, ulp_undelta
from .errors import CorruptDiffError

MAGIC = b"ODN1"
#: The float dtypes it codes (their exponent fields: entropy.EXPONENT_FIELD).
DTYPES = ("BF16", "F16", "F32", "F64")
#: magic, itemsize, exponent shift, exponent bits, c (the exponent the distances count down from).
_HEAD = struct.Struct("<4sBBBB")
#: Elements with an exponent above ``c`` cost a long token (their distance wraps): ``c`` is the
#: highest exponent with at least 1/C_TAIL of the elements at or above it.
C_TAIL = 4096
#: Elements converted per step when decoding (bounds the temporaries beside the chunk).
SLICE = 1 << 18


def is_frame(payload: bytes | memoryview | np.ndarray) -> bool:
    return bytes(memoryview(payload)[:4]) == MAGIC


def _field(dtype: str) -> tuple[int, int]:
    shift, ebits = entropy.EXPONENT_FIELD[dtype]
    return shift, ebits


def _to_symbols(x: np.ndarray, shift: int, ebits: int, c: int) -> np.ndarray:
    t = x.dtype.type
    w = 8 * x.dtype.itemsize
    e = (x >> t(shift)) & t((1 << ebits) - 1)
    mant = x & t((1 << shift) - 1)
    sign = x >> t(w - 1)
    dist = (t(c) - e) & t((1 << ebits) - 1)
    return (dist << t(shift + 1)) | (mant << t(1)) | sign


def _from_symbols(s: np.ndarray, shift: int, ebits: int, c: int) -> np.ndarray:
    t = s.dtype.type
    w = 8 * s.dtype.itemsize
    dist = s >> t(shift + 1)
    mant = (s >> t(1)) & t((1 << shift) - 1)
    sign = s & t(1)
    e = (t(c) - dist) & t((1 << ebits) - 1)
    return (sign << t(w - 1)) | (e << t(shift)) | mant


def choose_c(x: np.ndarray, shift: int, ebits: int) -> int:
    """The highest exponent value with at least 1/C_TAIL of the elements at or above it."""
    e = ((x >> x.dtype.type(shift)) & x.dtype.type((1 << ebits) - 1)).astype(np.int64)
    counts = np.bincount(e, minlength=1 << ebits)
    above = np.cumsum(counts[::-1])[::-1]  # elements with exponent >= v
    ok = np.flatnonzero(above * C_TAIL >= x.size)
    return int(ok[-1]) if ok.size else 0


def encode(target: np.ndarray, dtype: str, pure: bool | None = None) -> bytes:
    """The no-base frame of ``target`` (uint8 bytes of whole ``dtype`` elements, at least one)."""
    shift, ebits = _field(dtype)
    w = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8}[dtype]
    x = np.ascontiguousarray(target).view(UINT_FOR_SIZE[w])
    c = choose_c(x, shift, ebits)
    s = _to_symbols(x, shift, ebits, c)
    zero = np.zeros_like(s)
    y = ulp_undelta(s, zero)  # ulp_delta(y, 0) == s: the dense coder codes exactly these symbols
    frame = entropy.encode(y.view(np.uint8), zero.view(np.uint8), w, None, pure)
    return _HEAD.pack(MAGIC, w, shift, ebits, c) + frame


def decode(payload: bytes | memoryview | np.ndarray, itemsize: int, size: int, where: str = "chunk",
           pure: bool | None = None) -> np.ndarray:
    """Exactly ``size`` target bytes (uint8) from a no-base frame."""
    buf = bytes(payload) if not isinstance(payload, bytes) else payload
    if len(buf) < _HEAD.size:
        raise CorruptDiffError(f"{where}: no-base ANS frame is truncated; the diff is corrupt, download it again")
    magic, w, shift, ebits, c = _HEAD.unpack_from(buf)
    if (magic != MAGIC or w != itemsize or w not in (2, 4, 8) or not 1 <= ebits <= 11
            or shift + ebits + 1 != 8 * w or c >= 1 << ebits or size % w or size == 0):
        raise CorruptDiffError(f"{where}: no-base ANS frame header is invalid (element size {w} vs {itemsize}, "
                               "exponent field); the diff is corrupt, download it again")
    zero = np.zeros(size, dtype=np.uint8)  # calloc'd: untouched zero pages
    y = entropy.decode(buf[_HEAD.size:], zero, w, size, where, pure).view(UINT_FOR_SIZE[w])
    del zero
    z = np.zeros(SLICE, dtype=y.dtype)
    for a in range(0, y.size, SLICE):  # in place, a slice at a time: the chunk plus O(SLICE) bytes
        part = y[a: a + SLICE]
        part[:] = _from_symbols(ulp_delta(part, z[: part.size]), shift, ebits, c)
    return y.view(np.uint8)


__all__ = ["encode", "decode", "is_frame", "MAGIC"]
