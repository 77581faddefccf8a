"""Hashes moved off the critical path (apply's file sha256 on its own thread, make's base-file
sha256 in the background) measure exactly the bytes they did inline, and never outlive the
command that started them."""

from __future__ import annotations

import hashlib
import threading
import time

import pytest
from hypothesis import given, settings, strategies as st

import orca_diff.make as make_mod
from orca_diff.apply import apply_diff
from orca_diff.errors import InterruptedError_
from orca_diff.format import load_manifest
from orca_diff.make import make_diff
from orca_diff.outdir import StagedFile
from orca_diff.pipeline import SerialWorker

from conftest import file_hashes


@settings(max_examples=40, deadline=None)
@given(st.lists(st.binary(max_size=5000), max_size=12))
def test_a_staged_file_hashed_on_a_helper_thread_has_the_sha256_of_its_bytes(tmp_path_factory, parts):
    folder = tmp_path_factory.mktemp("staged")
    worker = SerialWorker("test-sha256")
    try:
        pooled, inline = StagedFile(folder, "a", hasher=worker), StagedFile(folder, "b")
        for p in parts:
            pooled.write(p)
            inline.write(p)
        want = hashlib.sha256(b"".join(parts)).hexdigest()
        assert pooled.hexdigest() == inline.hexdigest() == want
        pooled.commit()
        inline.commit()
    finally:
        worker.close()
    assert hashlib.sha256((folder / "a").read_bytes()).hexdigest() == want


def test_apply_with_one_and_two_threads_rebuilds_the_same_files(make_pair, tmp_path):
    base, target = make_pair("BF16", shard=40_000)
    make_diff(base, target, tmp_path / "diff", chunk_bytes=4096)
    for threads in (1, 2):
        apply_diff(base, tmp_path / "diff", tmp_path / f"out{threads}", threads=threads)
        assert file_hashes(tmp_path / f"out{threads}") == file_hashes(target)


def test_base_weight_files_hashed_in_background_match_the_inline_hashes(make_pair, tmp_path):
    base, target = make_pair("F16", shard=40_000)
    recorded = {}
    for threads in (1, 2):  # 1: hashed after encoding; 2: on a background thread during it
        make_diff(base, target, tmp_path / f"d{threads}", threads=threads)
        recorded[threads] = load_manifest(tmp_path / f"d{threads}").base.weight_files
    want = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in base.glob("*.safetensors")}
    assert {rel: f.sha256 for rel, f in recorded[2].items()} == want
    assert recorded[1] == recorded[2]


def test_ctrl_c_during_make_stops_the_background_base_hash(make_pair, tmp_path, monkeypatch):
    base, target = make_pair("BF16")
    started = threading.Event()

    real = make_mod.file_sha256

    def slow_sha256(path, block=16 << 20, stop=None):  # a base so large its hash outlasts the encoding
        if stop is None:  # make's other hashes (tokenizer files shared with the base)
            return real(path, block)
        started.set()
        for _ in range(3000):
            if stop is not None and stop.is_set():
                raise InterruptedError("stopped")
            time.sleep(0.01)
        raise AssertionError("the background hash was never told to stop")

    def interrupted(*a, **k):
        started.wait(5)
        raise KeyboardInterrupt

    monkeypatch.setattr(make_mod, "file_sha256", slow_sha256)
    monkeypatch.setattr(make_mod, "encode_chunk", interrupted)
    t0 = time.monotonic()
    with pytest.raises(InterruptedError_):
        make_diff(base, target, tmp_path / "diff", threads=2)
    deadline = time.monotonic() + 5
    while any(t.name == "orca-diff-base-files" for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not any(t.name == "orca-diff-base-files" for t in threading.enumerate())
    assert time.monotonic() - t0 < 10
    assert not (tmp_path / "diff").exists()


def test_the_helper_thread_runs_calls_in_order_one_at_a_time_and_reports_their_errors():
    worker = SerialWorker("test")
    seen: list[int] = []
    try:
        for i in range(50):
            worker.submit(seen.append, i)
        worker.wait()
        assert seen == list(range(50))
        worker.submit(lambda: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            worker.wait()
        worker.wait()  # reported once
    finally:
        worker.close()
