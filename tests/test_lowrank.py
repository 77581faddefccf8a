"""Low-rank predicted ANS frames (orca_diff.lowrank, docs/format.md §3e, diff format version 4).

A fine-tune moves many rows of a large-vocabulary embedding / LM head along one shared direction
(the rows of tokens the data never shows get the same mean-hidden-state gradient, and AdamW turns
it into a rank-one move). The frame carries the low-rank part as integer factors, so the rest
codes against a better prediction. What must hold: the prediction is the same bits on every
machine (the spec's formula, whatever the block size or summation order), rebuilds are exact,
the frame is chosen only where it is smaller, hostile frames are refused in one line, and a
diff that holds such frames says version 4 while every other diff stays version 3.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given, settings, strategies as st

from conftest import file_hashes
from orca_diff import entropy, lowrank
from orca_diff.apply import apply_diff
from orca_diff.bits import cast_bits, float_to_bits
from orca_diff.cli import cli
from orca_diff.codec import decode_chunk, encode_chunk
from orca_diff.containers import open_model
from orca_diff.errors import CorruptDiffError
from orca_diff.format import FORMAT_VERSION, LOW_RANK_VERSION, load_manifest
from orca_diff.make import make_diff
from orca_diff.synth import LlamaShape, write_llama, write_shards


def bits(x: np.ndarray, dtype: str) -> np.ndarray:
    return cast_bits(float_to_bits(x.astype(np.float32), "F32"), "F32", dtype).view(np.uint16)


def shared_move(rows: int, cols: int, dtype: str, seed: int = 0, rank: int = 1, noise: float = 0.25):
    """(target, base) 16-bit bit patterns: weights N(0, 0.02), moved as AdamW moves rows that share
    a gradient direction: lr * sign(row factor) * column pattern, plus per-element noise."""
    rng = np.random.default_rng(seed)
    w = 0.02 * rng.standard_normal((rows, cols), dtype=np.float32)
    lr = 4e-4
    u = rng.standard_normal((rows, rank), dtype=np.float32)
    v = np.sign(rng.standard_normal((rank, cols), dtype=np.float32))
    move = lr * np.sign(u) @ v / rank + noise * lr * rng.standard_normal((rows, cols), dtype=np.float32)
    return bits(w + move, dtype).reshape(-1), bits(w, dtype).reshape(-1)


def reference_prediction(pred: np.ndarray, dtype: str, a: np.ndarray, b: np.ndarray, ea: int, eb: int,
                         col0: int, cols: int) -> np.ndarray:
    """The formula of format §3e with Python integers, element by element (slow, for small cases)."""
    out = pred.copy()
    for i in range(pred.size):
        y, x = divmod(col0 + i, cols)
        m = sum(int(a[y, k]) * int(b[k, x]) for k in range(a.shape[1]))
        v = np.float32(math.ldexp(float(m), ea + eb))  # m < 2^35: float(m) is exact
        p = pred[i:i + 1]
        if not lowrank._finite(p, dtype)[0]:
            continue
        with np.errstate(all="ignore"):
            q = lowrank._as_f32(p, dtype) + v
        if dtype == "BF16":
            u = int(q.view(np.uint32)[0])
            out[i] = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        else:
            with np.errstate(all="ignore"):
                out[i] = q.astype(np.float16).view(np.uint16)[0]
    return out


@pytest.mark.parametrize("dtype", ["BF16", "F16"])
@pytest.mark.parametrize("col0", [0, 77])
def test_a_shared_row_move_codes_smaller_and_rebuilds_exactly(dtype, col0):
    rows, cols = 2048, 256
    t, b = shared_move(rows, cols, dtype)
    t, b = t[col0:col0 + (1 << 19) - 5], b[col0:col0 + (1 << 19) - 5]  # a chunk from mid-row to mid-row
    plain = encode_chunk(t.view(np.uint8), b.view(np.uint8), 2, "ulp", "escape", codec="ans", dtype=dtype)
    frame = encode_chunk(t.view(np.uint8), b.view(np.uint8), 2, "ulp", "escape", codec="ans", dtype=dtype,
                         grid=(cols, col0))
    assert lowrank.is_frame(frame)
    assert len(frame) < 0.9 * len(plain), (len(frame), len(plain))
    out = decode_chunk(frame, b.view(np.uint8), 2, "ulp", t.nbytes, "escape", codec="ans")
    assert out.tobytes() == t.tobytes()


def test_the_pure_numpy_decoder_rebuilds_the_same_bytes(monkeypatch):
    t, b = shared_move(1024, 512, "BF16", seed=3)
    frame = encode_chunk(t.view(np.uint8), b.view(np.uint8), 2, "ulp", "escape", codec="ans", dtype="BF16",
                         grid=(512, 0))
    assert lowrank.is_frame(frame)
    monkeypatch.setenv("ORCA_DIFF_PURE_PYTHON", "1")
    assert decode_chunk(frame, b.view(np.uint8), 2, "ulp", t.nbytes, "escape", codec="ans").tobytes() == t.tobytes()


def test_an_unstructured_update_keeps_the_plain_frame():
    rng = np.random.default_rng(5)
    w = 0.02 * rng.standard_normal(1 << 19, dtype=np.float32)
    t, b = bits(w + 1e-4 * rng.standard_normal(w.size, dtype=np.float32), "BF16"), bits(w, "BF16")
    frame = encode_chunk(t.view(np.uint8), b.view(np.uint8), 2, "ulp", "escape", codec="ans", dtype="BF16",
                         grid=(512, 0))
    assert not lowrank.is_frame(frame)


def test_lowrank_can_be_switched_off(monkeypatch):
    t, b = shared_move(1024, 512, "BF16")
    monkeypatch.setenv("ORCA_DIFF_LOWRANK", "0")
    frame = encode_chunk(t.view(np.uint8), b.view(np.uint8), 2, "ulp", "escape", codec="ans", dtype="BF16",
                         grid=(512, 0))
    assert not lowrank.is_frame(frame)


PURE = [True] + ([False] if hasattr(entropy._c, "lowrank_predict") else [])


@pytest.mark.parametrize("pure", PURE, ids=lambda p: "numpy" if p else "C")
@settings(max_examples=40, deadline=None)
@given(dtype=st.sampled_from(["BF16", "F16"]), r=st.integers(1, 32), cols=st.integers(1, 100),
       col0=st.integers(0, 99), n=st.integers(1, 600), ea=st.integers(-40, 0), eb=st.integers(-40, 0),
       seed=st.integers(0, 2**32 - 1), block=st.integers(1, 64))
def test_the_prediction_is_the_formula_of_the_spec(pure, dtype, r, cols, col0, n, ea, eb, seed, block):
    """Whatever the block the product is computed in, C or numpy: exact integers, then single
    roundings."""
    col0 %= cols
    rows = -(-(col0 + n) // cols)
    rng = np.random.default_rng(seed)
    a = rng.integers(-32768, 32768, (rows, r)).astype(np.int16)  # -2^15 too: a hostile frame may hold it
    b = rng.integers(-32768, 32768, (r, cols)).astype(np.int16)
    pred = rng.integers(0, 1 << 16, n).astype(np.uint16)  # every bit pattern: NaN, inf, subnormal
    got = lowrank.predict(pred, dtype, a, b, ea, eb, col0, cols, block_elems=block, pure=pure)
    assert np.array_equal(got, reference_prediction(pred, dtype, a, b, ea, eb, col0, cols))


@pytest.mark.skipif(len(PURE) == 1, reason="the C kernel is not built here: nothing to compare numpy with")
@pytest.mark.parametrize("dtype", ["BF16", "F16"])
def test_the_c_kernel_and_numpy_agree_on_every_base_pattern(dtype, monkeypatch):
    """All 65536 bit patterns as the base, moved by amounts that reach subnormals, ties and overflow;
    the kernel's vector path (32 columns at a time, where the CPU has AVX2/FMA/F16C) and its scalar
    path alike."""
    pred = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    cols = 1 << 8
    rng = np.random.default_rng(2)
    for e in (-60, -40, -30, -24, -16, -8, 0, 8):
        a = rng.integers(-32767, 32768, (pred.size // cols, 2)).astype(np.int16)
        b = rng.integers(-32767, 32768, (2, cols)).astype(np.int16)
        want = lowrank.predict(pred, dtype, a, b, e, -15, 0, cols, pure=True)
        assert np.array_equal(lowrank.predict(pred, dtype, a, b, e, -15, 0, cols, pure=False), want), e
        monkeypatch.setenv("ORCA_DIFF_NO_SIMD", "1")
        assert np.array_equal(lowrank.predict(pred, dtype, a, b, e, -15, 0, cols, pure=False), want), e
        monkeypatch.delenv("ORCA_DIFF_NO_SIMD")


@settings(max_examples=60, deadline=None)
@given(cols=st.integers(1, 50), col0=st.integers(0, 49), n=st.integers(1, 800),
       rows=st.lists(st.integers(0, 40), min_size=0, max_size=30), seed=st.integers(0, 2**32 - 1))
def test_the_trials_rows_are_read_exactly_as_indexed_element_by_element(cols, col0, n, rows, seed):
    """make's trials read sampled rows as slices of runs (lowrank._runs): the same matrix as one
    index per element, zero outside the chunk, for any rows (runs, gaps, past the end)."""
    col0 %= cols
    rows = np.array(sorted(set(rows)), dtype=np.int64)
    rng = np.random.default_rng(seed)
    target = rng.integers(0, 1 << 16, n).astype(np.uint16)
    pred = rng.integers(0, 1 << 16, n).astype(np.uint16)
    want = np.zeros((rows.size, cols), dtype=np.float32)
    for i, y in enumerate(rows.tolist()):
        for x in range(cols):
            e = y * cols + x - col0
            if 0 <= e < n:
                want[i, x] = lowrank._updates(target[e:e + 1], pred[e:e + 1], "BF16")[0]
    assert np.array_equal(lowrank._matrix(target, pred, "BF16", rows, cols, col0), want)
    inside = [y * cols + x - col0 for y in rows.tolist() for x in range(cols) if 0 <= y * cols + x - col0 < n]
    runs = lowrank._runs(rows, cols, col0, n)
    assert np.array_equal(lowrank._row_values(target, runs), target[inside])


def test_non_finite_base_elements_keep_their_bits():
    pred = np.array([0x7F80, 0xFF80, 0x7FC1, 0x3F80], dtype=np.uint16)  # +inf, -inf, NaN, 1.0 (BF16)
    a = np.full((1, 1), 1000, dtype=np.int16)
    b = np.full((1, 4), 1000, dtype=np.int16)
    got = lowrank.predict(pred, "BF16", a, b, -10, -10, 0, 4)  # moves 1.0 by ~0.95
    assert got[:3].tolist() == pred[:3].tolist() and got[3] != pred[3]


def frame_parts(frame: bytes) -> tuple[tuple, bytes]:
    head = lowrank._HEAD.unpack_from(frame)
    return head, frame[lowrank._HEAD.size:]


@pytest.fixture(scope="module")
def chunk():
    t, b = shared_move(1024, 512, "BF16", seed=1)
    frame = encode_chunk(t.view(np.uint8), b.view(np.uint8), 2, "ulp", "escape", codec="ans", dtype="BF16",
                         grid=(512, 0))
    assert lowrank.is_frame(frame)
    return t, b, frame


HOSTILE = {
    "rank 0": lambda h: (*h[:1], 0, *h[2:]),
    "rank 33": lambda h: (*h[:1], 33, *h[2:]),
    "dtype code 7": lambda h: (*h[:2], 7, *h[3:]),
    "exponent 120": lambda h: (*h[:3], 120, *h[4:]),
    "column 0 of 0": lambda h: (*h[:5], 0, 0, h[7]),
    "col0 past the row": lambda h: (*h[:6], h[5], h[7]),
    "rows that do not cover the chunk": lambda h: (*h[:7], h[7] - 1),
    "a huge row count": lambda h: (*h[:7], 2**32 - 1),
}


@pytest.mark.parametrize("edit", list(HOSTILE), ids=list(HOSTILE))
def test_a_hostile_header_is_refused_in_one_line(chunk, edit):
    t, b, frame = chunk
    head, rest = frame_parts(frame)
    bad = lowrank._HEAD.pack(*HOSTILE[edit](head)) + rest
    with pytest.raises(CorruptDiffError, match="low-rank frame") as e:
        decode_chunk(bad, b.view(np.uint8), 2, "ulp", t.nbytes, "escape", codec="ans", where="tensor 'x'")
    assert "\n" not in str(e.value) and "tensor 'x'" in str(e.value)


@pytest.mark.parametrize("keep", [3, lowrank._HEAD.size, lowrank._HEAD.size + 100])
def test_a_truncated_frame_is_refused(chunk, keep):
    t, b, frame = chunk
    with pytest.raises(CorruptDiffError):
        decode_chunk(frame[:keep], b.view(np.uint8), 2, "ulp", t.nbytes, "escape", codec="ans")


def test_a_nested_low_rank_frame_is_refused(chunk):
    t, b, frame = chunk
    head, rest = frame_parts(frame)
    r, rows, cols = head[1], head[7], head[5]
    factors = 2 * r * (rows + cols)
    nested = frame[:lowrank._HEAD.size + factors] + frame
    with pytest.raises(CorruptDiffError, match="neither"):
        decode_chunk(nested, b.view(np.uint8), 2, "ulp", t.nbytes, "escape", codec="ans")


def test_changed_factors_give_other_bytes_never_a_silent_success(chunk):
    """The chunk digest is what catches a tampered factor; the decoder itself cannot tell."""
    t, b, frame = chunk
    bad = bytearray(frame)
    bad[lowrank._HEAD.size + 1] ^= 0x40
    try:
        out = decode_chunk(bytes(bad), b.view(np.uint8), 2, "ulp", t.nbytes, "escape", codec="ans")
    except CorruptDiffError:
        return
    assert out.tobytes() != t.tobytes()


# --------------------------------------------------------------------------- make / apply

SHAPE = LlamaShape(vocab_size=4096, hidden_size=64, intermediate_size=172, num_hidden_layers=1,
                   num_attention_heads=4, num_key_value_heads=4)


def shared_move_finetune(base: Path, out: Path) -> Path:
    """``base`` with its embedding's rows moved along one shared direction, the rest unchanged
    except a little noise: the pattern of a large-vocabulary fine-tune."""
    m = open_model(base)
    rng = np.random.default_rng(9)
    tensors = []
    for name, info in m.tensors.items():
        raw = m.read(name).view(np.uint16).reshape(info.shape)
        w = cast_bits(raw.reshape(-1), info.dtype, "F32").view(np.float32).reshape(info.shape)
        if name == "model.embed_tokens.weight":
            u = np.sign(rng.standard_normal((info.shape[0], 1), dtype=np.float32))
            v = np.sign(rng.standard_normal((1, info.shape[1]), dtype=np.float32))
            w = w + 4e-4 * u @ v + 1e-4 * rng.standard_normal(info.shape, dtype=np.float32)
        else:
            w = w + 1e-4 * rng.standard_normal(info.shape, dtype=np.float32)
        tensors.append((name, info.dtype, bits(w, info.dtype).reshape(info.shape)))
    m.close()
    write_shards(out, iter(tensors), None, sum(a.nbytes for *_, a in tensors))
    for p in base.iterdir():
        if p.suffix != ".safetensors":
            shutil.copyfile(p, out / p.name)
    return out


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("lowrank")
    base = write_llama(root / "base", SHAPE, "BF16", seed=0)
    return base, shared_move_finetune(base, root / "target")


def test_make_uses_it_writes_version_4_and_apply_rebuilds_every_byte(pair, tmp_path):
    base, target = pair
    m = make_diff(base, target, tmp_path / "diff", progress=False)
    assert m.format_version == LOW_RANK_VERSION
    emb = m.tensors["model.embed_tokens.weight"]
    with open(tmp_path / "diff" / emb.chunks[0].payload, "rb") as f:
        f.seek(emb.chunks[0].offset)
        assert lowrank.is_frame(f.read(4))
    apply_diff(base, tmp_path / "diff", tmp_path / "out", progress=False)
    assert file_hashes(tmp_path / "out") == file_hashes(target)
    r = CliRunner().invoke(cli, ["info", str(tmp_path / "diff")])
    assert r.exit_code == 0 and "format version 4" in r.output
    r = CliRunner().invoke(cli, ["verify", "--diff", str(tmp_path / "diff"), "--base", str(base)])
    assert r.exit_code == 0, r.output


def test_it_pays_on_the_whole_diff(pair, tmp_path, monkeypatch):
    base, target = pair
    with_lr = make_diff(base, target, tmp_path / "a", progress=False)
    monkeypatch.setenv("ORCA_DIFF_LOWRANK", "0")
    without = make_diff(base, target, tmp_path / "b", progress=False)
    assert without.format_version == FORMAT_VERSION == 3
    emb = lambda m: sum(c.length for c in m.tensors["model.embed_tokens.weight"].chunks)  # noqa: E731
    assert emb(with_lr) < 0.8 * emb(without), (emb(with_lr), emb(without))
    size = lambda m: sum(p.size for p in m.payloads)  # noqa: E731
    assert size(with_lr) < size(without) - (emb(without) - emb(with_lr)) * 0.99  # nothing else grew


def test_a_version_3_reader_is_told_to_upgrade(pair, tmp_path, monkeypatch):
    """What orca-diff 0.3 says of such a diff: its reader knows versions 1-3."""
    import orca_diff.format as fmt

    base, target = pair
    make_diff(base, target, tmp_path / "diff", progress=False)
    monkeypatch.setattr(fmt, "READABLE_VERSIONS", (1, 2, 3))
    r = CliRunner().invoke(cli, ["apply", "--base", str(base), "--diff", str(tmp_path / "diff"),
                                 "--out", str(tmp_path / "out")])
    assert r.exit_code != 0 and "upgrade orca-diff" in r.output
    assert not (tmp_path / "out").exists()
    monkeypatch.undo()
    assert load_manifest(tmp_path / "diff").format_version == LOW_RANK_VERSION


def test_make_stays_deterministic_with_low_rank_frames(pair, tmp_path):
    base, target = pair
    make_diff(base, target, tmp_path / "d1", threads=1, progress=False)
    make_diff(base, target, tmp_path / "d2", threads=2, progress=False)
    assert load_manifest(tmp_path / "d1").format_version == LOW_RANK_VERSION
    assert file_hashes(tmp_path / "d1") == file_hashes(tmp_path / "d2")


def test_the_gain_script_measures_what_make_writes(pair):
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "scripts" / "lowrank_gain.py"
    spec = importlib.util.spec_from_file_location("lowrank_gain", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    plain, lr, chunks, lr_chunks, raw = mod.measure(*pair)["embed_tokens"]
    assert lr_chunks == chunks == 1 and lr < 0.8 * plain and raw == SHAPE.vocab_size * SHAPE.hidden_size * 2


def test_a_version_4_diff_streams_from_the_hub_with_its_base(pair, tmp_path):
    """The real client against the test Hub: base and diff fetched, the low-rank chunks decoded
    from the ranges the stream delivers, every file identical."""
    from hubserver import FakeHub
    from test_hub import Runner, assert_same_files

    base, target = pair
    hub = FakeHub().start()
    try:
        base_sha = hub.add_folder("lr-org/base", base)
        diff = tmp_path / "diff"
        m = make_diff(base, target, diff, base_name="lr-base", base_repo="lr-org/base", base_revision=base_sha,
                      progress=False)
        assert m.format_version == LOW_RANK_VERSION
        hub.add_folder("lr-org/diff", diff)
        catalog = tmp_path / "catalog.json"
        catalog.write_text('{"bases": {}, "diffs": {}}')
        run = Runner({"hub": hub, "catalog": catalog}, tmp_path)
        r = run("apply", "--diff", "lr-org/diff", "--out", str(tmp_path / "out"), "-q")
        assert r.returncode == 0, r.stderr
        assert_same_files(tmp_path / "out", target)
    finally:
        hub.stop()


def test_rows_too_wide_for_a_bounded_sample_are_not_tried():
    """16 rows of 2^17 columns would be a 2 Mi-element sample: such chunks keep the plain frame."""
    t, b = shared_move(16, 1 << 17, "BF16")
    assert lowrank.encode(t, b, "BF16", 1 << 17, 0, lambda *_: b"") is None
