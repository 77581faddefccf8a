"""Base fingerprints (one digest per set of weights, whatever the form) and mismatch diagnoses."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given, strategies as st

from orca_diff.diagnose import describe_llama, explain_base_mismatch, permutation_check
from orca_diff.fingerprint import base_fingerprint, base_fingerprint_full, fingerprint_lines, hash_model, tensor_sha256
from orca_diff.synth import LLAMA_7B, LLAMA_13B, LlamaShape, write_llama
from orca_diff.containers import TensorInfo, open_model

sys.path.insert(0, str(Path(__file__).parent))

TINY = LlamaShape()


# --------------------------------------------------------------------------- the definition


def test_fingerprint_is_sha256_over_sorted_tab_separated_lines():
    hashes = {"b.weight": ("F16", (4, 2), "bb" * 32), "a.weight": ("BF16", [3], "aa" * 32), "s": ("F32", (), "cc" * 32)}
    text = ("a.weight\tBF16\t3\t" + "aa" * 32 + "\n"
            "b.weight\tF16\t4x2\t" + "bb" * 32 + "\n"
            "s\tF32\t\t" + "cc" * 32 + "\n")
    assert "".join(fingerprint_lines(hashes)) == text
    assert base_fingerprint_full(hashes) == hashlib.sha256(text.encode()).hexdigest()
    assert base_fingerprint(hashes) == hashlib.sha256(text.encode()).hexdigest()[:16]


def test_fingerprint_definition_is_pinned():
    """A golden value: changing the definition would orphan every published diff's base record."""
    assert base_fingerprint({"w": ("F16", (2, 3), "0" * 64)}) == "14279eab62a32d82"  # printf "w\tF16\t2x3\t0...0\n" | sha256sum


@given(st.dictionaries(st.text(min_size=1, max_size=8).filter(lambda s: "\t" not in s and "\n" not in s),
                       st.tuples(st.sampled_from(["F16", "BF16", "F32"]),
                                 st.lists(st.integers(0, 9), max_size=3).map(tuple),
                                 st.binary(min_size=32, max_size=32).map(bytes.hex)),
                       min_size=1, max_size=6))
def test_fingerprint_ignores_order_but_sees_every_field(hashes):
    fp = base_fingerprint(hashes)
    assert base_fingerprint(dict(reversed(list(hashes.items())))) == fp
    name, (dtype, shape, sha) = next(iter(hashes.items()))
    for changed in ((("F64", shape, sha)), (dtype, shape + (7,), sha), (dtype, shape, "f" * 64)):
        assert base_fingerprint({**hashes, name: changed}) != fp


def test_tensor_digests_are_sha256_or_blake3_of_the_tensor_bytes(tmp_path):
    import blake3

    folder = write_llama(tmp_path / "m", TINY, "BF16", seed=2)
    with open_model(folder) as m:
        name = "model.layers.1.mlp.down_proj.weight"
        data = np.asarray(m.read(name)).tobytes()
        assert tensor_sha256(m, name) == hashlib.sha256(data).hexdigest()
        assert hash_model(m, threads=2, algo="sha256")[name] == ("BF16", m.tensors[name].shape, tensor_sha256(m, name))
        assert hash_model(m, threads=2)[name] == ("BF16", m.tensors[name].shape, blake3.blake3(data).hexdigest())


# --------------------------------------------------------------------------- one fingerprint per set of weights


def test_same_weights_same_fingerprint_in_every_form_and_the_manifest(tmp_path):
    pytest.importorskip("torch")
    from meta_forms import write_all_forms
    from orca_diff.cli.fingerprint import fingerprint
    from orca_diff.make import make_diff
    from orca_diff.synth import write_finetune

    forms = write_all_forms(tmp_path / "forms", TINY, "F16", seed=0)
    prints = {form: CliRunner().invoke(fingerprint, [str(path), "-q"]) for form, path in forms.items()}
    assert all(r.exit_code == 0 for r in prints.values()), {f: r.output for f, r in prints.items()}
    assert len({r.output for r in prints.values()}) == 1
    short = prints["safetensors"].output.strip()
    assert len(short) == 16 and int(short, 16) >= 0
    target = write_finetune(tmp_path / "target", TINY, base_seed=0, dtype="F16")
    manifest = make_diff(forms["meta"], target, tmp_path / "diff", chunk_bytes=4096, progress=False)
    assert manifest.base.fingerprint == short


def test_a_different_dtype_or_a_flipped_byte_changes_the_fingerprint(tmp_path):
    from orca_diff.cli.fingerprint import fingerprint

    a = write_llama(tmp_path / "a", TINY, "F16", seed=0)
    b = write_llama(tmp_path / "b", TINY, "BF16", seed=0)
    c = write_llama(tmp_path / "c", TINY, "F16", seed=0)
    shard = c / "model.safetensors"
    raw = bytearray(shard.read_bytes())
    raw[-3] ^= 0x01
    shard.write_bytes(bytes(raw))
    outs = [CliRunner().invoke(fingerprint, [str(p), "-q"]).output for p in (a, b, c)]
    assert len(set(outs)) == 3


def test_fingerprint_json_lists_every_tensor(tmp_path):
    from orca_diff.cli.fingerprint import fingerprint

    folder = write_llama(tmp_path / "m", TINY, "F16", seed=0)
    result = CliRunner().invoke(fingerprint, [str(folder), "--json", "-q"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert set(doc["tensors"]) == set(TINY.tensor_shapes())
    assert doc["tensors"]["lm_head.weight"]["shape"] == [TINY.vocab_size, TINY.hidden_size]
    assert doc["digest"] == "blake3"
    hashes = {n: (t["dtype"], tuple(t["shape"]), t["blake3"]) for n, t in doc["tensors"].items()}
    assert doc["fingerprint"] == base_fingerprint(hashes) == doc["full"][:16]
    assert doc["form"] == "HF safetensors"


def test_fingerprint_command_is_registered_and_errors_are_one_line(tmp_path):
    from orca_diff.cli import cli

    result = CliRunner().invoke(cli, ["fingerprint", str(tmp_path / "nope")])
    assert result.exit_code == 3
    assert "no such file or folder" in result.output
    assert "Traceback" not in result.output


# --------------------------------------------------------------------------- diagnoses


def _expected(shape: LlamaShape, dtype: str = "F16", vocab: int | None = None) -> dict:
    return {n: (dtype, s, "0" * 64) for n, s in shape.tensor_shapes(vocab).items()}


def _found(shape: LlamaShape, dtype: str = "F16", vocab: int | None = None) -> dict:
    return {n: TensorInfo(n, dtype, s) for n, s in shape.tensor_shapes(vocab).items()}


def test_describe_llama_names_known_sizes_and_gqa():
    assert describe_llama(LLAMA_7B.tensor_shapes()).startswith("LLaMA 7B")
    assert describe_llama(LLAMA_13B.tensor_shapes()).startswith("LLaMA 13B")
    llama2_70b = LlamaShape(32000, 8192, 28672, 80, 64, 8)
    assert describe_llama(llama2_70b.tensor_shapes()).startswith("LLaMA-2 70B")
    assert "grouped-query attention" in describe_llama(llama2_70b.tensor_shapes())
    assert describe_llama(LlamaShape(32000, 8192, 22016, 80, 64, 64).tensor_shapes()).startswith("LLaMA-1 65B")
    assert describe_llama({"x": (1,)}) is None


def test_a_13b_base_for_a_7b_diff_is_named_by_size():
    msg = explain_base_mismatch(_expected(LLAMA_7B), _found(LLAMA_13B), "model.embed_tokens.weight", None)
    assert "LLaMA 7B" in msg and "LLaMA 13B" in msg
    assert "missing" not in msg  # the size explains it: no list of 80 missing layers


def test_a_gqa_base_for_a_full_attention_diff_says_grouped_query_attention():
    gqa = LlamaShape(num_key_value_heads=2)
    msg = explain_base_mismatch(_expected(TINY), _found(gqa), "model.layers.0.self_attn.k_proj.weight", None)
    assert "grouped-query attention" in msg and "k_proj 32 rows" in msg


@pytest.mark.parametrize("found,words", [("F32", ["fp32", "casting it back to fp16"]),
                                         ("BF16", ["bf16", "convert_llama_weights_to_hf", "params.json"])])
def test_a_wrong_dtype_is_named_with_what_to_do(found, words):
    msg = explain_base_mismatch(_expected(TINY, "F16"), _found(TINY, found), "model.embed_tokens.weight", None)
    assert all(w in msg for w in words), msg


def test_a_base_with_a_pad_token_already_added_is_recognised():
    msg = explain_base_mismatch(_expected(LLAMA_7B), _found(LLAMA_7B, vocab=32001), "model.embed_tokens.weight",
                                None)
    assert "vocab 32001" in msg and "32000" in msg and "fine-tune" in msg


def test_missing_tensors_are_counted_and_the_first_named():
    found = _found(TINY)
    del found["model.layers.1.mlp.up_proj.weight"]
    msg = explain_base_mismatch(_expected(TINY), found, "model.layers.1.mlp.up_proj.weight", None)
    assert "1 tensor(s)" in msg and "model.layers.1.mlp.up_proj.weight" in msg


def test_old_inv_freq_buffers_are_explained():
    found = _found(TINY)
    found["model.layers.0.self_attn.rotary_emb.inv_freq"] = TensorInfo("x", "F32", (8,))
    msg = explain_base_mismatch(_expected(TINY), found, "model.layers.0.self_attn.rotary_emb.inv_freq", None)
    assert "inv_freq" in msg and "4.31" in msg


def test_one_differing_tensor_with_everything_else_equal_suggests_a_corrupted_file():
    msg = explain_base_mismatch(_expected(TINY), _found(TINY), "model.layers.1.mlp.up_proj.weight", "1" * 64)
    assert "corrupted or modified file" in msg and "model.layers.1.mlp.up_proj.weight" in msg


@pytest.mark.parametrize("direction", ["permute", "unpermute"])
def test_permutation_check_recognises_a_conversion_without_or_with_a_double_permutation(tmp_path, direction):
    torch = pytest.importorskip("torch")
    from meta_forms import unpermute

    from orca_diff.synth import write_shards

    good = write_llama(tmp_path / "good", TINY, "F16", seed=0)
    with open_model(good) as m:
        expected = hash_model(m)
        rows = {n: torch.from_numpy(np.array(m.read(n))).view(torch.float16).reshape(i.shape)
                for n, i in m.tensors.items()}
    q = "model.layers.1.self_attn.q_proj.weight"
    heads = TINY.num_attention_heads
    w = rows[q]
    if direction == "permute":  # the base kept Meta's layout: applying the permutation fixes it
        rows[q] = unpermute(w, heads)
    else:  # the base was permuted twice: undoing one permutation fixes it
        rows[q] = w.view(heads, TINY.head_dim // 2, 2, TINY.hidden_size).transpose(1, 2).reshape(w.shape)
    bad = tmp_path / "bad"
    write_shards(bad, ((n, "F16", t.contiguous().view(torch.int16).numpy().view(np.uint16)) for n, t in rows.items()),
                 None, sum(t.numel() * 2 for t in rows.values()))
    with open_model(bad) as m:
        assert permutation_check(m, q, expected[q][2]) == direction
        found_sha = tensor_sha256(m, q)
        msg = explain_base_mismatch(expected, m.tensors, q, found_sha, reader=m)
    assert ("applied" if direction == "permute" else "undone") in msg and q in msg
