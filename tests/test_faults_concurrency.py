"""Fault injection, part 9 (issue 12): two runs, one ``--out``.

Before the output lock, a second ``apply`` to the same ``--out`` shared the first one's staging
folder: it unlinked and recreated the first run's ``.X.incomplete``, and the first run then
renamed whatever was at that name, publishing a truncated shard (or shards of two models) with
exit 0 and "every file matches its sha256"; the loser said "choose an --out inside a writable
folder". Now one run holds ``.<out>.orca-diff-lock`` (flock) for its whole duration, a second
refuses at once naming the holder's pid and command, and each file is renamed only if its name
still designates the descriptor this run wrote and hashed.

* in-process: a second apply (same diff, another diff, a legacy apply) started while the first
  is writing is refused with a true message, and the first publishes its own model;
* subprocesses: ``TRIALS`` seeded trials of two real ``orca-diff apply`` runs (same diff and
  different diffs, the second started at a random delay, with or without ``--force``, killed at a
  random point or left to finish): every run that exits 0 published its own model byte for byte,
  the output is never a mix, and a refusal names the other run's pid.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

import orca_diff.apply as apply_mod
from faultkit import Kit, LlamaShape, build_kit, cli_cmd, cli_env, kit, ledger  # noqa: F401
from orca_diff.apply import apply_diff
from orca_diff.errors import OrcaDiffError, OutputError
from orca_diff.make import make_diff
from orca_diff.outdir import OutputLock, lock_path, marker_path, old_dir, staging_dir
from orca_diff.synth import FineTune, write_finetune

SUITE = "concurrency"
TRIALS = 14
#: ~40 MB of F16, 32 KiB chunks: one apply takes about half a second with one thread, so the
#: second run (started 0-0.6 s later) mostly overlaps it.
TRIAL_SHAPE = LlamaShape(vocab_size=8192, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=8)


def _second_diff(kit: Kit, root: Path, shape: LlamaShape, **make_kw) -> tuple[Path, dict[str, bytes]]:
    """Another fine-tune of the same base and its diff: the 'different diff' of the trials."""
    target = write_finetune(root / "target-b", shape, base_seed=0, dtype="F16",
                            ft=FineTune(add_pad_row=True, lr=6e-5, drift=0.01),
                            max_shard_bytes=make_kw.pop("shard_bytes"))
    diff = root / "diff-b"
    make_diff(kit.base, target, diff, threads=1, progress=False, **make_kw)
    return diff, {p.relative_to(target).as_posix(): p.read_bytes() for p in target.rglob("*") if p.is_file()}


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


# --------------------------------------------------------------------------- in-process


@pytest.mark.parametrize("second", ["same diff", "another diff", "another diff with --force", "legacy apply"])
def test_a_second_run_on_the_same_output_is_refused_and_the_first_publishes_its_own(
        kit: Kit, ledger, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, second: str) -> None:
    from faultkit import TINY, TINY_CHUNK_BYTES, TINY_PAYLOAD_BYTES, TINY_SHARD_BYTES

    diff_b, files_b = _second_diff(kit, tmp_path, TINY, shard_bytes=TINY_SHARD_BYTES, chunk_bytes=TINY_CHUNK_BYTES,
                                   payload_file_bytes=TINY_PAYLOAD_BYTES)
    assert files_b != kit.target_files
    out = tmp_path / "out"
    real = apply_mod._write_all
    calls = {"n": 0}
    outcome: dict[str, object] = {}

    def run_second() -> None:
        try:
            if second == "legacy apply":
                from orca_diff.legacy import apply_legacy

                apply_legacy("fastchat", str(kit.base), str(kit.target), out, progress=False)
            else:
                diff = kit.diff if second == "same diff" else diff_b
                apply_diff(kit.base, diff, out, force="force" in second, threads=1, progress=False)
            outcome["result"] = "exit 0"
        except BaseException as exc:  # noqa: BLE001 - recorded and asserted on below
            outcome["result"] = exc

    def racing_write(sf, data):
        calls["n"] += 1
        if calls["n"] == 5:  # the first run is mid-file: a second run starts and runs to its end
            t = threading.Thread(target=run_second)
            t.start()
            t.join(60)
        real(sf, data)

    monkeypatch.setattr(apply_mod, "_write_all", racing_write)
    r = apply_diff(kit.base, kit.diff, out, threads=1, progress=False)
    res = outcome["result"]
    if isinstance(res, OrcaDiffError):
        ledger.record(SUITE, f"in-process second run: {second}", "detected")
    else:
        ledger.record(SUITE, f"in-process second run: {second}", "silent" if res == "exit 0" else "unhandled")
    assert isinstance(res, OutputError), res
    msg = str(res)
    assert "another orca-diff run" in msg and f"pid {os.getpid()}" in msg, msg
    assert "writable folder" not in msg
    kit.assert_identical(out)
    assert r.files == len(kit.target_files)
    assert not lock_path(out).exists()


def test_the_lock_is_reentrant_in_one_thread_and_exclusive_between_threads(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with OutputLock(out):
        with OutputLock(out):  # convert -> make on the same output
            pass
        assert lock_path(out).exists()
        err: list[BaseException] = []

        def other() -> None:
            try:
                OutputLock(out).acquire()
            except BaseException as exc:  # noqa: BLE001
                err.append(exc)

        t = threading.Thread(target=other)
        t.start()
        t.join()
        assert err and isinstance(err[0], OutputError)
    assert not lock_path(out).exists()
    with OutputLock(out):  # free again
        pass


# --------------------------------------------------------------------------- real processes


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Kit, Path, dict[str, bytes]]:
    root = tmp_path_factory.mktemp("concurrency-kit")
    k = build_kit(root, TRIAL_SHAPE, shard_bytes=1 << 20, chunk_bytes=32 << 10, payload_bytes=2 << 20)
    diff_b, files_b = _second_diff(k, root, TRIAL_SHAPE, shard_bytes=1 << 20, chunk_bytes=32 << 10,
                                   payload_file_bytes=2 << 20)
    return k, diff_b, files_b


def _start(kit: Kit, diff: Path, out: Path, force: bool) -> subprocess.Popen:
    args = ["apply", "--base", str(kit.base), "--diff", str(diff), "--out", str(out), "-q"] + (["--force"] if force else [])
    return subprocess.Popen(cli_cmd(*args), env=cli_env(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _clean(out: Path) -> None:
    for p in (out, staging_dir(out), old_dir(out)):
        shutil.rmtree(p, ignore_errors=True)
    for p in (lock_path(out), marker_path(out)):
        p.unlink(missing_ok=True)


@pytest.mark.slow
def test_concurrent_apply_trials_publish_only_each_runs_own_model(pair, ledger, tmp_path: Path) -> None:
    kit, diff_b, files_b = pair
    models = {"A": kit.target_files, "B": files_b}
    rng = random.Random(12)
    out = tmp_path / "out"
    summary = []
    overlapped = 0
    for trial in range(TRIALS):
        _clean(out)
        same = trial % 2 == 0
        force_b = rng.random() < 0.5
        delay = rng.uniform(0.0, 0.6)
        kill_after = rng.uniform(0.02, 0.5) if rng.random() < 0.5 else None
        a = _start(kit, kit.diff, out, force=False)
        time.sleep(delay)
        b = _start(kit, kit.diff if same else diff_b, out, force=force_b)
        procs = {"A": a, "B": b}
        started_b = time.monotonic()
        ended: list[tuple[str, int]] = []
        killed = False
        while len(ended) < 2:
            for name, p in procs.items():
                if name not in [e[0] for e in ended] and p.poll() is not None:
                    ended.append((name, p.returncode))
            if kill_after is not None and not killed and b.poll() is None and time.monotonic() - started_b > kill_after:
                b.send_signal(signal.SIGKILL)
                killed = True
            time.sleep(0.005)
        outputs = {n: p.communicate() for n, p in procs.items()}
        model_of = {"A": "A", "B": "A" if same else "B"}
        ok = [n for n, rc in ended if rc == 0]
        for n, rc in ended:
            err = outputs[n][1]
            assert "Traceback" not in err, err
            assert rc in (0, OutputError.exit_code, -signal.SIGKILL), (n, rc, err)
            if "another orca-diff run" in err:
                other = procs["B" if n == "A" else "A"]
                assert f"pid {other.pid}" in err, err  # the message names the run that holds the lock
                overlapped += 1
        if ok:
            final = _files(out)
            assert final == models[model_of[ok[-1]]], f"trial {trial}: {out} is not the last successful run's model"
        for n in ok:  # it rebuilt its model, or (a rerun after the other finished) found it there and checked it
            assert "rebuilt" in outputs[n][0] or "already holds this model" in outputs[n][0], outputs[n][0]
        if not ok:
            assert not out.exists() or _files(out) in (models["A"], models["B"])
        outcome = {n: rc for n, rc in ended}
        said = {n: ("lock" if "another orca-diff run" in outputs[n][1] else outputs[n][1].strip()[-60:])
                for n, rc in ended if rc not in (0, -signal.SIGKILL)}
        summary.append((trial, "same" if same else "different", f"force={force_b}", f"delay={delay:.2f}",
                        f"kill={'%.2f' % kill_after if kill_after is not None else '-'}", outcome, said))
        ledger.record(SUITE, f"trial {trial}", "recovered" if ok else "detected")
    assert overlapped >= 3, f"only {overlapped} trials had the two runs overlap; the trials test nothing"
    # a killed run leaves a stale lock file and staging folder: neither blocks the next run
    r = subprocess.run(cli_cmd("apply", "--base", str(kit.base), "--diff", str(kit.diff), "--out", str(out), "-q",
                               "--force"), env=cli_env(1), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert _files(out) == models["A"]
    print("\n".join(map(str, summary)))
