"""The chunk codec: every transform x layout x dtype round-trips any bit pattern, and a payload
that does not match what the manifest implies (bomb, wrong size, forged escapes) is refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
import zstandard
from hypothesis import given, settings, strategies as st

from orca_diff.codec import (
    ESCAPE, LAYOUTS, base_prediction, choose_layout, decode_chunk, encode_chunk, from_planes, to_planes,
)
from orca_diff.errors import CorruptDiffError, FormatError
from orca_diff.format import MANIFEST_NAME, parse_manifest
from orca_diff.make import make_diff
from orca_diff.apply import apply_diff
from orca_diff.containers import FLOAT_DTYPES

UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
ITEMSIZE = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "U8": 1, "I32": 4}

#: float bit patterns that break naive arithmetic: zeros of both signs, subnormals, infinities,
#: NaNs (quiet, signalling, negative), the extremes of each width.
SPECIAL16 = [0x0000, 0x8000, 0x0001, 0x8001, 0x03FF, 0x7C00, 0xFC00, 0x7E00, 0x7C01, 0xFE00, 0x7F80, 0xFF80,
             0x7FC0, 0x7F81, 0x7BFF, 0xFBFF, 0x7F7F, 0x3C00, 0xBC00, 0xFFFF]
SPECIAL32 = [0x00000000, 0x80000000, 0x00000001, 0x807FFFFF, 0x7F800000, 0xFF800000, 0x7FC00000, 0x7F800001,
             0xFFC00000, 0x7F7FFFFF, 0xFF7FFFFF, 0x3F800000, 0xFFFFFFFF]


def elements(itemsize: int):
    """Arbitrary bit patterns, biased towards float specials and small neighbourhoods."""
    top = 2 ** (8 * itemsize) - 1
    specials = SPECIAL16 if itemsize == 2 else SPECIAL32 if itemsize == 4 else [0, top, 1, 2**63, 2**63 + 1]
    specials = [s for s in specials if s <= top]
    return st.one_of(st.integers(0, top), st.sampled_from(specials))


@st.composite
def chunk_pairs(draw, itemsize: int, max_len: int = 300):
    """(target, base) uint8 arrays of an odd or even number of elements; the target is the base
    nudged by a few ulps in most places (the fine-tune case) or arbitrary elsewhere."""
    n = draw(st.integers(0, max_len))
    base = np.array(draw(st.lists(elements(itemsize), min_size=n, max_size=n)), dtype=UINT[itemsize])
    mode = draw(st.sampled_from(["nudge", "arbitrary", "equal"]))
    if mode == "arbitrary":
        target = np.array(draw(st.lists(elements(itemsize), min_size=n, max_size=n)), dtype=UINT[itemsize])
    elif mode == "equal":
        target = base.copy()
    else:
        steps = np.array(draw(st.lists(st.integers(-600, 600), min_size=n, max_size=n)), dtype=np.int64)
        target = (base.astype(np.int64) + steps).astype(UINT[itemsize]) if n else base.copy()
    return target.view(np.uint8), base.view(np.uint8)


def round_trip(target, base, itemsize, transform, layout, level=1):
    payload = encode_chunk(target, base, itemsize, transform, layout, level)
    out = decode_chunk(payload, base, itemsize, transform, target.size, layout)
    assert out.dtype == np.uint8 and out.tobytes() == target.tobytes()
    return payload


@settings(max_examples=100, deadline=None)
@given(st.sampled_from([(2, "escape"), (2, "planes"), (2, "bytes"), (4, "planes"), (4, "escape"), (8, "planes"),
                        (8, "escape"), (4, "bytes")]),
       st.sampled_from(["ulp", "xor"]), st.data())
def test_delta_chunks_round_trip_any_bit_patterns(case, transform, data):
    itemsize, layout = case
    target, base = data.draw(chunk_pairs(itemsize))
    round_trip(target, base, itemsize, transform, layout)


@settings(max_examples=60, deadline=None)
@given(st.sampled_from([(1, "bytes"), (1, "planes"), (2, "planes"), (4, "planes"), (8, "planes")]), st.data())
def test_raw_chunks_round_trip(case, data):
    itemsize, layout = case
    target, _ = data.draw(chunk_pairs(itemsize))
    round_trip(target, None, itemsize, "raw", layout)


@settings(max_examples=60, deadline=None)
@given(st.sampled_from([("BF16", "F32"), ("F16", "BF16"), ("F32", "BF16"), ("F32", "F16"), ("F64", "BF16"),
                        ("BF16", "BF16"), ("F16", "F64")]), st.data())
def test_cross_dtype_delta_round_trips_through_the_specified_cast(dtypes, data):
    base_dtype, target_dtype = dtypes
    tw, bw = ITEMSIZE[target_dtype], ITEMSIZE[base_dtype]
    target, _ = data.draw(chunk_pairs(tw))
    base = np.array(data.draw(st.lists(elements(bw), min_size=target.size // tw, max_size=target.size // tw)),
                    dtype=UINT[bw]).view(np.uint8)
    pred = base_prediction(base, base_dtype, target_dtype)
    layout = "escape" if tw == 2 else "planes"
    round_trip(target, pred, tw, "ulp", layout)


@given(st.sampled_from([2, 4, 8]), st.integers(0, 50))
def test_planes_are_the_bytes_of_each_significance_together(itemsize, n):
    raw = np.arange(n * itemsize, dtype=np.uint64).astype(np.uint8)
    planes = to_planes(raw, itemsize)
    assert planes.tobytes() == raw.reshape(n, itemsize).T.tobytes()
    assert from_planes(planes, itemsize).tobytes() == raw.tobytes()


def test_escape_layout_is_one_byte_per_small_symbol_then_the_large_ones():
    base = np.zeros(6, dtype=np.uint16)
    sym = np.array([0, 1, 254, 255, 300, 7], dtype=np.uint16)  # the xor symbols are the targets
    payload = encode_chunk(sym.view(np.uint8), base.view(np.uint8), 2, "xor", "escape")
    content = zstandard.ZstdDecompressor().decompress(payload)
    assert content == bytes([0, 1, 254, 255, 255, 7]) + bytes([255, 300 & 255]) + bytes([0, 300 >> 8])


def test_fine_tune_deltas_choose_escape_for_16_bit_and_it_is_smaller():
    rng = np.random.default_rng(0)
    w = (0.02 * rng.standard_normal(1 << 16)).astype(np.float32)
    t = w + (1e-4 * rng.standard_normal(w.size)).astype(np.float32)
    from orca_diff.bits import cast_bits

    b16 = cast_bits(w.view(np.uint32), "F32", "BF16").view(np.uint8)
    t16 = cast_bits(t.view(np.uint32), "F32", "BF16").view(np.uint8)
    sizes = {lay: len(encode_chunk(t16, b16, 2, "ulp", lay)) for lay in LAYOUTS}
    assert choose_layout(t16, b16, 2, "ulp") == "escape"
    assert sizes["escape"] < sizes["planes"] < sizes["bytes"]
    assert choose_layout(t.view(np.uint8), w.view(np.uint8), 4, "ulp") == "planes"
    assert choose_layout(t16, None, 2, "raw") == "planes"


# --------------------------------------------------------------------------- hostile payloads


def _frame(content: bytes) -> bytes:
    return zstandard.ZstdCompressor(write_content_size=True).compress(content)


def test_a_bomb_frame_is_refused_before_decompressing():
    bomb = _frame(bytes(64 << 20))  # 64 MiB of zeros in a few KiB
    with pytest.raises(CorruptDiffError, match="declares 67108864 bytes"):
        decode_chunk(bomb, None, 1, "raw", 4096, "bytes")
    with pytest.raises(CorruptDiffError, match="declares"):
        decode_chunk(bomb, np.zeros(4096, np.uint8), 2, "ulp", 4096, "escape")


@pytest.mark.parametrize("layout", ["planes", "bytes"])
def test_a_frame_of_the_wrong_size_is_refused(layout):
    with pytest.raises(CorruptDiffError, match="frame declares 4094 bytes"):
        decode_chunk(_frame(bytes(4094)), np.zeros(4096, np.uint8), 2, "xor", 4096, layout)


def test_a_frame_without_a_declared_size_is_refused():
    frame = zstandard.ZstdCompressor(write_content_size=False).compress(bytes(4096))
    with pytest.raises(CorruptDiffError):
        decode_chunk(frame, None, 1, "raw", 4096, "bytes")


def test_garbage_and_truncated_frames_are_refused():
    good = encode_chunk(np.arange(4096, dtype=np.uint8), None, 1, "raw", "bytes")
    for bad in (b"not a zstd frame at all", good[: len(good) // 2], good[:-1]):
        with pytest.raises(CorruptDiffError):
            decode_chunk(bad, None, 1, "raw", 4096, "bytes")


def test_escape_stream_that_disagrees_with_its_escape_bytes_is_refused():
    base = np.zeros(8, dtype=np.uint8)
    # 4 symbols, one escape byte announced, but two escaped symbols stored
    with pytest.raises(CorruptDiffError, match="escape"):
        decode_chunk(_frame(bytes([1, 255, 2, 3]) + bytes([0, 1, 0, 2])), base, 2, "ulp", 8, "escape")
    # an escaped symbol below 255 would make the same chunk decodable two ways
    with pytest.raises(CorruptDiffError, match="below"):
        decode_chunk(_frame(bytes([1, 255, 2, 3]) + bytes([7, 0])), base, 2, "ulp", 8, "escape")
    # a size that is not n + a multiple of the element size
    with pytest.raises(CorruptDiffError, match="declares 5"):
        decode_chunk(_frame(bytes([1, 255, 2, 3, 9])), base, 2, "ulp", 8, "escape")


# --------------------------------------------------------------------------- through make/apply


@pytest.mark.parametrize("dtype", ["BF16", "F16", "F32"])
def test_make_records_the_layout_per_tensor_and_apply_rebuilds_bit_exactly(make_pair, tmp_path, dtype):
    base, target = make_pair(dtype)
    m = make_diff(base, target, tmp_path / "diff", chunk_bytes=4096, progress=False)
    matrices = {t.encoding.layout for n, t in m.tensors.items() if n.endswith("proj.weight")}
    assert matrices == ({"escape"} if dtype != "F32" else {"planes"})  # norms and frozen tensors may differ
    apply_diff(base, tmp_path / "diff", tmp_path / "out", progress=False)
    for p in target.glob("*.safetensors"):
        assert (tmp_path / "out" / p.name).read_bytes() == p.read_bytes()


def test_manifest_with_an_unknown_or_misplaced_layout_is_refused(make_pair, tmp_path):
    from orca_diff.format import canonical_sha256

    base, target = make_pair("BF16")
    make_diff(base, target, tmp_path / "diff", progress=False)
    doc = json.loads((tmp_path / "diff" / MANIFEST_NAME).read_text())
    for value, message in (("zigzag-huffman", "unknown layout"), (None, "unknown layout")):
        d = json.loads(json.dumps(doc))
        del d["manifest_sha256"]
        next(iter(d["tensors"].values()))["encoding"]["layout"] = value
        d["manifest_sha256"] = canonical_sha256(d)
        with pytest.raises(FormatError, match=message):
            parse_manifest(json.dumps(d).encode())
    d = json.loads(json.dumps(doc))
    del d["manifest_sha256"]
    enc = next(iter(d["tensors"].values()))["encoding"]
    enc.update(transform="raw", base_tensor=None, base_dtype=None, shared_bytes=0, layout="escape")
    d["manifest_sha256"] = canonical_sha256(d)
    with pytest.raises(FormatError, match="escape layout"):
        parse_manifest(json.dumps(d).encode())


def test_escape_constant_is_the_largest_byte():
    assert ESCAPE == 255 and set(ITEMSIZE) & FLOAT_DTYPES


# --------------------------------------------------------------------------- codec "ans"


@pytest.mark.parametrize("dtype,pure", [("BF16", False), ("F16", False), ("F32", False), ("BF16", True)])
def test_make_chooses_ans_for_float_matrices_and_apply_rebuilds_bit_exactly(make_pair, tmp_path, monkeypatch,
                                                                          dtype, pure):
    from orca_diff import entropy

    from orca_diff.synth import LlamaShape

    shape = LlamaShape(vocab_size=320, hidden_size=128, intermediate_size=344, num_hidden_layers=1,
                       num_attention_heads=4, num_key_value_heads=4)
    base, target = make_pair(dtype, shape=shape)
    m = make_diff(base, target, tmp_path / "diff", chunk_bytes=64 << 10, progress=False)
    codecs = {t.encoding.codec for n, t in m.tensors.items() if n.endswith("proj.weight")}
    assert codecs == {"ans"}  # norms (128 elements) and frozen tensors may keep zstd
    if pure:
        monkeypatch.setenv("ORCA_DIFF_PURE_PYTHON", "1")
    assert not pure or not entropy._use_c(None)
    apply_diff(base, tmp_path / "diff", tmp_path / "out", progress=False)
    for p in target.glob("*.safetensors"):
        assert (tmp_path / "out" / p.name).read_bytes() == p.read_bytes()


def test_manifest_refuses_the_ans_codec_outside_ulp_deltas(make_pair, tmp_path):
    from orca_diff.format import canonical_sha256

    base, target = make_pair("BF16")
    make_diff(base, target, tmp_path / "diff", progress=False)
    doc = json.loads((tmp_path / "diff" / MANIFEST_NAME).read_text())
    for change, message in (({"codec": "brotli"}, "unknown codec"), ({"codec": "ans", "transform": "xor"}, "ans codec"),
                            ({"codec": "ans", "layout": "bytes"}, "ans codec")):
        d = json.loads(json.dumps(doc))
        del d["manifest_sha256"]
        enc = next(t for t in d["tensors"].values() if t["encoding"]["transform"] == "ulp")["encoding"]
        enc.update(change)
        d["manifest_sha256"] = canonical_sha256(d)
        with pytest.raises(FormatError, match=message):
            parse_manifest(json.dumps(d).encode())


def test_apply_memory_plan_accounts_for_the_numpy_coder(make_pair, tmp_path, monkeypatch):
    """Issue 20.5: the plan was the same for both coders. With the numpy coder each decoding
    thread needs entropy.NUMPY_DECODE_SCRATCH more: threads are capped so the plan (chunks in
    flight x their working set + threads x scratch) stays within MEMORY_BUDGET at any --threads."""
    from orca_diff import entropy
    from orca_diff.apply import MEMORY_BUDGET, memory_plan
    from orca_diff.synth import LlamaShape

    shape = LlamaShape(vocab_size=320, hidden_size=128, intermediate_size=344, num_hidden_layers=1,
                       num_attention_heads=4, num_key_value_heads=4)
    base, target = make_pair("BF16", shape=shape)
    m = make_diff(base, target, tmp_path / "diff", chunk_bytes=64 << 10, progress=False)
    assert any(t.encoding.codec == "ans" for t in m.tensors.values())
    worst = max(c.length + 5 * c.size for t in m.tensors.values() for c in t.chunks)
    monkeypatch.setenv("ORCA_DIFF_PURE_PYTHON", "1")
    for threads in (1, 2, 8, 64, 1000):
        used, window = memory_plan(m, threads)
        assert used <= threads and window * max(worst, 32 << 20) + used * entropy.NUMPY_DECODE_SCRATCH <= MEMORY_BUDGET
    assert memory_plan(m, 1000)[0] < 1000
    if entropy.c_available():
        monkeypatch.delenv("ORCA_DIFF_PURE_PYTHON")
        assert memory_plan(m, 1000)[0] > MEMORY_BUDGET // 4 // entropy.NUMPY_DECODE_SCRATCH  # C: no scratch cap
