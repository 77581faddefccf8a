"""A Hub base not in the cache: downloaded into the HF cache while the rebuild reads it (issue 21).

The real huggingface_hub client (2.4.0) against the local test Hub (tests/hubserver.py), each
command in a subprocess. What is checked: the model is exact; the base ends up a normal HF cache
entry (blobs named by the sha256 of their bytes, ``snapshots/<commit>`` links, the ref) that the
client's own ``scan_cache_dir`` and ``snapshot_download(local_files_only=True)`` accept; the base
bytes are fetched once and overlap the rebuild; a server that sends other bytes than its listing
claims is refused (exit 9, as `download` refuses it) with nothing published and no blob under the sha256 name; a stalled
body is retried, or ends in one line with exit 9, never a hang; an interrupted run (a failure
that outlasts the retries, or a kill) is resumed from its partial blob, not from zero.
"""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hubserver import FakeHub
from test_hub import SHAPE, Runner, assert_same_files, one_error_line

from orca_diff.format import load_manifest
from orca_diff.make import make_diff
from orca_diff.synth import FineTune, write_finetune, write_llama

BASE_REPO = "bstream-org/llama-tiny"
DIFF_REPO = "bstream-org/orca-tiny-diff"
FAST = {"ORCA_DIFF_STALL_TIMEOUT": "1", "ORCA_DIFF_BACKOFF_S": "0.05"}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("basestream")
    base, target, diff = root / "base", root / "target", root / "diff"
    write_llama(base, SHAPE, "F16", seed=5, max_shard_bytes=30_000)
    write_finetune(target, SHAPE, base_seed=5, dtype="F16", ft=FineTune(add_pad_row=True), max_shard_bytes=30_000)
    hub = FakeHub().start()
    base_sha = hub.add_folder(BASE_REPO, base)
    make_diff(base, target, diff, base_name="llama-tiny", base_repo=BASE_REPO, base_revision=base_sha,
              chunk_bytes=4096, payload_file_bytes=10_000)
    hub.add_folder(DIFF_REPO, diff)
    catalog = root / "catalog.json"
    catalog.write_text(json.dumps({"bases": {}, "diffs": {}}))
    weights = sorted(p.name for p in base.glob("*.safetensors"))
    yield {"root": root, "base": base, "target": target, "diff": diff, "hub": hub, "catalog": catalog,
           "base_sha": base_sha, "manifest": load_manifest(diff), "weights": weights}
    hub.stop()


@pytest.fixture
def hub(world) -> FakeHub:
    world["hub"].clear_log()
    world["hub"].clear_failures()
    return world["hub"]


@pytest.fixture
def orca(world, hub, tmp_path) -> Runner:
    r = Runner(world, tmp_path)
    r.env.update(FAST)
    return r


def storage(tmp_path: Path) -> Path:
    return tmp_path / "hf-home" / "hub" / ("models--" + BASE_REPO.replace("/", "--"))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def served(hub: FakeHub, path: str) -> list[tuple[int, int]]:
    """(first, last) byte of every ranged GET of ``path`` the server saw."""
    out = []
    for p, rng in hub.ranges:
        if p == path and rng:
            a, _, b = rng.removeprefix("bytes=").partition("-")
            out.append((int(a), int(b)))
    return out


def apply_cmd(out: Path, *extra: str) -> tuple[str, ...]:
    return ("apply", "--diff", DIFF_REPO, "--out", str(out), *extra)


def assert_valid_cache_entry(world, tmp_path: Path, ref: str | None = None) -> None:
    """What the client itself says of the base in the cache: a complete revision, blobs named right."""
    from huggingface_hub import scan_cache_dir, snapshot_download

    cache = tmp_path / "hf-home" / "hub"
    info = scan_cache_dir(cache)
    repo = next(r for r in info.repos if r.repo_id == BASE_REPO)
    rev = next(r for r in repo.revisions if r.commit_hash == world["base_sha"])
    names = {f.file_name for f in rev.files}
    assert set(world["weights"]) <= names
    if ref is not None:  # a branch was named: its ref points at the commit (a pinned commit writes none)
        assert ref in rev.refs
        assert (storage(tmp_path) / "refs" / ref).read_text() == world["base_sha"]
    folder = Path(snapshot_download(BASE_REPO, revision=world["base_sha"], cache_dir=cache, local_files_only=True))
    for w in world["weights"]:
        p = folder / w
        assert p.is_symlink()
        blob = p.resolve()
        assert blob.name == sha256(blob) == sha256(world["base"] / w)  # the blob is named by its bytes
    assert [p.name for p in (storage(tmp_path) / "blobs").iterdir() if p.name.endswith(".incomplete")] == []


# --------------------------------------------------------------------------- the headline
def test_a_base_not_cached_streams_into_the_rebuild_and_ends_a_normal_cache_entry(world, hub, orca, tmp_path):
    r = orca(*apply_cmd(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    assert_same_files(tmp_path / "out", world["target"])
    assert "of base weights" in r.stdout + r.stderr and "while rebuilding" in r.stdout + r.stderr
    assert_valid_cache_entry(world, tmp_path)
    for w in world["weights"]:  # each byte fetched once, by ranges: the header, then the rest
        got = sorted(served(hub, w))
        size = (world["base"] / w).stat().st_size
        assert sum(b + 1 - a for a, b in got) == size, (w, got)
        assert got[0][0] == 0 and len(got) == 3, got
    # every header is fetched before the first weight data: apply opened the model from them
    gets = [(p, rng) for p, rng in hub.ranges if p in world["weights"]]
    first_data = next(i for i, (_p, rng) in enumerate(gets) if not rng.startswith(("bytes=0-7", "bytes=8-")))
    assert {p for p, _ in gets[:first_data]} == set(world["weights"])
    # a second run (to another folder) downloads no base byte: the cache is used
    hub.clear_log()
    r = orca(*apply_cmd(tmp_path / "out2", "-q"))
    assert r.returncode == 0, r.stderr
    assert not any(p in world["weights"] for p, _ in hub.ranges)
    assert_same_files(tmp_path / "out2", world["target"])


def test_hf_cache_verify_accepts_the_streamed_base(world, hub, orca, tmp_path):
    hf = Path(sys.executable).with_name("hf")
    if not hf.exists():
        pytest.skip("the hf CLI is not installed")
    r = orca(*apply_cmd(tmp_path / "out", "--base", BASE_REPO, "-q"))  # by branch: the ref is written too
    assert r.returncode == 0, r.stderr
    assert_valid_cache_entry(world, tmp_path, ref="main")
    r = subprocess.run([str(hf), "cache", "verify", BASE_REPO, "--revision", world["base_sha"]],
                       env={**orca.env}, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "All checksums match" in r.stdout


# --------------------------------------------------------------------------- lying server
@pytest.mark.parametrize("after", [0, 2], ids=["header", "data"])
def test_other_bytes_than_the_listing_claims_are_refused_and_nothing_is_published(world, hub, orca, tmp_path, after):
    victim = world["weights"][0]
    hub.fail_downloads(BASE_REPO, victim, "corrupt", after=after, times=100)
    r = orca(*apply_cmd(tmp_path / "out", "-q"))
    assert r.returncode == 9, r.stderr  # the server's fault, as when `download` finds it (HubError)
    line = one_error_line(r)
    assert victim in line and hub.url.split("//")[1] in line and "other bytes than it lists" in line, line
    assert not (tmp_path / "out").exists()
    assert not any(p.name.startswith(".out") for p in tmp_path.iterdir() if "partial" in p.name)  # staging removed
    good = sha256(world["base"] / victim)
    blobs = storage(tmp_path) / "blobs"
    assert not (blobs / good).exists()  # no blob under the sha256 name
    assert not (blobs / (good + ".orca-diff.incomplete")).exists()  # the wrong bytes were discarded
    hub.clear_failures()
    hub.clear_log()
    r = orca(*apply_cmd(tmp_path / "out", "-q"))  # the server is fixed: the rerun fetches it again
    assert r.returncode == 0, r.stderr
    assert_same_files(tmp_path / "out", world["target"])
    assert_valid_cache_entry(world, tmp_path)


# --------------------------------------------------------------------------- stalls
def test_a_base_body_that_stalls_once_is_resumed_and_the_output_is_exact(world, hub, orca, tmp_path):
    victim = world["weights"][1]
    hub.fail_downloads(BASE_REPO, victim, "stall", then="ok", after=2)  # the header is served, the data stalls
    t = time.monotonic()
    r = orca(*apply_cmd(tmp_path / "out", "-q"))
    assert r.returncode == 0, r.stderr
    assert time.monotonic() - t < 60
    assert_same_files(tmp_path / "out", world["target"])
    got = served(hub, victim)
    assert len(got) == 4 and got[3][0] > got[2][0], got  # the retry asked for the rest only
    assert_valid_cache_entry(world, tmp_path)


def test_a_base_that_keeps_stalling_is_one_line_exit_9_and_the_rerun_resumes_the_partial_blob(world, hub, orca,
                                                                                              tmp_path):
    victim = world["weights"][0]
    size = (world["base"] / victim).stat().st_size
    hub.fail_downloads(BASE_REPO, victim, "stall", after=2, times=100)
    t = time.monotonic()
    r = orca(*apply_cmd(tmp_path / "out", "-q"))
    assert time.monotonic() - t < 90
    assert r.returncode == 9, r.stderr
    line = one_error_line(r)
    assert "no data from 127.0.0.1" in line and victim in line and "rerun the same command" in line, line
    assert not (tmp_path / "out").exists()
    partial = storage(tmp_path) / "blobs" / (sha256(world["base"] / victim) + ".orca-diff.incomplete")
    kept = partial.stat().st_size
    assert 0 < kept < size
    hub.clear_failures()
    hub.clear_log()
    r = orca(*apply_cmd(tmp_path / "out", "-q"))
    assert r.returncode == 0, r.stderr
    assert_same_files(tmp_path / "out", world["target"])
    got = served(hub, victim)
    assert got == [(kept, size - 1)], got  # resumed where it stopped: nothing before was fetched again
    assert_valid_cache_entry(world, tmp_path)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["kill", "ctrl-c"])
def test_a_run_killed_mid_base_resumes_the_partial_blob(world, hub, orca, tmp_path, sig):
    victim = world["weights"][0]
    size = (world["base"] / victim).stat().st_size
    hub.bandwidth = 4000  # bytes/s: the first shard takes seconds
    partial = storage(tmp_path) / "blobs" / (sha256(world["base"] / victim) + ".orca-diff.incomplete")
    env = dict(orca.env)
    p = subprocess.Popen([sys.executable, "-m", "orca_diff.cli", *apply_cmd(tmp_path / "out", "-q")], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if partial.is_file() and partial.stat().st_size > size // 3:
                break
            time.sleep(0.05)
        else:
            pytest.fail("the base download never started")
        t = time.monotonic()
        p.send_signal(sig)
        p.wait(30)
        if sig == signal.SIGINT:  # Ctrl-C: a prompt exit 130 saying to rerun, whatever was downloading
            assert p.returncode == 130, p.stderr.read()
            assert time.monotonic() - t < 10
    finally:
        if p.poll() is None:
            p.kill()
    kept = partial.stat().st_size
    assert 0 < kept < size
    assert not (tmp_path / "out").exists()
    hub.clear_failures()
    hub.clear_log()
    r = orca(*apply_cmd(tmp_path / "out", "-q"))
    assert r.returncode == 0, r.stderr
    assert_same_files(tmp_path / "out", world["target"])
    got = served(hub, victim)
    assert got and got[0][0] >= kept and sum(b + 1 - a for a, b in got) == size - kept, (kept, got)
    assert_valid_cache_entry(world, tmp_path)


def test_a_cached_base_is_not_downloaded_again(world, hub, orca, tmp_path):
    assert orca("download", BASE_REPO, "-q").returncode == 0
    hub.clear_log()
    r = orca(*apply_cmd(tmp_path / "out", "-q"))
    assert r.returncode == 0, r.stderr
    assert not any(p in world["weights"] for p, _ in hub.ranges)
    assert_same_files(tmp_path / "out", world["target"])
