"""make -> apply rebuilds byte-identical files, for every shape of change real fine-tunes make."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from orca_diff.apply import apply_diff
from orca_diff.errors import BaseMismatchError, InputNotFoundError, OutputError
from orca_diff.format import MANIFEST_NAME, load_manifest
from orca_diff.make import make_diff, plan_encoding
from orca_diff.synth import SERIALIZER_DTYPE, write_shards
from orca_diff.containers import TensorInfo, open_model
from orca_diff.verify import verify_diff, verify_model

from conftest import file_hashes

SMALL_CHUNKS = 4096  # many chunks per tensor even on tiny models


def roundtrip(base: Path, target: Path, tmp_path: Path, **make_kw) -> Path:
    diff, out = tmp_path / "diff", tmp_path / "out"
    make_diff(base, target, diff, chunk_bytes=SMALL_CHUNKS, **make_kw)
    apply_diff(base, diff, out)
    assert file_hashes(out) == file_hashes(target)
    verify_model(out, diff)
    return diff


@pytest.mark.parametrize("dtype", ["BF16", "F16", "F32"])
@pytest.mark.parametrize("shard", [None, 40_000])
def test_rebuild_is_byte_identical_for_each_dtype_single_and_sharded(make_pair, tmp_path, dtype, shard):
    base, target = make_pair(dtype, shard=shard)
    if shard:
        assert (target / "model.safetensors.index.json").exists()
    diff = roundtrip(base, target, tmp_path)
    m = load_manifest(diff)
    assert {t.encoding.transform for t in m.tensors.values()} == {"ulp"}
    assert m.payload_bytes < m.target_bytes


def test_pad_row_added_gets_delta_on_shared_rows_and_new_row_raw(make_pair, tmp_path):
    base, target = make_pair("F16", add_pad_row=True)
    m = load_manifest(roundtrip(base, target, tmp_path))
    emb = m.tensors["model.embed_tokens.weight"]
    assert emb.shape[0] == 321
    assert emb.encoding.shared_bytes == 320 * 32 * 2
    assert [c.mode for c in emb.chunks][-1] == "raw"
    assert json.loads((target / "config.json").read_text())["vocab_size"] == 321


def test_new_target_tensor_is_stored_and_base_only_tensor_is_recorded_dropped(make_pair, tmp_path):
    base, target = make_pair("BF16", new_tensors={"model.score.weight": (4, 32)})
    # drop a base tensor from the target: rewrite the target without lm_head
    model = open_model(target)
    kept = [(n, i.dtype, model.read(n).view(np.uint16).reshape(i.shape)) for n, i in model.tensors.items()
            if n != "lm_head.weight"]
    model.close()
    for f in target.glob("*.safetensors"):
        f.unlink()
    write_shards(target, iter(kept), None, sum(a.nbytes for *_, a in kept))
    m = load_manifest(roundtrip(base, target, tmp_path))
    assert m.tensors["model.score.weight"].encoding.transform == "raw"
    assert m.dropped == ["lm_head.weight"]
    assert m.base.tensors["lm_head.weight"].needed is False


@pytest.mark.parametrize("base_dtype,target_dtype", [("F16", "F32"), ("F16", "BF16"), ("BF16", "F16"), ("F32", "BF16")])
def test_different_dtypes_cast_the_base_first(make_pair, tmp_path, base_dtype, target_dtype):
    base, target = make_pair(base_dtype, target_dtype, add_pad_row=True)
    m = load_manifest(roundtrip(base, target, tmp_path))
    enc = m.tensors["model.layers.0.mlp.up_proj.weight"].encoding
    assert (enc.transform, enc.base_dtype) == ("ulp", base_dtype)


def test_integer_tensors_are_xored(tmp_path):
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 1000, (64, 8)).astype(np.int64)
    base, target = tmp_path / "b", tmp_path / "t"
    write_shards(base, iter([("ids", "I64", ids)]), None, ids.nbytes)
    changed = ids.copy()
    changed[3, 4] += 1
    write_shards(target, iter([("ids", "I64", changed), ("mask", "BOOL", np.ones(5, dtype=np.bool_))]), None, 0)
    m = load_manifest(roundtrip(base, target, tmp_path))
    assert m.tensors["ids"].encoding.transform == "xor"
    assert m.tensors["mask"].encoding.transform == "raw"


def test_shared_non_weight_files_are_copied_from_base_and_changed_ones_stored(make_pair, tmp_path):
    base, target = make_pair("BF16", add_pad_row=True)
    m = load_manifest(roundtrip(base, target, tmp_path))
    sources = {f.path: f.source for f in m.files if f.kind == "blob"}
    assert sources["tokenizer.model"] == "base"           # identical in the base: never redistributed
    assert sources["special_tokens_map.json"] == "diff"   # pad token added
    assert sources["added_tokens.json"] == "diff"         # only in the target


def test_diff_never_contains_base_weights_in_the_clear(make_pair, tmp_path):
    base, target = make_pair("F16")
    diff = tmp_path / "diff"
    make_diff(base, target, diff)
    blob = b"".join(p.read_bytes() for p in diff.iterdir())
    model = open_model(base)
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.embed_tokens.weight"):
        row = model.read(name, 0, 64).tobytes()  # first 32 elements of the tensor
        assert row not in blob
    model.close()
    assert not list(diff.glob("*.safetensors")) and not (diff / "config.json").exists()


def test_apply_refuses_wrong_base_by_one_ulp_before_writing(make_pair, tmp_path):
    base, target = make_pair("F16")
    diff = tmp_path / "diff"
    make_diff(base, target, diff)
    model = open_model(base)
    name = "model.layers.1.mlp.down_proj.weight"
    info = model.tensors[name]
    model.close()
    # bump one element by one ulp in place in the base file
    f = next(base.glob("*.safetensors"))
    from orca_diff.containers import read_safetensors_header
    h = read_safetensors_header(f)
    entry = next(e for e in h.entries if e.info.name == name)
    data = bytearray(f.read_bytes())
    pos = h.data_start + entry.begin + 2 * 17
    v = int.from_bytes(data[pos:pos + 2], "little") + 1
    data[pos:pos + 2] = v.to_bytes(2, "little")
    f.write_bytes(bytes(data))
    out = tmp_path / "out"
    with pytest.raises(BaseMismatchError, match=name.replace(".", r"\.")):
        apply_diff(base, diff, out)
    assert not out.exists()
    assert not (tmp_path / ".out.orca-diff-partial").exists()
    assert info.dtype == "F16"


def test_apply_refuses_base_with_missing_shared_file(make_pair, tmp_path):
    base, target = make_pair("BF16")
    diff = tmp_path / "diff"
    make_diff(base, target, diff)
    (base / "tokenizer.model").unlink()
    with pytest.raises(BaseMismatchError, match="tokenizer.model"):
        apply_diff(base, diff, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_apply_refuses_non_empty_output_without_force_and_replaces_with_force(make_pair, tmp_path):
    base, target = make_pair("BF16")
    diff = tmp_path / "diff"
    make_diff(base, target, diff)
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(OutputError, match="--force"):
        apply_diff(base, diff, out)
    assert (out / "precious.txt").read_text() == "keep me"
    with pytest.raises(OutputError, match="precious.txt"):  # --force replaces only a previous orca-diff output
        apply_diff(base, diff, out, force=True)
    assert (out / "precious.txt").read_text() == "keep me"
    (out / "precious.txt").unlink()
    apply_diff(base, diff, out)
    apply_diff(base, diff, out, force=True)  # over its own previous output
    assert file_hashes(out) == file_hashes(target)


def test_apply_into_existing_empty_folder(make_pair, tmp_path):
    base, target = make_pair("BF16")
    diff = tmp_path / "diff"
    make_diff(base, target, diff)
    (tmp_path / "out").mkdir()
    apply_diff(base, diff, tmp_path / "out")
    assert file_hashes(tmp_path / "out") == file_hashes(target)


def test_interrupted_apply_resumes_keeping_finished_files(make_pair, tmp_path, monkeypatch):
    base, target = make_pair("BF16", shard=40_000)
    diff, out = tmp_path / "diff", tmp_path / "out"
    make_diff(base, target, diff, chunk_bytes=SMALL_CHUNKS)
    import orca_diff.apply as apply_mod

    real = apply_mod._write_all
    calls = {"n": 0}

    def dying_write(fd, data):
        calls["n"] += 1
        if calls["n"] == 40:
            raise KeyboardInterrupt
        real(fd, data)

    monkeypatch.setattr(apply_mod, "_write_all", dying_write)
    from orca_diff.errors import InterruptedError_
    with pytest.raises(InterruptedError_, match="rerun"):
        apply_diff(base, diff, out)
    staging = tmp_path / ".out.orca-diff-partial"
    finished = {p.name: p.stat().st_mtime_ns for p in staging.glob("*.safetensors")}
    assert finished, "some shard should have been finished before the interruption"
    assert not out.exists()
    monkeypatch.setattr(apply_mod, "_write_all", real)
    report = apply_diff(base, diff, out)
    assert report.resumed_files >= len(finished)
    assert file_hashes(out) == file_hashes(target)
    for name, mtime in finished.items():
        assert (out / name).stat().st_mtime_ns == mtime  # not rewritten


def test_make_refuses_existing_output_and_leaves_no_staging_on_failure(make_pair, tmp_path):
    base, target = make_pair("BF16")
    out = tmp_path / "diff"
    out.mkdir()
    (out / "x").write_text("x")
    with pytest.raises(OutputError):
        make_diff(base, target, out)
    with pytest.raises(InputNotFoundError):
        make_diff(tmp_path / "nope", target, tmp_path / "d2")
    assert not (tmp_path / "d2").exists() and not (tmp_path / ".d2.orca-diff-partial").exists()


def test_make_is_deterministic(make_pair, tmp_path):
    base, target = make_pair("BF16")
    make_diff(base, target, tmp_path / "d1", threads=1)
    make_diff(base, target, tmp_path / "d2", threads=2)
    assert file_hashes(tmp_path / "d1") == file_hashes(tmp_path / "d2")


def test_verify_diff_names_the_corrupt_tensor(make_pair, tmp_path):
    base, target = make_pair("BF16")
    diff = tmp_path / "diff"
    make_diff(base, target, diff, chunk_bytes=SMALL_CHUNKS)
    m = verify_diff(diff)
    chunk = m.tensors["model.layers.1.mlp.gate_proj.weight"].chunks[1]
    p = diff / chunk.payload
    data = bytearray(p.read_bytes())
    data[chunk.offset + chunk.length // 2] ^= 0x10
    p.write_bytes(bytes(data))
    from orca_diff.errors import CorruptDiffError
    with pytest.raises(CorruptDiffError, match="gate_proj"):
        verify_diff(diff)
    with pytest.raises(CorruptDiffError, match="gate_proj"):
        apply_diff(base, diff, tmp_path / "out")


def test_loading_a_model_folder_as_a_diff_says_it_is_a_model(make_pair):
    base, _ = make_pair("BF16")
    with pytest.raises(InputNotFoundError, match="if it is a model, give it as --base"):
        load_manifest(base)
    assert not (base / MANIFEST_NAME).exists()


@pytest.mark.parametrize(
    "t,b,expected",
    [
        (TensorInfo("w", "F16", (4, 2)), TensorInfo("w", "F16", (4, 2)), ("ulp", 16)),
        (TensorInfo("w", "F16", (5, 2)), TensorInfo("w", "F16", (4, 2)), ("ulp", 16)),
        (TensorInfo("w", "F16", (3, 2)), TensorInfo("w", "F16", (4, 2)), ("ulp", 12)),
        (TensorInfo("w", "F32", (4, 2)), TensorInfo("w", "F16", (4, 2)), ("ulp", 32)),
        (TensorInfo("w", "F16", (4, 3)), TensorInfo("w", "F16", (4, 2)), ("raw", 0)),
        (TensorInfo("w", "I32", (4,)), TensorInfo("w", "I32", (4,)), ("xor", 16)),
        (TensorInfo("w", "I32", (4,)), TensorInfo("w", "F32", (4,)), ("raw", 0)),
        (TensorInfo("w", "F16", ()), TensorInfo("w", "F16", ()), ("ulp", 2)),
    ],
)
def test_plan_encoding(t, b, expected):
    enc = plan_encoding(t, b)
    assert (enc.transform, enc.shared_bytes) == expected


def test_safetensors_headers_longer_than_any_small_limit_round_trip(make_pair, tmp_path):
    from orca_diff.synth import LlamaShape
    many_layers = LlamaShape(vocab_size=64, hidden_size=8, intermediate_size=16, num_hidden_layers=12,
                             num_attention_heads=2, num_key_value_heads=2)
    base, target = make_pair("BF16", shape=many_layers)
    diff = roundtrip(base, target, tmp_path)
    header = next(f.header for f in load_manifest(diff).files if f.kind == "safetensors")
    assert len(header) > 8192


@pytest.mark.parametrize("target_dtype", ["BF16", "F32"])
def test_base_hashes_taken_on_the_way_equal_independent_hashes(make_pair, tmp_path, target_dtype):
    """make hashes the base from the bytes its delta chunks read, then the rest: every base
    tensor's recorded digest (rows removed, dropped tensors, casts) must be the plain one."""
    from orca_diff.containers import tensor_digest
    base, target = make_pair("BF16", target_dtype)
    model = open_model(target)
    kept = []
    for n, i in model.tensors.items():
        if n == "lm_head.weight":
            continue  # dropped: hashed entirely after the encode pass
        a = model.read(n).view({"BF16": np.uint16, "F32": np.uint32}[i.dtype]).reshape(i.shape)
        kept.append((n, i.dtype, a[:-5] if n == "model.embed_tokens.weight" else a))  # rows removed
    model.close()
    for f in target.glob("*.safetensors"):
        f.unlink()
    write_shards(target, iter(kept), None, 0)
    m = load_manifest(roundtrip(base, target, tmp_path))
    b = open_model(base)
    assert m.digest_algo == "blake3"
    assert {n: t.digest for n, t in m.base.tensors.items()} == {n: tensor_digest(b, n, "blake3") for n in b.tensors}
    b.close()
    itemsize = {"BF16": 2, "F32": 4}[target_dtype]
    assert m.tensors["model.embed_tokens.weight"].encoding.shared_bytes == (320 - 5) * 32 * itemsize


def test_force_never_replaces_an_input(make_pair, tmp_path):
    base, target = make_pair("BF16")
    diff = tmp_path / "diff"
    make_diff(base, target, diff)
    before = file_hashes(base)
    for out in (base, tmp_path, base / "sub"):
        with pytest.raises(OutputError, match="input"):
            apply_diff(base, diff, out, force=True)
    with pytest.raises(OutputError, match="input"):
        make_diff(base, target, target, force=True)
    assert file_hashes(base) == before


def _rewrite(folder: Path, edit) -> None:
    """Rewrite a BF16 safetensors model folder with ``edit({name: uint16 array})`` applied."""
    model = open_model(folder)
    tensors = {n: model.read(n).view(np.uint16).reshape(i.shape).copy() for n, i in model.tensors.items()}
    model.close()
    edit(tensors)
    for f in folder.glob("*.safetensors"):
        f.unlink()
    write_shards(folder, iter((n, "BF16", a) for n, a in tensors.items()), None, sum(a.nbytes for a in tensors.values()))


def test_a_tensor_the_base_predicts_under_another_name_is_never_stored_raw(make_pair, tmp_path):
    """Issue 15: a tied base (no lm_head.weight) and an untied fine-tune whose lm_head is a copy of
    its embeddings; and a renamed tensor. Both are delta-coded against the base tensor that
    predicts them."""
    base, target = make_pair("BF16")
    _rewrite(base, lambda t: t.pop("lm_head.weight"))

    def untie_and_rename(t):
        t["lm_head.weight"] = t["model.embed_tokens.weight"].copy()
        t["model.layers.1.mlp.renamed_proj.weight"] = t.pop("model.layers.1.mlp.up_proj.weight")
    _rewrite(target, untie_and_rename)
    m = load_manifest(roundtrip(base, target, tmp_path))
    head = m.tensors["lm_head.weight"].encoding
    assert (head.transform, head.base_tensor) == ("ulp", "model.embed_tokens.weight")
    renamed = m.tensors["model.layers.1.mlp.renamed_proj.weight"].encoding
    assert (renamed.transform, renamed.base_tensor) == ("ulp", "model.layers.1.mlp.up_proj.weight")
    raw_bytes = sum(c.length for t in m.tensors.values() for c in t.chunks if c.mode == "raw")
    assert raw_bytes == 0
