"""Fault injection, part 4: a full disk or an unwritable output.

* ENOSPC injected into apply's own writes and fsyncs at several byte counts (in-process, exact);
* RLIMIT_FSIZE on a real ``orca-diff apply`` subprocess (SIGXFSZ ignored, so write() fails with
  EFBIG as on a file system with a small file-size limit);
* a real tmpfs too small for the model, or just big enough for the byte count but not for the
  page-rounded files (mount needs root; skipped, with the reason, where it is not allowed);
* unwritable outputs. The tests run as root, for whom chmod does not stop a write, so other
  means are used: a path under /proc, a regular file where the parent folder should be, and a
  read-only tmpfs mount.

Every case must end in one clear OrcaDiffError line, publish nothing (the output folder does not
exist, or is untouched if it existed), leave every pre-existing file as it was, and the same
command must complete once space is back, giving the fine-tune byte for byte.
"""

from __future__ import annotations

import errno
import os
import resource
import signal
import subprocess
from pathlib import Path

import pytest

import orca_diff.apply as apply_mod
import orca_diff.outdir as outdir_mod
from faultkit import Kit, expect_refusal, kit, ledger, previous_output, run_cli, tree_snapshot  # noqa: F401
from orca_diff.apply import apply_diff
from orca_diff.errors import OutputError
from orca_diff.outdir import staging_dir

SUITE = "disk"


def _apply(kit: Kit, out: Path, **kw):
    return lambda: apply_diff(kit.base, kit.diff, out, threads=1, progress=False, **kw)


class _FullDiskOs:
    """Stands in for the ``os`` module inside orca_diff.apply: ``write`` accepts ``budget`` bytes
    in all, then fails with ENOSPC (a short write first, as a real file system does); ``fsync``
    fails on call number ``fsync_fail`` when set."""

    def __init__(self, budget: int | None, fsync_fail: int | None = None):
        self.budget, self.fsync_fail, self.fsyncs = budget, fsync_fail, 0

    def __getattr__(self, name: str):
        return getattr(os, name)

    def write(self, fd: int, data) -> int:
        if self.budget is None:
            return os.write(fd, data)
        if self.budget <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        n = os.write(fd, memoryview(data)[: self.budget])
        self.budget -= n
        return n

    def fsync(self, fd: int) -> None:
        self.fsyncs += 1
        if self.fsync_fail is not None and self.fsyncs == self.fsync_fail:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        os.fsync(fd)


def _full_disk(monkeypatch: pytest.MonkeyPatch, fake: "_FullDiskOs") -> None:
    """Apply's own writes and those of the output discipline it writes through (outdir)."""
    monkeypatch.setattr(apply_mod, "os", fake)
    monkeypatch.setattr(outdir_mod, "os", fake)


@pytest.mark.parametrize("budget,fsync_fail", [(0, None), (1, None), (4095, None), (30_000, None),
                                               (60_000, None), (75_000, None), (None, 1), (None, 3)])
def test_disk_full_while_writing_is_a_clear_error_and_the_rerun_completes(
        kit: Kit, ledger, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, budget, fsync_fail) -> None:
    out = tmp_path / "out"
    (tmp_path / "neighbour.txt").write_text("a file the user had here")
    before = tree_snapshot(tmp_path)
    _full_disk(monkeypatch, _FullDiskOs(budget, fsync_fail))
    exc = expect_refusal(ledger, SUITE, f"ENOSPC after {budget} bytes / fsync #{fsync_fail}", _apply(kit, out),
                         must_name=("disk full", "rerun"))
    assert isinstance(exc, OutputError) and "\n" not in str(exc)
    assert not out.exists()
    after = tree_snapshot(tmp_path)
    assert {k: v for k, v in after.items() if not k.startswith(staging_dir(out).name)} == before
    monkeypatch.undo()
    apply_diff(kit.base, kit.diff, out, threads=1, progress=False)
    kit.assert_identical(out)


def test_disk_full_with_force_keeps_the_existing_output_as_it_was(
        kit: Kit, ledger, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = previous_output(tmp_path / "out", {"model.safetensors": b"the user's previous model"})
    before = tree_snapshot(out)
    _full_disk(monkeypatch, _FullDiskOs(20_000))
    expect_refusal(ledger, SUITE, "ENOSPC with --force over an existing output", _apply(kit, out, force=True),
                   must_name=("disk full",))
    assert tree_snapshot(out) == before


def _limit_file_size(limit: int):
    def preexec() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() then fails with EFBIG instead of killing
    return preexec


@pytest.mark.parametrize("limit", [1, 5000, 20_000])
def test_a_file_size_limit_in_a_real_subprocess_is_a_clear_error(kit: Kit, ledger, tmp_path: Path, limit: int) -> None:
    out = tmp_path / "out"
    args = ("apply", "--base", str(kit.base), "--diff", str(kit.diff), "--out", str(out), "-q")
    r = run_cli(*args, preexec_fn=_limit_file_size(limit))
    case = f"RLIMIT_FSIZE={limit}"
    assert "Traceback" not in r.stderr, r.stderr
    assert r.returncode == OutputError.exit_code, (r.returncode, r.stderr)
    assert "too large" in r.stderr and "\n" not in r.stderr.strip()
    assert not out.exists()
    ledger.record(SUITE, case, "detected")
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr
    kit.assert_identical(out)


# --------------------------------------------------------------------------- real small file systems


@pytest.fixture
def tmpfs(tmp_path: Path):
    """Mount a tmpfs on demand: ``mount(size_bytes, readonly=False) -> Path``; unmounted after."""
    mounted: list[Path] = []

    def mount(size: int, readonly: bool = False, name: str = "mnt") -> Path:
        point = tmp_path / name
        point.mkdir()
        opts = f"size={size}" + (",ro" if readonly else "")
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(point)], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {r.stderr.strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in reversed(mounted):
        subprocess.run(["umount", "-l", str(point)], check=False)


def _pages(kit: Kit) -> int:
    return sum(-(-len(b) // 4096) * 4096 for b in kit.target_files.values())


def test_a_tmpfs_too_small_for_the_model_is_refused_before_writing(kit: Kit, ledger, tmp_path: Path, tmpfs) -> None:
    mnt = tmpfs(32 * 1024)
    (mnt / "keep.txt").write_text("pre-existing")
    before = tree_snapshot(mnt)
    out = mnt / "out"
    exc = expect_refusal(ledger, SUITE, "tmpfs too small", _apply(kit, out), must_name=("free",))
    assert isinstance(exc, OutputError)
    assert "KiB" in str(exc) or "MiB" in str(exc), f"sizes should be human-readable: {exc}"
    assert tree_snapshot(mnt) == before  # nothing created, not even the staging folder


def test_a_tmpfs_that_fills_up_mid_write_is_a_clear_error_and_resumes_when_grown(
        kit: Kit, ledger, tmp_path: Path, tmpfs) -> None:
    """Its byte count passes the free-space check but page rounding makes it run out."""
    total = sum(len(b) for b in kit.target_files.values())
    size = -(-total // 4096) * 4096 + 4096
    assert _pages(kit) > size  # the small files each take a whole page
    mnt = tmpfs(size)
    out = mnt / "out"
    exc = expect_refusal(ledger, SUITE, "tmpfs full mid-write", _apply(kit, out), must_name=("disk full", "rerun"))
    assert isinstance(exc, OutputError)
    assert not out.exists()
    subprocess.run(["mount", "-o", f"remount,size={4 * _pages(kit)}", str(mnt)], check=True)
    r = apply_diff(kit.base, kit.diff, out, threads=1, progress=False)
    assert r.resumed_files > 0
    kit.assert_identical(out)


def test_a_read_only_file_system_is_a_clear_error(kit: Kit, ledger, tmp_path: Path, tmpfs) -> None:
    mnt = tmpfs(1 << 20, readonly=True)
    exc = expect_refusal(ledger, SUITE, "read-only mount", _apply(kit, mnt / "out"), must_name=("Read-only", "--out"))
    assert isinstance(exc, OutputError)
    assert list(mnt.iterdir()) == []


def test_an_output_under_proc_is_a_clear_error(kit: Kit, ledger, tmp_path: Path) -> None:
    """/proc refuses new entries even to root (chmod would not: the tests run as root)."""
    out = Path("/proc") / f"orca-diff-test-{os.getpid()}"
    exc = expect_refusal(ledger, SUITE, "output under /proc", _apply(kit, out), must_name=(str(out.parent),))
    assert isinstance(exc, OutputError)
    assert not out.exists()


def test_a_file_where_the_output_folder_should_be_is_a_clear_error(kit: Kit, ledger, tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file, not a folder")
    for out in (blocker, blocker / "out"):
        exc = expect_refusal(ledger, SUITE, f"file in the way: {out.relative_to(tmp_path)}", _apply(kit, out),
                             must_name=(str(blocker),))
        assert isinstance(exc, OutputError)
    assert blocker.read_text() == "a file, not a folder"


def test_cli_exit_code_for_an_unwritable_output_is_8_without_traceback(kit: Kit, ledger, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = run_cli("apply", "--base", str(kit.base), "--diff", str(kit.diff), "--out", str(blocker / "out"), "-q")
    assert r.returncode == 8 and "Traceback" not in r.stderr and str(blocker) in r.stderr, r.stderr
    ledger.record(SUITE, "cli unwritable output", "detected")
