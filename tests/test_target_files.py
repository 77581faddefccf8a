"""make carries every file of the target folder, or refuses naming the file: never a diff that
make accepts and apply refuses (issue 12 item 3). Also make's own edge cases: a file changing
while make reads it, a lone-surrogate tensor name, Ctrl-C."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
from click.testing import CliRunner

from orca_diff.apply import apply_diff
from orca_diff.cli import cli
from orca_diff.errors import FormatError, InterruptedError_
from orca_diff.format import load_manifest, path_problem
from orca_diff.make import make_diff
from orca_diff.verify import verify_model

from conftest import file_hashes

ODD_NAMES = {
    "notes with space.txt": b"a space",
    "weights (copy).json": b"{}",
    "lisez-moi-\u00e9t\u00e9.md": "non-ASCII".encode(),
    "~backup.txt": b"tilde",
    "training_args.bin": os.urandom(300),
    ".gitattributes": b"*.bin filter=lfs diff=lfs merge=lfs -text\n",
    "original/params.json": b'{"dim": 32}',
    "deep/er/still/file.txt": b"deep",
}


def add_files(folder: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        p = folder / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)


def test_make_carries_every_file_subfolders_dotfiles_and_odd_names(make_pair, tmp_path):
    base, target = make_pair("BF16")
    add_files(target, ODD_NAMES)
    for junk in (".git/HEAD", ".cache/huggingface/download/x.metadata", "__pycache__/x.pyc"):
        add_files(target, {junk: b"not the model"})
    outside = tmp_path / "blobs" / "0123abcd"
    outside.parent.mkdir()
    outside.write_bytes(b"a file the snapshot links to")
    (target / "linked.txt").symlink_to(outside)  # an HF cache snapshot is made of such links
    notes: list[str] = []
    make_diff(base, target, tmp_path / "diff", chunk_bytes=4096, notes=notes)
    assert any(".git/" in n for n in notes) and any("__pycache__/" in n for n in notes)
    assert any(".cache/" in n for n in notes)
    m = load_manifest(tmp_path / "diff")
    paths = {f.path for f in m.files}
    assert set(ODD_NAMES) | {"linked.txt"} <= paths
    assert not any(p.startswith((".git/", ".cache/", "__pycache__/")) for p in paths)
    out = tmp_path / "out"
    apply_diff(base, tmp_path / "diff", out)
    expected = {k: v for k, v in file_hashes(target).items() if not k.startswith((".git/", ".cache/", "__pycache__/"))}
    assert file_hashes(out) == expected
    verify_model(out, tmp_path / "diff")


@pytest.mark.parametrize("names, message", [
    ({"Config.JSON": b"x"}, "differ only in case"),  # config.json exists already
    ({"orca-diff.json": b"{}"}, "orca-diff.json"),
    ({".x.incomplete": b"x"}, "reserves"),
    ({"caf\u00e9.txt": b"1", "cafe\u0301.txt": b"2"}, "Unicode normalisation"),
    ({"bad\x01name.txt": b"x"}, "control character"),
])
def test_make_refuses_names_no_diff_can_carry_naming_the_file(make_pair, tmp_path, names, message):
    base, target = make_pair("BF16")
    add_files(target, names)
    with pytest.raises(FormatError, match=message):
        make_diff(base, target, tmp_path / "diff", chunk_bytes=4096)
    assert not (tmp_path / "diff").exists()


def test_make_refuses_a_fifo_and_a_dangling_link_by_name(make_pair, tmp_path):
    base, target = make_pair("BF16")
    os.mkfifo(target / "pipe.json")
    with pytest.raises(FormatError, match="pipe.json: is not a regular file"):
        make_diff(base, target, tmp_path / "diff")
    (target / "pipe.json").unlink()
    (target / "gone.txt").symlink_to(tmp_path / "nowhere")
    with pytest.raises(FormatError, match="gone.txt: cannot be read"):
        make_diff(base, target, tmp_path / "diff")


@pytest.mark.parametrize("path", list(ODD_NAMES) + ["a/b/.hidden", "\u00fc/~x (1)"])
def test_the_path_rule_accepts_what_make_carries(path):
    assert path_problem(path) is None


def test_a_file_growing_while_make_reads_it_still_gives_a_diff_that_applies(make_pair, tmp_path, monkeypatch):
    """Hash and chunks come from one read: the diff describes the bytes make encoded."""
    base, target = make_pair("BF16")
    big = target / "big.txt"
    big.write_bytes(b"a" * 20000)
    import orca_diff.make as make_mod

    real = make_mod._read_file
    calls = {"n": 0}

    def read_then_change(path, offset, size):
        data = real(path, offset, size)
        if path == big and calls["n"] == 0:
            calls["n"] += 1
            big.write_bytes(b"b" * 30000)  # changed after its first chunk was read
        return data

    monkeypatch.setattr(make_mod, "_read_file", read_then_change)
    make_diff(base, target, tmp_path / "diff", chunk_bytes=4096, threads=1)  # chunks read in order
    out = tmp_path / "out"
    apply_diff(base, tmp_path / "diff", out)  # applies and verifies: what make read, consistently
    verify_model(out, tmp_path / "diff")
    assert (out / "big.txt").read_bytes() == b"a" * 4096 + b"b" * (20000 - 4096)


def test_a_lone_surrogate_tensor_name_is_one_line_in_make_and_fingerprint(make_pair, tmp_path):
    base, target = make_pair("BF16")
    shard = next(target.glob("*.safetensors"))
    raw = shard.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = raw[8:8 + n].replace(b'"lm_head.weight"', b'"lm_head\\ud800weigh"', 1)
    header = header + b" " * (n - len(header))
    shard.write_bytes(struct.pack("<Q", len(header)) + header + raw[8 + n:])
    r = CliRunner().invoke(cli, ["make", "--base", str(base), "--target", str(target), "--out", str(tmp_path / "d")])
    assert r.exit_code == 4, r.output
    assert "not valid Unicode" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(cli, ["fingerprint", str(target)])
    assert r.exit_code == 4 and "not valid Unicode" in r.output


def test_ctrl_c_in_make_says_make_starts_over_not_resume(make_pair, tmp_path, monkeypatch):
    base, target = make_pair("BF16")
    import orca_diff.make as make_mod

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(make_mod, "_make_into", interrupted)
    with pytest.raises(InterruptedError_) as exc:
        make_diff(base, target, tmp_path / "diff")
    assert "resume" not in str(exc.value).replace("does not resume", "") and "again" in str(exc.value)
    r = CliRunner().invoke(cli, ["make", "--base", str(base), "--target", str(target), "--out", str(tmp_path / "d")])
    assert r.exit_code == 130
    assert "does not resume" in r.output
    assert not (tmp_path / "diff").exists() and not list(tmp_path.glob(".diff*"))
