"""Bases held as HF .bin shards or Meta's original .pth read as the same HF tensors as safetensors."""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")  # the torch extra; CI installs it (see pyproject [torch])

from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

from orca_diff.containers import pickled as torch_io  # noqa: E402
from orca_diff.bits import cast_bits  # noqa: E402
from orca_diff.errors import FormatError, InputNotFoundError, MissingExtraError  # noqa: E402
from orca_diff.synth import LlamaShape, write_llama  # noqa: E402
from orca_diff.containers import open_model  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from meta_forms import (  # noqa: E402
    TORCH_DTYPES, hf_state_dict, tensor_hashes, unpermute, write_all_forms, write_hf_bin, write_meta,
)

TINY = LlamaShape()  # hidden 64, 4 heads, 2 layers, vocab 512
GQA = LlamaShape(num_key_value_heads=2)  # LLaMA-2 70B-style grouped-query attention, in miniature


def _forms(tmp_path: Path, shape: LlamaShape = TINY, dtype: str = "F16", n_shards: int = 2) -> dict[str, Path]:
    return write_all_forms(tmp_path, shape, dtype, seed=3, n_shards=n_shards)


@pytest.mark.parametrize("dtype", ["F16", "BF16", "F32"])
@pytest.mark.parametrize("shape,n_shards", [(TINY, 1), (TINY, 2), (TINY, 4), (GQA, 1), (GQA, 2)],
                         ids=["mha-1shard", "mha-2shards", "mha-4shards", "gqa-1shard", "gqa-2shards"])
def test_every_form_gives_the_same_tensor_bytes(tmp_path, shape, n_shards, dtype):
    forms = _forms(tmp_path, shape, dtype, n_shards)
    want = tensor_hashes(forms["safetensors"])
    assert len(want) == len(shape.tensor_shapes())
    for form in ("bin", "meta"):
        assert tensor_hashes(forms[form]) == want, form


def test_meta_form_lists_tensors_in_transformers_state_dict_order(tmp_path):
    forms = _forms(tmp_path)
    with open_model(forms["meta"]) as m:
        assert list(m.tensors) == list(TINY.tensor_shapes())
        assert all(m.tensors[n].shape == s for n, s in TINY.tensor_shapes().items())


def test_meta_dtype_is_kept_as_stored(tmp_path):
    for dtype in ("F16", "BF16", "F32"):
        forms = write_all_forms(tmp_path / dtype, TINY, dtype, n_shards=2)
        with open_model(forms["meta"]) as m:
            assert {i.dtype for i in m.tensors.values()} == {dtype}


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(heads=st.sampled_from([2, 4, 8]), head_dim=st.sampled_from([2, 4, 8]), kv_div=st.sampled_from([1, 2, 4]),
       shard_pow=st.integers(0, 2), embed_rows=st.booleans(), dtype=st.sampled_from(["F16", "BF16", "F32"]))
def test_meta_reader_inverts_any_split_and_permutation(tmp_path_factory, heads, head_dim, kv_div, shard_pow,
                                                       embed_rows, dtype):
    kv = max(1, heads // kv_div)
    n_shards = min(2 ** shard_pow, kv)
    hidden = heads * head_dim
    shape = LlamaShape(vocab_size=8 * n_shards, hidden_size=hidden, intermediate_size=4 * n_shards,
                       num_hidden_layers=1, num_attention_heads=heads, num_key_value_heads=kv)
    root = tmp_path_factory.mktemp("prop")
    st_dir = write_llama(root / "st", shape, dtype, seed=heads + head_dim)
    meta = write_meta(st_dir, root / "meta", n_shards=n_shards, embed_split_dim=0 if embed_rows else 1)
    assert tensor_hashes(meta) == tensor_hashes(st_dir)


def test_meta_llama3_style_embedding_split_on_rows_is_detected(tmp_path):
    st_dir = write_llama(tmp_path / "st", TINY, "F16", seed=5)
    meta = write_meta(st_dir, tmp_path / "meta", n_shards=2, embed_split_dim=0)
    assert tensor_hashes(meta) == tensor_hashes(st_dir)


def test_meta_shards_saved_as_separate_storages_read_the_same(tmp_path):
    st_dir = write_llama(tmp_path / "st", TINY, "F16", seed=5)
    meta = write_meta(st_dir, tmp_path / "meta", n_shards=2, shared_storage=False)
    assert tensor_hashes(meta) == tensor_hashes(st_dir)


def test_rotary_frequency_tables_are_not_weights(tmp_path):
    st_dir = write_llama(tmp_path / "st", TINY, "F16", seed=5)
    old_bin = write_hf_bin(st_dir, tmp_path / "bin-4.28", with_inv_freq=True)
    meta = write_meta(st_dir, tmp_path / "meta", n_shards=2)
    assert "rope.freqs" in torch.load(meta / "consolidated.00.pth", weights_only=True)
    assert any(k.endswith("inv_freq") for k in torch.load(old_bin / "pytorch_model.bin", weights_only=True))
    want = tensor_hashes(st_dir)
    assert tensor_hashes(old_bin) == want
    assert tensor_hashes(meta) == want


def test_bin_single_file_and_sharded_index_both_read(tmp_path):
    st_dir = write_llama(tmp_path / "st", TINY, "BF16", seed=5)
    single = write_hf_bin(st_dir, tmp_path / "single")
    sharded = write_hf_bin(st_dir, tmp_path / "sharded", max_shard_bytes=30_000)
    assert (single / "pytorch_model.bin").is_file()
    assert len(json.loads((sharded / "pytorch_model.bin.index.json").read_text())["weight_map"]) == 21
    assert len(list(sharded.glob("pytorch_model-*-of-*.bin"))) > 2
    want = tensor_hashes(st_dir)
    assert tensor_hashes(single) == want
    assert tensor_hashes(sharded) == want


def test_extra_files_are_the_folder_non_weight_files(tmp_path):
    forms = _forms(tmp_path)
    with open_model(forms["bin"]) as m:
        assert {"config.json", "tokenizer.model", "pytorch_model.bin.index.json"} <= set(m.extra_files)
        assert not any(n.endswith(".bin") for n in m.extra_files)
    with open_model(forms["meta"]) as m:
        assert {"params.json", "tokenizer.model", "checklist.chk"} <= set(m.extra_files)
        assert not any(n.endswith(".pth") for n in m.extra_files)


def test_meta_tokenizer_in_parent_folder_as_meta_downloads_it(tmp_path):
    forms = _forms(tmp_path)
    (forms["meta"] / "tokenizer.model").rename(tmp_path / "tokenizer.model")
    with open_model(forms["meta"]) as m:
        assert m.extra_files["tokenizer.model"] == tmp_path / "tokenizer.model"


# --------------------------------------------------------------------------- refusing what is unsafe or wrong


class _Touch:
    """Unpickling this would create a file: the stand-in for a malicious payload."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (Path.touch, (self.target,))


def _malicious(path: Path, marker: Path) -> None:
    torch.save({"model.embed_tokens.weight": torch.zeros(2, 2), "payload": _Touch(marker)}, path)


@pytest.mark.parametrize("layout", ["bin", "meta"])
def test_malicious_pickle_is_refused_without_running_it(tmp_path, layout):
    marker = tmp_path / "pwned"
    folder = tmp_path / "model"
    folder.mkdir()
    if layout == "bin":
        bad = folder / "pytorch_model.bin"
    else:
        (folder / "params.json").write_text(json.dumps({"dim": 2, "n_heads": 1, "n_layers": 0, "norm_eps": 1e-6}))
        bad = folder / "consolidated.00.pth"
    _malicious(bad, marker)
    with pytest.raises(FormatError, match="refused") as err:
        open_model(folder)
    assert str(bad) in str(err.value)
    assert "weights_only" in str(err.value)
    assert not marker.exists()


def test_stray_pickles_next_to_the_weights_are_never_loaded(tmp_path):
    st_dir = write_llama(tmp_path / "st", TINY, "F16", seed=5)
    folder = write_hf_bin(st_dir, tmp_path / "bin")
    marker = tmp_path / "pwned"
    _malicious(folder / "training_args.bin", marker)
    assert tensor_hashes(folder) == tensor_hashes(st_dir)
    assert not marker.exists()


def test_truncated_bin_is_a_format_error_naming_the_file(tmp_path):
    st_dir = write_llama(tmp_path / "st", TINY, "F16", seed=5)
    folder = write_hf_bin(st_dir, tmp_path / "bin")
    f = folder / "pytorch_model.bin"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(FormatError, match="pytorch_model.bin"):
        open_model(folder)


def test_index_naming_a_missing_shard_says_which(tmp_path):
    st_dir = write_llama(tmp_path / "st", TINY, "F16", seed=5)
    folder = write_hf_bin(st_dir, tmp_path / "bin", max_shard_bytes=30_000)
    victim = sorted(folder.glob("pytorch_model-*.bin"))[1]
    victim.unlink()
    with pytest.raises(InputNotFoundError, match=victim.name):
        open_model(folder)


def test_meta_shard_gap_is_refused(tmp_path):
    forms = _forms(tmp_path, n_shards=4)
    (forms["meta"] / "consolidated.02.pth").unlink()
    with pytest.raises(InputNotFoundError, match="without gaps"):
        open_model(forms["meta"])


def test_meta_without_params_json_says_so(tmp_path):
    forms = _forms(tmp_path)
    (forms["meta"] / "params.json").unlink()
    with pytest.raises(InputNotFoundError, match="params.json"):
        open_model(forms["meta"])


def test_meta_params_disagreeing_with_tensors_is_refused(tmp_path):
    forms = _forms(tmp_path, GQA)
    params = json.loads((forms["meta"] / "params.json").read_text())
    del params["n_kv_heads"]  # claims full attention while k_proj is GQA-sized
    (forms["meta"] / "params.json").write_text(json.dumps(params))
    with pytest.raises(FormatError, match="n_kv_heads"):
        open_model(forms["meta"])


def test_missing_torch_names_the_extra(tmp_path, monkeypatch):
    forms = _forms(tmp_path)
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch -> ImportError
    with pytest.raises(MissingExtraError, match=r"orca-diff\[torch\]"):
        open_model(forms["bin"])


def test_core_modules_import_without_torch():
    code = ("import sys; import orca_diff.containers, orca_diff.containers.pickled, orca_diff.fingerprint, orca_diff.diagnose;"
            " assert 'torch' not in sys.modules, 'torch imported eagerly'")
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------- memory


MEDIUM = LlamaShape(vocab_size=4096, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                    num_attention_heads=16, num_key_value_heads=16)

_MEASURE = textwrap.dedent("""
    import json, sys
    import torch
    from orca_diff.containers import pickled as torch_io
    from orca_diff.fingerprint import hash_model
    from orca_diff.containers import open_model
    if len(sys.argv) > 2:
        torch_io.MAP_RELEASE_BYTES = int(sys.argv[2])
    def status():
        out = {}
        for line in open("/proc/self/status"):
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[k] = int(v.split()[0]) * 1024
        return out
    m = open_model(sys.argv[1])
    before = status()
    try:
        open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to now
        reset = True
    except OSError:
        reset = False
    hashes = hash_model(m)
    after = status()
    print(json.dumps({"before": before, "after": after, "reset": reset,
                      "model_bytes": sum(i.nbytes for i in m.tensors.values()),
                      "largest_tensor": max(i.nbytes for i in m.tensors.values())}))
""")


def measure_peak(model: Path, budget: int | None = None) -> dict:
    """Hash every tensor of ``model`` in a fresh process; return /proc memory figures."""
    args = [sys.executable, "-c", _MEASURE, str(model)] + ([str(budget)] if budget else [])
    out = subprocess.run(args, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_meta_memory_stays_bounded_by_one_tensor_and_the_map_budget(tmp_path):
    st_dir = write_llama(tmp_path / "st", MEDIUM, "F16", seed=1)
    meta = write_meta(st_dir, tmp_path / "meta", n_shards=2)
    budget = 16 * 1024 * 1024
    r = measure_peak(meta, budget)
    growth = r["after"]["VmHWM"] - r["before"]["VmRSS"]
    print(f"\nmeta form, {r['model_bytes'] / 2**20:.0f} MiB model, largest tensor "
          f"{r['largest_tensor'] / 2**20:.1f} MiB, map budget {budget >> 20} MiB: peak RSS growth "
          f"{growth / 2**20:.1f} MiB (peak {r['after']['VmHWM'] / 2**20:.0f} MiB, reset={r['reset']})")
    # Holding the model would grow by model_bytes; streaming grows by the map budget plus a few
    # tensors (two cached, one being merged, its parts) and allocator slack, whatever the model size.
    assert growth < budget + 6 * r["largest_tensor"] + 24 * 2**20
    assert growth < r["model_bytes"] / 2


# --------------------------------------------------------------------------- transformers' own converter

HF_CONVERTER = os.environ.get("ORCA_DIFF_HF_CONVERTER")
needs_converter = pytest.mark.skipif(
    not HF_CONVERTER,
    reason="set ORCA_DIFF_HF_CONVERTER to transformers<=4.47.1's convert_llama_weights_to_hf.py to compare with it",
)


def _load_converter():
    spec = importlib.util.spec_from_file_location("hf_convert_llama", HF_CONVERTER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # imports transformers + tokenizers: both must be installed
    return module


def _run_converter(meta: Path, out: Path, n_shards: int, vocab: int, monkeypatch, stop_before_cast: bool) -> dict:
    """Run the converter's write_model; return the state dicts it built before its final cast."""
    conv = _load_converter()
    captured: dict[str, torch.Tensor] = {}
    real_save = torch.save

    def capture(obj, f, *a, **k):
        if isinstance(obj, dict):
            captured.update({n: t.clone() for n, t in obj.items() if isinstance(t, torch.Tensor)})
        return real_save(obj, f, *a, **k)

    class _Stop(Exception):
        pass

    class _NoModel:
        @staticmethod
        def from_pretrained(*a, **k):
            raise _Stop

    monkeypatch.setattr(torch, "save", capture)
    if stop_before_cast:
        monkeypatch.setattr(conv, "LlamaForCausalLM", _NoModel)
    try:
        conv.write_model(model_path=str(out), input_base_path=str(meta), num_shards=n_shards, llama_version="1",
                         vocab_size=vocab, safe_serialization=True)
    except _Stop:
        pass
    monkeypatch.setattr(torch, "save", real_save)
    return captured


def _bytes(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy()


@needs_converter
@pytest.mark.parametrize("shape,n_shards,dtype", [(TINY, 1, "F16"), (TINY, 2, "F16"), (TINY, 4, "F32"),
                                                  (GQA, 2, "BF16"), (GQA, 1, "F16")],
                         ids=["mha-1", "mha-2", "mha-4-fp32", "gqa-2-bf16", "gqa-1"])
def test_meta_conversion_equals_transformers_converter_bit_for_bit(tmp_path, monkeypatch, shape, n_shards, dtype):
    forms = _forms(tmp_path, shape, dtype, n_shards)
    theirs = _run_converter(forms["meta"], tmp_path / "conv", n_shards, shape.vocab_size, monkeypatch,
                            stop_before_cast=True)
    assert sorted(k for k in theirs if not k.endswith("rotary_emb.inv_freq")) == sorted(shape.tensor_shapes())
    with open_model(forms["meta"]) as ours:
        for name, info in ours.tensors.items():
            assert TORCH_DTYPES[info.dtype] == theirs[name].dtype, name
            assert tuple(theirs[name].shape) == info.shape, name
            assert np.array_equal(ours.read(name), _bytes(theirs[name])), name


@needs_converter
def test_converter_final_output_is_our_bytes_cast_to_bf16(tmp_path, monkeypatch):
    """The converter ends with from_pretrained(torch_dtype=bfloat16) + save_pretrained: its files
    are exactly our (stored-dtype) tensors rounded to bf16, nothing else differs."""
    forms = _forms(tmp_path, GQA, "F16", 2)
    _run_converter(forms["meta"], tmp_path / "conv", 2, GQA.vocab_size, monkeypatch, stop_before_cast=False)
    with open_model(tmp_path / "conv") as final, open_model(forms["meta"]) as ours:
        assert set(final.tensors) == set(ours.tensors)
        for name, info in ours.tensors.items():
            assert final.tensors[name].dtype == "BF16"
            mine = cast_bits(np.asarray(ours.read(name)).view(np.uint16), "F16", "BF16")
            assert np.array_equal(np.asarray(final.read(name)).view(np.uint16), mine.reshape(-1)), name


# --------------------------------------------------------------------------- apply from every form


def _diff_from_safetensors(tmp_path: Path, dtype: str = "F16", shape: LlamaShape = TINY,
                           add_pad_row: bool = True) -> tuple[dict, Path, Path]:
    from orca_diff.make import make_diff
    from orca_diff.synth import FineTune, write_finetune

    forms = write_all_forms(tmp_path / "forms", shape, dtype, seed=0)
    target = write_finetune(tmp_path / "target", shape, base_seed=0, dtype=dtype,
                            ft=FineTune(add_pad_row=add_pad_row))
    make_diff(forms["safetensors"], target, tmp_path / "diff", chunk_bytes=4096, progress=False)
    return forms, target, tmp_path / "diff"


@pytest.mark.parametrize("add_pad_row", [
    True,  # the Orca/Alpaca case: vocab + 1, so config/tokenizer json files differ and travel in the diff
    False,  # same config: config/tokenizer json files still travel in the diff (a Meta base has none)
], ids=["pad-row-added", "same-config"])
def test_apply_from_every_base_form_rebuilds_identical_files(tmp_path, add_pad_row):
    from conftest import file_hashes
    from orca_diff.apply import apply_diff

    forms, target, diff = _diff_from_safetensors(tmp_path, add_pad_row=add_pad_row)
    want = file_hashes(target)
    for form, base in forms.items():
        out = tmp_path / f"out-{form}"
        apply_diff(base, diff, out, progress=False)
        assert file_hashes(out) == want, form


def _refuses_before_writing(base: Path, diff: Path, out: Path) -> str:
    from orca_diff.apply import apply_diff
    from orca_diff.errors import BaseMismatchError

    with pytest.raises(BaseMismatchError) as err:
        apply_diff(base, diff, out, progress=False)
    assert not out.exists(), "apply wrote output before refusing the base"
    assert not any(p.name.startswith(".") for p in out.parent.iterdir() if p.name.startswith(f".{out.name}"))
    return str(err.value)


@pytest.mark.parametrize("form", ["safetensors", "bin", "meta"])
def test_fp32_base_for_an_fp16_diff_fails_before_writing_and_says_fp32(tmp_path, form):
    _, _, diff = _diff_from_safetensors(tmp_path)
    wrong = write_all_forms(tmp_path / "fp32", TINY, "F32", seed=0)[form]
    msg = _refuses_before_writing(wrong, diff, tmp_path / "out")
    assert "fp32" in msg and "fp16" in msg


@pytest.mark.parametrize("form", ["safetensors", "bin", "meta"])
def test_llama2_gqa_base_for_a_llama1_diff_fails_before_writing_and_says_so(tmp_path, form):
    _, _, diff = _diff_from_safetensors(tmp_path)
    wrong = write_all_forms(tmp_path / "gqa", GQA, "F16", seed=0)[form]
    msg = _refuses_before_writing(wrong, diff, tmp_path / "out")
    assert "k_proj" in msg and "grouped-query attention" in msg


def test_base_converted_without_the_qk_permutation_is_diagnosed_by_apply(tmp_path):
    """A conversion that forgot the rotary permutation: names/dtypes/shapes match, q_proj does not."""
    from orca_diff.synth import write_shards

    _, _, diff = _diff_from_safetensors(tmp_path)
    good = write_all_forms(tmp_path / "good", TINY, "F16", seed=0)["safetensors"]
    sd = hf_state_dict(good)
    for name in list(sd):
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            sd[name] = unpermute(sd[name], TINY.num_attention_heads)
    bad = tmp_path / "no-permute"
    items = ((n, "F16", t.view(torch.int16).numpy().view(np.uint16)) for n, t in sd.items())
    write_shards(bad, items, None, sum(t.numel() * 2 for t in sd.values()))
    for extra in ("config.json", "generation_config.json", "special_tokens_map.json", "tokenizer_config.json",
                  "tokenizer.model"):
        (bad / extra).write_bytes((good / extra).read_bytes())
    msg = _refuses_before_writing(bad, diff, tmp_path / "out")
    assert "rotary q/k permutation" in msg
