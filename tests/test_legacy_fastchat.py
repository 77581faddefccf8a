"""FastChat/Vicuna deltas: orca-diff rebuilds exactly what FastChat's apply_delta produces.

The comparison runs FastChat's own make_delta.py and apply_delta.py (fschat 0.2.36, installed
with ``pip install --no-deps fschat==0.2.36``; the modules are loaded by file so that FastChat's
heavy package __init__ is not needed) on a tiny LlamaForCausalLM with a real tokenizer.
The v0 behaviour (32001-row deltas) is checked against that era's algorithm, written out here
from fastchat/model/apply_delta.py at commit 69e62190.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given, settings, strategies as st
from hypothesis.extra.numpy import arrays

from orca_diff.cli import cli
from orca_diff.errors import BaseMismatchError, FormatError
from orca_diff.legacy import SafetensorsWriter, apply_legacy, convert_legacy
from orca_diff.legacy.fastchat import effective_base_fingerprint
from orca_diff.synth import FineTune, LlamaShape, write_finetune, write_llama
from orca_diff.containers import open_model

TINY = LlamaShape(vocab_size=320, hidden_size=32, intermediate_size=88, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=4)


# --------------------------------------------------------------------------- helpers


def write_tokenizer(folder: Path, vocab_size: int) -> None:
    """A tiny real tokenizer (``tokenizers`` WordLevel) that AutoTokenizer loads, replacing the
    synthetic stand-in tokenizer.model that synth writes."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    (folder / "tokenizer.model").unlink(missing_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                               "model_max_length": 2048, **special}))
    (folder / "special_tokens_map.json").write_text(json.dumps(special))


def numpy_delta(base: Path, target: Path, out: Path) -> Path:
    """A FastChat-style delta (target - base in fp16, HF folder) without FastChat or torch."""
    b, t = open_model(base), open_model(target)
    out.mkdir()
    infos = list(t.tensors.values())
    w = SafetensorsWriter(out, infos)
    for i in infos:
        w.begin(i.name)
        tv = t.read(i.name).view(np.float16)
        bv = np.zeros(i.numel, np.float16)
        bv[: b.tensors[i.name].numel] = b.read(i.name).view(np.float16)
        w.write((tv - bv).view(np.uint8))
    w.close()
    for name, p in t.extra_files.items():
        shutil.copyfile(p, out / name)
    return out


def tensors_of(folder: Path) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    m = open_model(folder)
    try:
        return {n: (i.dtype, i.shape, bytes(m.read(n))) for n, i in m.tensors.items()}
    finally:
        m.close()


def load_fastchat(name: str):
    """fastchat/model/<name>.py loaded by path (its package __init__ imports the whole serving stack)."""
    fastchat = pytest.importorskip("fastchat", reason="the FastChat comparison needs fschat: pip install --no-deps fschat==0.2.36")
    pytest.importorskip("transformers", reason="FastChat's scripts load models with transformers")
    path = Path(fastchat.__file__).parent / "model" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"fastchat_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


@pytest.fixture
def pair(tmp_path: Path):
    counter = iter(range(100))

    def build(base_dtype: str = "F16", **ft: object) -> tuple[Path, Path]:
        i = next(counter)
        base = write_llama(tmp_path / f"base{i}-{base_dtype}", TINY, base_dtype, seed=0)
        target = write_finetune(tmp_path / f"target{i}", TINY, base_seed=0, dtype="F16", ft=FineTune(**ft))
        for f in (base, target):
            write_tokenizer(f, TINY.vocab_size + (1 if ft.get("add_pad_row") else 0) if f == target else TINY.vocab_size)
        return base, target

    return build


# --------------------------------------------------------------------------- FastChat's own tools


@pytest.mark.parametrize("base_dtype", ["F16", "BF16"])
def test_apply_matches_fastchat_make_delta_and_apply_delta_bitwise(pair, tmp_path, base_dtype):
    make_delta, apply_delta = load_fastchat("make_delta"), load_fastchat("apply_delta")
    base, target = pair(base_dtype)
    delta, fc_out = tmp_path / "fc-delta", tmp_path / "fc-out"
    make_delta.args = argparse.Namespace(hub_repo_id=None)  # make_delta() reads the CLI's global
    make_delta.make_delta(str(base), str(target), str(delta))
    apply_delta.apply_delta(str(base), str(fc_out), str(delta))

    result = CliRunner().invoke(cli, ["apply", "--format", "fastchat", "--base", str(base), "--diff", str(delta),
                                      "--out", str(tmp_path / "od-out"), "-q"])
    assert result.exit_code == 0, result.output
    assert tensors_of(tmp_path / "od-out") == tensors_of(fc_out)
    assert "rebuilt" in result.output and "model digest" in result.output
    if base_dtype == "BF16":
        assert "rounded to fp16 first" in result.output


# --------------------------------------------------------------------------- v0 deltas (32001 rows)


def fastchat_v0_apply_delta(base: Path, delta: Path) -> dict[str, np.ndarray]:
    """apply_delta of FastChat at 69e62190 (fschat <= 0.1.10), on state dicts: base in fp16,
    [PAD] added to the base tokenizer, embeddings resized to len(tokenizer) with the new rows set
    to 0, then base += delta for every tensor of the base."""
    torch = pytest.importorskip("torch")
    b, d = open_model(base), open_model(delta)
    out = {}
    for name, info in b.tensors.items():
        w = torch.from_numpy(np.array(b.read(name)).view(np.float16).reshape(info.shape))
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            resized = torch.empty((info.shape[0] + 1, info.shape[1]), dtype=torch.float16)
            resized[: info.shape[0]] = w
            resized[-1:] = 0
            w = resized
        dw = torch.from_numpy(np.array(d.read(name)).view(np.float16).reshape(d.tensors[name].shape))
        w += dw
        out[name] = w.numpy()
    return out


def test_v0_delta_gets_a_zero_pad_row_as_fastchat_0_1_10_did(pair, tmp_path):
    base, target = pair("F16", add_pad_row=True)
    delta = numpy_delta(base, target, tmp_path / "delta-v0")
    assert open_model(delta).tensors["lm_head.weight"].shape[0] == TINY.vocab_size + 1
    report = apply_legacy("fastchat", str(base), str(delta), tmp_path / "out", progress=False)
    assert any("v0 delta" in n for n in report.notes)
    got = tensors_of(tmp_path / "out")
    want = fastchat_v0_apply_delta(base, delta)
    assert sorted(got) == sorted(want)
    for name, arr in want.items():
        assert got[name][1] == arr.shape and got[name][2] == arr.tobytes(), name


def test_v1_delta_on_a_padded_base_is_refused_before_writing(pair, tmp_path):
    base, target = pair("F16", add_pad_row=True)
    # the "base" here has 321 rows (a model with a pad token), the delta 320: FastChat's 32000 vs 32001 error
    plain_base, _ = pair("F16")
    delta = numpy_delta(plain_base, plain_base, tmp_path / "delta-v1")
    with pytest.raises(BaseMismatchError, match=r"320.*already has 1 extra row"):
        apply_legacy("fastchat", str(target), str(delta), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_delta_with_rows_from_another_vocabulary_is_refused(pair, tmp_path):
    base, target = pair("F16")
    big = write_llama(tmp_path / "big", LlamaShape(**{**TINY.__dict__, "vocab_size": 330}), "F16")
    delta = numpy_delta(base, big, tmp_path / "delta")
    result = CliRunner().invoke(cli, ["apply", "--format", "fastchat", "--base", str(base), "--diff", str(delta),
                                      "--out", str(tmp_path / "out")])
    assert result.exit_code == BaseMismatchError.exit_code
    assert "size of tensor a (320) must match the size of tensor b (330)" in result.output
    assert "nothing was written" in result.output and not (tmp_path / "out").exists()


def test_delta_lacking_a_base_tensor_is_refused(pair, tmp_path):
    base, target = pair("F16")
    partial = tmp_path / "partial"
    partial.mkdir()
    t = open_model(target)
    infos = [i for n, i in t.tensors.items() if n != "model.norm.weight"]
    w = SafetensorsWriter(partial, infos)
    for i in infos:
        w.begin(i.name)
        w.write(t.read(i.name))
    w.close()
    with pytest.raises(FormatError, match="model.norm.weight"):
        apply_legacy("fastchat", str(base), str(partial), tmp_path / "out", progress=False)


def test_truncated_delta_is_a_clear_error(pair, tmp_path):
    base, target = pair("F16")
    delta = numpy_delta(base, target, tmp_path / "delta")
    shard = delta / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1000])
    result = CliRunner().invoke(cli, ["apply", "--format", "fastchat", "--base", str(base), "--diff", str(delta),
                                      "--out", str(tmp_path / "out")])
    assert result.exit_code == FormatError.exit_code
    assert "truncated" in result.output and "model.safetensors" in result.output


def test_a_same_shape_wrong_base_is_refused_when_the_catalog_knows_the_base(pair, tmp_path, monkeypatch):
    base, target = pair("F16")
    delta = numpy_delta(base, target, tmp_path / "delta")
    other = write_llama(tmp_path / "other", TINY, "F16", seed=5)
    names = list(open_model(base).tensors)
    catalog = tmp_path / "catalog.json"
    catalog.write_text(json.dumps({"diffs": {"tiny-vicuna": {
        "repo": "lmsys/tiny-vicuna-delta", "format": "fastchat", "base": "tiny-llama",
        "legacy": {"base_fingerprint": effective_base_fingerprint(open_model(base), names)}}}}))
    monkeypatch.setenv("ORCA_DIFF_CATALOG", str(catalog))
    monkeypatch.setattr("orca_diff.legacy.run.resolve_legacy_diff", lambda spec, fmt, progress: (delta, json.loads(
        catalog.read_text())["diffs"]["tiny-vicuna"]))
    with pytest.raises(BaseMismatchError, match="nothing was written"):
        apply_legacy("auto", str(other), "tiny-vicuna", tmp_path / "out", progress=False)
    report = apply_legacy("auto", str(base), "tiny-vicuna", tmp_path / "out", progress=False)
    assert any("base fingerprint" in c for c in report.checks)


# --------------------------------------------------------------------------- convert


def test_convert_applies_to_the_same_bytes_and_is_smaller(pair, tmp_path):
    from orca_diff.apply import apply_diff

    base, target = pair("F16")
    delta = numpy_delta(base, target, tmp_path / "delta")
    legacy_out = tmp_path / "legacy-out"
    apply_legacy("fastchat", str(base), str(delta), legacy_out, progress=False)
    result = CliRunner().invoke(cli, ["convert", str(delta), "--format", "fastchat", "--base", str(base),
                                      "--out", str(tmp_path / "diff"), "-q"])
    assert result.exit_code == 0, result.output
    assert "smaller" in result.output
    rebuilt = apply_diff(base, tmp_path / "diff", tmp_path / "rebuilt", progress=False)
    assert rebuilt.files >= 1
    for p in legacy_out.iterdir():
        assert (tmp_path / "rebuilt" / p.name).read_bytes() == p.read_bytes(), p.name
    report = convert_legacy("fastchat", str(delta), str(base), tmp_path / "diff2", progress=False)
    assert report.diff_bytes < report.legacy_bytes
    assert not any(p.name.endswith(".legacy-target") for p in tmp_path.iterdir())


# --------------------------------------------------------------------------- catalog + Hub (headline command)


def test_apply_by_catalog_names_downloads_the_delta_and_base_from_the_hub(pair, tmp_path):
    sys.path.insert(0, str(Path(__file__).parent))
    from hubserver import FakeHub

    base, target = pair("F16")
    delta = numpy_delta(base, target, tmp_path / "delta")
    catalog = tmp_path / "catalog.json"
    catalog.write_text(json.dumps({
        "bases": {"tiny-llama": {"repo": "huggyllama/tiny-llama", "status": "public"}},
        "diffs": {"tiny-vicuna-v1.1": {"repo": "lmsys/tiny-vicuna-delta-v1.1", "base": "tiny-llama",
                                       "status": "public", "format": "fastchat"}}}))
    expected = tmp_path / "expected"
    apply_legacy("fastchat", str(base), str(delta), expected, progress=False)
    with FakeHub() as hub:
        hub.add_folder("huggyllama/tiny-llama", base)
        hub.add_folder("lmsys/tiny-vicuna-delta-v1.1", delta)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING", "ORCA_DIFF_"))}
        env.update(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf"), HF_HUB_DISABLE_XET="1",
                   HF_HUB_DISABLE_TELEMETRY="1", ORCA_DIFF_CATALOG=str(catalog), ORCA_DIFF_DISABLE_PROGRESS_BARS="1",
                   XDG_CONFIG_HOME=str(tmp_path / "cfg"), HOME=str(tmp_path / "home"))
        proc = subprocess.run([sys.executable, "-m", "orca_diff.cli", "apply", "--base", "tiny-llama", "--diff",
                               "tiny-vicuna-v1.1", "--out", str(tmp_path / "out")], env=env, capture_output=True,
                              text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "fastchat release" in proc.stdout
    assert tensors_of(tmp_path / "out") == tensors_of(expected)


# --------------------------------------------------------------------------- arithmetic and v0 with today's FastChat


def test_todays_fastchat_fails_on_a_v0_delta_where_orca_diff_follows_the_old_rule(pair, tmp_path):
    apply_delta = load_fastchat("apply_delta")
    base, target = pair("F16", add_pad_row=True)
    delta = numpy_delta(base, target, tmp_path / "delta-v0")
    write_tokenizer(delta, TINY.vocab_size + 1)
    with pytest.raises(RuntimeError, match=r"size of tensor a \(320\) must match the size of tensor b \(321\)"):
        apply_delta.apply_delta(str(base), str(tmp_path / "fc-out"), str(delta))
    report = apply_legacy("fastchat", str(base), str(delta), tmp_path / "out", progress=False)
    assert any("fschat 0.1.10" in n for n in report.notes)


@settings(max_examples=50, deadline=None)
@given(arrays(np.uint16, 512, elements=st.integers(0, 0xFFFF)), arrays(np.uint16, 512, elements=st.integers(0, 0xFFFF)))
def test_fp16_add_is_torchs_fp16_add_bit_for_bit(a, b):
    """The one arithmetic step FastChat does, on any bit patterns (subnormals, overflow, inf)."""
    torch = pytest.importorskip("torch")
    fa, fb = a.view(np.float16), b.view(np.float16)
    with np.errstate(all="ignore"):
        ours = np.add(fa, fb).view(np.uint16)
    t = torch.from_numpy(fa.copy())
    t += torch.from_numpy(fb.copy())
    theirs = t.numpy().view(np.uint16)
    both_nan = np.isnan(ours.view(np.float16)) & np.isnan(theirs.view(np.float16))
    assert np.array_equal(ours[~both_nan], theirs[~both_nan])


def test_bin_delta_and_bin_base_as_published_give_the_same_model(pair, tmp_path):
    """The real Vicuna deltas and many LLaMA conversions are pytorch_model-*.bin shards."""
    pytest.importorskip("torch")
    sys.path.insert(0, str(Path(__file__).parent))
    from meta_forms import write_hf_bin

    base, target = pair("F16")
    delta = numpy_delta(base, target, tmp_path / "delta")
    apply_legacy("fastchat", str(base), str(delta), tmp_path / "from-safetensors", progress=False)
    base_bin = write_hf_bin(base, tmp_path / "base-bin", max_shard_bytes=30_000)
    delta_bin = write_hf_bin(delta, tmp_path / "delta-bin", max_shard_bytes=30_000)
    apply_legacy("fastchat", str(base_bin), str(delta_bin), tmp_path / "from-bin", progress=False)
    assert tensors_of(tmp_path / "from-bin") == tensors_of(tmp_path / "from-safetensors")
