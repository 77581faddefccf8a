#!/usr/bin/env python
"""apply at the size users have: a 7B-shaped pair (13.5 GB a side) and real small pairs, with the
page cache warm, cold, and held below the base's size, against the I/O floor and today's code.

For each pair and cache state this times, each in a fresh process:

* ``floor``: read every file of the base and the diff once, write the output's bytes once, fsync
  (what any rebuild must at least do);
* ``apply``: ``orca-diff apply`` of this checkout (the base read once: sampled check, then full
  digests measured from the bytes the predictions read);
* ``apply@main``: the same command with another checkout's code (``--main DIR``, default
  /work/main: the base hashed in full, then read again for the predictions);

and reports wall seconds, ratios to the floor, peak RSS (VmHWM of the child) and disk used.
Cache states: ``warm`` (inputs read once before the timed run), ``cold`` (``sync; echo 3 >
/proc/sys/vm/drop_caches`` before it: needs root) and ``limited`` (cold, and the child runs in a
cgroup-v1 memory cgroup whose limit, ``--limit``, is below the base's size: its page cache
cannot hold the base, as on a machine with less memory than the model).

The synthetic pair is written streaming, a block at a time (memory: two 32 MiB pools and one
16 MiB block): base and target blocks are slices, at a random offset, of one realistic
(base, fine-tune) pair of 16 Mi F16 elements made by ``orca_diff.synth`` (N(0, 0.02) weights, an
AdamW-like walk; 30 % of elements unchanged in F16), so every chunk codes like the synthetic
fine-tunes of docs/performance.md. The target is deleted after ``make`` (apply checks what it
writes against the manifest's sha256), outputs after each run::

    python scripts/bench_scale.py --size 13.5 --work /tmp/scale            # 7B shape, 13.5 GB a side
    python scripts/bench_scale.py --size 1.7 --work /tmp/scale             # 1/8 of it (fewer layers)
    python scripts/bench_scale.py --pair /tmp/smollm2/bf16/base /tmp/smollm2/bf16/target --work /tmp/scale

``--near-identical F`` makes the target the base with ``F`` of its elements (chosen uniformly)
moved by +-1..2 ulps in value order, everything else identical (issue 23's near-identical
checkpoint at 7B size; ``scripts/real_pair.py --near-identical`` does the same to a real model),
diffs it with ``--share-identical-files`` and prints what the whole diff folder weighs::

    python scripts/bench_scale.py --size 13.5 --near-identical 0.001 --states "" --work /tmp/near

Machine load matters (a shared VM): ``uptime`` is printed before and after each pair.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if sys.argv[1:2] != ["_child"]:  # a timed child imports orca_diff from its PYTHONPATH only (this checkout or --main)
    sys.path.insert(0, str(ROOT))

BLOCK = 16 << 20
POOL_ELEMS = 16 << 20
CGROUP = Path("/sys/fs/cgroup/memory/orca-bench-scale")


# --------------------------------------------------------------------------- the synthetic pair


def _pools() -> tuple[np.ndarray, np.ndarray]:
    """(base, target) F16 bit patterns of one realistic pair of POOL_ELEMS elements."""
    from orca_diff.bits import cast_bits, float_to_bits
    from orca_diff.synth import FineTune, finetune_weights

    rng = np.random.default_rng(0)
    w = 0.02 * rng.standard_normal(POOL_ELEMS, dtype=np.float32)
    t = finetune_weights("pool", w, FineTune())
    as16 = lambda x: cast_bits(float_to_bits(x, "F32"), "F32", "F16").view(np.uint16)  # noqa: E731
    return as16(w), as16(t)


def _header(tensors: list[tuple[str, tuple[int, ...]]]) -> bytes:
    doc: dict = {"__metadata__": {"format": "pt"}}
    off = 0
    for name, shape in tensors:
        n = int(np.prod(shape)) * 2
        doc[name] = {"dtype": "F16", "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(doc, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def move_some(block: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """A copy of F16 bit patterns with ``fraction`` of them (uniformly chosen) moved by +-1 or +-2
    ulps in value order (a step across zero lands on the other side's values)."""
    k = np.flatnonzero(rng.random(block.size, dtype=np.float32) < fraction)
    step = rng.choice(np.array([-2, -1, 1, 2]), k.size)
    signed = block[k].view(np.int16).astype(np.int64)
    order = np.where(signed < 0, -(signed & 0x7FFF), signed) + step
    out = block.copy()
    out[k] = np.where(order < 0, (-order) | 0x8000, order).astype(np.uint16)
    return out


def write_pair(base: Path, target: Path, shape, shard_bytes: int, near_identical: float | None = None) -> None:
    """Write base and target (F16 safetensors shards + index + config/tokenizer files), streaming;
    with ``near_identical`` the target is the base with that fraction of elements moved."""
    from orca_diff.synth import _write_common_files

    pool_b, pool_t = _pools()
    move_rng = np.random.default_rng(2)
    rng = np.random.default_rng(1)
    shapes = list(shape.tensor_shapes().items())
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shp in shapes:
        n = int(np.prod(shp)) * 2
        if shards[-1] and size + n > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shp))
        size += n
    total = sum(int(np.prod(s)) * 2 for _, s in shapes)
    for folder in (base, target):
        folder.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        head = _header(shard)
        with open(base / fname, "wb") as fb, open(target / fname, "wb") as ft:
            fb.write(head)
            ft.write(head)
            for name, shp in shard:
                weight_map[name] = fname
                left = int(np.prod(shp))
                while left:
                    n = min(left, BLOCK // 2)
                    at = int(rng.integers(0, POOL_ELEMS - n + 1))
                    fb.write(pool_b[at:at + n].tobytes())
                    if near_identical is None:
                        ft.write(pool_t[at:at + n].tobytes())
                    else:
                        ft.write(move_some(pool_b[at:at + n], near_identical, move_rng).tobytes())
                    left -= n
    for folder in (base, target):
        (folder / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2, sort_keys=True) + "\n")
        _write_common_files(folder, shape, "F16", shape.vocab_size, None)


def shape_of_size(gb: float):
    """LLaMA-7B's widths with as many layers as make about ``gb`` GB in F16 (32 layers: 13.5 GB)."""
    from orca_diff.synth import LLAMA_7B, LlamaShape

    per_layer = (4 * 4096 * 4096 + 3 * 4096 * 11008 + 2 * 4096) * 2
    fixed = 2 * 32000 * 4096 * 2 + 4096 * 2
    layers = max(1, round((gb * 1e9 - fixed) / per_layer))
    return LlamaShape(32000, 4096, 11008, layers, 32, 32) if layers != 32 else LLAMA_7B


# --------------------------------------------------------------------------- timed children


def _child(argv: list[str]) -> None:
    """One timed operation in this (fresh) process: prints {"seconds", "rss"} as JSON."""
    op = argv[0]
    t0 = time.perf_counter()
    if op == "apply":
        from orca_diff.apply import apply_diff

        apply_diff(argv[1], argv[2], argv[3], progress=False)
    elif op == "make":
        from orca_diff.make import make_diff

        make_diff(argv[1], argv[2], argv[3], progress=False, share_identical_files=argv[4:5] == ["share"])
    elif op == "floor":  # read the inputs once, write `sizes` bytes, fsync each file
        inputs, out, sizes = argv[1].split(os.pathsep), Path(argv[2]), json.loads(argv[3])
        buf = bytearray(BLOCK)
        for folder in inputs:
            for p in sorted(Path(folder).rglob("*")):
                if p.is_file():
                    with open(p, "rb", buffering=0) as f:
                        while f.readinto(buf):
                            pass
        out.mkdir(parents=True, exist_ok=True)
        data = memoryview(np.random.default_rng(0).bytes(BLOCK))
        for i, size in enumerate(sizes):
            fd = os.open(out / f"f{i}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            left = size
            while left:
                left -= os.write(fd, data[:min(left, BLOCK)])
            os.fsync(fd)
            os.close(fd)
    else:
        raise SystemExit(f"unknown op {op}")
    seconds = time.perf_counter() - t0
    io = dict(ln.split(": ") for ln in Path("/proc/self/io").read_text().splitlines())
    ru = resource.getrusage(resource.RUSAGE_SELF)
    rss = next(int(ln.split()[1]) * 1024 for ln in Path("/proc/self/status").read_text().splitlines()
               if ln.startswith("VmHWM:"))
    import orca_diff

    print(json.dumps({"code": str(Path(orca_diff.__file__).resolve().parent.parent), "seconds": seconds, "rss": rss,
                      "cpu": ru.ru_utime + ru.ru_stime,
                      "disk_read": int(io["read_bytes"]), "disk_written": int(io["write_bytes"])}))


def drop_caches() -> None:
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def read_all(*folders: Path) -> None:
    buf = bytearray(BLOCK)
    for folder in folders:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                with open(p, "rb", buffering=0) as f:
                    while f.readinto(buf):
                        pass


def run_child(args: list[str], code: Path, cgroup: Path | None = None) -> dict:
    """Run ``_child args`` with ``code`` first on PYTHONPATH, inside ``cgroup`` when given."""
    cmd = [sys.executable, __file__, "_child", *args]
    if cgroup is not None:  # join the cgroup before exec: every page the child reads is charged to it
        cmd = ["sh", "-c", f'echo $$ > {cgroup}/cgroup.procs && exec "$@"', "sh", *cmd]
    env = {**os.environ, "PYTHONPATH": str(code), "ORCA_DIFF_DISABLE_PROGRESS_BARS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        raise SystemExit(f"child {args[0]} ({code}) failed:\n{proc.stderr[-3000:]}")
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    if Path(r.pop("code")) != code.resolve():
        raise SystemExit(f"child {args[0]} ran the wrong code (asked for {code})")
    return r


def make_cgroup(limit: int) -> Path:
    CGROUP.mkdir(exist_ok=True)
    (CGROUP / "memory.limit_in_bytes").write_text(f"{limit}\n")
    return CGROUP


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def print_folder_sizes(diff: Path) -> None:
    """Every file of the diff folder as a % of the model's weight bytes (the whole-diff figure)."""
    from orca_diff.format import load_manifest

    m = load_manifest(diff)
    weights = sum(f.size for f in m.files if f.path.endswith(".safetensors"))
    files = sorted(p for p in diff.rglob("*") if p.is_file())
    total = sum(p.stat().st_size for p in files)
    for p in files:
        print(f"  {p.name:28s} {p.stat().st_size:>14,d} B  {100 * p.stat().st_size / weights:8.4f} %")
    print(f"  {'whole diff folder':28s} {total:>14,d} B  {100 * total / weights:8.4f} % of {weights:,d} B of weights",
          flush=True)


def uptime() -> str:
    return Path("/proc/loadavg").read_text().split(" ", 3)[:3].__str__()


def bench_states(base: Path, diff: Path, out: Path, states: list[str], limit: int, main: Path | None,
                 repeats: int, stop_at: float | None = None) -> dict:
    """{state: {floor, apply, apply@main: {"seconds": best, "rss": max}}}."""
    from orca_diff.format import load_manifest

    sizes = [f.size for f in load_manifest(diff).files]
    codes = [("apply", ROOT)] + ([("apply@main", main)] if main else [])
    res: dict = {}
    for state in states:
        cg = make_cgroup(limit) if state == "limited" else None
        row: dict = {}
        for _ in range(repeats):
            for label, code in [("floor", ROOT), *codes]:
                if stop_at is not None and time.time() > stop_at:
                    print(f"  {state:8s} {label:11s} skipped: past --stop-at", flush=True)
                    continue
                shutil.rmtree(out, ignore_errors=True)
                if state == "warm":
                    read_all(base, diff)
                else:
                    drop_caches()
                args = (["floor", os.pathsep.join([str(base), str(diff)]), str(out), json.dumps(sizes)]
                        if label == "floor" else ["apply", str(base), str(diff), str(out)])
                r = run_child(args, code, cg)
                if label != "floor":
                    r["disk_out"] = folder_bytes(out)
                prev = row.get(label)
                row[label] = r if prev is None or r["seconds"] < prev["seconds"] else {**prev, "rss": max(prev["rss"], r["rss"])}
                print(f"  {state:8s} {label:11s} {r['seconds']:7.2f} s  cpu {r['cpu']:6.1f} s  read from disk "
                      f"{r['disk_read'] / 1e9:6.2f} GB  rss {r['rss'] / 2**20:5.0f} MiB  load {uptime()}", flush=True)
                shutil.rmtree(out, ignore_errors=True)
        if "floor" in row and "apply" in row:
            res[state] = row
    return res


def print_table(name: str, res: dict, sizes: dict) -> None:
    print(f"\n### {name}: base {sizes['base'] / 1e9:.2f} GB, diff {sizes['diff'] / 1e9:.2f} GB, "
          f"output {sizes['out'] / 1e9:.2f} GB")
    print("| cache | I/O floor s | apply s | × floor | apply@main s | × floor | main / apply | read from disk GB: "
          "floor / apply / main | CPU s: apply / main | peak RSS MiB: apply / main |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for state, row in res.items():
        fl, a, m = row["floor"], row["apply"], row.get("apply@main") or {}
        f = fl["seconds"]
        mm = (f"{m['seconds']:.2f} | {m['seconds'] / f:.2f} | {m['seconds'] / a['seconds']:.2f}" if m else "- | - | -")
        gb = lambda r: f"{r['disk_read'] / 1e9:.2f}" if r else "-"  # noqa: E731
        print(f"| {state} | {f:.2f} | {a['seconds']:.2f} | {a['seconds'] / f:.2f} | {mm} | {gb(fl)} / {gb(a)} / {gb(m)} | "
              f"{a['cpu']:.1f} / {m.get('cpu', 0):.1f} | {a['rss'] / 2**20:.0f} / {m.get('rss', 0) / 2**20:.0f} |")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        _child(sys.argv[2:])
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=float, help="synthetic 7B-shaped pair of about this many GB a side")
    ap.add_argument("--pair", nargs=2, type=Path, metavar=("BASE", "TARGET"), help="an existing pair instead")
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--states", default="warm,cold,limited")
    ap.add_argument("--limit", type=float, default=0.3, help="cgroup memory limit as a fraction of the base (limited)")
    ap.add_argument("--main", default="/work/main", help="today's code (empty: skip)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--shard-gb", type=float, default=4.0)
    ap.add_argument("--keep", action="store_true", help="keep the generated base and diff")
    ap.add_argument("--stop-at", help="UTC HH:MM after which no timed run starts (a shared machine's deadline)")
    ap.add_argument("--near-identical", type=float, metavar="F",
                    help="target = the base with F of its elements moved 1-2 ulps (synthetic pair only)")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    print(f"load before: {uptime()}", flush=True)
    made_here = False
    if a.pair:
        base, target = a.pair
        name = f"{base.parent.name}/{base.name}"
    else:
        shape = shape_of_size(a.size)
        base, target = a.work / "base", a.work / "target"
        name = f"7B-shaped F16, {shape.num_hidden_layers} layers"
        if a.near_identical is not None:
            name += f", {a.near_identical:.2%} of elements moved"
        if not (base / "config.json").exists() or not (target / "config.json").exists():
            t0 = time.perf_counter()
            write_pair(base, target, shape, int(a.shard_gb * 1e9), a.near_identical)
            print(f"pair written in {time.perf_counter() - t0:.0f} s ({folder_bytes(base) / 1e9:.2f} GB a side)", flush=True)
        made_here = True
    diff, out = a.work / "diff", a.work / "out"
    if not (diff / "orca-diff.json").exists():
        shutil.rmtree(diff, ignore_errors=True)
        r = run_child(["make", str(base), str(target), str(diff), *(["share"] if a.near_identical is not None else [])],
                      ROOT)
        print(f"make: {r['seconds']:.1f} s, rss {r['rss'] / 2**20:.0f} MiB, diff {folder_bytes(diff) / 1e9:.2f} GB", flush=True)
    if a.near_identical is not None:
        print_folder_sizes(diff)
    sizes = {"base": folder_bytes(base), "diff": folder_bytes(diff), "out": folder_bytes(target) if target.exists() else 0}
    if made_here and not a.keep:
        shutil.rmtree(target)  # not needed by apply: it checks every file against the manifest's sha256
    if not sizes["out"]:
        from orca_diff.format import load_manifest

        sizes["out"] = load_manifest(diff).target_bytes
    limit = max(int(a.limit * sizes["base"]), 1 << 30)  # apply's own working set is ≤ 1 GiB
    states = [s for s in a.states.split(",") if s]
    if "limited" in states and limit >= sizes["base"]:
        print(f"limited: skipped (a {limit / 2**30:.1f} GiB cgroup would hold this base whole)", flush=True)
        states.remove("limited")
    print(f"states {states}; limited = cgroup v1 memory limit {limit / 2**30:.2f} GiB", flush=True)
    stop_at = None
    if a.stop_at:
        import datetime as dt

        now = dt.datetime.now(dt.timezone.utc)
        hh, mm = map(int, a.stop_at.split(":"))
        stop_at = now.replace(hour=hh, minute=mm, second=0, microsecond=0).timestamp()
    res = bench_states(base, diff, out, states, limit, Path(a.main) if a.main else None, a.repeats, stop_at)
    print(f"load after: {uptime()}")
    print_table(name, res, sizes)
    print(json.dumps({"pair": name, "sizes": sizes, "results": res}))
    if made_here and not a.keep:
        shutil.rmtree(base)
        shutil.rmtree(diff)


if __name__ == "__main__":
    main()
