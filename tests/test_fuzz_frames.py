"""Coverage-guided fuzzing of the ANS frame parsers (issue 20.8): atheris mutates real frames
(dense bf16 and f32 frames of dense and sparse changes, bare headers, sparse ``ODS1``, no-base
``ODN1`` and low-rank ``ODR1`` frames)
and feeds them to ``codec.decode_chunk`` (codec ans: dense, sparse or zstd fallback) on the
numpy path and, where it is built, the C path. Any exception other than CorruptDiffError, or the two
paths disagreeing, is a crash that fails the test.

Coverage must really attach: atheris instruments the Python modules it imports, and no sanitizer
runtime is preloaded (with one preloaded, an earlier run's coverage counters stayed flat). The
test checks that libFuzzer's ``cov:`` count at the end is above the count after the seed corpus,
i.e. that mutations reached new code. Bounded: a fixed number of runs and a time cap, seeded, so
CI time stays under a minute on 2 cores.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from orca_diff import entropy, lowrank, nobase, sparse

REPO = Path(__file__).resolve().parent.parent
N = 3000  # elements of every seed frame (the harness decodes every input as N elements)

HARNESS = textwrap.dedent(f"""
    import os
    import sys
    import atheris
    with atheris.instrument_imports():
        import numpy as np
        from orca_diff import entropy, lowrank, nobase, sparse
        from orca_diff.codec import decode_chunk
        from orca_diff.errors import CorruptDiffError

    BASES = {{2: np.arange({N} * 2, dtype=np.uint8) * 7, 4: np.arange({N} * 4, dtype=np.uint8) * 3}}
    PATHS = [True] + ([False] if entropy.c_available() else [])

    def one(data: bytes) -> None:
        if len(data) < 5:
            return
        w = 4 if data[4] == 4 else 2  # the itemsize byte of the header picks the base width
        results = []
        for pure in PATHS:
            os.environ["ORCA_DIFF_PURE_PYTHON"] = "1" if pure else "0"
            try:  # dense, sparse and zstd fallback frames, as apply decodes them; no-base frames as raw chunks
                if data[:4] == b"ODN1":
                    out = decode_chunk(data, None, w, "raw", {N} * w, "planes", where="fuzz")
                else:
                    out = decode_chunk(data, BASES[w], w, "ulp", {N} * w, "planes", where="fuzz", codec="ans")
                assert out.size == {N} * w
                results.append(out.tobytes())
            except CorruptDiffError as exc:
                assert "\\n" not in str(exc)
                results.append(None)
        assert len(set(results)) == 1, "the C and numpy decoders disagree"

    atheris.Setup(sys.argv, one)
    atheris.Fuzz()
""")


def _seeds(folder: Path) -> None:
    rng = np.random.default_rng(0)
    for w, dtype in ((2, "BF16"), (4, "F32")):
        base = (np.arange(N * w, dtype=np.uint8) * (7 if w == 2 else 3)).view(entropy.UINT_FOR_SIZE[w])
        dense = base + rng.integers(0, 40, N).astype(base.dtype)
        sparse_t = base.copy()
        sparse_t[rng.integers(0, N, 30)] += 1
        for name, t in (("dense", dense), ("sparse", sparse_t)):
            frame = entropy.encode(t.view(np.uint8), base.view(np.uint8), w, dtype)
            (folder / f"{dtype}-{name}").write_bytes(frame)
            (folder / f"{dtype}-{name}-header").write_bytes(frame[: entropy._HEAD.size])
        (folder / f"{dtype}-nobase-frame").write_bytes(nobase.encode(dense.view(np.uint8), dtype))
        (folder / f"{dtype}-sparse-frame").write_bytes(sparse.encode(sparse_t.view(np.uint8), base.view(np.uint8),
                                                                      w, dtype))
        if w == 2:  # a low-rank frame around a dense one: 60 rows of 50, rank 2
            cols, r = 50, 2
            a = rng.integers(-300, 300, (N // cols, r)).astype(np.int16)
            b = rng.integers(-300, 300, (r, cols)).astype(np.int16)
            moved = lowrank.predict(base, dtype, a, b, -10, -10, 0, cols)
            near = moved.copy()
            near[rng.integers(0, N, 30)] += 1  # a sparse inner frame keeps the seed under -max_len
            inner = sparse.encode(near.view(np.uint8), moved.view(np.uint8), w, dtype)
            (folder / f"{dtype}-lowrank-frame").write_bytes(
                lowrank._HEAD.pack(lowrank.MAGIC, r, 0, -10, -10, cols, 0, N // cols) + a.tobytes() + b.tobytes() + inner)


def _cov(stderr: str, event: str) -> int:
    m = re.search(rf"#\d+\s+{event}\s+cov: (\d+)", stderr)
    assert m, f"no {event} line in libFuzzer's output:\n{stderr[-2000:]}"
    return int(m.group(1))


def test_atheris_on_ans_frames_gains_coverage_and_finds_nothing(tmp_path: Path) -> None:
    pytest.importorskip("atheris")
    harness = tmp_path / "harness.py"
    harness.write_text(HARNESS)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    _seeds(corpus)
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}  # no sanitizer runtime
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    runs = int(os.environ.get("ORCA_DIFF_FUZZ_RUNS", "1500"))
    r = subprocess.run([sys.executable, str(harness), f"-runs={runs}", "-seed=1", "-max_len=4096",
                        "-max_total_time=90", "-print_final_stats=1", str(corpus)],
                       env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    inited, done = _cov(r.stderr, "INITED"), _cov(r.stderr, "DONE")
    assert done > inited, f"coverage did not grow ({inited} -> {done}): instrumentation is not attached"
