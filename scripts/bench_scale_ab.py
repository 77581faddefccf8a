#!/usr/bin/env python
"""Cold-cache apply A/B at scale: this tree (with or without readahead/early writeback) against
another checkout, alternating, each run in a fresh process after ``drop_caches`` (root).

    python scripts/bench_scale_ab.py BASE DIFF OUT both,main,nora+nowb REPEATS [--main /work/main]

Variants: ``both`` (this tree as is), ``nora`` (no ``posix_fadvise`` readahead), ``nowb`` (no
early writeback), ``nora+nowb``, ``main`` (the code at --main). Prints one JSON line per run:
wall s, CPU s, GB read from disk, the code that ran. Used for docs/performance.md §6.
"""
import json, os, subprocess, sys, time, shutil
from pathlib import Path
ROOT = Path(__file__).resolve().parent.parent
args = sys.argv[1:]
MAIN = "/work/main"
if "--main" in args:
    i = args.index("--main")
    MAIN = args[i + 1]
    del args[i:i + 2]
base, diff, out = Path(args[0]), Path(args[1]), Path(args[2])
variants, reps = args[3].split(","), int(args[4])
code = r'''
import sys, time, json, resource
v = sys.argv[1]
import orca_diff.apply as A
if v != "main":
    import orca_diff.prefetch as P
    if "nowb" in v: P.EarlyWriteback._fn = None
    if "nora" in v: P._WILLNEED = None
t = time.perf_counter(); A.apply_diff(sys.argv[2], sys.argv[3], sys.argv[4], progress=False)
io = dict(l.split(": ") for l in open("/proc/self/io").read().splitlines())
ru = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"s": round(time.perf_counter() - t, 1), "cpu": round(ru.ru_utime + ru.ru_stime, 1), "read": round(int(io["read_bytes"]) / 1e9, 2), "code": A.__file__}))
'''
for r in range(reps):
    for v in variants:
        shutil.rmtree(out, ignore_errors=True)
        subprocess.run(["sync"]); Path("/proc/sys/vm/drop_caches").write_text("3\n")
        pp = MAIN if v == "main" else str(ROOT)
        p = subprocess.run([sys.executable, "-c", code, v, str(base), str(diff), str(out)], cwd="/tmp",
                           capture_output=True, text=True, env={**os.environ, "PYTHONPATH": pp})
        d = json.loads(p.stdout.strip().splitlines()[-1]) if p.returncode == 0 else {"err": p.stderr[-500:]}
        print(time.strftime("%H:%M:%S"), v, d, open("/proc/loadavg").read().split()[:3], flush=True)
shutil.rmtree(out, ignore_errors=True)
