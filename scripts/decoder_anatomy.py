#!/usr/bin/env python
"""Where the `ans` decoder's time goes, and what a smaller context model would buy (issue 23).

Why: the decoder's goal (>= 1.6 GB/s per core) is far from the ~1.0 GB/s it runs, and guessing
which part to rewrite is how earlier attempts lost their time. This script answers by measurement,
in one run, on the same chunks (single thread, process CPU time, best of interleaved repeats: on
a shared machine the noise between runs is +-20 %, the best of many interleaved ones is stable):

1. **Timing-only builds of the shipped C source** (`orca_diff/_entropy.c` copied to a temporary
   folder, one textual change each, compiled with setup.py's flags). They decode *wrong* bytes
   and their frames then fail the end-of-stream check; only their time is meaningful:

   * ``shipped``: unchanged (the reference of this run);
   * ``no raw-bit pass``: the tokens decoded, the raw-bit pass and ulp inverse skipped;
   * ``table in L1``: as above, every table index masked into the first 8192 entries (32 KB);
   * ``no table loads``: as above, the 8 loads of a step's table entries replaced by arithmetic;
   * ``no renormalisation shuffle``: as above, the words a step takes not spread by the permutation.

2. **Valid frames of smaller context models**: the encoder's model choice replaced by a fixed one
   (16/8/4/2/1 exponent buckets, with or without the previous-token flag), every frame decoded
   and compared with the target before it is timed. The size each costs is printed beside it.

    python scripts/decoder_anatomy.py --base B/model.safetensors --target T/model.safetensors
    python scripts/decoder_anatomy.py            # synthetic chunks (orca_diff.synth)

Needs a C compiler (the one that builds the extension) and the AVX2 kernel (x86-64, GCC/Clang).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

for _v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # idle BLAS threads spin
    os.environ.setdefault(_v, "1")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from orca_diff import entropy  # noqa: E402

SOURCE = ROOT / "orca_diff" / "_entropy.c"
GATHER = "__m256i ent = gather8(tab, ti);"
SHUFFLE = "__m256i nw = _mm256_permutevar8x32_epi32(wv, _mm256_load_si256((const __m256i *)expand_lut[m]));"
FINISH = "    if (!err) {\n        int r;"
SKIP_FINISH = f'    err = "timing only";\n{FINISH}'  # the frame then "fails": no raw-bit pass
#: label -> textual replacements (anchor, replacement) applied to the shipped source
VARIANTS: dict[str, list[tuple[str, str]]] = {
    "shipped": [],
    "no raw-bit pass": [(FINISH, SKIP_FINISH)],
    "table in L1 (32 KB), no raw-bit pass": [
        (FINISH, SKIP_FINISH),
        (GATHER, "ti = _mm256_and_si256(ti, _mm256_set1_epi32(8191));\n" + GATHER)],
    "no table loads, no raw-bit pass": [
        (FINISH, SKIP_FINISH),
        (GATHER, "__m256i ent = _mm256_add_epi32(ti, _mm256_set1_epi32(0x01000FFF));")],
    "no renormalisation shuffle, no raw-bit pass": [
        (FINISH, SKIP_FINISH),
        (SHUFFLE, "__m256i nw = wv; (void)m;")],
}
#: (mshift, prev) of the fixed context models: 16 >> mshift buckets, times 2 with the flag
MODELS = [(0, True), (1, True), (2, True), (2, False), (3, False), (4, True), (4, False)]


def build_variants(workdir: Path) -> dict[str, object]:
    """label -> the extension module built from the shipped source with that label's changes."""
    cc = (sysconfig.get_config_var("CC") or "cc").split()
    include = sysconfig.get_paths()["include"]
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    text = SOURCE.read_text()
    mods = {}
    for i, (label, edits) in enumerate(VARIANTS.items()):
        src = text
        for anchor, new in edits:
            if src.count(anchor) != 1:
                raise SystemExit(f"{SOURCE}: the anchor for '{label}' is not found exactly once; update this script")
            src = src.replace(anchor, new)
        c = workdir / f"v{i}.c"
        c.write_text(src)
        so = workdir / f"v{i}{suffix}"
        cmd = [*cc, "-O3", "-std=c99", "-shared", "-fPIC", f"-I{include}", str(c), "-o", str(so), "-lm"]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            raise SystemExit(f"building '{label}' failed: {r.stderr.strip()[:400]}")
        spec = importlib.util.spec_from_file_location("orca_diff._entropy", so)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)  # type: ignore[union-attr]
        mods[label] = mod
    return mods


def model_label(mshift: int, prev: bool) -> str:
    k = entropy.MAX_BUCKETS >> mshift
    return f"{k} bucket{'s' if k > 1 else ''}{' x previous-token flag' if prev else ''} ({k * (2 if prev else 1)} tables)"


def encode_with(model, pairs, dtype: str) -> list[tuple[bytes, np.ndarray, np.ndarray]]:
    saved = entropy.choose_model
    entropy.choose_model = model or saved
    try:
        frames = [(entropy.encode(t, b, 2, dtype), b, t) for t, b in pairs]
    finally:
        entropy.choose_model = saved
    for f, b, t in frames:  # a figure for frames that do not decode exactly would mean nothing
        if not np.array_equal(entropy.decode(f, b, 2, t.size), t):
            raise SystemExit("a frame did not decode to its target")
    return frames


def timed(mod, frames, passes: int) -> float:
    """GB/s of decoded output over ``passes`` decodes of every frame with the module ``mod``."""
    saved = entropy._c
    entropy._c = mod
    try:
        t0 = time.process_time()
        for _ in range(passes):
            for f, b, t in frames:
                try:
                    entropy.decode(f, b, 2, t.size)
                except entropy.CorruptDiffError:  # the timing-only builds end that way
                    pass
        dt = time.process_time() - t0
    finally:
        entropy._c = saved
    return passes * sum(t.size for _, _, t in frames) / dt / 1e9


def measure(pairs, dtype: str, repeats: int, passes: int) -> dict:
    if not entropy.c_available():
        raise SystemExit("the C extension is not built: `python setup.py build_ext --inplace`")
    raw = sum(t.size for t, _ in pairs)
    base_frames = encode_with(None, pairs, dtype)
    model_frames = {"chosen per chunk (shipped)": base_frames}
    for ms, pv in MODELS:
        model_frames[model_label(ms, pv)] = encode_with(entropy.fixed_model(ms, pv), pairs, dtype)
    work = Path(tempfile.mkdtemp(prefix="orca-anatomy-"))
    try:
        mods = build_variants(work)
        rows = [(label, mod, base_frames) for label, mod in mods.items()]
        rows += [(label, mods["shipped"], frames) for label, frames in model_frames.items()]
        best = [0.0] * len(rows)
        for _ in range(repeats):  # interleaved: every row sees the same load
            for i, (_, mod, frames) in enumerate(rows):
                best[i] = max(best[i], timed(mod, frames, passes))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    n_var = len(VARIANTS)
    return {
        "raw_bytes": raw,
        "builds": {label: best[i] for i, (label, _, _) in enumerate(rows[:n_var])},
        "models": {label: {"gbps": best[n_var + i], "percent": 100 * sum(len(f) for f, _, _ in frames) / raw}
                   for i, (label, frames) in enumerate(model_frames.items())},
    }


def main() -> None:
    import decode_speed

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", help="a safetensors file (with --target): time its 2-D bf16/fp16 tensors")
    ap.add_argument("--target")
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--chunk-mib", type=float, default=4.0)
    ap.add_argument("--repeats", type=int, default=8, help="interleaved rounds; the best of each row counts")
    ap.add_argument("--passes", type=int, default=3, help="decodes of every chunk per round")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    cb = int(a.chunk_mib * (1 << 20)) & ~1
    pairs = (decode_speed.real_chunks(a.base, a.target, cb, a.chunks) if a.base
             else decode_speed.synthetic_chunks(a.chunks, cb))
    r = measure(pairs, "BF16", a.repeats, a.passes)
    ref = r["builds"]["shipped"]
    print(f"{len(pairs)} chunks, {r['raw_bytes'] / 1e6:.1f} MB; single thread, best of {a.repeats} interleaved rounds")
    print(f"  {'timing-only build of the shipped source':<48} {'GB/s':>6} {'vs shipped':>10}")
    for label, v in r["builds"].items():
        print(f"  {label:<48} {v:6.3f} {v / ref:10.2f}")
    print(f"  {'valid frames, context model':<48} {'GB/s':>6} {'vs shipped':>10} {'size % raw':>10}")
    for label, v in r["models"].items():
        print(f"  {label:<48} {v['gbps']:6.3f} {v['gbps'] / ref:10.2f} {v['percent']:9.2f}%")
    if a.json:
        a.json.write_text(json.dumps({"argv": sys.argv, **r}, indent=1) + "\n")


if __name__ == "__main__":
    main()
