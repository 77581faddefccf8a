#!/usr/bin/env python
"""Apply from the Hub over a throttled link: streamed apply against the download alone and
against download-then-apply (today's path before streaming, kept as ``apply --keep-diff``).

One run, on one synthetic LLaMA-shaped pair, from the local test Hub (tests/hubserver.py on
127.0.0.1, served from this process) throttled to ``--mbps`` MB/s (a token bucket shared by every
connection: one link), with the real huggingface_hub client in each command:

* ``download``: ``orca-diff download DIFF`` into an empty HF cache (what apply needs: the
  manifest and every payload byte), and the client's own ``snapshot_download`` of the same files;
* ``streamed``: ``orca-diff apply --diff DIFF --base LOCAL --out X`` into an empty cache;
* ``sequential``: ``orca-diff apply --keep-diff ...`` (download into the cache, then apply);
* the same three with stalls injected: ``--stalls`` payload files stall mid-body once (the
  server then sends nothing until the stall timeout, ``--stall-timeout`` s, makes the client retry);
* ``--base-from-hub``: also ``apply --diff DIFF --base ORG/BASE`` with the base not cached (the
  base downloads into the HF cache while the rebuild reads it, hub/basestream.py), against the
  download of both (``orca-diff download`` of each, and the client's ``snapshot_download`` of the
  same files in one process), against the link floor (bytes ÷ bandwidth), and against
  download-then-apply: this tree with ``ORCA_DIFF_BASE_STREAM=0`` (the base fetched whole first,
  then the diff streamed, as before) and, with ``--main DIR``, that checkout's code (run with
  ``PYTHONDONTWRITEBYTECODE=1``, nothing written there). With ``--stalls N`` the base's first
  weight file also stalls mid-body N times (only GETs of ≥ 1 MiB count, so the header reads of
  the streamed path do not absorb the stalls).

Each command runs in a fresh subprocess with its own HF cache; it reports its wall time, its
peak RSS (VmHWM, read by the child itself at exit) and the bytes left on disk (HF cache and
output). Ratios to the download alone are printed. The machine may be shared: read the numbers
with the load in mind (``--repeats`` takes the best of N).

Example (about 330 MB of bf16 weights, a link of 50 MB/s, a few minutes)::

    python scripts/bench_network.py --layers 8 --mbps 50 --stalls 2 --json /tmp/net.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from hubserver import FakeHub  # noqa: E402

from orca_diff.format import load_manifest  # noqa: E402
from orca_diff.make import make_diff  # noqa: E402
from orca_diff.synth import FineTune, LlamaShape, write_finetune, write_llama  # noqa: E402

BASE_REPO, DIFF_REPO = "bench/base", "bench/diff"

#: Runs a command of the CLI and writes its own peak RSS to a file at exit (ru_maxrss would be
#: inherited from this parent across fork+exec).
CHILD = r"""
import atexit, sys
from pathlib import Path
rss_file, mode, *args = sys.argv[1:]
def _rss():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            Path(rss_file).write_text(str(int(line.split()[1]) * 1024))
atexit.register(_rss)
sys.argv = ["orca-diff", *args]
if mode == "hf":
    import huggingface_hub as h
    h.snapshot_download(args[0], allow_patterns=args[1:])
elif mode == "hfmulti":  # several repos, one after the other, in one process: [[repo, [patterns]], ...]
    import json
    import huggingface_hub as h
    for repo, patterns in json.loads(args[0]):
        h.snapshot_download(repo, allow_patterns=patterns)
else:
    from orca_diff.cli import cli
    cli.main(args=args, prog_name="orca-diff")
"""


#: CPUs each measured command is pinned to (``--taskset``; empty: all): a machine whose CPU is busy.
TASKSET = ""


def du(path: Path) -> int:
    if not path.exists():
        return 0
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def run(label: str, work: Path, hub: FakeHub, args: list[str], *, mode: str = "cli", stall: float,
        check: Path | None = None, extra_env: dict | None = None, root: Path = ROOT) -> dict:
    home = work / f"hf-{label}"
    shutil.rmtree(home, ignore_errors=True)
    out = work / f"out-{label}"
    shutil.rmtree(out, ignore_errors=True)
    args = [a.replace("{OUT}", str(out)) for a in args]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "ORCA_DIFF_"))}
    env.update(HF_ENDPOINT=hub.url, HF_HOME=str(home), HF_HUB_DISABLE_XET="1", HF_HUB_DISABLE_TELEMETRY="1",
               HF_HUB_DISABLE_PROGRESS_BARS="1", ORCA_DIFF_STALL_TIMEOUT=str(stall), PYTHONPATH=str(ROOT),
               HF_HUB_DOWNLOAD_TIMEOUT=str(max(1, int(stall))), HF_HUB_ETAG_TIMEOUT=str(max(1, int(stall))))
    env["PYTHONPATH"] = str(root)
    if root != ROOT:
        env["PYTHONDONTWRITEBYTECODE"] = "1"  # another checkout: run it, write nothing into it
    env.update(extra_env or {})
    rss_file = work / f"rss-{label}"
    t = time.perf_counter()
    # cwd: `python -c` puts the working directory first on sys.path, so it picks the checkout that runs
    pin = ["taskset", "-c", TASKSET] if TASKSET else []  # --taskset: the command gets only these CPUs
    p = subprocess.run([*pin, sys.executable, "-c", CHILD, str(rss_file), mode, *args], env=env, capture_output=True,
                       text=True, cwd=str(root))
    wall = time.perf_counter() - t
    if p.returncode != 0:
        raise SystemExit(f"{label}: exit {p.returncode}\n{p.stderr[-2000:]}")
    res = {"label": label, "seconds": wall, "peak_rss": int(rss_file.read_text()), "cache_bytes": du(home),
           "out_bytes": du(out), "notes": [ln.strip() for ln in p.stderr.splitlines() + p.stdout.splitlines()
                                           if "note:" in ln or "retr" in ln][:6]}
    if check is not None:  # never a wrong output: byte-compare with the publisher's files
        for f in sorted(check.iterdir()):
            if f.is_file() and (out / f.name).read_bytes() != f.read_bytes():
                raise SystemExit(f"{label}: {f.name} differs from the target")
        res["exact"] = True
    shutil.rmtree(home, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=8, help="decoder layers (8: ~330 MB of bf16 weights a side)")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--lr", type=float, default=1e-3, help="synthetic fine-tune's learning rate: 1e-3 gives a diff "
                    "of ~45%% of the target, near the ~48%% of real full fine-tunes (the default 2e-5 gives ~14%%)")
    ap.add_argument("--mbps", type=float, default=50.0, help="link bandwidth, MB/s (1e6 bytes)")
    ap.add_argument("--stalls", type=int, default=2, help="requests for the first payload file that stall mid-body")
    ap.add_argument("--stall-timeout", type=float, default=2.0)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--runs", default="hf,download,streamed,sequential",
                    help="which of hf,download,streamed,sequential to run (ratios need hf or download)")
    ap.add_argument("--base-from-hub", action="store_true", help="also apply with --base ORG/NAME, not cached")
    ap.add_argument("--base-only", action="store_true", help="with --base-from-hub: skip the base-local runs")
    ap.add_argument("--main", type=Path, default=None, help="another checkout to time as the old code "
                    "(--base-from-hub runs), e.g. /work/main")
    ap.add_argument("--taskset", default="", help="pin each measured command to these CPUs (taskset -c LIST, "
                    "e.g. 0): apply slower than the link, as on a busy machine; the test Hub is not pinned")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    global TASKSET
    TASKSET = a.taskset

    work = a.workdir or Path(tempfile.mkdtemp(prefix="orca-bench-net-"))
    work.mkdir(parents=True, exist_ok=True)
    shape = LlamaShape(vocab_size=32000, hidden_size=a.hidden, intermediate_size=int(a.hidden * 2.6875) // 8 * 8,
                       num_hidden_layers=a.layers, num_attention_heads=max(1, a.hidden // 128),
                       num_key_value_heads=max(1, a.hidden // 128))
    base, target, diff = work / "base", work / "target", work / "diff"
    try:
        if not diff.exists():
            write_llama(base, shape, "BF16", seed=0, max_shard_bytes=200 << 20)
            write_finetune(target, shape, base_seed=0, dtype="BF16", ft=FineTune(lr=a.lr),
                           max_shard_bytes=200 << 20)
            # payload files of 48 MiB (make's default is 1 GiB): several files, as a 13B diff has
            make_diff(base, target, diff, base_name="bench-base", payload_file_bytes=48 << 20)
        m = load_manifest(diff)
        hub = FakeHub().start()
        hub.add_folder(BASE_REPO, base)
        hub.add_folder(DIFF_REPO, diff)
        rate = a.mbps * 1e6
        target_bytes = sum(f.size for f in m.files)
        print(f"pair: {target_bytes / 1e6:.0f} MB target, diff {m.payload_bytes / 1e6:.0f} MB in {len(m.payloads)} "
              f"payload files; link {a.mbps:g} MB/s; stall timeout {a.stall_timeout:g} s", flush=True)
        payloads = [p.path for p in m.payloads]
        plans = {
            "hf snapshot_download": ([DIFF_REPO, "orca-diff.json", *payloads], "hf"),
            "download": (["download", DIFF_REPO, "-q"], "cli"),
            "streamed apply": (["apply", "--diff", DIFF_REPO, "--base", str(base), "--out", "{OUT}", "-q"], "cli"),
            "sequential apply": (["apply", "--keep-diff", "--diff", DIFF_REPO, "--base", str(base), "--out", "{OUT}",
                                  "-q"], "cli"),
        }
        wanted = set(a.runs.split(",")) if not a.base_only else set()
        plans = {k: v for k, v in plans.items() if k.split()[0] in wanted}  # "hf", "download", ...
        results: dict[str, dict] = {}
        for stalls in ([0, a.stalls] if a.stalls else [0]):
            for name, (args, mode) in plans.items():
                best = None
                for _ in range(a.repeats):
                    hub.clear_failures()
                    hub.bandwidth = rate
                    if stalls:  # the first requests for the first payload file stall mid-body
                        hub.fail_downloads(DIFF_REPO, payloads[0], "stall", then="ok", times=stalls)
                    label = f"{name}{' +stalls' if stalls else ''}"
                    r = run(label.replace(" ", "_").replace("+", ""), work, hub, args, mode=mode,
                            stall=a.stall_timeout, check=target if "apply" in name else None)
                    best = r if best is None or r["seconds"] < best["seconds"] else best
                results[label] = best
                print(f"  {label:28s} {best['seconds']:7.2f} s  peak RSS {best['peak_rss'] / 2**20:6.0f} MiB  "
                      f"cache {best['cache_bytes'] / 1e6:7.1f} MB  out {best['out_bytes'] / 1e6:7.1f} MB", flush=True)
        if a.base_from_hub:
            base_weights = sorted(p.name for p in base.glob("*.safetensors"))
            base_bytes = du(base)
            manifest_bytes = (diff / "orca-diff.json").stat().st_size
            need_bytes = base_bytes + m.payload_bytes + manifest_bytes
            print(f"base on the Hub: {base_bytes / 1e6:.0f} MB in {len(base_weights)} weight files + side files; "
                  f"with the diff {need_bytes / 1e6:.0f} MB to fetch (link floor {need_bytes / rate:.1f} s)", flush=True)
            hub_apply = ["apply", "--diff", DIFF_REPO, "--base", BASE_REPO, "--out", "{OUT}", "-q"]
            base_plans = [
                ("download base+diff (orca-diff)", None, {}, ROOT),
                ("download base+diff (client)", "hf", {}, ROOT),
                ("streamed apply, base on Hub", hub_apply, {}, ROOT),
                ("download base, then apply", hub_apply, {"ORCA_DIFF_BASE_STREAM": "0"}, ROOT),
            ]
            if a.main is not None:
                base_plans.append(("main: apply, base on Hub", hub_apply, {}, a.main.resolve()))
            for stalls in ([0, a.stalls] if a.stalls else [0]):
                for name, args, extra, root in base_plans:
                    best = None
                    label = f"{name}{' +stalls' if stalls else ''}"
                    for _ in range(a.repeats):
                        hub.clear_failures()
                        hub.bandwidth = rate
                        if stalls:  # the first payload file and the first base weight file stall mid-body
                            hub.fail_downloads(DIFF_REPO, payloads[0], "stall", then="ok", times=stalls)
                            hub.fail_downloads(BASE_REPO, base_weights[0], "stall", then="ok", times=stalls,
                                               min_bytes=1 << 20)
                        tag = "".join(c if c.isalnum() else "_" for c in label)
                        if args is None:  # the two downloads, one after the other, as a user would
                            r1 = run(tag + "_b", work, hub, ["download", BASE_REPO, "-q"], stall=a.stall_timeout)
                            r2 = run(tag + "_d", work, hub, ["download", DIFF_REPO, "-q"], stall=a.stall_timeout)
                            r = {"label": label, "seconds": r1["seconds"] + r2["seconds"],
                                 "peak_rss": max(r1["peak_rss"], r2["peak_rss"]),
                                 "cache_bytes": r1["cache_bytes"] + r2["cache_bytes"], "out_bytes": 0}
                        elif args == "hf":
                            spec = json.dumps([[BASE_REPO, ["*"]], [DIFF_REPO, ["orca-diff.json", *payloads]]])
                            r = run(tag, work, hub, [spec], mode="hfmulti", stall=a.stall_timeout)
                        else:
                            r = run(tag, work, hub, args, stall=a.stall_timeout, check=target, extra_env=extra,
                                    root=root)
                        best = r if best is None or r["seconds"] < best["seconds"] else best
                    results[label] = best
                    print(f"  {label:36s} {best['seconds']:7.2f} s  peak RSS {best['peak_rss'] / 2**20:6.0f} MiB  "
                          f"cache {best['cache_bytes'] / 1e6:7.1f} MB  out {best['out_bytes'] / 1e6:7.1f} MB", flush=True)
                    for note in best.get("notes", []):
                        print(f"      {note[:150]}")
        hub.stop()
        print("\nratios (wall time / the faster download of the diff, the client's or orca-diff's, under the same"
              " faults):")
        for stalls in ([0, a.stalls] if a.stalls else [0]):
            sfx = " +stalls" if stalls else ""
            dls = [results[k]["seconds"] for k in (f"download{sfx}", f"hf snapshot_download{sfx}") if k in results]
            if not dls:
                continue
            dl = min(dls)
            link = (m.payload_bytes + (work / "diff" / "orca-diff.json").stat().st_size) / rate
            for name in ("hf snapshot_download", "download", "streamed apply", "sequential apply"):
                if name + sfx not in results:
                    continue
                print(f"  {name + sfx:28s} {results[name + sfx]['seconds'] / dl:5.2f}x   "
                      f"(link floor {link:.2f} s: {results[name + sfx]['seconds'] / link:4.2f}x)")
        if a.base_from_hub:
            print(f"\nbase on the Hub (link floor {need_bytes / rate:.2f} s for {need_bytes / 1e6:.0f} MB):")
            for stalls in ([0, a.stalls] if a.stalls else [0]):
                sfx = " +stalls" if stalls else ""
                dls = [results[k]["seconds"] for k in (f"download base+diff (orca-diff){sfx}",
                                                       f"download base+diff (client){sfx}") if k in results]
                dl = min(dls)
                for name, *_ in base_plans:
                    k = name + sfx
                    if k in results:
                        print(f"  {k:36s} {results[k]['seconds']:7.2f} s  {results[k]['seconds'] / dl:5.2f}x the "
                              f"faster download  {results[k]['seconds'] * rate / need_bytes:5.2f}x the link floor")
        if a.json:
            a.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(a).items()},
                                          "target_bytes": target_bytes, "payload_bytes": m.payload_bytes,
                                          "results": results}, indent=2))
    finally:
        if a.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
