"""Fault injection, part 3: ``orca-diff apply`` killed at random points, then run again.

A real ``orca-diff apply`` subprocess (one worker thread, a model big enough that the rebuild
takes a good fraction of a second) is killed with SIGKILL at a dozen seeded points: some while
it starts or checks the base, most after a seeded number of files were finished. Running the
same command again must give the fine-tune byte for byte, and the files that were finished
before the kill must be kept as they are (same inode, same mtime: not rewritten). Ctrl-C
(SIGINT) must exit with code 130, say how to resume, and leave a state the rerun resumes from.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

from faultkit import Kit, LlamaShape, build_kit, cli_cmd, cli_env, ledger, run_cli  # noqa: F401
from orca_diff.apply import finished_files
from orca_diff.outdir import staging_dir

SUITE = "crash"
#: ~18 MB of F16 in ~18 shards, 32 KiB chunks: the rebuild takes about a second with one thread.
CRASH_SHAPE = LlamaShape(vocab_size=8192, hidden_size=256, intermediate_size=688, num_hidden_layers=6,
                         num_attention_heads=4, num_key_value_heads=4)
SEEDS = range(12)


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Kit:
    return build_kit(tmp_path_factory.mktemp("crash-kit"), CRASH_SHAPE, shard_bytes=1 << 20,
                     chunk_bytes=32 << 10, payload_bytes=2 << 20)


def _apply_args(kit: Kit, out: Path) -> list[str]:
    return ["apply", "--base", str(kit.base), "--diff", str(kit.diff), "--out", str(out), "-q"]


def _done_files(out: Path) -> dict[str, list[int]]:
    return finished_files(staging_dir(out))


def _start(kit: Kit, out: Path, threads: int = 1) -> subprocess.Popen:
    return subprocess.Popen(cli_cmd(*_apply_args(kit, out)), env=cli_env(threads), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for(proc: subprocess.Popen, out: Path, files_done: int, timeout: float = 60) -> bool:
    """Poll until the staging state lists ``files_done`` finished files; False if the process
    ended first."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            return False
        if len(_done_files(out)) >= files_done:
            return True
        time.sleep(0.002)
    raise AssertionError("apply made no progress")


def _finished_stats(out: Path) -> dict[str, tuple[int, int]]:
    """(inode, mtime_ns) of each file the staging state records as finished and that is there."""
    stats = {}
    for rel, (size, mtime) in _done_files(out).items():
        p = staging_dir(out) / rel
        if p.is_file():
            st = p.stat()
            if [st.st_size, st.st_mtime_ns] == [size, mtime]:
                stats[rel] = (st.st_ino, st.st_mtime_ns)
    return stats


@pytest.mark.parametrize("seed", SEEDS)
def test_sigkill_at_a_random_point_then_rerun_gives_identical_files_without_rewriting_finished_ones(
        big: Kit, ledger, tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    n_files = sum(1 for _ in big.target_files)
    out = tmp_path / "out"
    proc = _start(big, out)
    if seed % 4 == 0:  # a pure time point: start-up, base check or rebuild
        time.sleep(rng.uniform(0.05, 1.5))
        when = "time"
    else:  # after a seeded number of finished files, plus a little
        _wait_for(proc, out, rng.randrange(1, n_files - 1))
        time.sleep(rng.uniform(0, 0.02))
        when = "files"
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    case = f"SIGKILL seed {seed} ({when}, {len(_done_files(out))} files done)"
    if out.exists():  # killed after publishing: the folder must be complete, never partial
        big.assert_identical(out)
        ledger.record(SUITE, case, "recovered")
        return
    kept = _finished_stats(out)
    r = run_cli(*_apply_args(big, out))
    assert r.returncode == 0, r.stderr
    big.assert_identical(out)
    for rel, (ino, mtime) in kept.items():
        st = (out / rel).stat()
        assert (st.st_ino, st.st_mtime_ns) == (ino, mtime), f"{rel} was rewritten after the kill"
    if kept:
        assert f"({len(kept)} already done)" in r.stdout
    assert not staging_dir(out).exists()
    ledger.record(SUITE, case, "recovered")


@pytest.mark.parametrize("threads", [1, 2])
def test_ctrl_c_exits_130_says_how_to_resume_and_the_rerun_resumes(big: Kit, ledger, tmp_path: Path, threads: int) -> None:
    out = tmp_path / "out"
    proc = _start(big, out, threads)
    assert _wait_for(proc, out, 3), "apply finished before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "rerun the same command to resume" in err and "Traceback" not in err
    assert str(staging_dir(out)) in err
    assert not out.exists()
    kept = _finished_stats(out)
    assert len(kept) >= 3
    r = run_cli(*_apply_args(big, out), threads=threads)
    assert r.returncode == 0, r.stderr
    assert f"({len(kept)} already done)" in r.stdout
    big.assert_identical(out)
    for rel, (ino, mtime) in kept.items():
        assert ((out / rel).stat().st_ino, (out / rel).stat().st_mtime_ns) == (ino, mtime)
    ledger.record(SUITE, f"SIGINT threads={threads}", "recovered")


@pytest.mark.parametrize("keep_mtime", [False, True])
def test_a_finished_file_damaged_before_the_rerun_is_rebuilt_not_published(
        big: Kit, ledger, tmp_path: Path, keep_mtime: bool) -> None:
    """Finished files are only trusted when they still hash to the manifest's sha256: a bit
    flipped in one between the runs (even with its mtime put back) is written again."""
    out = tmp_path / "out"
    proc = _start(big, out)
    assert _wait_for(proc, out, 2)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    done = sorted(_finished_stats(out))
    assert done
    victim = staging_dir(out) / done[0]
    st = victim.stat()
    data = bytearray(victim.read_bytes())
    data[-1] ^= 1
    victim.write_bytes(bytes(data))
    if keep_mtime:
        os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    r = run_cli(*_apply_args(big, out))
    case = f"finished file damaged between runs (mtime kept: {keep_mtime})"
    if r.returncode == 0 and not big.matches_target(out):
        ledger.record(SUITE, case, "silent")
        raise AssertionError(f"{case}: SILENT CORRUPTION: the damaged file was published")
    assert r.returncode == 0, r.stderr
    big.assert_identical(out)
    ledger.record(SUITE, case, "recovered")
