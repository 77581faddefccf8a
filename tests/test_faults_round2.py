"""Fault injection, round 2 (issue 20): what ``--force`` may delete, the lock file, a kill while
the marker is written, paths no platform can hold, inputs that change or vanish while read.

Each test is one defect the adversarial pass found; each failed before its fix.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

import orca_diff.format as format_mod
from faultkit import Kit, expect_refusal, expect_safe, kit, ledger, rewrite_manifest, run_cli, tree_snapshot  # noqa: F401
from orca_diff.apply import apply_diff
from orca_diff.errors import FormatError, OutputError
from orca_diff.format import canonical_sha256, load_manifest, parse_manifest, path_key, path_problem
from orca_diff.make import make_diff
from orca_diff.outdir import (OutputLock, lock_path, marker_path, output_session, pending_marker_path, publish,
                              write_marker)

SUITE = "round 2"


def _apply(kit: Kit, out: Path, **kw):
    return lambda: apply_diff(kit.base, kit.diff, out, threads=1, progress=False, **kw)


def _make(kit: Kit, out: Path, **kw):
    return lambda: make_diff(kit.base, kit.target, out, chunk_bytes=4096, threads=1, progress=False, **kw)


# --------------------------------------------------------------------------- 1. a stale marker


def test_force_refuses_a_folder_recreated_under_a_stale_marker(kit: Kit, ledger, tmp_path: Path) -> None:
    """`rm -r out` leaves the marker beside it; a folder the user makes later under that name,
    holding files of the same names, is not a previous output."""
    out = tmp_path / "out"
    apply_diff(kit.base, kit.diff, out, threads=1, progress=False)
    shutil.rmtree(out)
    assert marker_path(out).is_file()
    out.mkdir()
    mine = {name: f"the user's own {name}\n" for name in ("config.json", "model-00001-of-00004.safetensors",
                                                          "tokenizer_config.json") if name in kit.target_files}
    assert mine
    for name, text in mine.items():
        (out / name).write_text(text)
    before = tree_snapshot(out)
    expect_refusal(ledger, SUITE, "a recreated folder under a stale marker", _apply(kit, out, force=True),
                   must_name=(sorted(mine)[0], "--force", "changed since orca-diff published it"))
    assert tree_snapshot(out) == before


@pytest.mark.parametrize("keep_mtime", [False, True])
def test_force_refuses_a_previous_output_whose_file_the_user_edited(kit: Kit, ledger, tmp_path: Path,
                                                                    keep_mtime: bool) -> None:
    out = tmp_path / "out"
    apply_diff(kit.base, kit.diff, out, threads=1, progress=False)
    edited = out / "config.json"
    st = edited.stat()
    data = bytearray(edited.read_bytes())
    data[5:6] = b"X" if data[5:6] != b"X" else b"Y"
    edited.write_bytes(bytes(data))  # same size
    if keep_mtime:
        os.utime(edited, ns=(st.st_atime_ns, st.st_mtime_ns))
    before = tree_snapshot(out)
    expect_refusal(ledger, SUITE, f"a user-edited file of a previous output (mtime kept: {keep_mtime})",
                   _apply(kit, out, force=True), must_name=("config.json", "sha256"))
    assert tree_snapshot(out) == before


def test_force_still_replaces_its_own_output_copied_or_chmodded(kit: Kit, ledger, tmp_path: Path) -> None:
    """A changed identity with unchanged bytes (chmod, `cp -a` and back) is proved by sha256."""
    out = tmp_path / "out"
    apply_diff(kit.base, kit.diff, out, threads=1, progress=False)
    os.chmod(out / "config.json", 0o600)
    shutil.copytree(out, tmp_path / "copy", copy_function=shutil.copy2)
    shutil.rmtree(out)
    (tmp_path / "copy").rename(out)
    expect_safe(ledger, SUITE, "--force over its own output, copied back", _apply(kit, out, force=True), out,
                kit.matches_target)


def test_an_old_style_marker_proves_nothing(kit: Kit, ledger, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "train.py").write_text("print('mine')\n")
    marker_path(out).write_text(json.dumps({"written_by": "orca-diff", "files": ["train.py"]}))
    expect_refusal(ledger, SUITE, "a bare list of names as marker", _apply(kit, out, force=True),
                   must_name=("train.py", "older orca-diff"))
    assert (out / "train.py").read_text() == "print('mine')\n"


# --------------------------------------------------------------------------- 2. any orca-diff.json


def test_a_loose_orca_diff_json_does_not_make_a_project_replaceable(kit: Kit, ledger, tmp_path: Path) -> None:
    proj = tmp_path / "proj"
    (proj / "data").mkdir(parents=True)
    (proj / "train.py").write_text("print('my training script')\n")
    (proj / "data" / "set.jsonl").write_text('{"q": 1}\n')
    (proj / "orca-diff.json").write_text(json.dumps({"payloads": [{"path": "train.py"}, {"path": "data/set.jsonl"}]}))
    before = tree_snapshot(proj)
    expect_refusal(ledger, SUITE, "a loose orca-diff.json listing the user's files", _make(kit, proj, force=True),
                   must_name=("--force",))
    assert tree_snapshot(proj) == before


def test_a_valid_manifest_proves_only_payloads_that_still_match_it(kit: Kit, ledger, tmp_path: Path) -> None:
    """A diff folder without a marker (an older orca-diff's, or a download): its valid manifest
    proves its payloads by size and sha256; a payload the user overwrote is refused."""
    d = tmp_path / "diff"
    shutil.copytree(kit.diff, d)
    payload = sorted(p for p in d.iterdir() if p.name not in ("orca-diff.json", "README.md"))[0]
    payload.write_bytes(b"not a payload any more" + payload.read_bytes()[22:])
    before = tree_snapshot(d)
    expect_refusal(ledger, SUITE, "a diff folder whose payload the user overwrote", _make(kit, d, force=True),
                   must_name=(payload.name, "sha256"))
    assert tree_snapshot(d) == before
    shutil.rmtree(d)
    shutil.copytree(kit.diff, d)
    expect_safe(ledger, SUITE, "--force over a marker-less diff folder", _make(kit, d, force=True), d,
                lambda p: (p / "orca-diff.json").is_file() and marker_path(p).is_file())


def test_make_leaves_a_marker_and_force_replaces_its_own_diff(kit: Kit, ledger, tmp_path: Path) -> None:
    d = tmp_path / "diff"
    make_diff(kit.base, kit.target, d, chunk_bytes=4096, threads=1, progress=False)
    assert marker_path(d).is_file()
    expect_safe(ledger, SUITE, "make --force over its own diff", _make(kit, d, force=True), d,
                lambda p: load_manifest(p) is not None and marker_path(p).is_file())
    (d / "README.md").write_text("my own card\n")
    expect_refusal(ledger, SUITE, "make --force over its diff with an edited card", _make(kit, d, force=True),
                   must_name=("README.md",))
    assert (d / "README.md").read_text() == "my own card\n"


# --------------------------------------------------------------------------- 3. the lock file


def test_a_hard_link_at_the_lock_name_is_refused_and_left_untouched(kit: Kit, ledger, tmp_path: Path) -> None:
    victim = tmp_path / "precious.txt"
    victim.write_text("the user's data\n")
    out = tmp_path / "out"
    os.link(victim, lock_path(out))
    expect_refusal(ledger, SUITE, "a hard link planted at the lock name", _apply(kit, out),
                   must_name=(lock_path(out).name, "hard link"))
    assert victim.read_text() == "the user's data\n" and not out.exists()


def test_a_fifo_at_the_lock_name_is_refused_without_blocking(kit: Kit, ledger, tmp_path: Path) -> None:
    out = tmp_path / "out"
    os.mkfifo(lock_path(out))
    expect_refusal(ledger, SUITE, "a FIFO at the lock name", _apply(kit, out), must_name=("not a regular file",))


def test_a_stale_lock_file_is_replaced_not_rewritten(kit: Kit, ledger, tmp_path: Path) -> None:
    """A lock file left by a killed run is not truncated and rewritten: its name is dropped and
    a file of this run's own is made (a file opened elsewhere keeps its bytes)."""
    out = tmp_path / "out"
    lock_path(out).write_text("12345\nan earlier run, killed\n")
    stale_ino = lock_path(out).stat().st_ino
    with open(lock_path(out)) as held_elsewhere:
        with OutputLock(out):
            assert lock_path(out).stat().st_ino != stale_ino
            assert lock_path(out).read_text().startswith(f"{os.getpid()}\n")
        assert held_elsewhere.read() == "12345\nan earlier run, killed\n"
    expect_safe(ledger, SUITE, "apply after a stale lock file", _apply(kit, out), out, kit.matches_target)


# --------------------------------------------------------------------------- 14. a kill during the marker write


def test_a_kill_while_the_marker_is_written_is_cleaned_by_the_next_run(kit: Kit, ledger, tmp_path: Path,
                                                                        monkeypatch) -> None:
    """Before: the marker was written after the publish, so a kill inside its write left a
    published folder without a marker (which no rerun could replace) and the marker's
    ``..out.orca-diff-output.incomplete`` forever. Now it is written before the renames."""
    import orca_diff.outdir as outdir_mod

    out = tmp_path / "out"
    real_write = outdir_mod.StagedFile.write

    def killed(self, data):
        if ".orca-diff-output" in self.final.name:
            real_write(self, bytes(memoryview(data).cast("B"))[:20])
            raise KeyboardInterrupt
        return real_write(self, data)

    monkeypatch.setattr(outdir_mod.StagedFile, "write", killed)
    with pytest.raises(BaseException):
        apply_diff(kit.base, kit.diff, out, threads=1, progress=False)
    assert any(".orca-diff-output" in p.name and p.name.endswith(".incomplete") for p in tmp_path.iterdir())
    monkeypatch.setattr(outdir_mod.StagedFile, "write", real_write)
    expect_safe(ledger, SUITE, "the same command after a kill in the marker write", _apply(kit, out), out,
                kit.matches_target)
    assert marker_path(out).is_file()
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".incomplete")]


def test_a_marker_temporary_of_an_older_run_is_removed(kit: Kit, ledger, tmp_path: Path) -> None:
    out = tmp_path / "out"
    apply_diff(kit.base, kit.diff, out, threads=1, progress=False)
    leftover = marker_path(out).parent / f".{marker_path(out).name}.incomplete"
    leftover.write_text('{"written_by": "orca-di')
    marker_path(out).unlink()  # what a kill inside an older orca-diff's marker write left
    expect_refusal(ledger, SUITE, "--force over an output whose marker an older run never finished",
                   _apply(kit, out, force=True), must_name=("--force",))
    assert not leftover.exists()


def test_a_kill_between_publish_and_marker_is_finished_by_the_next_run(kit: Kit, ledger, tmp_path: Path,
                                                                        monkeypatch) -> None:
    out = tmp_path / "out"
    import orca_diff.outdir as outdir_mod

    real_replace = os.replace

    def killed(src, dst, *a, **kw):
        if Path(dst) == marker_path(out):
            raise KeyboardInterrupt  # the kill, after the renames, before the marker takes its name
        return real_replace(src, dst, *a, **kw)

    monkeypatch.setattr(outdir_mod.os, "replace", killed)
    with pytest.raises(BaseException):
        apply_diff(kit.base, kit.diff, out, threads=1, progress=False)
    monkeypatch.setattr(outdir_mod.os, "replace", real_replace)
    assert out.is_dir() and pending_marker_path(out).is_file() and not marker_path(out).exists()
    with output_session(out, force=True) as s:
        assert any("interrupted just after publishing" in n for n in s.notes)
    assert marker_path(out).is_file() and not pending_marker_path(out).exists()
    expect_safe(ledger, SUITE, "--force after a kill before the marker took its name", _apply(kit, out, force=True),
                out, kit.matches_target)


def test_a_pending_marker_that_does_not_prove_the_folder_is_dropped(kit: Kit, ledger, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("mine\n")
    write_marker(out, ["mine.txt"])
    marker_path(out).rename(pending_marker_path(out))
    (out / "mine.txt").write_text("changed\n")
    expect_refusal(ledger, SUITE, "a pending marker that proves nothing", _apply(kit, out, force=True),
                   must_name=("mine.txt",))
    assert not pending_marker_path(out).exists() and (out / "mine.txt").read_text() == "changed\n"


def test_publish_writes_the_marker_from_the_staged_files(tmp_path: Path) -> None:
    staging, out = tmp_path / "staging", tmp_path / "out"
    staging.mkdir()
    (staging / "a.txt").write_text("a")
    publish(staging, out, force=False, files=["a.txt"])
    doc = json.loads(marker_path(out).read_text())
    assert doc["marker_version"] == 2 and doc["files"]["a.txt"]["size"] == 1
    assert doc["files"]["a.txt"]["ino"] == (out / "a.txt").stat().st_ino


def test_a_leftover_of_a_refused_force_publish_does_not_linger(kit: Kit, ledger, tmp_path: Path) -> None:
    out = tmp_path / "out"
    apply_diff(kit.base, kit.diff, out, threads=1, progress=False)
    with pytest.raises(OutputError):
        with output_session(out, force=True) as s:
            s.staging.mkdir()
            (s.staging / "x").write_text("x")
            (out / "new-user-file").write_text("appeared while this run wrote")
            s.publish(["x"])
    assert not pending_marker_path(out).exists()


# --------------------------------------------------------------------------- 6. many small tensors



def test_a_manifest_of_more_tensors_than_any_model_is_refused_in_one_line(kit: Kit, ledger, monkeypatch) -> None:
    """The caps (2^18 tensors, 2^16 files) are lowered here so that the tiny kit is over them."""
    data = (kit.diff / "orca-diff.json").read_bytes()
    n = len(kit.manifest_doc()["tensors"])
    monkeypatch.setattr(format_mod, "MAX_TENSORS", n - 1)
    exc = expect_refusal(ledger, SUITE, "more tensors than the cap", lambda: parse_manifest(data, "m.json"),
                         must_name=("tensors", str(n), "more than"))
    assert isinstance(exc, FormatError) and "\n" not in str(exc)
    monkeypatch.setattr(format_mod, "MAX_TENSORS", n // 8 - 1)  # the pre-parse bound: before json.loads
    monkeypatch.setattr(format_mod.json, "loads", lambda *a, **k: pytest.fail("parsed a manifest over the bound"))
    expect_refusal(ledger, SUITE, "more tensors than the pre-parse bound", lambda: parse_manifest(data, "m.json"),
                   must_name=("more than",))


def test_a_manifest_of_more_files_than_the_cap_is_refused(kit: Kit, ledger, monkeypatch) -> None:
    monkeypatch.setattr(format_mod, "MAX_FILES", 1)
    expect_refusal(ledger, SUITE, "more files than the cap", lambda: load_manifest(kit.diff), must_name=("files", "more than the 1"))


def test_the_streamed_checksum_is_the_canonical_json_one(kit: Kit) -> None:
    import hashlib

    doc = kit.manifest_doc()
    claimed = doc.pop("manifest_sha256")
    text = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    assert canonical_sha256(doc) == hashlib.sha256(text.encode()).hexdigest() == claimed
    wide = {"x": {f"k{i}\u00e9": [i, {"n": None, "f": 1.5, "s": "\u2603\""}] * (i % 3) for i in range(300)}}
    text = json.dumps(wide, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    assert canonical_sha256(wide) == hashlib.sha256(text.encode()).hexdigest()


# --------------------------------------------------------------------------- 11. paths Linux cannot open


def test_a_path_longer_than_path_max_is_refused_by_verify_and_apply(kit: Kit, ledger, tmp_path: Path) -> None:
    d = kit.copy_diff(tmp_path / "diff")
    long = "/".join(["c" * 200] * 31 + ["config.json"])  # 6.2 KB: each component fine, the whole not
    rewrite_manifest(d, lambda doc: [f.update(path=long) for f in doc["target"]["files"] if f["path"] == "config.json"])
    r = run_cli("verify", "--diff", str(d))
    assert r.returncode == FormatError.exit_code and "bytes in all" in r.stderr and "OK" not in r.stdout, r
    exc = expect_refusal(ledger, SUITE, "a 6 KB path through apply",
                         lambda: apply_diff(kit.base, d, tmp_path / "out", threads=1, progress=False),
                         must_name=("bytes in all",))
    assert "--out" not in str(exc)


def test_make_refuses_a_target_path_over_the_bound_naming_it(kit: Kit, ledger, tmp_path: Path) -> None:
    target = tmp_path / "target"
    shutil.copytree(kit.target, target)
    deep = target / ("d" * 200) / ("e" * 200) / ("f" * 150 + ".txt")
    deep.parent.mkdir(parents=True)
    deep.write_text("x")
    exc = expect_refusal(ledger, SUITE, "a 550-byte path in make's target",
                         lambda: make_diff(kit.base, target, tmp_path / "diff", threads=1, progress=False),
                         must_name=("f" * 150 + ".txt", "bytes in all"))
    assert isinstance(exc, FormatError)


# --------------------------------------------------------------------------- 13. what the platforms really do


@pytest.mark.parametrize("name", ["straße.txt", ".gİt/config", "console.txt", "nullable.json", "com10.txt",
                                  "a\u200cb.txt", "CONFIG", "lpt.txt"])
def test_the_path_rule_accepts_names_every_platform_stores(ledger, name: str) -> None:
    assert path_problem(name) is None
    ledger.record(SUITE, f"path rule accepts {name!r}", "recovered")


@pytest.mark.parametrize("name", ["CON", "nul.txt", "Aux.tar.gz", "sub/COM1", "lpt9.json", "COM\u00b9", "conin$",
                                  "trailing space ", "trailing.dot.", "dir./x", "dir /x", ".GIT/config",
                                  "git~1/config", ".gıt/config", ".g\u200cit/config", "a\ufeffb", "a\u200eb",
                                  "/".join(["abcdefgh"] * 60)])
def test_the_path_rule_refuses_names_some_platform_cannot_store(ledger, name: str) -> None:
    assert path_problem(name) is not None
    ledger.record(SUITE, f"path rule refuses {name[:40]!r}", "detected")


def test_collision_keys_use_simple_case_folding() -> None:
    assert path_key("straße.txt") != path_key("strasse.txt")  # two files on NTFS and APFS
    assert path_key("README.md") == path_key("readme.MD")
    assert path_key("e\u0301.txt") == path_key("\u00e9.txt")  # macOS normalises
    assert path_key("ǅ") == path_key("ǆ") == path_key("Ǆ")
    assert path_key(".gİt") != path_key(".git")


def test_make_carries_strasse_and_strasse_and_refuses_nul_txt(kit: Kit, ledger, tmp_path: Path) -> None:
    target = tmp_path / "target"
    shutil.copytree(kit.target, target)
    (target / "straße.txt").write_text("1")
    (target / "strasse.txt").write_text("2")
    d = tmp_path / "diff"
    make_diff(kit.base, target, d, chunk_bytes=4096, threads=1, progress=False)
    out = tmp_path / "out"
    apply_diff(kit.base, d, out, threads=1, progress=False)
    assert (out / "straße.txt").read_text() == "1" and (out / "strasse.txt").read_text() == "2"
    (target / "nul.txt").write_text("3")
    expect_refusal(ledger, SUITE, "nul.txt in make's target",
                   lambda: make_diff(kit.base, target, tmp_path / "diff2", threads=1, progress=False),
                   must_name=("nul.txt", "Windows device"))


# --------------------------------------------------------------------------- 12. inputs that vanish, --diff as a link


def test_a_target_file_vanishing_while_make_reads_it_is_blamed_on_the_target(kit: Kit, ledger, tmp_path: Path,
                                                                              monkeypatch) -> None:
    import orca_diff.make as make_mod

    target = tmp_path / "target"
    shutil.copytree(kit.target, target)
    real = make_mod._read_file

    def vanish(path, offset, size):
        Path(path).unlink()
        return real(path, offset, size)

    monkeypatch.setattr(make_mod, "_read_file", vanish)
    exc = expect_refusal(ledger, SUITE, "a target file removed while make reads it",
                         lambda: make_diff(kit.base, target, tmp_path / "diff", threads=1, progress=False),
                         must_name=(str(target),))
    assert not isinstance(exc, OutputError) and "--out" not in str(exc) and "while make was reading" in str(exc)
    assert not (tmp_path / "diff").exists()


def test_diff_given_as_a_link_to_its_manifest_under_another_name(kit: Kit, ledger, tmp_path: Path) -> None:
    link = tmp_path / "the-diff.json"
    link.symlink_to(kit.diff / "orca-diff.json")
    r = run_cli("verify", "--diff", str(link))
    assert r.returncode == 0, r.stderr
    expect_safe(ledger, SUITE, "--diff as a link to the manifest",
                lambda: apply_diff(kit.base, link, tmp_path / "out", threads=1, progress=False), tmp_path / "out",
                kit.matches_target)


# --------------------------------------------------------------------------- 14. a deflated .bin


def test_a_deflate_compressed_bin_that_torch_loads_travels_verbatim(kit: Kit, ledger, tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    import io
    import zipfile

    target = tmp_path / "target"
    target.mkdir()
    for name in ("config.json", "tokenizer_config.json"):
        if (kit.target / name).exists():
            shutil.copy(kit.target / name, target / name)
    buf = io.BytesIO()
    torch.save({"model.norm.weight": torch.arange(32, dtype=torch.float32)}, buf)
    src = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    with zipfile.ZipFile(target / "pytorch_model.bin", "w", compression=zipfile.ZIP_DEFLATED) as z:
        for info in src.infolist():
            z.writestr(info.filename, src.read(info.filename))
    loaded = torch.load(target / "pytorch_model.bin", weights_only=True)
    assert torch.equal(loaded["model.norm.weight"], torch.arange(32, dtype=torch.float32))  # torch loads it
    notes: list[str] = []
    d = tmp_path / "diff"
    make_diff(kit.base, target, d, chunk_bytes=4096, threads=1, progress=False, notes=notes)
    assert any("compressed" in n and "verbatim" in n for n in notes), notes
    out = tmp_path / "out"
    expect_safe(ledger, SUITE, "a deflated .bin through make and apply",
                lambda: apply_diff(kit.base, d, out, threads=1, progress=False), out,
                lambda o: all((o / p.name).read_bytes() == p.read_bytes() for p in target.iterdir()))


# --------------------------------------------------------------------------- 10. a base written while make reads it


@pytest.mark.parametrize("how", ["in place", "replaced by rename", "truncated"])
def test_a_base_changing_while_make_reads_it_is_refused(kit: Kit, ledger, tmp_path: Path, monkeypatch, how: str) -> None:
    """Before: a diff that verifies, whose base digests describe a mixture of the two versions
    of the shard, so that apply refuses both as the wrong base."""
    import orca_diff.make as make_mod

    base = kit.copy_base(tmp_path / "base")
    shard = sorted(base.glob("*.safetensors"))[-1]
    real = make_mod.read_range
    calls = {"n": 0}

    def change_after_first_base_read(reader, name, start, length):
        data = real(reader, name, start, length)
        if getattr(reader, "path", None) == base:
            calls["n"] += 1
            if calls["n"] == 1:
                raw = bytearray(shard.read_bytes())
                raw[-1] ^= 0xFF
                if how == "in place":
                    with open(shard, "r+b") as f:
                        f.seek(len(raw) - 1)
                        f.write(raw[-1:])
                elif how == "replaced by rename":
                    (shard.parent / "new").write_bytes(bytes(raw))
                    os.replace(shard.parent / "new", shard)
                else:
                    os.truncate(shard, len(raw) - 2)
        return data

    monkeypatch.setattr(make_mod, "read_range", change_after_first_base_read)
    out = tmp_path / "diff"
    exc = expect_refusal(ledger, SUITE, f"a base shard {how} while make reads it",
                         lambda: make_diff(base, kit.target, out, chunk_bytes=4096, threads=1, progress=False),
                         must_name=(shard.name, "changed while make read it" if how != "truncated" else "ended early"))
    assert exc.exit_code == (11 if how != "truncated" else 4) and not out.exists()
