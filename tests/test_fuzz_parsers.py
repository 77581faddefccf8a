"""Coverage-guided fuzzing (atheris, libFuzzer) of the manifest parser and of the segments parser,
for a bounded time on every CI run (issue 20).

Each fuzzer runs in a subprocess of plain Python: no sanitizer runtime preloaded (with one, the
previous run's coverage did not attach, and libFuzzer fuzzed blind). Only ``orca_diff`` is
instrumented, so the feedback is about our parser, not numpy's or json's. The test checks that
the coverage libFuzzer reports really grows from the seed corpus (a fuzzer whose coverage is
flat proves nothing), that no input made anything but an OrcaDiffError escape (the harness
lets any other exception crash libFuzzer, which the test reports with the input), and it
records every input in the fault ledger.

* manifest: an input is either raw bytes for :func:`parse_manifest` (first byte even) or a JSON
  document that the harness re-signs (its ``manifest_sha256`` recomputed, as an attacker can)
  before parsing (first byte odd), so mutations get past the checksum into the structure checks.
  Whatever is accepted must serialise and parse back to the same manifest.
* segments: an input is a file size (4 bytes) and a JSON list of segments, parsed by
  ``format._segments`` against the tensor table of the session's real diff. Whatever is accepted
  must tile the file exactly.

FUZZ_SECONDS (default 20) bounds each run; ORCA_DIFF_FUZZ_SECONDS overrides it.
"""

from __future__ import annotations

import ast
import base64
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from faultkit import REPO, Kit, cli_env, kit, ledger  # noqa: F401 - fixtures
from orca_diff.format import file_segments, load_manifest

FUZZ_SECONDS = int(os.environ.get("ORCA_DIFF_FUZZ_SECONDS", "20"))

HARNESS_COMMON = """
import json, os, struct, sys
import atheris

with atheris.instrument_imports(include=["orca_diff"]):
    import orca_diff.format as fmt
    from orca_diff.errors import OrcaDiffError

counts = {"detected": 0, "recovered": 0}
log = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)


def counted(one):
    def run(data):
        try:
            if one(data):
                counts["recovered"] += 1
            else:
                counts["detected"] += 1
        finally:  # libFuzzer exits without running atexit: the counts are written after every input
            os.pwrite(log, (str(counts) + " " * 20).encode(), 0)
    return run
"""

MANIFEST_HARNESS = HARNESS_COMMON + """

def one(data: bytes) -> bool:
    if not data:
        return False
    body = data[1:]
    if data[0] & 1:
        try:
            doc = json.loads(body.decode("utf-8"))
        except (ValueError, RecursionError):
            return False
        if not isinstance(doc, dict):
            return False
        doc.pop("manifest_sha256", None)
        try:
            doc["manifest_sha256"] = fmt.canonical_sha256(doc)
            body = json.dumps(doc).encode()
        except (ValueError, RecursionError, TypeError):
            return False
    try:
        m = fmt.parse_manifest(body, "fuzz.json")
    except OrcaDiffError:
        return False
    again = fmt.parse_manifest(m.to_bytes(), "again.json")  # what is accepted round-trips
    assert again.body() == m.body(), "an accepted manifest does not round-trip"
    return True


atheris.Setup([sys.argv[0]] + sys.argv[2:], counted(one))
atheris.Fuzz()
"""

SEGMENTS_HARNESS = HARNESS_COMMON + """
m = fmt.load_manifest(os.environ["FUZZ_DIFF"])
key = m.digest_algo


def one(data: bytes) -> bool:
    if len(data) < 4:
        return False
    size = struct.unpack("<I", data[:4])[0] % (1 << 22)
    try:
        items = json.loads(data[4:].decode("utf-8"))
    except (ValueError, RecursionError):
        return False
    try:
        segs = fmt._segments(items, "fuzz.bin", size, key, m.tensors, set())
    except OrcaDiffError:
        return False
    cursor = 0
    for s in segs:  # what is accepted tiles the file, each segment with exactly one source
        assert s.offset == cursor and s.size >= 1, "segments do not tile the file"
        assert sum(x is not None and x != () for x in (s.tensor, s.data, s.chunks or None)) == 1
        cursor += s.size
    assert cursor == size, "segments do not cover the file"
    return True


atheris.Setup([sys.argv[0]] + sys.argv[2:], counted(one))
atheris.Fuzz()
"""

_COV = re.compile(r"\bcov: (\d+)")


def _run_fuzzer(tmp_path: Path, name: str, harness: str, seeds: dict[str, bytes], env: dict[str, str]) -> tuple[dict, int, int]:
    """Run one harness for FUZZ_SECONDS; returns (outcome counts, initial coverage, final coverage)."""
    script = tmp_path / f"{name}_harness.py"
    script.write_text(textwrap.dedent(harness))
    corpus = tmp_path / f"{name}_corpus"
    corpus.mkdir()
    for seed, data in seeds.items():
        (corpus / seed).write_bytes(data)
    counts = tmp_path / f"{name}_counts.txt"
    full_env = {**cli_env(), **env}
    full_env.pop("LD_PRELOAD", None)  # no sanitizer runtime: it kept the coverage from attaching
    r = subprocess.run([sys.executable, str(script), str(counts), f"-max_total_time={FUZZ_SECONDS}", "-seed=1",
                        "-max_len=262144", "-timeout=20", "-rss_limit_mb=2048", f"-artifact_prefix={tmp_path}/",
                        str(corpus)], env=full_env, capture_output=True, text=True, timeout=FUZZ_SECONDS + 240,
                       cwd=REPO)
    assert r.returncode == 0, f"{name} fuzzer found a crash:\n{r.stderr[-4000:]}"
    covs = [int(c) for c in _COV.findall(r.stderr)]
    inited = re.search(r"INITED cov: (\d+)", r.stderr)
    assert inited and covs, f"{name}: libFuzzer printed no coverage (instrumentation did not attach):\n{r.stderr[-2000:]}"
    found = ast.literal_eval(counts.read_text().strip())
    print(f"{name}: {sum(found.values())} inputs {found}, coverage {inited.group(1)} -> {max(covs)}")
    return found, int(inited.group(1)), max(covs)


def _record(ledger, suite: str, found: dict) -> None:
    for outcome, n in found.items():
        for _ in range(n):
            ledger.record(suite, "", outcome)


def test_atheris_fuzzes_the_manifest_parser_with_growing_coverage(ledger, kit: Kit, tmp_path: Path) -> None:
    pytest.importorskip("atheris")
    manifest = (kit.diff / "orca-diff.json").read_bytes()
    doc = json.loads(manifest)
    small = dict(doc, tensors=dict(list(doc["tensors"].items())[:2]))  # a smaller seed mutates faster
    seeds = {"raw": b"\x00" + manifest, "resigned": b"\x01" + manifest,
             "small": b"\x01" + json.dumps(small).encode(), "empty-object": b"\x01{}"}
    found, inited, final = _run_fuzzer(tmp_path, "manifest", MANIFEST_HARNESS, seeds, {})
    assert sum(found.values()) > len(seeds)
    assert final > inited, f"manifest fuzzer: coverage did not grow ({inited} -> {final})"
    assert found.get("recovered", 0) >= 1  # the valid seeds are accepted (and round-trip)
    _record(ledger, "fuzz: atheris manifest", found)


def _segments_seed(kit: Kit) -> bytes:
    """A valid segments list: the first safetensors file of the session's diff, seen as segments."""
    m = load_manifest(kit.diff)
    f = next(f for f in m.files if f.kind == "safetensors")
    items = []
    for s in file_segments(f):
        if s.tensor is not None:
            items.append({"size": s.size, "tensor": s.tensor})
        else:
            data = s.data or b""
            for i in range(0, len(data), 4096):
                piece = data[i:i + 4096]
                items.append({"size": len(piece), "data": base64.b64encode(piece).decode()})
    return f.size.to_bytes(4, "little") + json.dumps(items).encode()


def test_atheris_fuzzes_the_segments_parser_with_growing_coverage(ledger, kit: Kit, tmp_path: Path) -> None:
    pytest.importorskip("atheris")
    m = load_manifest(kit.diff)
    chunk = next(c for t in m.tensors.values() for c in t.chunks if c.mode == "raw")
    raw_chunk = {"start": 0, "size": chunk.size, "mode": "raw", "payload": chunk.payload, "offset": chunk.offset,
                 "length": chunk.length, m.digest_algo: chunk.digest}
    seeds = {"real": _segments_seed(kit),
             "chunks": chunk.size.to_bytes(4, "little") + json.dumps([{"size": chunk.size, "chunks": [raw_chunk]}]).encode(),
             "data": (3).to_bytes(4, "little") + b'[{"size": 3, "data": "YWJj"}]'}
    found, inited, final = _run_fuzzer(tmp_path, "segments", SEGMENTS_HARNESS, seeds, {"FUZZ_DIFF": str(kit.diff)})
    assert sum(found.values()) > len(seeds)
    assert final > inited, f"segments fuzzer: coverage did not grow ({inited} -> {final})"
    assert found.get("recovered", 0) >= 1
    _record(ledger, "fuzz: atheris segments", found)
