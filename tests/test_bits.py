"""Bit arithmetic: the ulp delta is a bijection, casts follow the spec (and torch where it is defined)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from orca_diff.bits import cast_bits, ulp_delta, ulp_undelta


@settings(max_examples=200, deadline=None)
@given(st.sampled_from([np.uint16, np.uint32, np.uint64]), st.data())
def test_ulp_delta_round_trips_any_bit_patterns(dtype, data):
    n = data.draw(st.integers(0, 64))
    width = np.dtype(dtype).itemsize * 8
    ints = st.integers(0, 2**width - 1)
    t = np.array(data.draw(st.lists(ints, min_size=n, max_size=n)), dtype=dtype)
    b = np.array(data.draw(st.lists(ints, min_size=n, max_size=n)), dtype=dtype)
    assert (ulp_undelta(ulp_delta(t, b), b) == t).all()


def test_ulp_delta_of_neighbouring_floats_is_small():
    x = np.array([1.0, -1.0, 0.0, 3.5e-3, -2e-2], dtype=np.float32).view(np.uint32)
    up = np.nextafter(x.view(np.float32), np.float32(np.inf)).view(np.uint32)
    down = np.nextafter(x.view(np.float32), np.float32(-np.inf)).view(np.uint32)
    assert list(ulp_delta(up, x)) == [2] * 5       # +1 ulp -> zigzag 2
    # -1 ulp -> zigzag 1; below +0 the order passes -0 first, so the smallest negative is 2 steps (zigzag 3)
    assert list(ulp_delta(down, x)) == [1, 1, 3, 1, 1]


def test_casts_match_torch_for_all_non_nan_values():
    torch = pytest.importorskip("torch")  # torch is in the CI environment (the [torch] extra)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200_000, generator=g) * torch.logspace(-45, 38, 200_000)
    x[:4] = torch.tensor([float("inf"), -float("inf"), -0.0, 65504.0])
    b32 = x.numpy().view(np.uint32)
    bf = torch.tensor(cast_bits(b32, "F32", "BF16").view(np.int16))
    assert torch.equal(bf.view(torch.bfloat16), x.to(torch.bfloat16))
    f16 = torch.tensor(cast_bits(b32, "F32", "F16").view(np.int16))
    assert torch.equal(f16.view(torch.float16), x.to(torch.float16))
    xb = x.to(torch.bfloat16)
    bf_bits = xb.view(torch.int16).numpy().view(np.uint16)
    assert torch.equal(torch.tensor(cast_bits(bf_bits, "BF16", "F32").view(np.int32)).view(torch.float32), xb.float())
    h = x.to(torch.float16)
    assert torch.equal(torch.tensor(cast_bits(h.view(torch.int16).numpy().view(np.uint16), "F16", "BF16").view(np.int16)).view(torch.bfloat16),
                       h.to(torch.bfloat16))


def test_nan_narrows_to_quiet_nan_keeping_sign():
    nans = np.array([0x7FC00000, 0xFF800001, 0x7F800001], dtype=np.uint32)
    assert [hex(v) for v in cast_bits(nans, "F32", "BF16")] == ["0x7fc0", "0xffc0", "0x7fc0"]


def test_rne_ties_to_even_for_bf16():
    # 1 + 2^-8 is exactly halfway between bf16 1.0 and 1 + 2^-7: ties to the even one (1.0)
    half = np.array([np.float32(1 + 2**-8)]).view(np.uint32)
    assert cast_bits(half, "F32", "BF16")[0] == 0x3F80
    above = np.array([np.float32(1 + 2**-8 + 2**-20)]).view(np.uint32)
    assert cast_bits(above, "F32", "BF16")[0] == 0x3F81
