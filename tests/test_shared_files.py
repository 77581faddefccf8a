"""`make --share-identical-files`: files the base holds byte-identical stay out of the diff.

Between a fine-tune's successive checkpoints (issue 23) the tokenizer and config files are the
base's own: shipping them (a 0.7 MB tokenizer.json against a 0.6 % weight delta) is most of a
near-identical diff. With the option they travel as `source: "base"` entries (format section 2),
checked by size and sha256 against the user's base before anything is written. By default only
tokenizer.model is taken from the base, and make says how much the option would save.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import TINY, file_hashes
from orca_diff.apply import apply_diff
from orca_diff.cli import cli
from orca_diff.errors import BaseMismatchError
from orca_diff.format import load_manifest
from orca_diff.make import make_diff
from orca_diff.synth import FineTune, write_finetune, write_llama


@pytest.fixture
def checkpoints(tmp_path: Path) -> tuple[Path, Path]:
    """Two checkpoints of one run: different weights, the same side files (a 200 KB tokenizer.json)."""
    base = write_llama(tmp_path / "step-100", TINY, "BF16", seed=0)
    target = write_finetune(tmp_path / "step-200", TINY, base_seed=0, dtype="BF16", ft=FineTune())
    for p in base.iterdir():
        if p.suffix != ".safetensors":
            p.unlink()
    big = b'{"model": {"vocab": {' + b",".join(b'"tok%d": %d' % (i, i) for i in range(16000)) + b"}}}"
    (target / "tokenizer.json").write_bytes(big)
    for p in target.iterdir():
        if p.suffix != ".safetensors":
            shutil.copyfile(p, base / p.name)
    (target / "notes.txt").write_text("only in the fine-tune\n")
    return base, target


def _sources(diff: Path) -> dict[str, str]:
    return {f.path: f.source for f in load_manifest(diff).files if f.kind == "blob"}


def test_identical_side_files_come_from_the_base_and_rebuild_exactly(checkpoints, tmp_path):
    base, target = checkpoints
    make_diff(base, target, tmp_path / "diff", share_identical_files=True)
    sources = _sources(tmp_path / "diff")
    assert sources["tokenizer.json"] == sources["config.json"] == sources["tokenizer.model"] == "base"
    assert sources["notes.txt"] == "diff"  # not in the base: shipped
    apply_diff(base, tmp_path / "diff", tmp_path / "out")
    assert file_hashes(tmp_path / "out") == file_hashes(target)


def test_sharing_makes_the_diff_smaller_by_the_files_left_out(checkpoints, tmp_path):
    base, target = checkpoints
    make_diff(base, target, tmp_path / "shipped")
    make_diff(base, target, tmp_path / "shared", share_identical_files=True)
    size = lambda d: sum(p.stat().st_size for p in d.iterdir() if p.name != "README.md")  # noqa: E731
    saved = size(tmp_path / "shipped") - size(tmp_path / "shared")
    shipped = {f.path: f for f in load_manifest(tmp_path / "shipped").files}
    assert shipped["tokenizer.json"].source == "diff"
    carried = sum(c.length for c in shipped["tokenizer.json"].chunks) + sum(c.length for c in shipped["config.json"].chunks)
    assert saved >= carried > 0


def test_by_default_make_ships_them_and_says_what_the_option_would_save(checkpoints, tmp_path):
    base, target = checkpoints
    r = CliRunner().invoke(cli, ["make", "--base", str(base), "--target", str(target), "--out",
                                 str(tmp_path / "diff"), "-q"])
    assert r.exit_code == 0, r.output
    assert "--share-identical-files" in r.output and "tokenizer.json" in r.output
    assert _sources(tmp_path / "diff")["tokenizer.json"] == "diff"
    r = CliRunner().invoke(cli, ["make", "--base", str(base), "--target", str(target), "--out",
                                 str(tmp_path / "diff2"), "-q", "--share-identical-files"])
    assert r.exit_code == 0 and "--share-identical-files" not in r.output, r.output


def test_a_base_without_a_shared_file_is_refused_before_writing(checkpoints, tmp_path):
    base, target = checkpoints
    make_diff(base, target, tmp_path / "diff", share_identical_files=True)
    (base / "tokenizer.json").unlink()
    with pytest.raises(BaseMismatchError, match="tokenizer.json"):
        apply_diff(base, tmp_path / "diff", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_base_whose_shared_file_changed_is_refused(checkpoints, tmp_path):
    base, target = checkpoints
    make_diff(base, target, tmp_path / "diff", share_identical_files=True)
    data = bytearray((base / "config.json").read_bytes())
    data[1] ^= 1  # same size, other bytes
    (base / "config.json").write_bytes(bytes(data))
    r = CliRunner().invoke(cli, ["apply", "--base", str(base), "--diff", str(tmp_path / "diff"), "--out",
                                 str(tmp_path / "out"), "-q"])
    assert r.exit_code == 6 and "config.json" in r.output, r.output
    assert not (tmp_path / "out").exists()
