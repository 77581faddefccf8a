"""The compiled ans decoder's vector paths (orca_diff/_entropy.c) against the numpy coder: random
tensors and base predictions, every context model (bucket merge 0-4, previous-token context on
and off, forced), lane counts that run 4, 2 and 1 interleaved groups and scalar lanes, lengths
that are not multiples of 8, 16 or the 128-step staging block, 2-, 4- and 8-byte elements; the
C and numpy encoders write the same bytes and every decoder path (AVX2 with the pdep or the
shuffle raw-bit pass, scalar C, numpy) returns the target exactly."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from orca_diff import entropy
from orca_diff.bits import cast_bits

needs_c = pytest.mark.skipif(not entropy.c_available(), reason="C extension not built")
UINT = {2: np.uint16, 4: np.uint32, 8: np.uint64}
DTYPES = {2: ["BF16", "F16"], 4: ["F32"], 8: ["F64"]}


def tensors(rng, n: int, w: int, dtype: str, mode: str):
    if mode == "tune":  # weight-like base, small steps, some elements frozen
        b = (0.02 * rng.standard_normal(n)).astype(np.float32)
        t = b + (10.0 ** rng.uniform(-6, -2) * rng.standard_normal(n)).astype(np.float32)
        t = np.where(rng.random(n) < 0.3, b, t).astype(np.float32)
        if w == 8:
            return t.astype(np.float64).view(np.uint8), b.astype(np.float64).view(np.uint8)
        if w == 4:
            return t.view(np.uint8), b.view(np.uint8)
        return (cast_bits(t.view(np.uint32), "F32", dtype).view(np.uint8),
                cast_bits(b.view(np.uint32), "F32", dtype).view(np.uint8))
    top = np.iinfo(UINT[w]).max
    b = rng.integers(0, top, n, dtype=UINT[w], endpoint=True)
    if mode == "random":
        t = rng.integers(0, top, n, dtype=UINT[w], endpoint=True)
    elif mode == "equal":
        t = b.copy()
    else:  # "near": +-1..3 ulps on half the elements (many token-0 runs: the previous-token context)
        d = rng.integers(-3, 4, n).astype(np.int64) * (rng.random(n) < 0.5)
        t = (b.astype(np.int64) + d).astype(UINT[w]) if w < 8 else (b + d.astype(np.uint64))
    return t.view(np.uint8), b.view(np.uint8)


@st.composite
def cases(draw):
    w = draw(st.sampled_from([2, 2, 2, 4, 8]))
    dtype = draw(st.sampled_from(DTYPES[w]))
    # lanes = n // 8192 (1-7), 8 (8-15) or a multiple of 16: 8 runs one vector group, 16 two, 32
    # four, 48 four + two; extra elements make n % lanes != 0 and steps not multiples of 8 / 128
    lanes = draw(st.sampled_from([1, 3, 8, 16, 32, 48] if w < 8 else [1, 8, 16]))
    n = lanes * 8192 + draw(st.integers(0, 8191 if lanes < 8 else 8 * lanes)) + draw(st.sampled_from([0, 1, 7, 9, 127]))
    if lanes == 1 and draw(st.booleans()):  # short chunks: one scalar lane
        n = draw(st.integers(1, 9000))
    mode = draw(st.sampled_from(["tune", "tune", "near", "random", "equal"]))
    model = draw(st.sampled_from([None, (0, True), (0, False), (1, True), (2, False), (3, True), (4, True), (4, False)]))
    seed = draw(st.integers(0, 2**32 - 1))
    return w, dtype, n, mode, model, seed


@needs_c
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(cases())
def test_every_decoder_path_returns_the_target_and_c_and_numpy_frames_are_identical(case):
    w, dtype, n, mode, model, seed = case
    rng = np.random.default_rng(seed)
    t, b = tensors(rng, n, w, dtype, mode)
    assert entropy.lane_count(n) in (1, 2, 3, 4, 5, 6, 7, 8, 16, 32, 48)
    saved = entropy.choose_model
    try:
        if model is not None:
            entropy.choose_model = entropy.fixed_model(*model)
        frame = entropy.encode(t, b, w, dtype)
        assert entropy.encode(t, b, w, dtype, pure=True) == frame
    finally:
        entropy.choose_model = saved
    if model is not None:
        flags, mshift = frame[5], frame[9]
        assert (mshift, bool(flags & 1)) == model
    outs = {"c": entropy.decode(frame, b, w, t.size)}
    for var in ("ORCA_DIFF_NO_PDEP", "ORCA_DIFF_NO_SIMD"):
        os.environ[var] = "1"
        try:
            outs[var] = entropy.decode(frame, b, w, t.size)
        finally:
            del os.environ[var]
    if n <= 200_000:  # the numpy decoder is slow on a loaded machine
        outs["numpy"] = entropy.decode(frame, b, w, t.size, pure=True)
    for name, out in outs.items():
        assert out.tobytes() == t.tobytes(), name


@needs_c
@pytest.mark.parametrize("prev", [False, True])
@pytest.mark.parametrize("n", [48 * 8192 + 8 * 129 + 5, 16 * 8192 + 16 * 128, 8 * 8192 + 8 * 135 + 3])
def test_staging_block_edges_and_both_contexts_decode_exactly(n, prev):
    """Steps per lane at, just above and below multiples of the 128-step staging block."""
    rng = np.random.default_rng(n)
    t, b = tensors(rng, n, 2, "BF16", "near")
    saved = entropy.choose_model
    try:
        entropy.choose_model = entropy.fixed_model(0, prev)
        frame = entropy.encode(t, b, 2, "BF16")
    finally:
        entropy.choose_model = saved
    assert bool(frame[5] & 1) == prev
    assert entropy.decode(frame, b, 2, t.size).tobytes() == t.tobytes()
    os.environ["ORCA_DIFF_NO_PDEP"] = "1"
    try:
        assert entropy.decode(frame, b, 2, t.size).tobytes() == t.tobytes()
    finally:
        del os.environ["ORCA_DIFF_NO_PDEP"]
