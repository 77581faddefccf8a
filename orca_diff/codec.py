"""Encode and decode one chunk: pure functions from bytes to bytes.

A chunk of a target tensor is rebuilt from its payload and, for delta chunks, the matching
elements of the base tensor cast to the target dtype (:func:`base_prediction`):

    encode: transform(target, base) -> byte planes -> zstd frame
    decode: zstd frame (size-checked) -> un-plane -> inverse transform(., base)

Byte planes put the k-th byte of every element together: the high bytes of small deltas are
almost all zero and compress to nearly nothing, the low bytes carry the entropy. The decoder
refuses a frame that would expand beyond the declared size (a decompression bomb).
"""

from __future__ import annotations

import threading

import numpy as np
import zstandard

from .bits import UINT_FOR_SIZE, cast_bits, ulp_delta, ulp_undelta
from .errors import CorruptDiffError

DEFAULT_LEVEL = 3
_local = threading.local()


def _compressor(level: int) -> zstandard.ZstdCompressor:
    cache = getattr(_local, "cctx", None)
    if cache is None:
        cache = _local.cctx = {}
    c = cache.get(level)
    if c is None:
        c = cache[level] = zstandard.ZstdCompressor(level=level, write_content_size=True, write_checksum=False)
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
    from .tensors import DTYPE_SIZES

    bits = base_raw.view(UINT_FOR_SIZE[DTYPE_SIZES[base_dtype]])
    return cast_bits(bits, base_dtype, target_dtype).view(np.uint8)


def _to_planes(raw: np.ndarray, itemsize: int) -> np.ndarray:
    if itemsize == 1:
        return raw
    return np.ascontiguousarray(raw.reshape(-1, itemsize).T).reshape(-1)


def _from_planes(planes: np.ndarray, itemsize: int) -> np.ndarray:
    if itemsize == 1:
        return planes
    return np.ascontiguousarray(planes.reshape(itemsize, -1).T).reshape(-1)


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


def encode_chunk(target: np.ndarray, base: np.ndarray | None, itemsize: int, transform: str,
                 planes: bool = True, level: int = DEFAULT_LEVEL) -> bytes:
    """Compress one chunk. ``target`` and ``base`` are uint8 arrays of equal length (``base`` is
    the prediction already cast to the target dtype, or None for raw chunks)."""
    sym = forward(target, base, itemsize, transform)
    if planes:
        sym = _to_planes(sym, itemsize)
    return _compressor(level).compress(sym.data if sym.flags.c_contiguous else sym.tobytes())


def decode_chunk(payload: bytes | memoryview, base: np.ndarray | None, itemsize: int, transform: str,
                 size: int, planes: bool = True, where: str = "chunk") -> np.ndarray:
    """Decompress and invert one chunk into exactly ``size`` target bytes (uint8 array)."""
    try:
        params = zstandard.get_frame_parameters(payload)
        if params.content_size != size:
            raise CorruptDiffError(
                f"{where}: frame declares {params.content_size} bytes, manifest says {size}; the diff is corrupt"
            )
        out = _decompressor().decompress(payload, max_output_size=size)
    except zstandard.ZstdError as exc:
        raise CorruptDiffError(f"{where}: cannot decompress ({exc}); the diff is corrupt, download it again") from None
    if len(out) != size:
        raise CorruptDiffError(f"{where}: decompressed to {len(out)} bytes, expected {size}; the diff is corrupt")
    sym = np.frombuffer(out, dtype=np.uint8)
    if planes:
        sym = _from_planes(sym, itemsize)
    return inverse(sym, base, itemsize, transform)
