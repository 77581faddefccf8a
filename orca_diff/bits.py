"""Pure bit-pattern arithmetic on tensor elements: dtype casts and reversible deltas.

Floats are handled as unsigned integers of their width (bf16 as uint16), so everything is exact
and needs no torch. The two delta transforms are bijections given the base:

* ``xor``: ``t ^ b`` (any dtype);
* ``ulp``: ``zigzag(ordered(t) - ordered(b))`` modulo 2**w, where ``ordered`` maps a
  sign-magnitude float to an integer that increases with its value. Small numeric changes give
  small integers, which entropy-code 1-2 points better than XOR (see docs/performance.md).

Casts are deterministic and specified in docs/format.md: widening is exact; narrowing rounds to
nearest, ties to even (numpy's IEEE casts for f64->f32->f16; the standard bias trick for bf16,
NaN -> quiet NaN keeping the sign), as torch does.
"""

from __future__ import annotations

import numpy as np

UINT_FOR_SIZE = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
INT_FOR_SIZE = {1: np.int8, 2: np.int16, 4: np.int32, 8: np.int64}
FLOAT_VIEW = {"F16": np.float16, "F32": np.float32, "F64": np.float64}
BITS_SIZE = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}


def as_elements(raw: np.ndarray, itemsize: int) -> np.ndarray:
    """View little-endian raw bytes as unsigned integers of ``itemsize`` bytes (no copy)."""
    return raw.view(UINT_FOR_SIZE[itemsize])


def float_to_bits(values: np.ndarray, dtype: str) -> np.ndarray:
    """Bit patterns of a numpy float array that already has ``dtype``'s width (not BF16)."""
    return values.view(UINT_FOR_SIZE[BITS_SIZE[dtype]])


def bits_to_float(bits: np.ndarray, dtype: str) -> np.ndarray:
    """Values of bit patterns, as float32 for 16-bit types (analysis and tests only)."""
    if dtype == "BF16":
        return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)
    return bits.view(FLOAT_VIEW[dtype])


def _f32_to_bf16(bits32: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even fp32 -> bf16, NaN -> quiet NaN with the same sign."""
    x = bits32.astype(np.uint32, copy=False)
    lsb = (x >> np.uint32(16)) & np.uint32(1)
    rounded = ((x + np.uint32(0x7FFF) + lsb) >> np.uint32(16)).astype(np.uint16)
    nan = (x & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    if nan.any():
        quiet = ((x >> np.uint32(16)) | np.uint32(0x0040)).astype(np.uint16)
        rounded = np.where(nan, quiet, rounded)
    return rounded


def cast_bits(bits: np.ndarray, src: str, dst: str) -> np.ndarray:
    """Cast float bit patterns from ``src`` to ``dst`` (F16, BF16, F32, F64), as specified.

    Every cast goes through fp32 except F64<->F32 itself, so e.g. F64->BF16 rounds twice
    (F64->F32->BF16): deterministic, and documented in docs/format.md.
    """
    if src == dst:
        return bits
    # to fp32 (exact for F16 and BF16; RNE for F64)
    if src == "F32":
        f32 = bits.view(np.uint32)
    elif src == "BF16":
        f32 = bits.astype(np.uint32) << np.uint32(16)
    elif src == "F16":
        f32 = bits.view(np.float16).astype(np.float32).view(np.uint32)
    elif src == "F64":
        with np.errstate(over="ignore", invalid="ignore"):
            f32 = bits.view(np.float64).astype(np.float32).view(np.uint32)
    else:
        raise ValueError(f"cannot cast from {src}")
    if dst == "F32":
        return f32
    if dst == "BF16":
        return _f32_to_bf16(f32)
    if dst == "F16":
        with np.errstate(over="ignore", invalid="ignore"):
            return f32.view(np.float32).astype(np.float16).view(np.uint16)
    if dst == "F64":
        if src == "F16":
            return bits.view(np.float16).astype(np.float64).view(np.uint64)
        return f32.view(np.float32).astype(np.float64).view(np.uint64)
    raise ValueError(f"cannot cast to {dst}")


def _ordered(u: np.ndarray) -> np.ndarray:
    """Map sign-magnitude float bits to two's-complement order (an involution), in place-safe form."""
    mask = _order_mask(u)
    np.bitwise_xor(u, mask, out=mask)
    return mask


def _order_mask(u: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """(all ones if negative else 0) & 0x7f..f, as unsigned: what ``_ordered`` XORs in."""
    size = u.dtype.itemsize
    signed = u.view(INT_FOR_SIZE[size])
    if out is None:
        out = np.empty_like(u)
    np.right_shift(signed, size * 8 - 1, out=out.view(INT_FOR_SIZE[size]))
    np.bitwise_and(out, u.dtype.type((1 << (size * 8 - 1)) - 1), out=out)
    return out


def ulp_delta(target: np.ndarray, base: np.ndarray) -> np.ndarray:
    """zigzag(ordered(target) - ordered(base)) as unsigned ints of the same width."""
    size = target.dtype.itemsize
    d = _ordered(target)
    tmp = _ordered(base)
    np.subtract(d, tmp, out=d)
    sd = d.view(INT_FOR_SIZE[size])
    np.right_shift(sd, size * 8 - 1, out=tmp.view(INT_FOR_SIZE[size]))
    np.left_shift(d, 1, out=d)
    np.bitwise_xor(d, tmp, out=d)
    return d


def ulp_undelta(delta: np.ndarray, base: np.ndarray) -> np.ndarray:
    """Inverse of :func:`ulp_delta`: the target bits from the delta and the base bits.

    Works with two temporaries of the chunk's size (apply's hot path): unzigzag, add to the
    ordered base, map back."""
    one = delta.dtype.type(1)
    d = np.bitwise_and(delta, one)
    np.negative(d, out=d)                        # 0 - (z & 1): all ones for odd z
    tmp = np.right_shift(delta, one)
    np.bitwise_xor(d, tmp, out=d)                # unzigzag(z)
    _order_mask(base, out=tmp)
    np.bitwise_xor(tmp, base, out=tmp)           # ordered(base)
    np.add(d, tmp, out=d)                        # ordered(target)
    _order_mask(d, out=tmp)
    np.bitwise_xor(d, tmp, out=d)                # target
    return d
