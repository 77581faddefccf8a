#!/usr/bin/env python
"""Benchmark orca-diff against the entropy floor, zstd --patch-from, the FastChat delta and pure I/O.

One run, on the same pair(s):

* size: diff bytes as % of the target's weight-file bytes, next to
  - the order-0 entropy floor of the ulp delta symbols, per tensor, summed (16-bit symbols for
    bf16/fp16; for fp32 the achievable "bit-length class + raw bits" code, see
    docs/performance.md), and H(delta | base exponent) for reference;
  - ``zstd -19 --long=27 --patch-from=<base shard>`` on each safetensors shard (when the zstd
    program is installed);
  - the FastChat-style delta: both models cast to fp16, ``target - base`` in fp16, zstd -19;
  - per codec, on every delta chunk (single thread, same run): orca-diff's ``ans`` codec (C and
    pure-numpy paths) and its version-1 ``zstd`` codec, BitX-style (XOR, byte planes, zstd -3) and
    ZipNN's delta mode on the whole file (when ``zipnn`` is installed), with encode/decode MB/s;
* time: make and apply (each in a fresh subprocess, best of ``--repeats``), next to a pure I/O
  baseline measured in the same run: read base and target, write the diff bytes, fsync (make);
  read base and diff, write the output bytes, fsync (apply). Ratios are printed;
* whole pipelines side by side (where sizes are compared): orca-diff make/apply, ZipNN's delta
  mode and ``zstd -3 --patch-from``, each in fresh processes, imports apart
  (scripts/peer_pipelines.py), and the compute floor: the pure-I/O baseline plus the CPU work
  make and apply cannot skip (coding, sha256 of files, BLAKE3 of tensors) spread over every core;
* memory: peak RSS (VmHWM, read by each subprocess itself) of each subprocess;
* at 1x, 4x and 16x size (layers and vocabulary scaled), to show linear time and flat memory.

Examples::

    python scripts/bench.py                          # bf16, 1x 4x 16x (1x = 136 MB)
    python scripts/bench.py --sizes 1 --dtype F16 --json bench.json
    python scripts/bench.py --base ./llama-7b --target ./vicuna-7b --sizes 1
    python scripts/real_pair.py --out /tmp/minilm && \
      python scripts/bench.py --base /tmp/minilm/bf16/base --target /tmp/minilm/bf16/target --repeats 1
    python scripts/bench.py --codecs-only --base /tmp/minilm/fp16/base --target /tmp/minilm/fp16/target
    python scripts/bench.py --no-base --target /tmp/smollm2/bf16/target   # coded with nothing to predict it

The page cache is warm for every timed run (each input was just written or read), and the memory
each run writes its output into was touched just before (peer_pipelines.prime_free_pages: on a VM,
first-touch memory halves write speed, which made the order of the runs matter); the machine may
be shared, so use ``--repeats`` and read best-of-N figures as such.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from orca_diff.bits import UINT_FOR_SIZE, cast_bits, ulp_delta  # noqa: E402
from orca_diff import sparse  # noqa: E402
from orca_diff.codec import base_prediction, decode_chunk, encode_chunk  # noqa: E402
from orca_diff.synth import FineTune, LlamaShape, write_finetune, write_llama  # noqa: E402
from orca_diff.containers import FLOAT_DTYPES, open_model, read_range  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peer_pipelines  # noqa: E402
from peer_pipelines import peak_rss, weight_files  # noqa: E402

BLOCK = 16 << 20
EXP_FIELD = {"BF16": (7, 0xFF), "F16": (10, 0x1F), "F32": (23, 0xFF), "F64": (52, 0x7FF)}


def shape_for(scale: int) -> LlamaShape:
    """1x: hidden 1024, 4 layers, vocab 8000 (67.8 M parameters); layers and vocab grow with scale."""
    return LlamaShape(vocab_size=8000 * scale, hidden_size=1024, intermediate_size=2816,
                      num_hidden_layers=4 * scale, num_attention_heads=8, num_key_value_heads=8)


# --------------------------------------------------------------------------- child processes


def _child(argv: list[str]) -> None:
    """Run one timed operation and print {"seconds", "maxrss_bytes"} as JSON (a fresh process
    per measurement, so peak RSS is that operation's own)."""
    op = argv[0]
    t0 = time.perf_counter()
    if op == "make":
        from orca_diff.make import make_diff

        make_diff(argv[1], argv[2], argv[3], force=True, progress=False,
                  share_identical_files=os.environ.get("ORCA_BENCH_SHARE_FILES") == "1")
    elif op == "apply":
        from orca_diff.apply import apply_diff

        apply_diff(argv[1], argv[2], argv[3], force=True, progress=False)
    elif op == "io":  # read every file of the inputs, write `size` bytes as the output, fsync
        inputs, out, sizes = argv[1].split(os.pathsep), Path(argv[2]), json.loads(argv[3])
        buf = bytearray(BLOCK)
        for folder in inputs:
            for p in sorted(Path(folder).rglob("*")):
                if p.is_file():
                    with open(p, "rb", buffering=0) as f:
                        while f.readinto(buf):
                            pass
        out.mkdir(parents=True, exist_ok=True)
        data = memoryview(np.frombuffer(np.random.default_rng(0).bytes(BLOCK), np.uint8))
        for i, size in enumerate(sizes):
            fd = os.open(out / f"f{i}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            left = size
            while left:
                left -= os.write(fd, data[:min(left, BLOCK)])
            os.fsync(fd)
            os.close(fd)
    else:
        raise SystemExit(f"unknown child op {op}")
    seconds = time.perf_counter() - t0
    print(json.dumps({"seconds": seconds, "maxrss_bytes": peak_rss()}))


def run_child(*args: str) -> dict:
    proc = subprocess.run([sys.executable, __file__, "_child", *args], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    if proc.returncode:
        raise SystemExit(f"child {args[0]} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- sizes


def _h0_bits(counts: np.ndarray) -> float:
    c = counts[counts > 0].astype(np.float64)
    n = c.sum()
    return float(-(c * np.log2(c / n)).sum()) if n else 0.0


@dataclass
class Floors:
    order0: float = 0.0       # bytes: H0 of 16-bit delta symbols, or class+raw code for wider types
    cond_exp: float = 0.0     # bytes: H(delta | base exponent) (16-bit only; the class code's for wider)
    raw_bytes: int = 0        # bytes of tensors (or regions) with no base: counted at their full size
    changed: int = 0
    elements: int = 0
    rel_changes: list | None = None


def entropy_floors(base_dir: Path, target_dir: Path) -> Floors:
    """Per-tensor order-0 floors of the ulp delta (streamed tensor by tensor, bounded memory)."""
    base, target = open_model(base_dir), open_model(target_dir)
    fl = Floors(rel_changes=[])
    try:
        for name, ti in target.tensors.items():
            bi = base.tensors.get(name)
            if bi is None or ti.dtype not in FLOAT_DTYPES or bi.dtype not in FLOAT_DTYPES or bi.shape != ti.shape:
                fl.raw_bytes += ti.nbytes
                continue
            w = ti.itemsize
            sh, mask = EXP_FIELD[ti.dtype]
            if w == 2:
                joint = np.zeros((mask + 1, 65536), dtype=np.int64)  # rows of exponents seen only
            else:
                joint = np.zeros((mask + 1, 8 * w + 1), dtype=np.int64)
            sq_d = sq_b = 0.0
            step = BLOCK // w * w
            for s in range(0, ti.nbytes, step):
                n = min(step, ti.nbytes - s)
                t = read_range(target, name, s, n).view(UINT_FOR_SIZE[w])
                b = base_prediction(read_range(base, name, s // w * bi.itemsize, n // w * bi.itemsize), bi.dtype,
                                    ti.dtype).view(UINT_FOR_SIZE[w])
                d = ulp_delta(t, b)
                e = ((b >> UINT_FOR_SIZE[w](sh)) & UINT_FOR_SIZE[w](mask)).astype(np.int64)
                fl.changed += int(np.count_nonzero(d))
                fl.elements += d.size
                if w == 2:
                    for k in np.flatnonzero(np.bincount(e, minlength=mask + 1)):
                        joint[k] += np.bincount(d[e == k], minlength=65536)
                else:
                    _, cls = np.frexp(d.astype(np.float64))  # bit length of d (0 for d = 0)
                    joint += np.bincount(e * (8 * w + 1) + cls, minlength=joint.size).reshape(joint.shape)
                tf = _as_f64(t, ti.dtype)
                bf = _as_f64(b, ti.dtype)
                ok = np.isfinite(tf) & np.isfinite(bf)
                sq_d += float(np.sum((tf[ok] - bf[ok]) ** 2))
                sq_b += float(np.sum(bf[ok] ** 2))
            if sq_b > 0:
                fl.rel_changes.append(np.sqrt(sq_d / sq_b))
            if w == 2:
                j = joint.reshape(mask + 1, 65536)
                fl.order0 += _h0_bits(j.sum(axis=0)) / 8
                fl.cond_exp += sum(_h0_bits(row) for row in j if row.any()) / 8
            else:
                classes = np.arange(8 * w + 1)
                raw_bits = float((joint.sum(axis=0) * np.maximum(classes - 1, 0)).sum())
                n_el = joint.sum()
                table = 0.5 * np.count_nonzero(joint.sum(axis=0)) * np.log2(max(n_el, 2))  # KT-style learning cost
                fl.order0 += (_h0_bits(joint.sum(axis=0)) + raw_bits + table) / 8
                cond = sum(_h0_bits(row) + 0.5 * np.count_nonzero(row) * np.log2(max(row.sum(), 2))
                           for row in joint if row.any())
                fl.cond_exp += (cond + raw_bits) / 8
    finally:
        base.close()
        target.close()
    return fl


def _as_f64(bits: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "BF16":
        return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32).astype(np.float64)
    return bits.view({"F16": np.float16, "F32": np.float32, "F64": np.float64}[dtype]).astype(np.float64)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def patch_from_bytes(base_dir: Path, target_dir: Path, work: Path) -> int | None:
    """``zstd -19 --long=27 --patch-from`` per shard (shards paired by position)."""
    zstd = shutil.which("zstd")
    if zstd is None:
        return None
    total = 0
    for i, (b, t) in enumerate(zip(weight_files(base_dir), weight_files(target_dir))):
        out = work / f"patch-{i}.zst"
        subprocess.run([zstd, "-q", "-f", "-19", "--long=27", f"--patch-from={b}", str(t), "-o", str(out)], check=True)
        total += out.stat().st_size
        out.unlink()
    return total


def fastchat_bytes(base_dir: Path, target_dir: Path) -> tuple[int, int, int]:
    """FastChat's apply_delta convention: fp16 ``target - base``, compressed with zstd -19.
    Returns (compressed bytes, elements that do not rebuild exactly, elements)."""
    import zstandard

    base, target = open_model(base_dir), open_model(target_dir)
    cctx = zstandard.ZstdCompressor(level=19, threads=2)
    wrong = elems = 0
    counter = _Counter()
    try:
        with cctx.stream_writer(counter, closefd=False) as sink:
            for name, ti in target.tensors.items():
                bi = base.tensors.get(name)
                for s in range(0, ti.nbytes, BLOCK // ti.itemsize * ti.itemsize):
                    n = min(BLOCK // ti.itemsize * ti.itemsize, ti.nbytes - s)
                    t = read_range(target, name, s, n).view(UINT_FOR_SIZE[ti.itemsize])
                    t16 = cast_bits(t, ti.dtype, "F16").view(np.float16)
                    if bi is None or bi.shape != ti.shape or bi.dtype not in FLOAT_DTYPES:
                        sink.write(t16.tobytes())
                        continue
                    b = read_range(base, name, s // ti.itemsize * bi.itemsize, n // ti.itemsize * bi.itemsize)
                    b16 = cast_bits(b.view(UINT_FOR_SIZE[bi.itemsize]), bi.dtype, "F16").view(np.float16)
                    with np.errstate(all="ignore"):
                        delta = t16 - b16
                        rebuilt = cast_bits((b16 + delta).view(np.uint16), "F16", ti.dtype)
                    wrong += int(np.count_nonzero(rebuilt != t))
                    elems += t.size
                    sink.write(delta.tobytes())
            sink.flush(zstandard.FLUSH_FRAME)
    finally:
        base.close()
        target.close()
    return counter.n, wrong, elems


class _Counter:
    def __init__(self) -> None:
        self.n = 0

    def write(self, data: bytes) -> int:
        self.n += len(data)
        return len(data)

    def flush(self) -> None:
        pass


def sha_folder(folder: Path) -> dict[str, str]:
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and not p.name.startswith("."):
            h = hashlib.sha256()
            with open(p, "rb") as f:
                while chunk := f.read(BLOCK):
                    h.update(chunk)
            out[p.relative_to(folder).as_posix()] = h.hexdigest()
    return out


# --------------------------------------------------------------------------- codec exploration


def explore(base_dir: Path, target_dir: Path) -> list[dict]:
    """Sizes and single-thread speeds of candidate encodings on every tensor's first chunk
    (the table in docs/performance.md). Speeds are of the whole chunk path in numpy + zstd."""
    import zstandard

    from orca_diff.codec import _compressor, decode_chunk, encode_chunk, from_planes, to_planes

    base, target = open_model(base_dir), open_model(target_dir)
    l3 = zstandard.ZstdCompressor(level=3)
    dctx = zstandard.ZstdDecompressor()

    def sorted_planes(t: np.ndarray, b: np.ndarray, w: int, dtype: str) -> tuple[bytes, float, float]:
        """Conditioning on the base exponent by a stable sort of the delta by it (then planes)."""
        sh, mask = EXP_FIELD[dtype]
        t0 = time.perf_counter()
        bu = b.view(UINT_FOR_SIZE[w])
        key = ((bu >> UINT_FOR_SIZE[w](sh)) & UINT_FOR_SIZE[w](mask)).astype(np.uint16)
        perm = np.argsort(key, kind="stable")
        d = ulp_delta(t.view(UINT_FOR_SIZE[w]), bu)[perm]
        z = _compressor(1).compress(to_planes(d.view(np.uint8), w))
        t1 = time.perf_counter()
        key = ((bu >> UINT_FOR_SIZE[w](sh)) & UINT_FOR_SIZE[w](mask)).astype(np.uint16)
        perm = np.argsort(key, kind="stable")
        out = np.empty(t.size // w, dtype=UINT_FOR_SIZE[w])
        out[perm] = from_planes(np.frombuffer(dctx.decompress(z), np.uint8), w).view(UINT_FOR_SIZE[w])
        return z, t1 - t0, time.perf_counter() - t1

    cands = {
        "xor, planes, zstd -3 (BitX-style)": ("xor", "planes", 3),
        "xor, planes, tuned fast zstd": ("xor", "planes", 1),
        "ulp, planes, zstd -3 (defaults)": ("ulp", "planes", 3),
        "ulp, planes, tuned fast zstd": ("ulp", "planes", 1),
        "ulp, bytes (no planes), tuned fast zstd": ("ulp", "bytes", 1),
        "ulp, escape, tuned fast zstd (default for 16-bit)": ("ulp", "escape", 1),
        "ulp, sorted by base exponent, planes, tuned fast zstd": ("ulp", "sorted", 1),
    }
    acc = {k: [0, 0.0, 0.0] for k in cands}
    raw_total = 0
    try:
        for name, ti in target.tensors.items():
            bi = base.tensors.get(name)
            if bi is None or bi.shape != ti.shape or bi.dtype != ti.dtype or ti.dtype not in FLOAT_DTYPES:
                continue
            w = ti.itemsize
            n = min(ti.nbytes, BLOCK)
            t = read_range(target, name, 0, n)
            b = read_range(base, name, 0, n)
            raw_total += n
            for label, (tr, lay, lvl) in cands.items():
                if lay == "escape" and w == 1:
                    continue
                if lay == "sorted":
                    z, te, td = sorted_planes(t, b, w, ti.dtype)
                    acc[label][0] += len(z)
                    acc[label][1] += te
                    acc[label][2] += td
                    continue
                t0 = time.perf_counter()
                if lvl == 3:  # zstd's own level 3 parameters, as before this work
                    from orca_diff.codec import forward

                    sym = forward(t, b, w, tr)
                    z = l3.compress(to_planes(sym, w) if lay == "planes" else sym)
                    t1 = time.perf_counter()
                    from orca_diff.codec import inverse

                    inverse(from_planes(np.frombuffer(dctx.decompress(z), np.uint8), w), b, w, tr)
                else:
                    z = encode_chunk(t, b, w, tr, "escape" if lay == "escape" and w == 2 else
                                     ("planes" if lay == "escape" else lay), lvl)
                    t1 = time.perf_counter()
                    decode_chunk(z, b, w, tr, n, "escape" if lay == "escape" and w == 2 else
                                 ("planes" if lay == "escape" else lay))
                acc[label][0] += len(z)
                acc[label][1] += t1 - t0
                acc[label][2] += time.perf_counter() - t1
    finally:
        base.close()
        target.close()
    return [{"encoding": k, "percent": 100 * v[0] / raw_total, "encode_MBps": raw_total / 1e6 / v[1],
             "decode_MBps": raw_total / 1e6 / v[2]} for k, v in acc.items()]


# --------------------------------------------------------------------------- codecs, chunk by chunk


def codec_comparison(base_dir: Path, target_dir: Path, numpy_sample_bytes: int = 32 << 20) -> dict:
    """Bytes and single-thread encode/decode seconds of each codec over every float delta chunk
    (16 MiB, as make cuts them; tensors with no same-shape base are skipped and counted apart).
    The numpy path of ``ans`` is timed on the first ``numpy_sample_bytes`` only (its bytes are the
    C path's, checked). Every decode is checked bit-exact. Times are CPU seconds of this process
    (``time.process_time``): MB/s per core, robust to other load on a shared machine; decodes are
    the best of 3 per chunk (numpy: 1), encodes a single run."""
    import zstandard

    from orca_diff import entropy, lowrank
    from orca_diff.codec import choose_layout, decode_chunk, encode_chunk, from_planes, to_planes

    base, target = open_model(base_dir), open_model(target_dir)
    l3 = zstandard.ZstdCompressor(level=3)
    dctx = zstandard.ZstdDecompressor()
    acc = {k: [0, 0.0, 0.0, 0] for k in ("ans", "ans-numpy", "zstd-v1", "bitx")}  # bytes, enc s, dec s, raw
    ans_chunks = [0, 0, 0, 0]  # dense ANS frames, zstd fallback frames, sparse ANS frames, low-rank frames

    def timed(label: str, raw: int, enc, dec) -> None:
        t0 = time.process_time()
        z = enc()
        t1 = time.process_time()
        dec_s = []
        for _ in range(1 if label == "ans-numpy" else 3):  # best of 3: the machine is shared
            t2 = time.process_time()
            out = dec(z)
            dec_s.append(time.process_time() - t2)
            if out != b"ok":
                raise SystemExit(f"{label}: decode is not bit-exact")
        a = acc[label]
        a[0] += len(z)
        a[1] += t1 - t0
        a[2] += min(dec_s)
        a[3] += raw

    try:
        for name, ti in target.tensors.items():
            bi = base.tensors.get(name)
            if bi is None or bi.shape != ti.shape or ti.dtype not in FLOAT_DTYPES or bi.dtype not in FLOAT_DTYPES:
                continue
            w = ti.itemsize
            step = BLOCK // w * w
            layout = None
            for s in range(0, ti.nbytes, step):
                n = min(step, ti.nbytes - s)
                t = read_range(target, name, s, n)
                b = base_prediction(read_range(base, name, s // w * bi.itemsize, n // w * bi.itemsize), bi.dtype, ti.dtype)
                tb = t.tobytes()
                if layout is None:
                    layout = choose_layout(t[: 256 << 10], b[: 256 << 10], w, "ulp")
                ok = lambda out: b"ok" if out.tobytes() == tb else b"bad"  # noqa: E731
                grid = (ti.shape[-1], s // w % ti.shape[-1]) if len(ti.shape) >= 2 and ti.shape[-1] else None
                timed("ans", n, lambda: encode_chunk(t, b, w, "ulp", layout, codec="ans", dtype=ti.dtype, grid=grid),
                      lambda z: ok(decode_chunk(z, b, w, "ulp", n, layout, codec="ans")))
                frame = encode_chunk(t, b, w, "ulp", layout, codec="ans", dtype=ti.dtype, grid=grid)
                ans_chunks[0 if entropy.is_frame(frame) else 2 if sparse.is_frame(frame)
                           else 3 if lowrank.is_frame(frame) else 1] += 1
                if acc["ans-numpy"][3] < numpy_sample_bytes and entropy.is_frame(frame):
                    def enc_np():
                        z = entropy.encode(t, b, w, ti.dtype, pure=True)
                        if z != frame:
                            raise SystemExit(f"{name}: numpy and C frames differ")
                        return z
                    timed("ans-numpy", n, enc_np, lambda z: ok(entropy.decode(z, b, w, n, pure=True)))
                timed("zstd-v1", n, lambda: encode_chunk(t, b, w, "ulp", layout),
                      lambda z: ok(decode_chunk(z, b, w, "ulp", n, layout)))

                def bitx_enc():
                    x = (t.view(UINT_FOR_SIZE[w]) ^ b.view(UINT_FOR_SIZE[w])).view(np.uint8)
                    return l3.compress(to_planes(x, w))

                def bitx_dec(z):
                    x = from_planes(np.frombuffer(dctx.decompress(z), np.uint8), w).view(UINT_FOR_SIZE[w])
                    return ok((x ^ b.view(UINT_FOR_SIZE[w])).view(np.uint8))
                timed("bitx", n, bitx_enc, bitx_dec)
    finally:
        base.close()
        target.close()
    res = {k: {"bytes": v[0], "encode_MBps": v[3] / 1e6 / v[1] if v[1] else None,
               "decode_MBps": v[3] / 1e6 / v[2] if v[2] else None, "raw_bytes": v[3]} for k, v in acc.items()}
    res["ans_frames"], res["ans_zstd_fallback_frames"], res["ans_sparse_frames"], res["ans_lowrank_frames"] = ans_chunks
    res["c_extension"] = entropy.c_available()
    res["zipnn"] = zipnn_delta(base_dir, target_dir)
    return res


def no_base_sizes(target_dir: Path) -> dict:
    """Bytes of the target's float tensors coded with nothing to predict them (added rows, new
    heads, a model diffed against nothing), in 16 MiB chunks: what make writes for raw float
    chunks (codec.encode_chunk with the dtype: the no-base ANS frame or zstd planes), zstd planes
    alone (format v1), ZipNN 0.5.4 (Huffman on byte groups; when installed), and the order-0
    exponent bound (an ideal code of the exponent field, every other bit raw)."""
    try:
        from zipnn import ZipNN
    except ImportError:
        ZipNN = None
    target = open_model(target_dir)
    acc = {"raw_bytes": 0, "nobase": 0, "zstd_planes": 0, "zipnn": 0 if ZipNN else None, "exp_bound": 0.0}
    dec_s = 0.0
    zips: dict = {}
    try:
        for name, ti in target.tensors.items():
            if ti.dtype not in ("BF16", "F16", "F32"):
                continue
            w = ti.itemsize
            for s in range(0, ti.nbytes, BLOCK):
                x = read_range(target, name, s, min(BLOCK, ti.nbytes - s))
                frame = encode_chunk(x, None, w, "raw", "planes", dtype=ti.dtype)
                t0 = time.process_time()
                out = decode_chunk(frame, None, w, "raw", x.size, "planes")
                dec_s += time.process_time() - t0
                if out.tobytes() != x.tobytes():
                    raise SystemExit(f"{name}: no-base round trip is not exact")
                acc["raw_bytes"] += x.size
                acc["nobase"] += len(frame)
                acc["zstd_planes"] += len(encode_chunk(x, None, w, "raw", "planes"))
                if ZipNN is not None:
                    dt = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}[ti.dtype]
                    z = zips.setdefault(dt, ZipNN(input_format="byte", bytearray_dtype=dt, method="HUFFMAN", threads=1))
                    acc["zipnn"] += len(z.compress(x.tobytes()))
                sh, mask = EXP_FIELD[ti.dtype]
                e = ((x.view(UINT_FOR_SIZE[w]) >> UINT_FOR_SIZE[w](sh)) & UINT_FOR_SIZE[w](mask)).astype(np.int64)
                acc["exp_bound"] += (_h0_bits(np.bincount(e)) + e.size * (8 * w - int(mask).bit_length())) / 8
    finally:
        target.close()
    acc["nobase_decode_MBps"] = acc["raw_bytes"] / 1e6 / dec_s if dec_s else None
    return acc


def zipnn_delta(base_dir: Path, target_dir: Path) -> dict | None:
    """ZipNN 0.5.4's delta mode on each weight file (XOR with the base file, byte groups,
    Huffman), as perf-anchors.md: sizes and single-thread compress/decompress seconds. None when
    zipnn is not installed (``pip install --no-deps zipnn``; it needs only numpy/torch/zstandard)."""
    try:
        from zipnn import ZipNN
    except ImportError:
        return None
    total = enc = dec = 0.0
    dtypes = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}
    for bp, tp in zip(weight_files(base_dir), weight_files(target_dir)):
        header = json.loads(tp.read_bytes()[8: 8 + int.from_bytes(tp.read_bytes()[:8], "little")])
        kinds = {v["dtype"] for k, v in header.items() if k != "__metadata__"}
        dt = dtypes.get(next(iter(kinds))) if len(kinds) == 1 else None
        if dt is None:
            return None
        tb, bb = tp.read_bytes(), bp.read_bytes()
        if len(tb) != len(bb):
            return None
        z = ZipNN(input_format="byte", bytearray_dtype=dt, method="HUFFMAN", delta_compressed_type="byte", threads=1)
        t0 = time.process_time()
        c = z.compress(bytearray(tb), delta_second_data=bytearray(bb))
        t1 = time.process_time()
        out = z.decompress(c, delta_second_data=bytearray(bb))
        t2 = time.process_time()
        if bytes(out) != tb:
            raise SystemExit(f"{tp}: ZipNN delta round trip is not exact")
        total += len(c)
        enc += t1 - t0
        dec += t2 - t1
    raw = sum(p.stat().st_size for p in weight_files(target_dir))
    return {"bytes": int(total), "encode_MBps": raw / 1e6 / enc, "decode_MBps": raw / 1e6 / dec}


# --------------------------------------------------------------------------- one size


def bench_pair(base_dir: Path, target_dir: Path, work: Path, repeats: int, compare: bool,
               patch_from_19: bool = True) -> dict:
    diff_dir, out_dir, io_dir = work / "diff", work / "out", work / "io"
    target_weight_bytes = sum(p.stat().st_size for p in weight_files(target_dir))
    target_sizes = [p.stat().st_size for p in sorted(target_dir.rglob("*")) if p.is_file()]
    res: dict = {"base": str(base_dir), "target": str(target_dir), "target_weight_bytes": target_weight_bytes,
                 "target_bytes": sum(target_sizes)}

    makes, applies, io_make, io_apply = [], [], [], []
    prime = lambda: peer_pipelines.prime_free_pages(work, sum(target_sizes))  # noqa: E731  (same start for every run)
    for r in range(repeats):
        prime()
        makes.append(run_child("make", str(base_dir), str(target_dir), str(diff_dir)))
        diff_size = folder_bytes(diff_dir)
        prime()
        io_make.append(run_child("io", os.pathsep.join([str(base_dir), str(target_dir)]), str(io_dir),
                                 json.dumps([diff_size])))
        shutil.rmtree(io_dir)
        prime()
        applies.append(run_child("apply", str(base_dir), str(diff_dir), str(out_dir)))
        if r == 0:
            if sha_folder(out_dir) != sha_folder(target_dir):
                raise SystemExit(f"{out_dir}: rebuilt model differs from {target_dir}")
        shutil.rmtree(out_dir)
        prime()
        io_apply.append(run_child("io", os.pathsep.join([str(base_dir), str(diff_dir)]), str(io_dir),
                                  json.dumps(target_sizes)))
        shutil.rmtree(io_dir)
    best = lambda xs: min(x["seconds"] for x in xs)  # noqa: E731
    peak = lambda xs: max(x["maxrss_bytes"] for x in xs)  # noqa: E731
    payload = sum(p.stat().st_size for p in diff_dir.glob("*.odz"))
    res.update(diff_bytes=folder_bytes(diff_dir), payload_bytes=payload,
               make_s=best(makes), make_io_s=best(io_make), apply_s=best(applies), apply_io_s=best(io_apply),
               make_rss=peak(makes), apply_rss=peak(applies), io_rss=peak(io_apply + io_make),
               make_runs=[x["seconds"] for x in makes], apply_runs=[x["seconds"] for x in applies],
               make_io_runs=[x["seconds"] for x in io_make], apply_io_runs=[x["seconds"] for x in io_apply])
    manifest = json.loads((diff_dir / "orca-diff.json").read_text())
    layouts: dict[str, int] = {}
    for t in manifest["tensors"].values():
        key = f'{t["encoding"]["transform"]}/{t["encoding"]["layout"]}/{t["encoding"].get("codec", "zstd")}'
        layouts[key] = layouts.get(key, 0) + 1
    res["layouts"] = layouts
    if compare:
        fl = entropy_floors(base_dir, target_dir)
        res.update(floor_bytes=fl.order0 + fl.raw_bytes, cond_exp_bytes=fl.cond_exp + fl.raw_bytes,
                   floor_delta_bytes=fl.order0, cond_exp_delta_bytes=fl.cond_exp,
                   changed_fraction=fl.changed / max(fl.elements, 1),
                   rel_change_median=float(np.median(fl.rel_changes)) if fl.rel_changes else None,
                   rel_change_max=float(np.max(fl.rel_changes)) if fl.rel_changes else None)
        res["codecs"] = codec_comparison(base_dir, target_dir)
        t0 = time.perf_counter()
        res["patch_from_bytes"] = patch_from_bytes(base_dir, target_dir, work) if patch_from_19 else None
        res["patch_from_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        res["fastchat_bytes"], res["fastchat_wrong"], res["fastchat_elems"] = fastchat_bytes(base_dir, target_dir)
        res["fastchat_s"] = time.perf_counter() - t0
        res["pipelines"] = peer_pipelines.run(base_dir, target_dir, work / "pipelines", repeats)
        res["hash_GBps"] = peer_pipelines.hash_speeds()
        res["base_weight_bytes"] = sum(p.stat().st_size for p in weight_files(base_dir))
    return res


def compute_floors(r: dict) -> dict | None:
    """Lower bounds on make and apply time on this machine's cores: the larger of the pure-I/O
    baseline and the CPU work neither can skip spread perfectly over every core (single-thread
    speeds from this run), as if the two overlapped completely. apply: ans decode of the target,
    sha256 of every rebuilt file, BLAKE3 of every rebuilt tensor and of the base (its
    pre-check). make: ans encode of the target, sha256 of the target's files and of the base's
    (the Hub pre-check record), BLAKE3 of both."""
    c, h = r.get("codecs"), r.get("hash_GBps")
    if not c or not h or not c["ans"].get("decode_MBps"):
        return None
    cores = len(os.sched_getaffinity(0))
    t, b = r["target_weight_bytes"] / 1e9, r["base_weight_bytes"] / 1e9
    dec, enc = c["ans"]["decode_MBps"] / 1e3, c["ans"]["encode_MBps"] / 1e3
    apply_cpu = t / dec + t / h["sha256"] + (t + b) / h["blake3"]
    make_cpu = t / enc + (t + b) / h["sha256"] + (t + b) / h["blake3"]
    return {"cores": cores, "apply_cpu_s": apply_cpu, "make_cpu_s": make_cpu,
            "apply_floor_s": max(r["apply_io_s"], apply_cpu / cores),
            "make_floor_s": max(r["make_io_s"], make_cpu / cores)}


def build_pair(work: Path, scale: int, dtype: str, shard_bytes: int) -> tuple[Path, Path]:
    base, target = work / f"base-{dtype}-{scale}x", work / f"target-{dtype}-{scale}x"
    shape = shape_for(scale)
    if not (base / "config.json").exists():
        shutil.rmtree(base, ignore_errors=True)
        write_llama(base, shape, dtype, seed=0, max_shard_bytes=shard_bytes)
    if not (target / "config.json").exists():
        shutil.rmtree(target, ignore_errors=True)
        write_finetune(target, shape, base_seed=0, dtype=dtype, ft=FineTune(), max_shard_bytes=shard_bytes)
    return base, target


# --------------------------------------------------------------------------- report


def pct(x: float | None, total: int) -> str:
    return "-" if x is None else f"{100 * x / total:.2f} %"


def print_codecs(r: dict) -> None:
    """The per-codec table: % of the delta tensors' bytes, ratios to the floors, single-thread speeds."""
    c = r["codecs"]
    raw = c["ans"]["raw_bytes"]
    if not raw:
        return
    floor, cond = r["floor_delta_bytes"], r["cond_exp_delta_bytes"]
    print(f"   delta chunks, single thread ({raw / 1e6:.1f} MB of float tensors with a base; C extension "
          f"{'built' if c['c_extension'] else 'NOT built'}; ans frames {c['ans_frames']} dense, "
          f"{c.get('ans_sparse_frames', 0)} sparse, {c.get('ans_lowrank_frames', 0)} low-rank, zstd fallbacks {c['ans_zstd_fallback_frames']}):")
    print(f"   {'codec':<44} {'% raw':>7} {'x floor':>8} {'x H(s|e)':>9} {'enc MB/s':>9} {'dec MB/s':>9}")
    rows = [("ans (C)", c["ans"]), ("ans (pure numpy; bytes = C's)", c["ans-numpy"]),
            ("zstd, escape/planes layout (format v1)", c["zstd-v1"]), ("BitX-style: xor, byte planes, zstd -3", c["bitx"])]
    if c.get("zipnn"):
        rows.append(("ZipNN 0.5.4 delta (whole file, header incl.)", c["zipnn"]))
    for label, v in rows:
        size = v["bytes"] if label != rows[1][0] else None
        fmt = lambda x: "-" if x is None else f"{x:.0f}"  # noqa: E731
        if size is None:
            print(f"   {label:<44} {'=':>7} {'':>8} {'':>9} {fmt(v['encode_MBps']):>9} {fmt(v['decode_MBps']):>9}")
            continue
        print(f"   {label:<44} {100 * size / raw:6.2f}% {size / floor:8.3f} {size / cond:9.3f} "
              f"{fmt(v['encode_MBps']):>9} {fmt(v['decode_MBps']):>9}")
    print(f"   {'order-0 floor of the ulp delta (bound)':<44} {100 * floor / raw:6.2f}%")
    print(f"   {'H(ulp delta | base exponent) (bound)':<44} {100 * cond / raw:6.2f}%")
    if r.get("patch_from_bytes"):
        print(f"   {'zstd -19 --long=27 --patch-from (whole file)':<44} {100 * r['patch_from_bytes'] / raw:6.2f}% "
              f"{r['patch_from_bytes'] / floor:8.3f}; ans / patch-from = {c['ans']['bytes'] / r['patch_from_bytes']:.3f}")


def print_report(results: list[dict]) -> None:
    for r in results:
        tb = r["target_weight_bytes"]
        print(f"\n== {r['label']}: target {tb / 1e6:.1f} MB of weights ({r['target_bytes'] / 1e6:.1f} MB with other files)")
        if "floor_bytes" in r:
            print(f"   fine-tune: {100 * r['changed_fraction']:.1f} % of elements changed; relative L2 change per tensor "
                  f"median {r['rel_change_median']:.2e} (max {r['rel_change_max']:.2e})")
            rows = [("orca-diff (whole diff folder)", r["diff_bytes"]),
                    ("  payload only", r["payload_bytes"]),
                    ("order-0 floor of the ulp delta, per tensor (bound)", r["floor_bytes"]),
                    ("H(ulp delta | base exponent), per tensor (bound)", r["cond_exp_bytes"]),
                    ("zstd -19 --long=27 --patch-from", r.get("patch_from_bytes")),
                    ("FastChat fp16 delta, zstd -19 (lossy)", r.get("fastchat_bytes"))]
            w = max(len(a) for a, _ in rows)
            for a, b in rows:
                print(f"   {a:<{w}}  {pct(b, tb):>9}")
            print(f"   diff / floor = {r['diff_bytes'] / r['floor_bytes']:.3f}", end="")
            if r.get("patch_from_bytes"):
                print(f"; diff / patch-from = {r['diff_bytes'] / r['patch_from_bytes']:.3f}", end="")
            if r.get("fastchat_elems"):
                print(f"; FastChat rebuild wrong for {r['fastchat_wrong']} / {r['fastchat_elems']} elements", end="")
            print()
        if "codecs" in r:
            print_codecs(r)
        if "pipelines" in r:
            peer_pipelines.print_table(r["pipelines"], tb)
        if (fl := compute_floors(r)) is not None:
            r["floors"] = fl
            print(f"   floor on {fl['cores']} cores (max of pure I/O and the unavoidable CPU work / cores; sha256 "
                  f"{r['hash_GBps']['sha256']:.2f} GB/s, BLAKE3 {r['hash_GBps']['blake3']:.2f} GB/s per core): "
                  f"apply {fl['apply_floor_s']:.2f} s ({fl['apply_cpu_s']:.2f} CPU-s), measured {r['apply_s']:.2f} s = "
                  f"{r['apply_s'] / fl['apply_floor_s']:.2f}x; make {fl['make_floor_s']:.2f} s ({fl['make_cpu_s']:.2f} "
                  f"CPU-s), measured {r['make_s']:.2f} s = {r['make_s'] / fl['make_floor_s']:.2f}x")
        print(f"   layouts: {r['layouts']}")
    print("\n size | weights MB | diff %  | make s | make I/O s | make/IO | apply s | apply I/O s | apply/IO "
          "| make RSS MiB | apply RSS MiB | I/O RSS MiB")
    for r in results:
        print(f" {r['label']:>4} | {r['target_weight_bytes'] / 1e6:10.1f} | {100 * r['diff_bytes'] / r['target_weight_bytes']:6.2f} "
              f"| {r['make_s']:6.2f} | {r['make_io_s']:10.2f} | {r['make_s'] / r['make_io_s']:7.2f} "
              f"| {r['apply_s']:7.2f} | {r['apply_io_s']:11.2f} | {r['apply_s'] / r['apply_io_s']:8.2f} "
              f"| {r['make_rss'] / 2**20:12.0f} | {r['apply_rss'] / 2**20:13.0f} | {r['io_rss'] / 2**20:11.0f}")
    print("\n times: best of the repeats, each in a fresh process (import time excluded); warm page cache; "
          "RSS: the largest VmHWM over the repeats")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        return _child(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="BF16", choices=["BF16", "F16", "F32"], help="synthetic pair dtype")
    ap.add_argument("--sizes", default="1,4,16", help="comma-separated scales of the synthetic pair (1x = 136 MB bf16)")
    ap.add_argument("--compare-sizes", default="1", help="scales at which floors, patch-from and FastChat are "
                    "computed (patch-from runs at ~1.5 MB/s; 'all' for every size; '' for none, which with "
                    "--base/--target skips them too)")
    ap.add_argument("--base", type=Path, help="a real base model folder (with --target)")
    ap.add_argument("--target", type=Path, help="a real fine-tuned model folder (safetensors)")
    ap.add_argument("--work", type=Path, default=Path("bench-work"), help="scratch folder (pairs are cached here)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per size (best is reported)")
    ap.add_argument("--shard-bytes", type=int, default=1 << 30, help="max shard size of the synthetic pair")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--share-identical-files", action="store_true", help="make with --share-identical-files (side "
                    "files the base holds byte-identical are taken from it: near-identical checkpoints)")
    ap.add_argument("--codecs-only", action="store_true", help="skip make/apply timing: only the floors, the "
                    "per-codec table and zstd --patch-from (not with --compare-sizes ''), on the first pair")
    ap.add_argument("--no-base", action="store_true", help="only code the target's float tensors with no base: "
                    "orca-diff's no-base frames (or zstd planes, whichever make keeps) vs zstd planes vs ZipNN")
    ap.add_argument("--explore", action="store_true", help="only compare candidate encodings on each tensor's "
                    "first 16 MiB (sizes and single-thread speeds) at the first size")
    ap.add_argument("--no-patch-from-19", action="store_true", help="skip the zstd -19 --patch-from size (about "
                    "1 MB/s: 5 minutes on a 270 MB model); the -3 pipeline timing still runs")
    args = ap.parse_args()
    if args.share_identical_files:
        os.environ["ORCA_BENCH_SHARE_FILES"] = "1"  # read by the make child
    args.work.mkdir(parents=True, exist_ok=True)
    results = []
    if args.base or args.target:
        if not (args.base and args.target) and not (args.no_base and args.target):
            ap.error("--base and --target go together")
        pairs = [("real", args.base, args.target, args.compare_sizes != "")]  # "": timings only
    else:
        scales = [int(s) for s in args.sizes.split(",")]
        cmp = set(scales) if args.compare_sizes == "all" else {int(s) for s in args.compare_sizes.split(",") if s}
        pairs = []
        for s in scales:
            b, t = build_pair(args.work, s, args.dtype, args.shard_bytes)
            pairs.append((f"{s}x", b, t, s in cmp))
    if args.codecs_only:
        label, b, t, _ = pairs[0]
        fl = entropy_floors(b, t)
        r = {"label": label, "codecs": codec_comparison(b, t), "floor_delta_bytes": fl.order0,
             "cond_exp_delta_bytes": fl.cond_exp, "changed_fraction": fl.changed / max(fl.elements, 1),
             "rel_change_median": float(np.median(fl.rel_changes)) if fl.rel_changes else None}
        work = args.work / "run-codecs"
        work.mkdir(parents=True, exist_ok=True)
        r["patch_from_bytes"] = (patch_from_bytes(b, t, work) if args.compare_sizes != "" and not args.no_patch_from_19
                                 else None)
        print(f"== {label}: {b} -> {t}; {100 * r['changed_fraction']:.1f} % of elements changed, median relative "
              f"L2 change {r['rel_change_median']:.2e}")
        print_codecs(r)
        if args.json:
            args.json.write_text(json.dumps({"argv": sys.argv, "codecs": r}, indent=1) + "\n")
        return
    if args.no_base:
        r = no_base_sizes(pairs[0][2])
        print(f"== no base: every float tensor of {pairs[0][2]} coded alone, 16 MiB chunks, single thread")
        for k in ("nobase", "zstd_planes", "zipnn"):
            if r.get(k) is not None:
                print(f"   {k:<12} {100 * r[k] / r['raw_bytes']:6.2f} % of raw")
        print(f"   order-0 exponent bound (H(exponent) + other bits raw) {100 * r['exp_bound'] / r['raw_bytes']:.2f} %")
        if r.get("zipnn"):
            print(f"   orca-diff no-base / ZipNN = {r['nobase'] / r['zipnn']:.4f}")
        print(f"   no-base decode {r['nobase_decode_MBps']:.0f} MB/s (single thread, CPU time)")
        if args.json:
            args.json.write_text(json.dumps({"argv": sys.argv, "no_base": r}, indent=1) + "\n")
        return
    if args.explore:
        label, b, t, _ = pairs[0]
        rows = explore(b, t)
        print(f"candidate encodings, {label} {args.dtype if label != 'real' else ''}: % of the sampled bytes, "
              "single-thread MB/s (best effort; machine shared)")
        for r in rows:
            print(f"  {r['encoding']:<55} {r['percent']:6.2f} %  enc {r['encode_MBps']:6.0f}  dec {r['decode_MBps']:6.0f}")
        if args.json:
            args.json.write_text(json.dumps({"argv": sys.argv, "explore": rows}, indent=1) + "\n")
        return
    for label, b, t, compare in pairs:
        work = args.work / f"run-{label}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        print(f"[{time.strftime('%H:%M:%S')}] {label}: {b} -> {t} (load {os.getloadavg()[0]:.1f})", file=sys.stderr)
        r = bench_pair(b, t, work, args.repeats, compare, not args.no_patch_from_19)
        r["label"] = label
        r["dtype"] = args.dtype if label != "real" else None
        r["loadavg_end"] = os.getloadavg()
        results.append(r)
        shutil.rmtree(work, ignore_errors=True)
    print_report(results)
    if args.json:
        args.json.write_text(json.dumps({"argv": sys.argv, "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
