"""Alpaca/WizardLM weight diffs: orca-diff recovers exactly what weight_diff.py's recover does.

The reference below is the published algorithm (tatsu-lab/stanford_alpaca weight_diff.py,
``make_diff`` and ``recover``, with train.py's ``smart_tokenizer_and_embedding_resize``) written
on torch state dicts: fp32 models, a [PAD] row that is the mean of the other rows, ``add_``,
and the naive integrity check ``sum(t.sum() for t in state_dict)``.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from click.testing import CliRunner

torch = pytest.importorskip("torch")  # the Alpaca path needs the torch extra (its [PAD] row is a torch mean)

from orca_diff.cli import cli  # noqa: E402
from orca_diff.errors import BaseMismatchError, FormatError, VerificationError  # noqa: E402
from orca_diff.legacy import apply_legacy, convert_legacy  # noqa: E402
from orca_diff.legacy.alpaca import group_of, integrity_message, inv_freq_total  # noqa: E402
from orca_diff.synth import FineTune, LlamaShape, write_finetune, write_llama  # noqa: E402
from orca_diff.containers import open_model  # noqa: E402

TINY = LlamaShape(vocab_size=320, hidden_size=32, intermediate_size=88, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=4)
TORCH = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}
EMB = ("model.embed_tokens.weight", "lm_head.weight")


def state_dict(folder: Path) -> dict[str, "torch.Tensor"]:
    m = open_model(folder)
    try:
        return {n: torch.from_numpy(np.array(m.read(n))).view(TORCH[i.dtype]).reshape(i.shape)
                for n, i in m.tensors.items()}
    finally:
        m.close()


def smart_resize(sd: dict[str, "torch.Tensor"]) -> None:
    """smart_tokenizer_and_embedding_resize with one new token, on a fp32 state dict."""
    for name in EMB:
        w = sd[name]
        resized = torch.empty((w.shape[0] + 1, w.shape[1]), dtype=torch.float32)
        resized[:-1] = w
        resized[-1:] = resized[:-1].mean(dim=0, keepdim=True)
        sd[name] = resized


def reference_make_diff(raw: Path, tuned: Path, out: Path) -> Path:
    """weight_diff.py make_diff: fp32 tuned - fp32 resized raw, saved as pytorch_model.bin (fp32)."""
    sd_tuned = {k: v.float() for k, v in state_dict(tuned).items()}
    sd_raw = {k: v.float() for k, v in state_dict(raw).items()}
    smart_resize(sd_raw)
    for key in sd_tuned:
        sd_tuned[key].add_(-sd_raw[key])
    out.mkdir()
    torch.save(sd_tuned, out / "pytorch_model.bin")
    for name in ("config.json", "generation_config.json", "tokenizer.model", "tokenizer_config.json",
                 "special_tokens_map.json", "added_tokens.json"):
        (out / name).write_bytes((tuned / name).read_bytes())
    return out


def reference_recover(raw: Path, diff: Path) -> tuple[dict[str, "torch.Tensor"], float]:
    """weight_diff.py recover: (recovered state dict, allsum of the naive integrity check)."""
    sd_raw = {k: v.float() for k, v in state_dict(raw).items()}
    smart_resize(sd_raw)
    sd_rec = {k: v.clone() for k, v in state_dict(diff).items()}
    for key in sd_rec:
        sd_rec[key].add_(sd_raw[key])
    allsum = sum(sd_rec[key].sum() for key in sd_rec)
    return sd_rec, float(allsum)


@pytest.fixture
def release(tmp_path: Path):
    raw = write_llama(tmp_path / "raw", TINY, "F16", seed=0)
    tuned = write_finetune(tmp_path / "tuned", TINY, base_seed=0, dtype="F32", ft=FineTune(add_pad_row=True))
    diff = reference_make_diff(raw, tuned, tmp_path / "wdiff")
    recovered, allsum = reference_recover(raw, diff)
    return SimpleNamespace(raw=raw, tuned=tuned, diff=diff, recovered=recovered, allsum=allsum, root=tmp_path)


def with_entry(monkeypatch, diff: Path, legacy: dict) -> None:
    """Make ``diff`` resolve with a catalog entry carrying ``legacy`` (the integrity data)."""
    entry = {"repo": "tatsu-lab/tiny-alpaca-wdiff", "format": "alpaca", "legacy": legacy}
    monkeypatch.setattr("orca_diff.legacy.run.resolve_legacy_diff", lambda spec, fmt, progress: (diff, entry))


def tensors_of(folder: Path) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    m = open_model(folder)
    try:
        return {n: (i.dtype, i.shape, bytes(m.read(n))) for n, i in m.tensors.items()}
    finally:
        m.close()


def test_recover_matches_weight_diff_py_bitwise_and_passes_its_integrity_check(release, monkeypatch):
    with_entry(monkeypatch, release.diff, {"integrity_sum": release.allsum})
    result = CliRunner().invoke(cli, ["apply", "--format", "alpaca", "--base", str(release.raw), "--diff",
                                      str(release.diff), "--out", str(release.root / "out"), "-q"])
    assert result.exit_code == 0, result.output
    assert "naive integrity check: weights sum to" in result.output
    assert "[PAD] row" in result.output
    got = tensors_of(release.root / "out")
    assert sorted(got) == sorted(release.recovered)
    for name, t in release.recovered.items():
        assert got[name] == ("F32", tuple(t.shape), t.numpy().tobytes()), name
    # and it is the fine-tuned model (tuned - raw + raw in fp32 is within an ulp or so of tuned)
    for name, t in state_dict(release.tuned).items():
        np.testing.assert_allclose(np.frombuffer(got[name][2], np.float32).reshape(t.shape), t.numpy(), rtol=1e-6, atol=1e-7)


def test_integrity_failure_names_the_tensor_group_that_differs(release, monkeypatch):
    groups: dict[str, float] = {}
    for name, t in release.recovered.items():
        groups[group_of(name)] = groups.get(group_of(name), 0.0) + float(t.sum())
    with_entry(monkeypatch, release.diff, {"integrity_sum": release.allsum, "group_sums": groups})
    bad = release.root / "bad-raw"
    sd = state_dict(release.raw)
    sd["model.layers.1.mlp.down_proj.weight"] = sd["model.layers.1.mlp.down_proj.weight"] + 0.01
    write_like(release.raw, bad, sd)
    with pytest.raises(VerificationError) as err:
        apply_legacy("alpaca", str(bad), str(release.diff), release.root / "out", progress=False)
    msg = str(err.value)
    assert "naive integrity check failed" in msg and "mlp (found" in msg
    assert "attention (found" not in msg and "embed_tokens (found" not in msg
    assert not (release.root / "out").exists()


def write_like(src: Path, out: Path, sd: dict[str, "torch.Tensor"]) -> None:
    out.mkdir()
    torch.save({k: v.contiguous() for k, v in sd.items()}, out / "pytorch_model.bin")
    for p in src.iterdir():  # config and tokenizer files, not the weights or their index
        if p.name.endswith((".json", ".model")) and p.name != "model.safetensors.index.json":
            (out / p.name).write_bytes(p.read_bytes())


def test_integrity_failure_without_recorded_groups_explains_the_likely_cause(release, monkeypatch):
    with_entry(monkeypatch, release.diff, {"integrity_sum": release.allsum})
    other = write_llama(release.root / "other-raw", TINY, "F16", seed=3)
    result = CliRunner().invoke(cli, ["apply", "--format", "alpaca", "--base", str(other), "--diff",
                                      str(release.diff), "--out", str(release.root / "out")])
    assert result.exit_code == VerificationError.exit_code
    assert "per-group sums are: embed_tokens" in result.output and "Likely cause" in result.output
    assert "Traceback" not in result.output and not (release.root / "out").exists()


def test_bf16_base_is_named_as_the_likely_cause():
    base = SimpleNamespace(tensors={"a": SimpleNamespace(dtype="BF16")})
    msg = integrity_message(50640.0, 50637.1836, 1e-2, base, {}, {"mlp": 1.0}, None)  # type: ignore[arg-type]
    assert "your base is bf16" in msg and "gap +2.8164" in msg


def test_a_constant_that_counts_the_rotary_buffers_is_accepted(release, monkeypatch):
    inv = inv_freq_total(release.diff / "config.json")
    assert inv is not None and inv > 0
    with_entry(monkeypatch, release.diff, {"integrity_sum": release.allsum + inv})
    report = apply_legacy("alpaca", str(release.raw), str(release.diff), release.root / "out", progress=False)
    assert any("inv_freq" in c for c in report.checks)


def test_release_without_a_constant_says_so(release, monkeypatch):
    with_entry(monkeypatch, release.diff, {"integrity_sum": None})
    report = apply_legacy("alpaca", str(release.raw), str(release.diff), release.root / "out", progress=False)
    assert any("no integrity constant known" in n for n in report.notes)
    assert report.target_fingerprint


def test_base_whose_tokenizer_has_a_pad_token_is_refused(release):
    doc = json.loads((release.raw / "special_tokens_map.json").read_text())
    (release.raw / "special_tokens_map.json").write_text(json.dumps({**doc, "pad_token": "<unk>"}))
    with pytest.raises(BaseMismatchError, match="already defines pad_token"):
        apply_legacy("alpaca", str(release.raw), str(release.diff), release.root / "out", progress=False)


def test_base_of_another_size_is_refused_before_writing(release):
    small = write_llama(release.root / "small", LlamaShape(**{**TINY.__dict__, "hidden_size": 16,
                                                              "num_attention_heads": 2, "num_key_value_heads": 2}), "F16")
    with pytest.raises(BaseMismatchError, match="nothing was written"):
        apply_legacy("alpaca", str(small), str(release.diff), release.root / "out", progress=False)
    assert not (release.root / "out").exists()


def test_truncated_diff_is_a_clear_error(release):
    f = release.diff / "pytorch_model.bin"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    result = CliRunner().invoke(cli, ["apply", "--format", "alpaca", "--base", str(release.raw), "--diff",
                                      str(release.diff), "--out", str(release.root / "out")])
    assert result.exit_code == FormatError.exit_code
    assert "pytorch_model.bin" in result.output and "Traceback" not in result.output


def test_convert_applies_to_the_same_bytes_and_is_much_smaller(release):
    from orca_diff.apply import apply_diff

    legacy_out = release.root / "legacy-out"
    apply_legacy("alpaca", str(release.raw), str(release.diff), legacy_out, progress=False)
    report = convert_legacy("alpaca", str(release.diff), str(release.raw), release.root / "diff", progress=False)
    # the target is fp32 with full-entropy low mantissa bits, so the gain is smaller than for fp16
    assert report.diff_bytes < 0.8 * report.legacy_bytes
    apply_diff(release.raw, release.root / "diff", release.root / "rebuilt", progress=False)
    for p in legacy_out.iterdir():
        assert (release.root / "rebuilt" / p.name).read_bytes() == p.read_bytes(), p.name
