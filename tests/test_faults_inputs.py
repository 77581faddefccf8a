"""Fault injection, part 8 (issue 12): inputs that hang, exhaust memory or make apply slow.

* a FIFO (or other non-regular file) named like a weight file, in the base or as the model given
  to ``fingerprint``: refused by name at once instead of blocking forever;
* a 2 KB ``.bin`` holding a stride-0 expanded tensor that claims 4 GiB: refused before any
  allocation (peak RSS bounded), by ``fingerprint`` and by apply's base check;
* chunk sizes chosen by a hostile manifest: apply's chunk window is sized to a memory budget and
  chunks over the documented bound are refused;
* the finished-files log is appended to, never rewritten (apply time linear in the number of files).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

import orca_diff.apply as apply_mod
from faultkit import Kit, cli_cmd, cli_env, expect_refusal, kit, ledger  # noqa: F401
from orca_diff.apply import MAX_APPLY_CHUNK_BYTES, MEMORY_BUDGET, STATE_NAME, apply_diff, memory_plan
from orca_diff.containers import open_model
from orca_diff.errors import FormatError, OrcaDiffError
from orca_diff.outdir import staging_dir

SUITE = "inputs"


def _run_with_timeout(args: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(cli_cmd(*args), env=cli_env(1), capture_output=True, text=True, timeout=timeout)


# --------------------------------------------------------------------------- non-regular files


@pytest.mark.parametrize("where", ["base shard", "fingerprint of a FIFO file", "fingerprint of a folder"])
def test_a_fifo_named_like_a_weight_file_is_refused_not_waited_on(kit: Kit, ledger, tmp_path: Path, where: str) -> None:
    base = kit.copy_base(tmp_path / "base")
    shard = sorted(base.glob("*.safetensors"))[1]
    shard.unlink()
    os.mkfifo(shard)
    if where == "base shard":
        args = ["apply", "--base", str(base), "--diff", str(kit.diff), "--out", str(tmp_path / "out"), "-q"]
    elif where == "fingerprint of a FIFO file":
        args = ["fingerprint", str(shard)]
    else:
        args = ["fingerprint", str(base)]
    t0 = time.monotonic()
    try:
        r = _run_with_timeout(args, timeout=60)
    except subprocess.TimeoutExpired:
        ledger.record(SUITE, f"FIFO: {where}", "unhandled")
        raise AssertionError(f"{where}: blocked on the FIFO") from None
    assert r.returncode not in (0, 1) and "Traceback" not in r.stderr, r.stderr
    assert shard.name in r.stderr and "regular file" in r.stderr, r.stderr
    assert time.monotonic() - t0 < 30
    assert not (tmp_path / "out").exists()
    ledger.record(SUITE, f"FIFO: {where}", "detected")


# --------------------------------------------------------------------------- hostile .bin memory


def _expanded_bin(folder: Path, claim_elems: int) -> Path:
    torch = pytest.importorskip("torch")
    folder.mkdir()
    w = torch.zeros(1, dtype=torch.float32).expand(claim_elems)  # stride 0: 4 bytes of storage
    torch.save({"model.embed_tokens.weight": w}, folder / "pytorch_model.bin")
    (folder / "config.json").write_text("{}")
    return folder


def test_a_stride0_bin_claiming_gigabytes_is_refused_before_allocating(ledger, tmp_path: Path) -> None:
    claim = 1 << 30  # 4 GiB of F32 claimed by a file of about 1.5 KB
    base = _expanded_bin(tmp_path / "bin", claim)
    assert (base / "pytorch_model.bin").stat().st_size < 4096
    code = ("import resource, sys\n"
            "from orca_diff.cli import main\n"
            "sys.argv = ['orca-diff', 'fingerprint', sys.argv[1]]\n"
            "try:\n    main()\nexcept SystemExit as e:\n    code = e.code\n"
            "print('RSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, 'CODE', code)\n")
    r = subprocess.run([sys.executable, "-c", code, str(base)], env=cli_env(1), capture_output=True, text=True,
                       timeout=120)
    assert "Traceback" not in r.stderr, r.stderr
    rss_kib, exit_code = int(r.stdout.split()[1]), r.stdout.split()[3]
    assert exit_code == str(FormatError.exit_code), (r.stdout, r.stderr)
    assert "expanded" in r.stderr and "model.embed_tokens.weight" in r.stderr
    assert rss_kib < 1024 * 1024, f"peak RSS {rss_kib} KiB: the claimed size was allocated"
    ledger.record(SUITE, "stride-0 .bin claiming 4 GiB (fingerprint)", "detected")


def test_an_expanded_view_is_refused_by_the_reader_itself(ledger, tmp_path: Path) -> None:
    base = _expanded_bin(tmp_path / "bin", 1 << 20)
    exc = expect_refusal(ledger, SUITE, "stride-0 .bin opened as a base", lambda: open_model(base).read(
        "model.embed_tokens.weight", 0, 16), must_name=("model.embed_tokens.weight",))
    assert isinstance(exc, FormatError)


# --------------------------------------------------------------------------- chunk memory bound


def _fake_manifest(chunk: int, n: int = 4, base_dtype: str | None = "F16", length: int | None = None):
    chunks = [SimpleNamespace(size=chunk, length=length if length is not None else chunk // 3, mode="delta",
                              start=i * chunk) for i in range(n)]
    t = SimpleNamespace(name="w", chunks=chunks, info=SimpleNamespace(itemsize=2),
                        encoding=SimpleNamespace(transform="ulp", base_dtype=base_dtype))
    return SimpleNamespace(tensors={"w": t}, files=[])


@pytest.mark.parametrize("chunk_mib,threads", [(16, 8), (64, 8), (128, 8), (256, 16), (16, 64)])
def test_the_chunk_window_fits_the_memory_budget(ledger, chunk_mib: int, threads: int) -> None:
    chunk = chunk_mib << 20
    workers, window = memory_plan(_fake_manifest(chunk), threads)  # type: ignore[arg-type]
    assert 1 <= workers <= window <= threads + 2
    per_chunk = chunk // 3 + 5 * chunk  # compressed + base bytes (F16 -> F16) + 4 buffers
    assert window == 1 or window * per_chunk <= MEMORY_BUDGET
    if chunk_mib == 16 and threads == 8:
        assert window == threads + 2  # the default chunk size keeps full parallelism
    ledger.record(SUITE, f"{chunk_mib} MiB chunks on {threads} threads: window {window}", "recovered")


def test_chunks_over_the_apply_bound_are_refused(ledger) -> None:
    fake = _fake_manifest(MAX_APPLY_CHUNK_BYTES + 2)
    exc = expect_refusal(ledger, SUITE, "chunk over the apply bound", lambda: memory_plan(fake, 4),  # type: ignore[arg-type]
                         must_name=("at most",))
    assert isinstance(exc, FormatError)


def test_a_hostile_big_chunk_manifest_is_refused_before_reading_the_base(kit: Kit, ledger, tmp_path: Path) -> None:
    """The real path: a re-signed manifest whose one chunk covers a 1 GiB tensor."""
    from faultkit import rewrite_manifest
    from orca_diff.fingerprint import base_fingerprint

    diff = kit.copy_diff(tmp_path / "diff")

    def edit(doc: dict) -> None:
        doc["chunk_bytes"] = 1 << 30
        name = "model.layers.0.mlp.up_proj.weight"
        t = doc["tensors"][name]
        t["shape"] = [1 << 14, 1 << 15]
        t["encoding"].update(transform="raw", base_tensor=None, base_dtype=None, shared_bytes=0, layout="planes",
                             codec="zstd")
        c = dict(t["chunks"][0], start=0, size=1 << 30, mode="raw")
        t["chunks"] = [c]
        for f in doc["target"]["files"]:
            if f.get("kind") == "safetensors" and name in f.get("header", ""):
                import json as _json

                h = _json.loads(f["header"])
                off = 0
                for k, v in sorted(((k, v) for k, v in h.items() if k != "__metadata__"),
                                   key=lambda kv: kv[1]["data_offsets"][0]):
                    n = (1 << 30) if k == name else v["data_offsets"][1] - v["data_offsets"][0]
                    v["data_offsets"] = [off, off + n]
                    if k == name:
                        v["shape"] = t["shape"]
                    off += n
                raw = _json.dumps(h, separators=(",", ":"))
                raw += " " * (-len(raw) % 8)
                f["header"] = raw
                f["size"] = 8 + len(raw) + off
        doc["target"]["fingerprint"] = base_fingerprint(
            {n: (x["dtype"], tuple(x["shape"]), x["blake3"]) for n, x in doc["tensors"].items()})

    rewrite_manifest(diff, edit)
    t0 = time.monotonic()
    exc = expect_refusal(ledger, SUITE, "manifest with a 1 GiB chunk",
                         lambda: apply_diff(kit.base, diff, tmp_path / "out", threads=4, progress=False),
                         must_name=("at most", "model.layers.0.mlp.up_proj.weight"))
    assert isinstance(exc, OrcaDiffError) and time.monotonic() - t0 < 10
    assert not (tmp_path / "out").exists() and not staging_dir(tmp_path / "out").exists()


# --------------------------------------------------------------------------- linear time in files


def test_the_finished_files_log_is_appended_never_rewritten(kit: Kit, ledger, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Rewriting the whole record after each file made apply quadratic in the file count
    (2k/8k/16k files: 11/42/134 s). The log keeps one inode and grows by one line per file."""
    out = tmp_path / "out"
    log = staging_dir(out) / STATE_NAME
    seen: list[tuple[int, int]] = []
    real = apply_mod._write_all

    def watching(sf, data):
        if log.exists():
            st = log.stat()
            seen.append((st.st_ino, st.st_size))
        real(sf, data)

    monkeypatch.setattr(apply_mod, "_write_all", watching)
    apply_diff(kit.base, kit.diff, out, threads=1, progress=False)
    kit.assert_identical(out)
    assert len({ino for ino, _ in seen}) == 1, "the finished-files record was replaced while applying"
    sizes = [s for _, s in seen]
    assert sizes == sorted(sizes) and sizes[-1] < 200 * len(kit.target_files) + 200
    ledger.record(SUITE, "finished-files log append-only", "recovered")


def test_apply_time_per_file_does_not_grow_with_the_file_count(tmp_path: Path, ledger) -> None:
    """Cost of recording finished files: the log's writes for n files are O(n) bytes in total."""
    from orca_diff.apply import _State

    def record_cost(n: int) -> int:
        staging = tmp_path / f"s{n}"
        staging.mkdir()
        state = _State(staging, "m")
        state.open(False)
        st = os.stat(staging)
        written = 0
        for i in range(n):
            before = (staging / STATE_NAME).stat().st_size
            state.record(f"file-{i:06d}.json", st)
            written += (staging / STATE_NAME).stat().st_size - before
        state.close()
        return written

    small, large = record_cost(500), record_cost(4000)
    assert large < 9 * small  # linear (8x the files), not quadratic (64x)
    ledger.record(SUITE, "state log cost linear in files", "recovered")

