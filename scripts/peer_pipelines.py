#!/usr/bin/env python
"""Whole pipelines side by side: orca-diff make/apply against ZipNN's delta mode and
``zstd --patch-from``, on the same pair, cores and warm page cache, each run in a fresh process.

A codec table (scripts/bench.py) compares coders on chunks in memory; users run commands. This
times what a command does end to end, for every tool the same way: read the input files,
encode or decode, write the output files and fsync them. orca-diff's times include its checks
(make: sha256 of every file, BLAKE3 of every tensor, base and target; apply: base pre-check,
measured BLAKE3 of every tensor and sha256 of every file); the peers check nothing. Each child
reports its import time apart from its work (ZipNN imports torch): ``seconds`` is the work,
``import_s`` the tool's own imports (the interpreter's start is common to all and left out).
Before every timed run the memory its output will go to is primed (:func:`prime_free_pages`).

Peers, when installed (a missing one is skipped with the reason):

* ZipNN 0.5.4 delta mode (``delta_compressed_type="byte"``, Huffman, ``threads=0``: its own
  default, all cores): needs base and target weight files of equal length, one float dtype each;
* ``zstd -3 --long=W -T0 --patch-from=BASE`` and ``zstd -d --long=W --patch-from=BASE`` per
  weight file (shards paired by position), W covering the larger file.

Usage: ``python scripts/peer_pipelines.py BASE TARGET [--work DIR] [--repeats N]`` (scripts/bench.py
calls :func:`run` for each pair it compares).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ZIPNN_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}


def weight_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def _fsync_all(folder: Path) -> None:
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _zstd_window(base_dir: Path, target_dir: Path) -> int:
    largest = max(p.stat().st_size for p in weight_files(base_dir) + weight_files(target_dir))
    return min(max(largest.bit_length(), 10), 31)


def _safetensors_dtype(path: Path) -> str | None:
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    kinds = {v["dtype"] for k, v in header.items() if k != "__metadata__"}
    return ZIPNN_DTYPES.get(next(iter(kinds))) if len(kinds) == 1 else None


def zipnn_skip_reason(base_dir: Path, target_dir: Path) -> str | None:
    """Why ZipNN's delta mode cannot run on this pair, or None."""
    try:
        import importlib.util
        if importlib.util.find_spec("zipnn") is None:
            return "zipnn is not installed (pip install --no-deps zipnn, after the pinned torch)"
    except ValueError:
        return "zipnn is not importable"
    bs, ts = weight_files(base_dir), weight_files(target_dir)
    if len(bs) != len(ts):
        return f"{len(bs)} base vs {len(ts)} target weight files"
    for b, t in zip(bs, ts):
        if b.stat().st_size != t.stat().st_size:
            return f"{t.name}: base and target files differ in length (its delta mode needs equal lengths)"
        if _safetensors_dtype(t) is None:
            return f"{t.name}: more than one dtype, or one ZipNN does not take"
    return None


# --------------------------------------------------------------------------- child processes


def _child(op: str, base: Path, src: Path, out: Path) -> dict:
    """One timed operation: ``src`` is the target folder (``*-make``) or the diff (``*-apply``)."""
    t0 = time.perf_counter()
    if op.startswith("orca"):
        import orca_diff.cli  # noqa: F401  (what the orca-diff command loads first: its numpy settings)
        from orca_diff.apply import apply_diff
        from orca_diff.make import make_diff
    elif op.startswith("zipnn"):
        from zipnn import ZipNN
    t1 = time.perf_counter()
    if op == "orca-make":
        make_diff(base, src, out, force=True, progress=False)
    elif op == "orca-apply":
        apply_diff(base, src, out, force=True, progress=False)
    elif op in ("zipnn-make", "zipnn-apply"):
        out.mkdir(parents=True)
        for i, b in enumerate(weight_files(base)):
            t = weight_files(src)[i] if op == "zipnn-make" else src / f"{i:05d}.znn"
            name = f"{i:05d}.safetensors"
            dt = _safetensors_dtype(b)
            z = ZipNN(input_format="byte", bytearray_dtype=dt, method="HUFFMAN", delta_compressed_type="byte",
                      threads=0)
            data, ref = bytearray(t.read_bytes()), bytearray(b.read_bytes())
            if op == "zipnn-make":
                res = z.compress(data, delta_second_data=ref)
                (out / f"{i:05d}.znn").write_bytes(res)
            else:
                (out / name).write_bytes(z.decompress(bytes(data), delta_second_data=ref))
        _fsync_all(out)
    elif op in ("zstd-make", "zstd-apply"):
        out.mkdir(parents=True)
        w = _zstd_window(base, src) if op == "zstd-make" else int((src / "window").read_text())
        for i, b in enumerate(weight_files(base)):
            if op == "zstd-make":
                t = weight_files(src)[i]
                cmd = ["zstd", "-q", "-f", "-3", f"--long={w}", f"-T{len(os.sched_getaffinity(0))}",
                       f"--patch-from={b}", str(t), "-o", str(out / f"{i:05d}.zst")]
            else:
                cmd = ["zstd", "-q", "-f", "-d", f"--long={w}", f"--patch-from={b}", str(src / f"{i:05d}.zst"),
                       "-o", str(out / f"{i:05d}.safetensors")]
            subprocess.run(cmd, check=True)
        if op == "zstd-make":
            (out / "window").write_text(str(w))
        _fsync_all(out)
    else:
        raise SystemExit(f"unknown op {op}")
    t2 = time.perf_counter()
    # zstd runs as a child process of this one: its peak is its own
    child_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    return {"import_s": t1 - t0, "seconds": t2 - t1, "maxrss_bytes": max(peak_rss(), child_rss)}


def peak_rss() -> int:
    """This process's peak resident set (VmHWM). Not ru_maxrss: Linux carries that over from the
    parent across fork+exec, so a child would report the benchmark's own peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def prime_free_pages(folder: Path, nbytes: int) -> None:
    """Write ``nbytes`` to a scratch file, fsync it, delete it: the memory the next command writes
    its output into has then been touched before. On this VM a write into never-touched guest
    memory runs at about half speed (2.2 GB: 5.4 s against 3.6 s right after a 2.2 GB file was
    deleted), so without this the order of the runs decided the winner. Every timed run, of
    every tool and of the pure-I/O baseline, is primed the same way."""
    folder.mkdir(parents=True, exist_ok=True)
    scratch = folder / ".prime"
    block = bytes(16 << 20)
    fd = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        left = nbytes
        while left > 0:
            left -= os.write(fd, block[: min(left, len(block))])
        os.fsync(fd)
    finally:
        os.close(fd)
        scratch.unlink()


def _run_child(op: str, base: Path, src: Path, out: Path, prime: int = 0) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    if prime:
        prime_free_pages(out.parent, prime)
    proc = subprocess.run([sys.executable, __file__, "_child", op, str(base), str(src), str(out)],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if proc.returncode:
        raise SystemExit(f"{op} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _sha_files(files: list[Path]) -> list[str]:
    return [hashlib.sha256(p.read_bytes()).hexdigest() for p in files]


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and p.name != "window")


def run(base_dir: Path, target_dir: Path, work: Path, repeats: int = 3) -> dict:
    """{tool: {make_s, make_import_s, apply_s, apply_import_s, make_rss, apply_rss, bytes} or
    {skipped: reason}}: best of ``repeats`` per operation; every tool's rebuild is checked
    against the target's weight files once."""
    work.mkdir(parents=True, exist_ok=True)
    target_sha = _sha_files(weight_files(target_dir))
    prime = sum(p.stat().st_size for p in target_dir.rglob("*") if p.is_file())  # the largest output
    tools = {"orca-diff": None, "ZipNN delta": zipnn_skip_reason(base_dir, target_dir),
             "zstd -3 --patch-from": None if shutil.which("zstd") else "the zstd program is not installed"}
    prefix = {"orca-diff": "orca", "ZipNN delta": "zipnn", "zstd -3 --patch-from": "zstd"}
    res: dict[str, dict] = {}
    for tool, skip in tools.items():
        if skip:
            res[tool] = {"skipped": skip}
            continue
        diff, out = work / f"{prefix[tool]}-diff", work / f"{prefix[tool]}-out"
        makes, applies = [], []
        for r in range(repeats):
            makes.append(_run_child(f"{prefix[tool]}-make", base_dir, target_dir, diff, prime))
            applies.append(_run_child(f"{prefix[tool]}-apply", base_dir, diff, out, prime))
            if r == 0:
                rebuilt = weight_files(out)
                if _sha_files(rebuilt) != target_sha:
                    raise SystemExit(f"{tool}: the rebuilt weight files differ from {target_dir}")
            shutil.rmtree(out)
        best_make = min(makes, key=lambda x: x["seconds"])
        best_apply = min(applies, key=lambda x: x["seconds"])
        res[tool] = {"make_s": best_make["seconds"], "make_import_s": min(x["import_s"] for x in makes),
                     "apply_s": best_apply["seconds"], "apply_import_s": min(x["import_s"] for x in applies),
                     "make_rss": max(x["maxrss_bytes"] for x in makes),
                     "apply_rss": max(x["maxrss_bytes"] for x in applies),
                     "bytes": _folder_bytes(diff),
                     "make_runs": [x["seconds"] for x in makes], "apply_runs": [x["seconds"] for x in applies]}
        shutil.rmtree(diff)
    return res


def hash_speeds(mb: int = 256) -> dict:
    """Single-thread GB/s of sha256 (hashlib) and BLAKE3 on one buffer, for the compute floor."""
    import blake3

    buf = os.urandom(1 << 20) * mb
    out = {}
    for name, fn in (("sha256", lambda: hashlib.sha256(buf).digest()),
                     ("blake3", lambda: blake3.blake3(buf, max_threads=1).digest())):
        best = min(_timed(fn) for _ in range(3))
        out[name] = len(buf) / 1e9 / best
    return out


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def print_table(res: dict, target_bytes: int) -> None:
    """The side-by-side table, ratios against orca-diff."""
    o = res.get("orca-diff", {})
    print(f"   whole pipelines, fresh processes, best of the repeats, warm cache, {len(os.sched_getaffinity(0))} cores "
          "(work s; the tool's imports apart):")
    print(f"   {'tool':<22} {'diff %':>7} {'make s':>7} {'+import':>8} {'apply s':>8} {'+import':>8} "
          f"{'make RSS':>9} {'apply RSS':>10}  peer/orca-diff (apply, apply+import, make)")
    for tool, r in res.items():
        if "skipped" in r:
            print(f"   {tool:<22} skipped: {r['skipped']}")
            continue
        ratios = ""
        if tool != "orca-diff" and o and "skipped" not in o:
            ratios = (f"{r['apply_s'] / o['apply_s']:.2f}x, "
                      f"{(r['apply_s'] + r['apply_import_s']) / (o['apply_s'] + o['apply_import_s']):.2f}x, "
                      f"{r['make_s'] / o['make_s']:.2f}x")
        print(f"   {tool:<22} {100 * r['bytes'] / target_bytes:6.2f}% {r['make_s']:7.2f} {r['make_import_s']:8.2f} "
              f"{r['apply_s']:8.2f} {r['apply_import_s']:8.2f} {r['make_rss'] / 2**20:8.0f}M {r['apply_rss'] / 2**20:9.0f}M  "
              f"{ratios}")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        op, base, src, out = sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4]), Path(sys.argv[5])
        print(json.dumps(_child(op, base, src, out)))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("base", type=Path)
    ap.add_argument("target", type=Path)
    ap.add_argument("--work", type=Path, default=Path("bench-work/pipelines"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    res = run(args.base, args.target, args.work, args.repeats)
    print_table(res, sum(p.stat().st_size for p in weight_files(args.target)))
    if args.json:
        args.json.write_text(json.dumps({"argv": sys.argv, "pipelines": res}, indent=1) + "\n")


if __name__ == "__main__":
    main()
