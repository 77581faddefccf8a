"""The two identities, recomputed by hand from the bytes exactly as docs/format.md section 6 and
docs/bases.md define them, and compared with what the commands print (issue 19).

* model digest: sha256 over the raw sha256 of every file (OpenSSF model-signing root digest);
* base fingerprint: sha256 over sorted "name\\tdtype\\tshape\\tdigest\\n" lines, digest = BLAKE3 of
  the tensor's bytes (sha256 with --digest sha256, format version 1), first 16 hex.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import blake3
from click.testing import CliRunner

from conftest import TINY
from orca_diff.apply import apply_diff
from orca_diff.cli import cli
from orca_diff.identity import ignored, model_digest, order_key
from orca_diff.make import make_diff
from orca_diff.synth import FineTune, write_finetune, write_llama


def _by_hand_model_digest(folder: Path) -> str:
    """docs/format.md section 6, literally."""
    rels = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
    rels = [r for r in rels if r.split("/")[0] not in (".git", ".github") and r not in
            (".gitattributes", ".gitignore", "model.sig")]
    rels.sort(key=lambda r: r.split("/"))
    return hashlib.sha256(b"".join(hashlib.sha256((folder / r).read_bytes()).digest() for r in rels)).hexdigest()


def _by_hand_base_fingerprint(folder: Path, algo: str = "blake3") -> str:
    """docs/bases.md "Fingerprints", literally, from the safetensors bytes."""
    lines = []
    for shard in sorted(folder.glob("*.safetensors")):
        raw = shard.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8:8 + n])
        for name, t in header.items():
            if name == "__metadata__":
                continue
            begin, end = t["data_offsets"]
            data = raw[8 + n + begin:8 + n + end]
            digest = blake3.blake3(data).hexdigest() if algo == "blake3" else hashlib.sha256(data).hexdigest()
            lines.append(f"{name}\t{t['dtype']}\t{'x'.join(map(str, t['shape']))}\t{digest}\n")
    return hashlib.sha256("".join(sorted(lines)).encode()).hexdigest()[:16]


def test_documented_example_of_the_base_fingerprint() -> None:
    line = "w\tF16\t2x3\t" + "0" * 64 + "\n"
    assert hashlib.sha256(line.encode()).hexdigest()[:16] == "14279eab62a32d82"


def test_base_fingerprint_by_hand_equals_the_command(tmp_path: Path) -> None:
    base = write_llama(tmp_path / "base", TINY, "BF16", seed=0, max_shard_bytes=30_000)
    runner = CliRunner()
    for algo in ("blake3", "sha256"):
        r = runner.invoke(cli, ["fingerprint", str(base), "--digest", algo, "-q"])
        assert r.exit_code == 0, r.output
        assert r.output.strip() == _by_hand_base_fingerprint(base, algo)


def test_model_digest_by_hand_equals_what_make_apply_verify_info_and_fingerprint_print(tmp_path: Path) -> None:
    base = write_llama(tmp_path / "base", TINY, "BF16", seed=0)
    target = write_finetune(tmp_path / "target", TINY, base_seed=0, dtype="BF16", ft=FineTune(add_pad_row=True))
    (target / "sub").mkdir()
    (target / "sub" / "x.py").write_text("print(1)\n")
    (target / "sub-x.txt").write_text("order differs by component\n")
    (target / ".gitattributes").write_text("*.bin filter=lfs\n")
    want = _by_hand_model_digest(target)
    runner = CliRunner()
    diff, out = tmp_path / "diff", tmp_path / "out"
    outputs = [runner.invoke(cli, ["make", "--base", str(base), "--target", str(target), "--out", str(diff), "-q"]),
               runner.invoke(cli, ["apply", "--base", str(base), "--diff", str(diff), "--out", str(out), "-q"]),
               runner.invoke(cli, ["verify", "--diff", str(diff), "--model", str(out), "-q"]),
               runner.invoke(cli, ["info", str(diff)])]
    for r in outputs:
        assert r.exit_code == 0 and f"model digest {want}" in r.output, r.output
    fp = runner.invoke(cli, ["fingerprint", "--model", str(out), "-q"])
    assert fp.output.strip() == want
    doc = json.loads(runner.invoke(cli, ["info", str(diff), "--json"]).output)
    assert doc["target"]["model_digest"] == want
    assert apply_diff(base, diff, tmp_path / "lib", progress=False).model_digest == want  # the library


def test_ignored_paths_are_top_level_only_like_model_signing() -> None:
    assert ignored(".gitattributes") and ignored(".git/config") and ignored("model.sig")
    assert not ignored("sub/.gitattributes") and not ignored("sub/model.sig") and not ignored(".gitattributes2")
    assert sorted(["a-b", "a/b", "a.b"], key=order_key) == ["a/b", "a-b", "a.b"]


def test_the_digest_binds_every_byte_of_every_file() -> None:
    files = {"config.json": hashlib.sha256(b"{}").hexdigest(), "model.safetensors": hashlib.sha256(b"w").hexdigest()}
    d = model_digest(files)
    assert model_digest({**files, "config.json": hashlib.sha256(b'{"auto_map": 1}').hexdigest()}) != d
    assert model_digest({**files, "modeling_evil.py": hashlib.sha256(b"import os").hexdigest()}) != d
    assert model_digest({**files, ".gitattributes": hashlib.sha256(b"x").hexdigest()}) == d


def test_legacy_apply_convert_and_the_converted_diff_print_one_identity(tmp_path: Path) -> None:
    """The issue's case: for files `cmp` calls identical, `apply --format fastchat`, `convert`,
    `apply` of the converted diff and `fingerprint --model` printed three different values."""
    import pytest

    pytest.importorskip("tokenizers")
    from conftest import file_hashes
    from test_legacy_fastchat import numpy_delta, write_tokenizer

    base = write_llama(tmp_path / "base", TINY, "F16", seed=0)
    target = write_finetune(tmp_path / "target", TINY, base_seed=0, dtype="F16", ft=FineTune())
    for f in (base, target):
        write_tokenizer(f, TINY.vocab_size)
    delta = numpy_delta(base, target, tmp_path / "delta")
    runner = CliRunner()
    legacy_out, diff, out = tmp_path / "legacy-out", tmp_path / "diff", tmp_path / "out"
    a = runner.invoke(cli, ["apply", "--format", "fastchat", "--base", str(base), "--diff", str(delta),
                            "--out", str(legacy_out), "-q"])
    c = runner.invoke(cli, ["convert", str(delta), "--format", "fastchat", "--base", str(base), "--out", str(diff), "-q"])
    b = runner.invoke(cli, ["apply", "--base", str(base), "--diff", str(diff), "--out", str(out), "-q"])
    for r in (a, c, b):
        assert r.exit_code == 0, r.output
    assert file_hashes(legacy_out) == file_hashes(out)  # the same bytes
    want = _by_hand_model_digest(out)
    for r in (a, c, b):
        assert f"model digest {want}" in r.output, r.output
    assert runner.invoke(cli, ["fingerprint", "--model", str(legacy_out), "-q"]).output.strip() == want
