"""OpenAssistant XOR releases: orca-diff decodes exactly what xor_codec.py decodes, and checks.

The reference below is the published algorithm (LAION-AI/Open-Assistant
scripts/xor-codec/xor_codec.py: ``xor_uncompressed`` with its 4096-byte blocks, zero padding of
a shorter base and truncation of a longer one, and ``xor_dir``, which copies added_tokens.json
first and skips any file that raises). Both the payload and the decoded files are made with it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from click.testing import CliRunner

torch = pytest.importorskip("torch")  # the .bin files are torch checkpoints (the torch extra)

from meta_forms import write_hf_bin  # noqa: E402
from orca_diff.cli import cli  # noqa: E402
from orca_diff.errors import BaseMismatchError, VerificationError  # noqa: E402
from orca_diff.legacy import apply_legacy, convert_legacy, detect_format  # noqa: E402
from orca_diff.legacy.oa_xor import published_md5  # noqa: E402
from orca_diff.synth import FineTune, LlamaShape, write_finetune, write_llama  # noqa: E402
from orca_diff.containers import open_model  # noqa: E402

TINY = LlamaShape(vocab_size=320, hidden_size=32, intermediate_size=88, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=4)
SHARD = 40_000


# --------------------------------------------------------------------------- reference codec


def ref_xor_uncompressed(dst: str, src_payload: str, src_base: str, block_size: int = 4096) -> None:
    with open(src_payload, "rb") as fp_payload, open(src_base, "rb") as fp_base, open(dst, "wb") as fp:
        while True:
            buf1 = np.array(bytearray(fp_payload.read(block_size)), dtype=np.uint8)
            buf2 = np.array(bytearray(fp_base.read(block_size)), dtype=np.uint8)
            padding = len(buf1) - len(buf2)
            if padding > 0:
                buf2 = np.pad(buf2, (0, padding), "constant", constant_values=(0,))
            if padding < 0:
                buf2 = buf2[: len(buf1)]
            fp.write(np.bitwise_xor(buf1, buf2))
            if len(buf1) < block_size:
                break


def ref_xor_dir(dst: Path, src_payload: Path, src_base: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy(src_payload / "added_tokens.json", dst / "added_tokens.json")
    for path in os.listdir(src_payload):
        try:
            # the script opens payload and base before it creates the output file
            open(src_base / path, "rb").close()
            ref_xor_uncompressed(str(dst / path), str(src_payload / path), str(src_base / path))
        except Exception:
            pass  # "Exception when processing ..."


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def card(base: Path, out: Path) -> str:
    """A model card in the shape of OpenAssistant's: md5 lists of Meta's files, the converted
    base, and the final files, each in its own code block."""
    def block(folder: Path) -> str:
        return "\n".join(f"{md5(p)}  ./{p.name}" for p in sorted(folder.iterdir()) if p.is_file())
    return ("# tiny oasst xor\n\n```\n" + "0" * 32 + "  ./consolidated.00.pth\n" + "1" * 32 + "  ./params.json\n```\n\n"
            f"Convert, then check:\n\n```\n{block(base)}\n```\n\nAfter the XOR:\n\n```\n{block(out)}\n```\n")


@pytest.fixture
def release(tmp_path: Path):
    base_st = write_llama(tmp_path / "base-st", TINY, "F16", seed=0)
    target_st = write_finetune(tmp_path / "target-st", TINY, base_seed=0, dtype="F16", ft=FineTune(add_pad_row=True))
    (target_st / "config.json").write_text((target_st / "config.json").read_text().replace("\n", "").replace("  ", ""))
    base = write_hf_bin(base_st, tmp_path / "llama_hf", max_shard_bytes=SHARD)
    target = write_hf_bin(target_st, tmp_path / "oasst", max_shard_bytes=SHARD)
    assert sorted(p.name for p in base.glob("*.bin")) == sorted(p.name for p in target.glob("*.bin"))
    assert (target / "config.json").stat().st_size < (base / "config.json").stat().st_size  # truncation rule
    assert (target / "pytorch_model-00001-of-00003.bin").stat().st_size != (base / "pytorch_model-00001-of-00003.bin").stat().st_size
    repo = tmp_path / "repo"
    payload = repo / "oasst-tiny-xor"
    ref_xor_dir(payload, target, base)  # encoding is the same XOR
    (repo / "README.md").write_text(card(base, target))
    return SimpleNamespace(base=base, target=target, repo=repo, payload=payload, root=tmp_path)


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


# --------------------------------------------------------------------------- tests


def test_decode_matches_xor_codec_byte_for_byte_and_checks_the_published_md5s(release):
    ref_out = release.root / "ref-out"
    ref_xor_dir(ref_out, release.payload, release.base)
    assert files_of(ref_out) == files_of(release.target)  # the reference round-trips
    result = CliRunner().invoke(cli, ["apply", "--format", "oa-xor", "--base", str(release.base), "--diff",
                                      str(release.repo), "--out", str(release.root / "out"), "-q"])
    assert result.exit_code == 0, result.output
    assert files_of(release.root / "out") == files_of(ref_out)
    assert "md5 of 10 base files match" in result.output  # 3 shards, index, config, generation config, 4 tokenizer files
    assert "md5 of 10 rebuilt files match" in result.output
    assert "loads as a weights-only checkpoint" in result.output


def test_an_xor_payload_is_detected_without_format(release):
    assert detect_format(str(release.repo)) == "oa-xor"
    assert detect_format(str(release.target)) is None  # a plain model folder is not taken for a release
    result = CliRunner().invoke(cli, ["apply", "--base", str(release.base), "--diff", str(release.payload),
                                      "--out", str(release.root / "out"), "-q"])
    assert result.exit_code == 0, result.output
    assert files_of(release.root / "out") == files_of(release.target)


def test_a_base_with_other_bytes_is_refused_before_writing_naming_the_expected_conversion(release):
    shard = release.base / "pytorch_model-00002-of-00003.bin"
    data = bytearray(shard.read_bytes())
    data[-100] ^= 1
    shard.write_bytes(bytes(data))
    result = CliRunner().invoke(cli, ["apply", "--format", "oa-xor", "--base", str(release.base), "--diff",
                                      str(release.repo), "--out", str(release.root / "out")])
    assert result.exit_code == BaseMismatchError.exit_code
    assert "pytorch_model-00002-of-00003.bin" in result.output and "transformers commit" in result.output
    assert "nothing was written" in result.output and not (release.root / "out").exists()


def test_without_an_md5_list_a_different_conversion_is_caught_as_unloadable(release, tmp_path):
    (release.repo / "README.md").unlink()
    other = write_hf_bin(tmp_path / "base-st", tmp_path / "other-conversion", max_shard_bytes=SHARD, with_inv_freq=True)
    assert sorted(p.name for p in other.iterdir()) == sorted(p.name for p in release.base.iterdir())
    with pytest.raises(VerificationError, match="not byte-identical to the ones the release was made against"):
        apply_legacy("oa-xor", str(other), str(release.payload), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_a_truncated_payload_is_caught_by_the_published_result_md5s(release):
    shard = release.payload / "pytorch_model-00003-of-00003.bin"
    shard.write_bytes(shard.read_bytes()[:-500])
    with pytest.raises(VerificationError, match="pytorch_model-00003-of-00003.bin.*payload download complete"):
        apply_legacy("oa-xor", str(release.base), str(release.repo), release.root / "out", progress=False)
    assert not (release.root / "out").exists()


def test_a_missing_base_shard_is_refused(release):
    (release.base / "pytorch_model-00003-of-00003.bin").unlink()
    with pytest.raises(BaseMismatchError, match="has no pytorch_model-00003-of-00003.bin"):
        apply_legacy("oa-xor", str(release.base), str(release.repo), release.root / "out", progress=False)


def test_the_cards_md5_blocks_are_read_as_base_then_output(release):
    base_md5, out_md5 = published_md5(release.payload)
    assert base_md5["config.json"] == md5(release.base / "config.json")
    assert out_md5["config.json"] == md5(release.target / "config.json")
    assert "consolidated.00.pth" not in base_md5 and "added_tokens.json" in out_md5


def test_convert_yields_the_same_tensors_and_is_smaller(release):
    from orca_diff.apply import apply_diff

    report = convert_legacy("oa-xor", str(release.repo), str(release.base), release.root / "diff", progress=False)
    assert report.diff_bytes < report.legacy_bytes
    assert any("re-saved as safetensors" in n for n in report.notes)
    apply_diff(release.base, release.root / "diff", release.root / "rebuilt", progress=False)
    want, got = open_model(release.target), open_model(release.root / "rebuilt")
    assert sorted(want.tensors) == sorted(got.tensors)
    for name in want.tensors:
        assert want.tensors[name] == got.tensors[name] and bytes(want.read(name)) == bytes(got.read(name)), name


def test_convert_cli_detects_the_xor_release_and_reports_the_ratio(release):
    result = CliRunner().invoke(cli, ["convert", str(release.repo), "--base", str(release.base), "--out",
                                      str(release.root / "diff"), "-q"])
    assert result.exit_code == 0, result.output
    assert "vs the oa-xor release's" in result.output and "smaller" in result.output
