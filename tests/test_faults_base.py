"""Fault injection, part 2: a base that is not the diff's base is refused before any output.

One element one ulp off, a missing tensor, another shape or dtype, a missing shard, a changed or
missing tokenizer file, a truncated shard: each is refused with an error naming the tensor or
file, and neither the output folder nor its hidden staging sibling is created.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import load_file, save_file

from faultkit import Kit, assert_no_output, expect_refusal, expect_safe, kit, ledger, previous_output, truncate, tree_snapshot  # noqa: F401
from orca_diff.apply import apply_diff
from orca_diff.cli import cli
from orca_diff.errors import BaseMismatchError, FormatError
from orca_diff.containers import read_safetensors_header

SUITE = "wrong-base"


def _shard_of(base: Path, tensor: str) -> Path:
    for shard in sorted(base.glob("*.safetensors")):
        if any(e.info.name == tensor for e in read_safetensors_header(shard).entries):
            return shard
    raise KeyError(tensor)


def _edit_shard(base: Path, tensor: str, edit: Callable[[dict[str, np.ndarray]], None]) -> None:
    shard = _shard_of(base, tensor)
    tensors = load_file(str(shard))
    edit(tensors)
    save_file(tensors, str(shard), metadata={"format": "pt"})


def _one_ulp_off(base: Path, tensor: str, index: int) -> None:
    """Move one element of ``tensor`` by one unit in the last place (bit pattern + 1), in place."""
    shard = _shard_of(base, tensor)
    header = read_safetensors_header(shard)
    entry = next(e for e in header.entries if e.info.name == tensor)
    n = entry.info.numel
    pos = header.data_start + entry.begin + (index % n) * entry.info.itemsize
    with open(shard, "r+b") as f:
        f.seek(pos)
        v = np.frombuffer(f.read(2), dtype=np.uint16)[0]
        f.seek(pos)
        f.write(np.uint16(v + 1 if v & 0x7FFF != 0x7BFF else v - 1).tobytes())


WRONG_BASES: dict[str, tuple[Callable[[Path], None], tuple[str, ...]]] = {
    "first element of the embedding one ulp off": (
        lambda b: _one_ulp_off(b, "model.embed_tokens.weight", 0), ("model.embed_tokens.weight",)),
    "middle element of a q_proj one ulp off": (
        lambda b: _one_ulp_off(b, "model.layers.1.self_attn.q_proj.weight", 512), ("model.layers.1.self_attn.q_proj.weight",)),
    "last element of lm_head one ulp off": (
        lambda b: _one_ulp_off(b, "lm_head.weight", -1), ("lm_head.weight",)),
    "last element of the final norm one ulp off": (
        lambda b: _one_ulp_off(b, "model.norm.weight", -1), ("model.norm.weight",)),
    "a tensor missing": (
        lambda b: _edit_shard(b, "model.layers.0.mlp.down_proj.weight",
                              lambda t: t.pop("model.layers.0.mlp.down_proj.weight")),
        ("model.layers.0.mlp.down_proj.weight", "missing")),
    "a tensor of another shape (transposed)": (
        lambda b: _edit_shard(b, "model.layers.0.mlp.up_proj.weight",
                              lambda t: t.update({"model.layers.0.mlp.up_proj.weight": np.ascontiguousarray(
                                  t["model.layers.0.mlp.up_proj.weight"].T)})),
        ("model.layers.0.mlp.up_proj.weight",)),
    "a tensor with a row fewer": (
        lambda b: _edit_shard(b, "model.embed_tokens.weight",
                              lambda t: t.update({"model.embed_tokens.weight": t["model.embed_tokens.weight"][:-1].copy()})),
        ("model.embed_tokens.weight",)),
    "a tensor of another dtype, same values": (
        lambda b: _edit_shard(b, "model.layers.1.self_attn.v_proj.weight",
                              lambda t: t.update({"model.layers.1.self_attn.v_proj.weight":
                                                  t["model.layers.1.self_attn.v_proj.weight"].astype(np.float32)})),
        ("model.layers.1.self_attn.v_proj.weight", "F32")),
    "a shard missing": (
        lambda b: (b / "model-00002-of-00004.safetensors").unlink(), ("missing",)),
    "the tokenizer file the diff copies changed": (
        lambda b: (b / "tokenizer.model").write_bytes(b"\0" + (b / "tokenizer.model").read_bytes()[1:]),
        ("tokenizer.model",)),
    "the tokenizer file the diff copies missing": (
        lambda b: (b / "tokenizer.model").unlink(), ("tokenizer.model", "missing")),
}


@pytest.mark.parametrize("case", sorted(WRONG_BASES))
def test_apply_refuses_a_wrong_base_before_writing(kit: Kit, ledger, tmp_path: Path, case: str) -> None:
    damage, names = WRONG_BASES[case]
    base = kit.copy_base(tmp_path / "base")
    damage(base)
    out = tmp_path / "out"
    exc = expect_refusal(ledger, SUITE, case, lambda: apply_diff(base, kit.diff, out, threads=1, progress=False),
                         must_name=names)
    assert isinstance(exc, BaseMismatchError)
    assert_no_output(out)


def test_a_truncated_base_shard_is_refused_naming_it(kit: Kit, ledger, tmp_path: Path) -> None:
    for cut in (0, 7, 8, 100, -1):
        base = kit.copy_base(tmp_path / f"base{cut}")
        shard = base / "model-00003-of-00004.safetensors"
        truncate(shard, cut if cut >= 0 else shard.stat().st_size + cut)
        out = tmp_path / f"out{cut}"
        exc = expect_refusal(ledger, SUITE, f"base shard truncated at {cut}",
                             lambda: apply_diff(base, kit.diff, out, threads=1, progress=False),
                             must_name=("model-00003-of-00004.safetensors",))
        assert isinstance(exc, FormatError)
        assert_no_output(out)


def test_the_fine_tune_given_as_base_is_refused(kit: Kit, ledger, tmp_path: Path) -> None:
    out = tmp_path / "out"
    exc = expect_refusal(ledger, SUITE, "target given as base",
                         lambda: apply_diff(kit.target, kit.diff, out, threads=1, progress=False),
                         must_name=("model.embed_tokens.weight",))
    assert isinstance(exc, BaseMismatchError)
    assert_no_output(out)


def test_a_wrong_base_leaves_an_existing_output_untouched_even_with_force(kit: Kit, ledger, tmp_path: Path) -> None:
    base = kit.copy_base(tmp_path / "base")
    _one_ulp_off(base, "model.layers.0.self_attn.k_proj.weight", 3)
    out = previous_output(tmp_path / "out", {"model.safetensors": "a previous model"})
    before = tree_snapshot(out)
    expect_refusal(ledger, SUITE, "wrong base with --force over an existing folder",
                   lambda: apply_diff(base, kit.diff, out, force=True, threads=1, progress=False),
                   must_name=("model.layers.0.self_attn.k_proj.weight",))
    assert tree_snapshot(out) == before
    assert not (tmp_path / ".out.orca-diff-partial").exists()


def test_extra_base_tensors_and_files_are_harmless(kit: Kit, ledger, tmp_path: Path) -> None:
    """The control: what the diff does not need may differ; the output is still exact."""
    base = kit.copy_base(tmp_path / "base")
    _edit_shard(base, "model.norm.weight", lambda t: t.update({"extra.bias": np.ones(4, dtype=np.float16)}))
    (base / "notes.txt").write_text("not part of the model")
    out = tmp_path / "out"
    expect_safe(ledger, SUITE, "extra base tensor and file", lambda: apply_diff(base, kit.diff, out, threads=1, progress=False),
                out, kit.matches_target)
    kit.assert_identical(out)


def test_cli_exit_code_for_a_wrong_base_is_6_and_the_message_is_one_line(kit: Kit, ledger, tmp_path: Path) -> None:
    base = kit.copy_base(tmp_path / "base")
    _one_ulp_off(base, "model.layers.1.mlp.gate_proj.weight", 7)
    out = tmp_path / "out"
    r = CliRunner().invoke(cli, ["apply", "--base", str(base), "--diff", str(kit.diff), "--out", str(out), "-q"])
    assert r.exit_code == 6, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "model.layers.1.mlp.gate_proj.weight" in lines[0] and "Traceback" not in r.output
    ledger.record(SUITE, "cli wrong base", "detected")
    assert_no_output(out)
