"""The ans codec (orca_diff.entropy, docs/format.md §3b): the C kernels and the pure-numpy path
write the same bytes and both invert them, the token scheme and table encoding are the specified
ones, and a hostile frame is refused with CorruptDiffError, never a crash, hang or wrong output."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from orca_diff import entropy
from orca_diff.bits import cast_bits
from orca_diff.codec import ZSTD_MAGIC, choose_encoding, decode_chunk, encode_chunk
from orca_diff.errors import CorruptDiffError

UINT = {2: np.uint16, 4: np.uint32, 8: np.uint64}
needs_c = pytest.mark.skipif(not entropy.c_available(), reason="C extension not built")
#: The paths every round trip runs through: numpy always, C when it is built.
PATHS = [True] + ([False] if entropy.c_available() else [])


def fine_tune(n: int, dtype: str, seed: int = 0, lr: float = 1e-4, frozen: float = 0.3):
    """(target, base) bytes of a weight-like tensor moved by small steps, some elements frozen."""
    rng = np.random.default_rng(seed)
    w = (0.02 * rng.standard_normal(n)).astype(np.float32)
    t = w + (lr * rng.standard_normal(n)).astype(np.float32)
    keep = rng.random(n) < frozen
    t[keep] = w[keep]
    if dtype == "F32":
        return t.view(np.uint8).copy(), w.view(np.uint8).copy()
    if dtype == "F64":
        return t.astype(np.float64).view(np.uint8).copy(), w.astype(np.float64).view(np.uint8).copy()
    return (cast_bits(t.view(np.uint32), "F32", dtype).view(np.uint8).copy(),
            cast_bits(w.view(np.uint32), "F32", dtype).view(np.uint8).copy())


SIZE = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8}
SPECIAL = {2: [0, 0x8000, 1, 0x7C00, 0xFC00, 0x7E00, 0x7F80, 0xFF80, 0x7FC0, 0xFFFF, 0x3C00],
           4: [0, 0x80000000, 1, 0x7F800000, 0xFF800000, 0x7FC00000, 0xFFFFFFFF, 0x3F800000],
           8: [0, 1 << 63, 1, 0x7FF0000000000000, 0xFFFFFFFFFFFFFFFF, 0x3FF0000000000000]}


@st.composite
def pairs(draw, max_len: int = 20000):
    """(dtype, target, base): fine-tune-like, arbitrary, equal, or special bit patterns."""
    dtype = draw(st.sampled_from(["BF16", "F16", "F32", "F64"]))
    w = SIZE[dtype]
    n = draw(st.integers(1, max_len))
    mode = draw(st.sampled_from(["tune", "tune", "random", "equal", "special"]))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    if mode == "tune":
        t, b = fine_tune(n, dtype, seed, lr=draw(st.sampled_from([1e-6, 1e-4, 1e-2])))
        return dtype, t, b
    top = np.iinfo(UINT[w]).max
    b = rng.integers(0, top, n, dtype=UINT[w], endpoint=True)
    if mode == "random":
        t = rng.integers(0, top, n, dtype=UINT[w], endpoint=True)
    elif mode == "equal":
        t = b.copy()
    else:
        sp = np.array(SPECIAL[w], dtype=UINT[w])
        b = sp[rng.integers(0, sp.size, n)]
        t = sp[rng.integers(0, sp.size, n)]
    return dtype, t.view(np.uint8), b.view(np.uint8)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pairs())
def test_c_and_numpy_write_identical_frames_and_both_decode_them(case):
    dtype, target, base = case
    w = SIZE[dtype]
    frame = entropy.encode(target, base, w, dtype, pure=True)
    if entropy.c_available():
        assert entropy.encode(target, base, w, dtype, pure=False) == frame
    for pure in PATHS:
        assert entropy.decode(frame, base, w, target.size, pure=pure).tobytes() == target.tobytes()


@pytest.mark.parametrize("n", [1, 2, 8191, 8192, 8193, 3 * 8192 + 5, 12 * 8192 + 7, 1024 * 8192 + 3])
def test_lane_split_edges_round_trip(n):
    t, b = fine_tune(n, "BF16", seed=n)
    frame = entropy.encode(t, b, 2, "BF16")
    assert entropy.decode(frame, b, 2, t.size).tobytes() == t.tobytes()
    if n < 200_000:  # 8 lanes in AVX2 (where available), then the last steps in scalar code
        assert entropy.encode(t, b, 2, "BF16", pure=True) == frame
        assert entropy.decode(frame, b, 2, t.size, pure=True).tobytes() == t.tobytes()


def test_lanes_are_one_per_8192_elements_in_whole_vector_groups_up_to_1024():
    ns = (1, 8191, 8192, 16384 + 1, 7 * 8192 + 9, 8 * 8192, 15 * 8192 + 5, 16 * 8192, 18 * 8192 + 7, 47 * 8192,
          1024 * 8192, 10**9)
    assert [entropy.lane_count(n) for n in ns] == [1, 1, 1, 2, 7, 8, 8, 16, 16, 32, 1024, 1024]
    assert entropy.lane_starts(10, 3).tolist() == [0, 4, 7, 10]  # contiguous; the first n % lanes hold one more
    idx, q, r = entropy._lane_matrix(10, 3)
    assert idx[:q].T.tolist() == [[0, 1, 2], [4, 5, 6], [7, 8, 9]] and (q, r) == (3, 1) and idx[3, 0] == 3


def test_token_scheme_is_hybrid_uint_with_two_mantissa_bits():
    s = np.array([0, 15, 16, 17, 23, 24, 31, 32, 0xFFFF], dtype=np.uint16)
    tok, nb, extra = entropy.tokenize(s)
    assert tok.tolist() == [0, 15, 16, 16, 17, 18, 19, 20, 63]
    assert nb.tolist() == [0, 0, 2, 2, 2, 2, 2, 3, 13]
    assert extra.tolist() == [0, 0, 0, 1, 3, 0, 3, 0, 0x1FFF]
    base, nbits = entropy.token_base(2)
    assert (base[tok] | extra).tolist() == s.tolist() and nbits[tok].tolist() == nb.tolist()
    big = np.array([2**64 - 1, 2**63, 2**40 + 12345], dtype=np.uint64)
    tok, nb, extra = entropy.tokenize(big)
    assert tok.tolist() == [255, 252, 16 + 36 * 4] and nb.tolist() == [61, 61, 38]
    b8, _ = entropy.token_base(8)
    assert (b8[tok] | extra).tolist() == big.tolist()
    assert [entropy.alphabet(w) for w in (2, 4, 8)] == [64, 128, 256]


def test_quantized_tables_sum_to_4096_and_keep_every_seen_token():
    rng = np.random.default_rng(1)
    counts = np.zeros((5, 256), dtype=np.int64)
    counts[0, :256] = 1                       # many tiny counts: rounding up overshoots
    counts[1, 0] = 10**9                      # one dominant token, a rare one
    counts[1, 200] = 1
    counts[2] = rng.integers(0, 10**6, 256)
    counts[4, 3] = 7                          # a single token
    f = entropy.quantize(counts)
    assert f[3].sum() == 0
    for r in (0, 1, 2, 4):
        assert f[r].sum() == entropy.PROB_SCALE
        assert ((f[r] > 0) == (counts[r] > 0)).all()
    assert f[4, 3] == 4096


def test_frame_header_is_the_specified_layout():
    t, b = fine_tune(20000, "F16")
    frame = entropy.encode(t, b, 2, "F16")
    magic, w, flags, shift, ebits, lo, mshift, n, raw_len = struct.unpack_from("<4sBBBBBBII", frame)
    assert (magic, w, shift, ebits, n) == (b"ODA1", 2, 10, 5, 20000) and flags in (0, 1)
    assert lo <= 16 and mshift <= 4  # a window of 16 of the 32 fp16 exponents, merged by 2^mshift
    assert entropy.bucket_lut(5, 3, 1).tolist() == [0] * 4 + [i // 2 for i in range(1, 16)] + [7] * 13
    contexts = (16 >> mshift) * (2 if flags else 1)
    _, pos = entropy._parse_tables(frame, 18, contexts, 64, "test")
    group_words = np.frombuffer(frame, "<u4", 1, pos)  # 20000 elements: 2 lanes, one group of 8
    assert group_words[0] >= 4 and pos + 4 + 2 * int(group_words[0]) + raw_len == len(frame)


# --------------------------------------------------------------------------- hostile frames


def _frame(n: int = 30000, dtype: str = "BF16"):
    t, b = fine_tune(n, dtype, seed=3)
    return entropy.encode(t, b, SIZE[dtype], dtype), t, b


@pytest.mark.parametrize("pure", PATHS)
def test_truncated_or_extended_frames_are_refused(pure):
    frame, t, b = _frame()
    for bad in (frame[:3], frame[:20], frame[:300], frame[: len(frame) // 2], frame[:-1], frame + b"\0",
                frame + b"\0\0"):
        with pytest.raises(CorruptDiffError):
            entropy.decode(bad, b, 2, t.size, pure=pure)


@pytest.mark.parametrize("pure", PATHS)
def test_every_prefix_of_a_frame_is_refused_in_one_line(pure):
    """Issue 20.8: an 18-byte frame (a valid header, nothing after) raised IndexError in the table
    parser; every prefix, the bare header included, is a CorruptDiffError."""
    frame, t, b = _frame(3000)
    assert entropy._HEAD.size == 18
    for k in list(range(0, 40)) + [len(frame) // 3, len(frame) - 2]:
        with pytest.raises(CorruptDiffError):
            entropy.decode(frame[:k], b, 2, t.size, pure=pure)


@pytest.mark.parametrize("pure", PATHS)
def test_a_frame_for_another_size_or_width_is_refused(pure):
    frame, t, b = _frame()
    with pytest.raises(CorruptDiffError, match="elements"):
        entropy.decode(frame, b[:-2], 2, t.size - 2, pure=pure)
    with pytest.raises(CorruptDiffError, match="header"):
        entropy.decode(frame, b, 4, t.size, pure=pure)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_any_corruption_is_refused_or_decodes_the_same_on_both_paths(data):
    """Flip, overwrite or splice bytes anywhere: each path refuses with CorruptDiffError or
    returns exactly `size` bytes, and the two paths agree."""
    frame, t, b = FRAME
    buf = bytearray(frame)
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(buf) - 1))
        buf[pos] = data.draw(st.integers(0, 255))
    results = []
    for pure in PATHS:
        try:
            out = entropy.decode(bytes(buf), b, 2, t.size, pure=pure)
            assert out.size == t.size
            results.append(out.tobytes())
        except CorruptDiffError:
            results.append(None)
    assert len(set(results)) == 1


FRAME = _frame(20000)


@needs_c
@pytest.mark.parametrize("lanes", [11, 40])  # 8 lanes (resp. 2 x 16 + 1 x 8) in AVX2
@pytest.mark.parametrize("dtype", ["BF16", "F16", "F32", "F64"])
def test_simd_and_scalar_c_coders_agree_with_numpy(monkeypatch, dtype, lanes):
    t, b = fine_tune(lanes * 8192 + 3, dtype, seed=5, lr=1e-3 if lanes > 11 else 1e-4)
    w = SIZE[dtype]
    frame = entropy.encode(t, b, w, dtype)
    assert entropy.encode(t, b, w, dtype, pure=True) == frame
    assert entropy.decode(frame, b, w, t.size).tobytes() == t.tobytes()
    monkeypatch.setenv("ORCA_DIFF_NO_SIMD", "1")
    assert entropy.encode(t, b, w, dtype) == frame
    assert entropy.decode(frame, b, w, t.size).tobytes() == t.tobytes()
    assert entropy.decode(frame, b, w, t.size, pure=True).tobytes() == t.tobytes()


@needs_c
@pytest.mark.parametrize("mode", ["random", "special", "equal"])
@pytest.mark.parametrize("w", [2, 4, 8])
def test_vector_coders_agree_with_numpy_on_arbitrary_bits(monkeypatch, w, mode):
    """16 lanes (2 groups of 8 in AVX2) of data that emits a word at almost every step (random),
    hits the largest tokens (special) or only token 0 (equal)."""
    rng = np.random.default_rng(w)
    n = 17 * 8192 + 5
    top = np.iinfo(UINT[w]).max
    if mode == "special":
        sp = np.array(SPECIAL[w], dtype=UINT[w])
        b, t = sp[rng.integers(0, sp.size, n)], sp[rng.integers(0, sp.size, n)]
    else:
        b = rng.integers(0, top, n, dtype=UINT[w], endpoint=True)
        t = rng.integers(0, top, n, dtype=UINT[w], endpoint=True) if mode == "random" else b.copy()
    t, b = t.view(np.uint8), b.view(np.uint8)
    frame = entropy.encode(t, b, w)
    assert entropy.encode(t, b, w, pure=True) == frame
    assert entropy.decode(frame, b, w, t.size).tobytes() == t.tobytes()
    monkeypatch.setenv("ORCA_DIFF_NO_SIMD", "1")
    assert entropy.encode(t, b, w) == frame
    assert entropy.decode(frame, b, w, t.size).tobytes() == t.tobytes()


@needs_c
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_corrupt_frames_with_many_lanes_are_refused_by_the_simd_path(data):
    frame, t, b = FRAME_WIDE
    buf = bytearray(frame)
    for _ in range(data.draw(st.integers(1, 3))):
        pos = data.draw(st.integers(0, len(buf) - 1))
        buf[pos] = data.draw(st.integers(0, 255))
    try:
        out = entropy.decode(bytes(buf), b, 2, t.size)
        assert out.size == t.size
    except CorruptDiffError:
        pass


FRAME_WIDE = _frame(33 * 8192 + 1)  # 32 lanes: 4 groups of 8 decoded together in AVX2


@needs_c
def test_c_kernels_refuse_inconsistent_arguments_without_crashing():
    from orca_diff import _entropy as c

    t, b = fine_tune(100, "BF16")
    freqs = np.zeros((32, 256), np.uint16)
    freqs[0, 0] = 4096
    tok = np.empty(t.size // 2, np.uint8)
    with pytest.raises(ValueError):
        c.analyze(t, b[:-2], 2, 7, 8, 1, tok)
    with pytest.raises(ValueError):
        c.analyze(t, b, 3, 7, 8, 1, tok)
    with pytest.raises(ValueError):
        c.analyze(t, b, 2, 7, 8, 0, tok)
    with pytest.raises(ValueError):
        c.analyze(t, b, 2, 7, 9, 1, tok)
    with pytest.raises(ValueError):
        c.analyze(t, b, 2, 7, 8, 1, tok[:-1])  # one token per element
    c.analyze(t, b, 2, 7, 8, 1, tok)
    with pytest.raises(ValueError):
        c.encode(tok[:-1], b, 2, 7, 8, 0, 4, 0, 1, freqs.tobytes())
    with pytest.raises(ValueError):
        c.encode(tok, b, 2, 7, 8, 0, 4, 0, 1, freqs.tobytes())  # tokens other than 0 have no frequency
    out = np.empty_like(t)
    with pytest.raises(ValueError):
        c.decode(out, b, 2, 7, 8, 0, 4, 0, 1, freqs.tobytes(), struct.pack("<I", 3), b"\0" * 4, b"")
    freqs[0, 0] = 4095
    with pytest.raises(ValueError):
        c.decode(out, b, 2, 7, 8, 0, 4, 0, 1, freqs.tobytes(), struct.pack("<I", 2), b"\0\1\0\0", b"")


# --------------------------------------------------------------------------- through the codec


@pytest.mark.parametrize("dtype", ["BF16", "F16", "F32"])
def test_ans_chunks_are_smaller_than_zstd_on_fine_tune_deltas(dtype):
    t, b = fine_tune(1 << 16, dtype)
    w = SIZE[dtype]
    layout = "escape" if w == 2 else "planes"
    z = encode_chunk(t, b, w, "ulp", layout)
    a = encode_chunk(t, b, w, "ulp", layout, codec="ans", dtype=dtype)
    assert a[:4] == entropy.MAGIC and len(a) < len(z)
    assert choose_encoding(t, b, w, "ulp", dtype=dtype) == (layout, "ans")
    assert decode_chunk(a, b, w, "ulp", t.size, layout, codec="ans").tobytes() == t.tobytes()


@pytest.mark.parametrize("dtype", ["BF16", "F16", "F32"])
def test_the_tensor_choice_skips_the_zstd_trial_only_where_zstd_cannot_win(dtype, monkeypatch):
    """A sample of 64 KiB or more whose ANS frame is over 1/64 of it is ans without compressing
    it with zstd (the rule of the chunk-level fallback); a near-constant one is still tried."""
    from orca_diff import codec

    w = SIZE[dtype]
    t, b = fine_tune((256 << 10) // w, dtype)
    sampled = []
    real = codec.encode_chunk
    monkeypatch.setattr(codec, "encode_chunk", lambda tt, *a, **k: sampled.append(tt.size) or real(tt, *a, **k))
    layout, chosen = choose_encoding(t, b, w, "ulp", dtype=dtype)
    assert chosen == "ans" and max(sampled, default=0) <= codec.LAYOUT_FALLBACK_SAMPLE_BYTES
    assert layout == codec.choose_layout(t[: codec.LAYOUT_FALLBACK_SAMPLE_BYTES], b[: codec.LAYOUT_FALLBACK_SAMPLE_BYTES],
                                         w, "ulp")
    full = len(real(t, b, w, "ulp", layout))
    assert len(entropy.encode(t, b, w, dtype)) < full  # what trying zstd on the whole sample would have chosen
    sampled.clear()
    same = np.tile(b[: 64 * w], (256 << 10) // (64 * w))  # unchanged elements: ANS frame far under 1/64
    # tried with zstd, and ans: its chunks are sparse frames of one header (each chunk keeps the smaller)
    assert choose_encoding(same, same, w, "ulp", dtype=dtype)[1] == "ans"
    assert max(sampled) == same.size


def test_tiny_chunks_fall_back_to_a_zstd_frame_and_unchanged_ones_are_a_sparse_header():
    t, b = fine_tune(6, "BF16")
    a = encode_chunk(t, b, 2, "ulp", "escape", codec="ans", dtype="BF16")
    assert a[:4] == ZSTD_MAGIC
    assert decode_chunk(a, b, 2, "ulp", t.size, "escape", codec="ans").tobytes() == t.tobytes()
    same = np.tile(b, 6000)  # 72 KB of unchanged elements: zstd is tried, the sparse frame (a header) wins
    a = encode_chunk(same, same, 2, "ulp", "planes", codec="ans", dtype="BF16")
    z = encode_chunk(same, same, 2, "ulp", "planes")
    assert a[:4] == b"ODS1" and len(a) == 18 < len(z)
    assert decode_chunk(a, same, 2, "ulp", same.size, "planes", codec="ans").tobytes() == same.tobytes()


def test_ans_codec_refuses_payloads_that_are_neither_frame():
    t, b = fine_tune(64, "BF16")
    with pytest.raises(CorruptDiffError, match="neither"):
        decode_chunk(b"garbage!" * 10, b, 2, "ulp", t.size, "escape", codec="ans")
    with pytest.raises(CorruptDiffError, match="only for ulp"):
        decode_chunk(b"garbage!", b, 1, "ulp", 8, "bytes", codec="ans")


def test_the_numpy_path_is_forced_by_the_environment(monkeypatch):
    monkeypatch.setenv("ORCA_DIFF_PURE_PYTHON", "1")
    assert not entropy._use_c(None)
    monkeypatch.setenv("ORCA_DIFF_PURE_PYTHON", "0")
    assert entropy._use_c(None) == entropy.c_available()


def test_numpy_decoder_working_set_is_bounded_by_slices_not_by_the_chunk():
    """Issue 20.5: the numpy decoder held int64 (step, lane) matrices of the whole chunk, ~100
    bytes an element at its peak (5.8 GiB for 16 MiB chunks at 8 threads, 10 GiB+ and a
    MemoryError for a 256 MiB chunk). Now: the output, a token byte per element, and scratch
    that does not grow with the chunk (numpy reports its allocations to tracemalloc)."""
    import tracemalloc

    n = 2_000_000
    t, b = fine_tune(n, "BF16", seed=9, lr=1e-3)
    frame = entropy.encode(t, b, 2, "BF16")
    tracemalloc.start()
    try:
        out = entropy.decode(frame, b, 2, t.size, pure=True)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert out.tobytes() == t.tobytes()
    assert peak <= t.size + n + entropy.NUMPY_DECODE_SCRATCH, peak
