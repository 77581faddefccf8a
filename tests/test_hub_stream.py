"""Streaming apply from the Hub and the network fault matrix: never a hang, never a wrong output.

The real huggingface_hub client (2.4.0, see tests/hubserver.py) against the local test Hub,
each command in a subprocess (the client reads HF_* variables at import). Faults are injected
by the server: a connection cut mid-body, a body that stalls, an answer shorter than asked,
bytes other than the listing's sha256 describes, a server that accepts and never answers, an
HTTP error, and a bandwidth limit. Every case ends in a rebuilt model identical to the
publisher's or in one error line with a non-zero exit, within a bounded time.
"""

from __future__ import annotations

import hashlib
import json
import os
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

BASE_REPO = "stream-org/llama-tiny"
DIFF_REPO = "stream-org/orca-tiny-diff"
#: Stall timeout and first backoff the tests run with (seconds): every fault resolves in seconds.
STALL = "1"
FAST = {"ORCA_DIFF_STALL_TIMEOUT": STALL, "ORCA_DIFF_BACKOFF_S": "0.05"}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A base and a fine-tune of several shards, a diff of many small payload files whose base
    repo and revision are recorded (so apply --diff alone fetches both), served by one hub."""
    root = tmp_path_factory.mktemp("streamworld")
    base, target, diff = root / "base", root / "target", root / "diff"
    write_llama(base, SHAPE, "F16", seed=3, max_shard_bytes=30_000)
    write_finetune(target, SHAPE, base_seed=3, dtype="F16", ft=FineTune(add_pad_row=True), max_shard_bytes=30_000)
    hub = FakeHub().start()
    base_sha = hub.add_folder(BASE_REPO, base)
    make_diff(base, target, diff, base_name="llama-tiny", base_repo=BASE_REPO, base_revision=base_sha,
              chunk_bytes=4096, payload_file_bytes=10_000)
    hub.add_folder(DIFF_REPO, diff)
    catalog = root / "catalog.json"
    catalog.write_text(json.dumps({"bases": {}, "diffs": {}}))
    yield {"root": root, "base": base, "target": target, "diff": diff, "hub": hub, "catalog": catalog,
           "base_sha": base_sha, "manifest": load_manifest(diff)}
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


def payload_blobs(tmp_path: Path, manifest) -> list[Path]:
    """Payload files of the diff in the test's HF cache (blobs or partial blobs)."""
    blobs = tmp_path / "hf-home" / "hub" / ("models--" + DIFF_REPO.replace("/", "--")) / "blobs"
    names = {p.sha256 for p in manifest.payloads}
    return [p for p in blobs.glob("*") if p.name in names or p.name.endswith(".incomplete")]


def fetched_bytes(hub: FakeHub, path: str) -> int:
    """Bytes of ``path`` the client asked for (sum of the Range requests)."""
    total = 0
    for p, rng in hub.ranges:
        if p == path:
            a, _, b = rng.removeprefix("bytes=").partition("-")
            total += int(b) + 1 - int(a)
    return total


def apply_cmd(out: Path, *extra: str) -> tuple[str, ...]:
    return ("apply", "--diff", DIFF_REPO, "--out", str(out), "-q", *extra)


# --------------------------------------------------------------------------- the headline
def test_streamed_apply_rebuilds_the_model_and_keeps_no_copy_of_the_diff(world, hub, orca, tmp_path):
    r = orca(*apply_cmd(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    assert_same_files(tmp_path / "out", world["target"])
    assert payload_blobs(tmp_path, world["manifest"]) == []  # only the manifest was written to the cache
    assert "no copy of the diff kept" in r.stderr and "streamed" in r.stderr
    m = world["manifest"]
    for p in m.payloads:  # ranged reads, each byte once
        assert all(rng is not None for path, rng in hub.ranges if path == p.path)
        assert fetched_bytes(hub, p.path) == p.size, p.path
    # the base, not cached, was fetched into the HF cache as a normal download (see below)
    snap = tmp_path / "hf-home" / "hub" / ("models--" + BASE_REPO.replace("/", "--")) / "snapshots" / world["base_sha"]
    assert sorted(p.name for p in snap.iterdir()) == sorted(p.name for p in world["base"].iterdir())


def test_keep_diff_downloads_it_into_the_cache_and_a_cached_diff_is_used_not_streamed(world, hub, orca, tmp_path):
    r = orca(*apply_cmd(tmp_path / "a", "--keep-diff"))
    assert r.returncode == 0, r.stderr
    assert len(payload_blobs(tmp_path, world["manifest"])) == len(world["manifest"].payloads)
    hub.clear_log()
    r = orca(*apply_cmd(tmp_path / "b"))
    assert r.returncode == 0, r.stderr
    assert_same_files(tmp_path / "b", world["target"])
    assert [p for p in hub.file_gets(DIFF_REPO) if p != "orca-diff.json"] == []


# --------------------------------------------------------------------------- the fault matrix
@pytest.mark.parametrize("mode", ["drop", "stall", "short", "corrupt", 503, 429, "hang"])
def test_a_payload_fault_once_is_retried_and_the_output_is_exact(world, hub, orca, tmp_path, mode):
    victim = world["manifest"].payloads[1].path
    failure = hub.fail_downloads(DIFF_REPO, victim, mode, then="ok")
    t = time.monotonic()
    r = orca(*apply_cmd(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    assert time.monotonic() - t < 60
    assert failure.count >= 2  # it failed, then a retry got it
    assert_same_files(tmp_path / "out", world["target"])


@pytest.mark.parametrize("range_bytes", ["5000", "100000"])  # GETs of part of a file, and of whole files
def test_a_server_that_ignores_range_requests_still_gives_an_exact_output(world, hub, orca, tmp_path, range_bytes):
    for p in world["manifest"].payloads:
        hub.fail_downloads(DIFF_REPO, p.path, "norange")
    r = orca(*apply_cmd(tmp_path / "out"), ORCA_DIFF_RANGE_BYTES=range_bytes)
    assert r.returncode == 0, r.stderr
    assert_same_files(tmp_path / "out", world["target"])
    if range_bytes == "5000":
        assert len(hub.ranges) > len(world["manifest"].payloads)


def test_offline_mode_with_only_the_manifest_cached_is_one_line(world, hub, orca, tmp_path):
    assert orca("info", DIFF_REPO).returncode == 0  # caches the manifest
    assert orca("download", BASE_REPO, "-q").returncode == 0
    r = orca(*apply_cmd(tmp_path / "out"), HF_HUB_OFFLINE="1")
    assert r.returncode == 9, r.stderr
    assert "HF_HUB_OFFLINE=1" in one_error_line(r)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("mode,code,says", [
    ("stall", 9, "no data from 127.0.0.1"), ("hang", 9, "no data from 127.0.0.1"),
    ("drop", 9, "failed 5 times"), ("short", 9, "bytes short"), (503, 9, "answered 503"),
    ("corrupt", 5, "fails its"),
])
def test_a_payload_that_keeps_failing_is_one_error_line_and_nothing_is_published(world, hub, orca, tmp_path, mode,
                                                                               code, says):
    victim = world["manifest"].payloads[1].path
    hub.fail_downloads(DIFF_REPO, victim, mode)
    t = time.monotonic()
    r = orca(*apply_cmd(tmp_path / "out"))
    assert time.monotonic() - t < 90
    assert r.returncode == code, r.stderr
    line = one_error_line(r)
    assert says in line and victim in line, line
    if code == 9:
        assert "rerun the same command to resume" in line
    else:  # other bytes than the manifest records: the server's copy is refused, naming it
        assert hub.url.split("//")[1] in line and "tell the publisher" in line
    assert not (tmp_path / "out").exists()


HUB_COMMANDS = {
    "download": ("download", DIFF_REPO, "-q"),
    "info": ("info", DIFF_REPO),
    "verify": ("verify", "--diff", DIFF_REPO, "-q"),
    "apply": ("apply", "--diff", DIFF_REPO, "--out", "OUT", "-q"),
    "make --base": ("make", "--base", BASE_REPO, "--target", "TARGET", "--out", "OUT", "-q"),
    "push": ("push", "DIFF", "--repo", "stream-org/pushed", "-q"),
}


@pytest.mark.parametrize("command", list(HUB_COMMANDS))
def test_a_hub_that_accepts_and_never_answers_is_one_line_within_bounded_time(world, hub, orca, tmp_path, command):
    args = [a.replace("OUT", str(tmp_path / "out")).replace("TARGET", str(world["target"]))
            .replace("DIFF", str(world["diff"])) for a in HUB_COMMANDS[command]]
    hub.silent = True
    t = time.monotonic()
    r = orca(*args, HF_TOKEN="hf_writer")
    took = time.monotonic() - t
    assert r.returncode == 9, r.stderr
    line = one_error_line(r)
    assert "127.0.0.1" in line and ("timed out" in line or "no data" in line), line
    # the client's own retries included: 6 tries of 1 s plus its backoff (1+2+4+8+8 s) at most
    assert took < 60, took


def test_the_stall_timeout_honours_hf_hub_download_timeout_and_the_option(world, hub, orca, tmp_path):
    victim = world["manifest"].payloads[0].path
    hub.fail_downloads(DIFF_REPO, victim, "hang")
    t = time.monotonic()
    r = orca(*apply_cmd(tmp_path / "a"), ORCA_DIFF_STALL_TIMEOUT=None, HF_HUB_DOWNLOAD_TIMEOUT="1")
    assert r.returncode == 9 and "for 1 s" in one_error_line(r)
    r = orca(*apply_cmd(tmp_path / "b", "--stall-timeout", "0.3"))
    assert r.returncode == 9 and "for 0.3 s" in one_error_line(r)
    assert time.monotonic() - t < 40


def test_a_throttled_link_is_slow_but_exact(world, hub, orca, tmp_path):
    m = world["manifest"]
    hub.bandwidth = 4 * m.payload_bytes  # the payloads take about 1/4 s
    t = time.monotonic()
    r = orca(*apply_cmd(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    assert time.monotonic() - t >= 0.25
    assert_same_files(tmp_path / "out", world["target"])


# --------------------------------------------------------------------------- resume
def chunks_of(manifest, files) -> list:
    from orca_diff.apply import _jobs

    return [j.chunk for j in _jobs(manifest, list(files)) if j.chunk is not None]


def staged_finished(out: Path) -> set[str]:
    """Files an interrupted apply into ``out`` recorded as finished in its hidden staging folder."""
    from orca_diff.apply import finished_files

    staging = [p for p in out.parent.iterdir() if p.name.startswith(".") and out.name in p.name and p.is_dir()]
    assert len(staging) <= 1, list(out.parent.iterdir())
    return set(finished_files(staging[0])) if staging else set()


@pytest.mark.parametrize("how", ["error", "kill"])
def test_an_interrupted_streamed_apply_refetches_nothing_it_finished(world, hub, orca, tmp_path, how):
    """Interrupted once the first files are finished (a payload that keeps failing: exit 9; or
    SIGKILL), the same command fetches no chunk of a finished file again."""
    m = world["manifest"]
    out = tmp_path / "out"
    assert orca("download", BASE_REPO, "-q").returncode == 0  # the base at full speed; the link then slows
    if how == "error":
        victim = chunks_of(m, m.files[-1:])[-1].payload
        hub.fail_downloads(DIFF_REPO, victim, 503, after=0)
        hub.bandwidth = m.payload_bytes / 2  # ~2 s, and the victim's retries last ~7 s: the files
        first = orca(*apply_cmd(out), ORCA_DIFF_BACKOFF_S="0.5")  # before its chunks get finished
        assert first.returncode == 9, first.stderr
    else:
        hub.bandwidth = m.payload_bytes / 4  # ~4 s of payload
        proc = subprocess.Popen([sys.executable, "-m", "orca_diff.cli", *apply_cmd(out)], env=orca.env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            if staged_finished(out):
                break
            time.sleep(0.05)
        proc.kill()
        proc.wait()
    done = staged_finished(out)
    assert done and len(done) < len(m.files), done
    hub.clear_failures()
    hub.clear_log()
    second = orca(*apply_cmd(out))
    assert second.returncode == 0, second.stderr
    assert_same_files(out, world["target"])
    finished_chunks = {(c.payload, c.offset) for c in chunks_of(m, [f for f in m.files if f.path in done])}
    fetched = set()
    for path, rng in hub.ranges:
        a, _, b = rng.removeprefix("bytes=").partition("-")
        fetched |= {(p, o) for p, o in finished_chunks if p == path and int(a) <= o <= int(b)}
    assert fetched == set()  # nothing of a finished file was fetched again
    assert hub.ranges  # but the rest was


def test_ctrl_c_during_a_streamed_apply_then_the_same_command_finishes(world, hub, orca, tmp_path):
    assert orca("download", BASE_REPO, "-q").returncode == 0
    hub.bandwidth = world["manifest"].payload_bytes / 3  # about 3 s of payload
    env = dict(orca.env)
    proc = subprocess.Popen([sys.executable, "-m", "orca_diff.cli", *apply_cmd(tmp_path / "out")], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(2.0)
    proc.send_signal(signal.SIGINT)
    _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    hub.bandwidth = None
    r = orca(*apply_cmd(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    assert_same_files(tmp_path / "out", world["target"])


# --------------------------------------------------------------------------- the base, into the HF cache
def base_repo_dir(tmp_path: Path) -> Path:
    return tmp_path / "hf-home" / "hub" / ("models--" + BASE_REPO.replace("/", "--"))


def test_a_base_download_cut_midway_resumes_from_its_partial_blob_and_the_cache_is_a_normal_one(world, hub, orca,
                                                                                               tmp_path):
    shard = sorted(p.name for p in world["base"].glob("*.safetensors"))[-1]
    size = (world["base"] / shard).stat().st_size
    failure = hub.fail_downloads(BASE_REPO, shard, "drop", then=503)
    first = orca("download", BASE_REPO, "-q")
    assert first.returncode == 9, first.stderr
    assert failure.count >= 2
    assert list((base_repo_dir(tmp_path) / "blobs").glob("*.orca-diff.incomplete"))
    hub.clear_failures()
    hub.clear_log()
    second = orca("download", BASE_REPO, "-q")
    assert second.returncode == 0, second.stderr
    assert [r for p, r in hub.ranges if p == shard] == [f"bytes={size // 2}-{size - 1}"]
    folder = Path(second.stdout.strip())
    assert folder.name == world["base_sha"]
    for p in world["base"].iterdir():
        assert (folder / p.name).read_bytes() == p.read_bytes()
        blob = (folder / p.name).resolve()
        assert blob.parent.name == "blobs"
        if p.suffix == ".safetensors":
            assert blob.name == hashlib.sha256(p.read_bytes()).hexdigest()
    assert (base_repo_dir(tmp_path) / "refs" / "main").read_text() == world["base_sha"]
    # the client's own tools accept it: `hf cache verify` against the Hub, and an offline download
    hf = Path(sys.executable).with_name("hf")
    v = subprocess.run([str(hf), "cache", "verify", BASE_REPO], env=orca.env, capture_output=True, text=True,
                       timeout=120)
    assert v.returncode == 0, v.stdout + v.stderr
    off = orca.run_python("-c", "import huggingface_hub as h; print(h.snapshot_download(%r))" % BASE_REPO,
                          HF_HUB_OFFLINE="1")
    assert off.returncode == 0 and off.stdout.strip() == str(folder), off.stderr


def test_transformers_loads_the_base_orca_diff_put_in_the_cache_offline(world, hub, orca, tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("torch")
    assert orca("download", BASE_REPO, "-q").returncode == 0
    script = (f"from transformers import AutoModelForCausalLM; m = AutoModelForCausalLM.from_pretrained({BASE_REPO!r});"
              " print(sum(p.numel() for p in m.parameters()))")
    r = orca.run_python("-c", script, HF_HUB_OFFLINE="1")
    assert r.returncode == 0, r.stderr[-3000:]
    assert int(r.stdout.split()[-1]) > 0


def test_a_cached_base_blob_that_does_not_hash_to_its_name_is_fetched_again_once(world, hub, orca, tmp_path):
    assert orca("download", BASE_REPO, "-q").returncode == 0
    shard = sorted(p.name for p in world["base"].glob("*.safetensors"))[0]
    blob = (base_repo_dir(tmp_path) / "snapshots" / world["base_sha"] / shard).resolve()
    data = bytearray(blob.read_bytes())
    data[100] ^= 1
    blob.write_bytes(bytes(data))
    hub.clear_log()
    r = orca("download", BASE_REPO, "-q")
    assert r.returncode == 0, r.stderr
    assert hub.file_gets(BASE_REPO) == [shard]
    assert blob.read_bytes() == (world["base"] / shard).read_bytes()
    # the same damage, and now the server too holds other bytes than its listing claims: refused
    blob.write_bytes(bytes(data))
    hub.fail_downloads(BASE_REPO, shard, "corrupt")
    r = orca("download", BASE_REPO, "-q")
    assert r.returncode == 9
    line = one_error_line(r)
    assert shard in line and "127.0.0.1" in line and "damaged copy" in line


def test_a_base_whose_server_bytes_contradict_the_listing_never_rebuilds(world, hub, orca, tmp_path):
    shard = sorted(p.name for p in world["base"].glob("*.safetensors"))[0]
    failure = hub.fail_downloads(BASE_REPO, shard, "corrupt")
    r = orca(*apply_cmd(tmp_path / "out"))  # streamed into the rebuild (tests/test_hub_basestream.py)
    assert r.returncode == 9
    assert "other bytes than it lists" in one_error_line(r) and shard in one_error_line(r)
    assert not (tmp_path / "out").exists()
    failure.count = 0
    r = orca(*apply_cmd(tmp_path / "out"), ORCA_DIFF_BASE_STREAM="0")  # downloaded first, as before
    assert r.returncode == 9
    assert "damaged copy" in one_error_line(r)
    assert failure.count == 2  # fetched once more, then refused
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- memory stays bounded
def test_the_stream_holds_at_most_its_budget(world, hub, orca, tmp_path):
    """In a subprocess (the client reads HF_ENDPOINT at import): a reader that is slower than the
    link never lets fetched-but-unread bytes exceed the budget, and every chunk checks out."""
    script = f"""
import time, threading
from orca_diff.format import load_manifest
from orca_diff.hub.stream import StreamedPayloads
from orca_diff.hub.transfer import fetch_manifest, RepoRef
folder = fetch_manifest(RepoRef({DIFF_REPO!r}))
m = load_manifest(folder)
chunks = [c for t in m.tensors.values() for c in t.chunks]
budget = 3 * max(c.length for c in chunks)
s = StreamedPayloads({DIFF_REPO!r}, folder.name, m, chunks, in_flight=3, budget=budget, range_bytes=budget)
peak = 0
for c in chunks:
    time.sleep(0.002)
    peak = max(peak, s._held)
    s.read(c, "x")
s.close()
assert peak <= budget, (peak, budget)
print("ok", len(chunks), peak, budget)
"""
    r = orca.run_python("-c", script)
    assert r.returncode == 0 and r.stdout.startswith("ok"), r.stderr


def test_request_hook_fills_missing_timeouts_and_caps_the_clients_long_ones(monkeypatch):
    from orca_diff.hub import stream

    class Req:
        extensions = {"timeout": {"connect": None, "read": 60.0, "write": None, "pool": 2.0}}

    monkeypatch.setenv(stream.STALL_ENV, "3")
    stream._fill_timeouts(Req)
    import huggingface_hub.constants as c

    cap = max(3.0, float(c.HF_HUB_ETAG_TIMEOUT))
    assert Req.extensions["timeout"] == {"connect": 3.0, "read": min(60.0, cap), "write": 3.0, "pool": 2.0}
    monkeypatch.delenv(stream.STALL_ENV)
    monkeypatch.setenv("HF_HUB_DOWNLOAD_TIMEOUT", "7")
    assert stream.stall_timeout() == 7.0
    monkeypatch.delenv("HF_HUB_DOWNLOAD_TIMEOUT")
    assert stream.stall_timeout() == stream.DEFAULT_STALL_S


def test_ranges_group_neighbouring_chunks_in_need_order(world):
    from orca_diff.hub.stream import plan_ranges

    chunks = [c for t in world["manifest"].tensors.values() for c in t.chunks]
    ranges = plan_ranges(chunks, range_bytes=10_000)
    assert [c for r in ranges for c in r.chunks] == chunks  # order kept, nothing lost
    for r in ranges:
        assert len({c.payload for c in r.chunks}) == 1
        assert all(a.offset + a.length == b.offset for a, b in zip(r.chunks, r.chunks[1:]))
        assert r.nbytes <= 10_000 or len(r.chunks) == 1


def test_make_never_takes_a_weight_files_sha256_from_the_name_of_a_damaged_cache_blob(world, hub, orca, tmp_path):
    """issue 19 item 5: ``base.weight_files`` comes from bytes read, or from a blob orca-diff
    checked; a cache folder whose blob does not hash to its name is refused, not recorded."""
    r = orca("download", BASE_REPO, "-q")
    assert r.returncode == 0, r.stderr
    folder = Path(r.stdout.strip())
    ok = orca("make", "--base", str(folder), "--target", str(world["target"]), "--out", str(tmp_path / "d1"), "-q")
    assert ok.returncode == 0, ok.stderr
    recorded = load_manifest(tmp_path / "d1").base.weight_files
    for rel, bf in recorded.items():
        assert bf.sha256 == hashlib.sha256((world["base"] / rel).read_bytes()).hexdigest()
    shard = sorted(recorded)[0]
    blob = (folder / shard).resolve()
    data = bytearray(blob.read_bytes())
    data[-5] ^= 1  # a tensor byte: the file still parses
    blob.write_bytes(bytes(data))
    bad = orca("make", "--base", str(folder), "--target", str(world["target"]), "--out", str(tmp_path / "d2"), "-q")
    assert bad.returncode == 6, bad.stderr
    line = one_error_line(bad)
    assert shard in line and "damaged" in line
