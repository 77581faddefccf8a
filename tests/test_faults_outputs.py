"""Fault injection, part 6 (issue 12): what an output may be, what ``--force`` may replace, and
the legacy paths' output discipline.

* ``--force`` replaces only a previous orca-diff output (the marker beside it lists its files),
  never a folder of unrelated content (``--out models --force``);
* a base made of symbolic links into ``--out`` (the HF cache's snapshots/ layout) is an input;
* a kill between the two renames of a ``--force`` publish is recovered on the next run, and said;
* ``--out`` '.', '..', a mount point, a 256-byte name are refused before the base is read; a
  240-255 byte name works (the hidden sibling names are shortened with a hash);
* the legacy paths (``apply --format``, ``convert``) refuse a base lacking a tensor of the delta,
  and turn every OSError (read-only, /proc, full disk, links at the staging name) into one line.
"""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest

import orca_diff.legacy.common as legacy_mod
from faultkit import Kit, expect_refusal, expect_safe, kit, ledger, previous_output, run_cli, tree_snapshot  # noqa: F401
from orca_diff.apply import apply_diff
from orca_diff.containers import open_model
from orca_diff.errors import BaseMismatchError, OrcaDiffError, OutputError
from orca_diff.legacy import SafetensorsWriter, apply_legacy, convert_legacy
from orca_diff.outdir import lock_path, marker_path, old_dir, staging_dir

SUITE = "outputs"


def _apply(kit: Kit, out: Path, base: Path | None = None, **kw):
    return lambda: apply_diff(base or kit.base, kit.diff, out, threads=1, progress=False, **kw)


def _wrong_base(kit: Kit, dest: Path) -> Path:
    base = kit.copy_base(dest)
    shard = sorted(base.glob("*.safetensors"))[-1]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    return base


# --------------------------------------------------------------------------- --force


def test_force_refuses_a_folder_of_unrelated_content_naming_it(kit: Kit, ledger, tmp_path: Path) -> None:
    models = tmp_path / "models"
    (models / "llama-7b").mkdir(parents=True)
    (models / "llama-7b" / "model.safetensors").write_text("another model the user keeps here")
    (models / "notes.txt").write_text("mine")
    before = tree_snapshot(models)
    exc = expect_refusal(ledger, SUITE, "--out models --force over unrelated folders", _apply(kit, models, force=True),
                         must_name=("llama-7b", "--force"))
    assert isinstance(exc, OutputError)
    assert tree_snapshot(models) == before and not staging_dir(models).exists()


def test_force_replaces_a_previous_output_and_refuses_one_with_a_foreign_entry(kit: Kit, ledger, tmp_path: Path) -> None:
    out = tmp_path / "out"
    apply_diff(kit.base, kit.diff, out, threads=1, progress=False)
    assert marker_path(out).is_file()
    (out / "my-eval-results.json").write_text("the user's own file, added later")
    before = tree_snapshot(out)
    expect_refusal(ledger, SUITE, "previous output with a file the user added", _apply(kit, out, force=True),
                   must_name=("my-eval-results.json",))
    assert tree_snapshot(out) == before
    (out / "my-eval-results.json").unlink()
    expect_safe(ledger, SUITE, "--force over its own previous output", _apply(kit, out, force=True), out,
                kit.matches_target)
    kit.assert_identical(out)


def test_a_base_made_of_symlinks_into_the_output_is_an_input(kit: Kit, ledger, tmp_path: Path) -> None:
    """The HF cache layout: snapshots/<rev>/ holds links to ../../blobs/<hash>. Here the real
    files live in what the user gives as --out."""
    blobs = previous_output(tmp_path / "blobs", {})  # a folder --force would otherwise accept
    snapshot = tmp_path / "snapshots" / "rev"
    snapshot.mkdir(parents=True)
    for p in sorted(kit.base.iterdir()):
        (blobs / f"blob-{p.name}").write_bytes(p.read_bytes())
        (snapshot / p.name).symlink_to(blobs / f"blob-{p.name}")
    from orca_diff.outdir import write_marker

    write_marker(blobs, [p.name for p in blobs.iterdir()])
    before = tree_snapshot(blobs)
    exc = expect_refusal(ledger, SUITE, "base of symlinks into --out (HF cache layout)",
                         lambda: apply_diff(snapshot, kit.diff, blobs, force=True, threads=1, progress=False),
                         must_name=("input", str(snapshot)))
    assert isinstance(exc, OutputError)
    assert tree_snapshot(blobs) == before


@pytest.mark.parametrize("rerun_force", [True, False])
def test_a_kill_between_the_two_renames_of_force_is_recovered_and_said(kit: Kit, ledger, tmp_path: Path,
                                                                       rerun_force: bool) -> None:
    out = tmp_path / "out"
    previous = {"model.safetensors": "the previous model"}
    previous_output(out, previous)
    # what a kill right after `out -> .out.orca-diff-old` leaves: no out, the old one hidden
    out.rename(old_dir(out))
    report = apply_diff(kit.base, kit.diff, out, force=rerun_force, threads=1, progress=False) if rerun_force else None
    if rerun_force:
        assert any("restored" in n for n in report.notes), report.notes
        kit.assert_identical(out)
        ledger.record(SUITE, "kill between the --force renames, rerun with --force", "recovered")
    else:
        expect_refusal(ledger, SUITE, "kill between the --force renames, rerun without --force",
                       _apply(kit, out), must_name=("--force",))
        assert (out / "model.safetensors").read_text() == "the previous model"  # visible again
    assert not old_dir(out).exists()


def test_a_kill_after_the_second_rename_leaves_no_hidden_copy(kit: Kit, ledger, tmp_path: Path) -> None:
    out = tmp_path / "out"
    apply_diff(kit.base, kit.diff, out, threads=1, progress=False)
    previous_output(old_dir(out), {"model.safetensors": "the model the killed run replaced"})
    r = run_cli("apply", "--base", str(kit.base), "--diff", str(kit.diff), "--out", str(out), "--force", "-q")
    assert r.returncode == 0, r.stderr
    assert "removed" in r.stderr and old_dir(out).name in r.stderr
    assert not old_dir(out).exists()
    kit.assert_identical(out)
    ledger.record(SUITE, "kill after the second --force rename", "recovered")


# --------------------------------------------------------------------------- impossible outputs


@pytest.mark.parametrize("given", [".", ".."])
def test_dot_and_dotdot_are_refused_before_the_base_is_read(kit: Kit, ledger, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch, given: str) -> None:
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    before = tree_snapshot(tmp_path)
    exc = expect_refusal(ledger, SUITE, f"--out {given}", _apply(kit, Path(given), base=_wrong_base(kit, tmp_path / "wb")),
                         must_name=("--out", given))
    assert isinstance(exc, OutputError)  # not BaseMismatchError: refused before the base check
    assert {k: v for k, v in tree_snapshot(tmp_path).items() if not k.startswith("wb")} == before


def test_a_mount_point_as_output_is_refused_before_the_base_is_read(kit: Kit, ledger, tmp_path: Path) -> None:
    point = tmp_path / "mnt"
    point.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(point)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        exc = expect_refusal(ledger, SUITE, "--out an empty mount point",
                             _apply(kit, point, base=_wrong_base(kit, tmp_path / "wb")), must_name=("mount point",))
        assert isinstance(exc, OutputError)
        assert list(point.iterdir()) == [] and not staging_dir(point).exists()
        apply_diff(kit.base, kit.diff, point / "model", threads=1, progress=False)  # what the message suggests
        kit.assert_identical(point / "model")
    finally:
        subprocess.run(["umount", "-l", str(point)], check=False)


@pytest.mark.parametrize("length", [240, 250, 255])
def test_a_long_output_name_works_with_shortened_hidden_names(kit: Kit, ledger, tmp_path: Path, length: int) -> None:
    out = tmp_path / ("m" * length)
    for name in (staging_dir(out).name, lock_path(out).name, old_dir(out).name, marker_path(out).name):
        assert len(name.encode()) <= 255
    expect_safe(ledger, SUITE, f"--out name of {length} bytes", _apply(kit, out), out, kit.matches_target)
    kit.assert_identical(out)


def test_an_output_name_over_name_max_is_refused_before_the_base_is_read(kit: Kit, ledger, tmp_path: Path) -> None:
    out = tmp_path / ("m" * 256)
    exc = expect_refusal(ledger, SUITE, "--out name of 256 bytes", _apply(kit, out, base=_wrong_base(kit, tmp_path / "wb")),
                         must_name=("256 bytes",))
    assert isinstance(exc, OutputError)
    r = run_cli("apply", "--base", str(kit.base), "--diff", str(kit.diff), "--out", str(tmp_path / ("é" * 128)), "-q")
    assert r.returncode == OutputError.exit_code and "Traceback" not in r.stderr, r.stderr


# --------------------------------------------------------------------------- legacy paths


@pytest.fixture
def fastchat_pair(kit: Kit, tmp_path: Path) -> tuple[Path, Path]:
    """A base and a 'delta' FastChat can apply (any fp16 tensors of the same names and shapes)."""
    return kit.base, kit.target


def _base_without(kit: Kit, dest: Path, missing: str) -> Path:
    src = open_model(kit.base)
    dest.mkdir()
    infos = [i for n, i in src.tensors.items() if n != missing]
    w = SafetensorsWriter(dest, infos)
    for i in infos:
        w.begin(i.name)
        w.write(src.read(i.name))
    w.close()
    src.close()
    for name, p in open_model(kit.base).extra_files.items():
        (dest / name).write_bytes(p.read_bytes())
    return dest


def test_fastchat_base_lacking_a_tensor_of_the_delta_is_refused_naming_it(kit: Kit, ledger, tmp_path: Path) -> None:
    name = "model.layers.1.mlp.down_proj.weight"
    base = _base_without(kit, tmp_path / "base", name)
    out = tmp_path / "out"
    exc = expect_refusal(ledger, SUITE, "fastchat base lacking a delta tensor",
                         lambda: apply_legacy("fastchat", str(base), str(kit.target), out, progress=False),
                         must_name=(name,))
    assert isinstance(exc, BaseMismatchError)
    assert not out.exists() and not staging_dir(out).exists()


@pytest.mark.parametrize("fmt_call", ["apply", "convert"])
def test_legacy_outputs_under_proc_and_in_a_file_are_one_line(kit: Kit, ledger, tmp_path: Path, fmt_call: str) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for out in (Path("/proc") / f"orca-diff-test-{os.getpid()}", blocker / "out"):
        args = (["apply", "--format", "fastchat", "--diff"] if fmt_call == "apply" else ["convert", "--format", "fastchat"])
        tail = [str(kit.target), "--base", str(kit.base), "--out", str(out), "-q"]
        r = run_cli(*(args + tail if fmt_call == "apply" else ["convert", str(kit.target), "--format", "fastchat"] + tail[1:]))
        assert r.returncode == OutputError.exit_code and "Traceback" not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
        ledger.record(SUITE, f"legacy {fmt_call} output {out}", "detected")


@pytest.mark.parametrize("kind", ["symlink", "dangling symlink", "file"])
def test_legacy_apply_replaces_whatever_is_at_its_staging_name_without_following_it(
        kit: Kit, ledger, tmp_path: Path, kind: str) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious").write_text("keep")
    out = tmp_path / "out"
    st = staging_dir(out)
    if kind == "symlink":
        st.symlink_to(victim, target_is_directory=True)
    elif kind == "dangling symlink":
        st.symlink_to(tmp_path / "nowhere")
    else:
        st.write_text("a file")
    before = tree_snapshot(victim)
    expect_safe(ledger, SUITE, f"legacy staging name is a {kind}",
                lambda: apply_legacy("fastchat", str(kit.base), str(kit.target), out, progress=False), out,
                lambda o: o.is_dir() and (o / "model.safetensors").is_file())
    assert tree_snapshot(victim) == before


def test_legacy_apply_on_a_full_disk_is_one_line_and_leaves_nothing(kit: Kit, ledger, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.write

    def full(fd: int, data) -> int:
        if len(data) > 100:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data)

    monkeypatch.setattr(legacy_mod.os, "write", full)
    out = tmp_path / "out"
    before = tree_snapshot(tmp_path)
    exc = expect_refusal(ledger, SUITE, "legacy apply, disk full",
                         lambda: apply_legacy("fastchat", str(kit.base), str(kit.target), out, progress=False),
                         must_name=("disk full",))
    assert isinstance(exc, OutputError) and "\n" not in str(exc)
    assert tree_snapshot(tmp_path) == before


def test_legacy_apply_unreadable_input_is_an_input_error(kit: Kit, ledger, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    delta = tmp_path / "delta"
    delta.mkdir()
    for p in kit.target.iterdir():
        (delta / p.name).write_bytes(p.read_bytes())
    real = legacy_mod.copy_model_files

    def vanishing(src, dst, skip=()):
        (delta / "config.json").unlink()  # removed while the rebuild ran
        return real(src, dst, skip)

    monkeypatch.setattr(legacy_mod, "copy_model_files", vanishing)
    import orca_diff.legacy.fastchat as fastchat_mod

    monkeypatch.setattr(fastchat_mod, "copy_model_files", vanishing)
    out = tmp_path / "out"
    exc = expect_refusal(ledger, SUITE, "legacy apply, an input file removed mid-run",
                         lambda: apply_legacy("fastchat", str(kit.base), str(delta), out, progress=False),
                         must_name=("config.json",))
    assert not isinstance(exc, OutputError), exc
    assert not out.exists() and not staging_dir(out).exists()


def test_convert_takes_the_output_lock_and_make_inside_it_does_not_deadlock(kit: Kit, ledger, tmp_path: Path) -> None:
    out = tmp_path / "converted"
    report = convert_legacy("fastchat", str(kit.target), str(kit.base), out, progress=False)
    assert (out / "orca-diff.json").is_file() and report.diff_bytes > 0
    assert not lock_path(out).exists()
    ledger.record(SUITE, "convert under the output lock", "recovered")


def test_every_error_of_the_output_checks_is_an_orca_diff_error(kit: Kit, tmp_path: Path) -> None:
    """Smoke: none of the refusals above escapes as another exception type through the CLI."""
    r = run_cli("apply", "--base", str(kit.base), "--diff", str(kit.diff), "--out", ".", "-q", cwd=tmp_path)
    assert r.returncode == OutputError.exit_code and "Traceback" not in r.stderr
    assert issubclass(OutputError, OrcaDiffError)
