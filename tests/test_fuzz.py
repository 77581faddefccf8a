"""Fault injection, part 6: fuzzing the three parsers of untrusted bytes.

The manifest parser, the safetensors header reader and the chunk decoder see bytes from the
internet. For ANY input, only an OrcaDiffError may escape them (never a KeyError, ValueError,
MemoryError, RecursionError...), and what they accept must be self-consistent (a decoded chunk
is exactly the size asked for). Hypothesis runs derandomized (seeded by the test) with bounded
example counts, so CI is deterministic and fast; structured strategies mutate a real manifest
(with its checksum recomputed) so examples get past the JSON and checksum layers. atheris, a
coverage-guided fuzzer, runs the same targets for a fixed number of runs when it is installed.
"""

from __future__ import annotations

import ast
import copy
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from faultkit import REPO, Kit, cli_env, kit, ledger  # noqa: F401 - fixtures
from orca_diff.codec import decode_chunk, encode_chunk
from orca_diff.errors import OrcaDiffError
from orca_diff.format import canonical_sha256, parse_manifest
from orca_diff.containers import DTYPE_SIZES, parse_safetensors_header, read_safetensors_header

FUZZ = settings(max_examples=300, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _run(ledger, suite: str, fn) -> object:
    """Call ``fn``: an OrcaDiffError is a refusal, a result is an acceptance, anything else is a bug."""
    try:
        result = fn()
    except OrcaDiffError:
        ledger.record(suite, "", "detected")
        return None
    except Exception:
        ledger.record(suite, "", "unhandled")
        raise
    ledger.record(suite, "", "recovered")
    return result


json_scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
                         st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20),
                         st.sampled_from(["F16", "BF16", "F32", "U8", "delta", "raw", "ulp", "xor", "planes",
                                          "escape", "bytes", "zstd", "blob", "safetensors", "base", "diff",
                                          "../x", "/abs", "C:\\x", "payload-00001.odz", "config.json"]))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)), max_leaves=12)


def _paths(doc: object, prefix: tuple = ()) -> list[tuple]:
    """Every location in a JSON document, as a tuple of keys/indexes."""
    out = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += _paths(v, prefix + (i,))
    return out


def _sign(doc: dict) -> bytes:
    doc = dict(doc)
    doc.pop("manifest_sha256", None)
    doc["manifest_sha256"] = canonical_sha256(doc)
    return json.dumps(doc).encode()


# --------------------------------------------------------------------------- manifest


@FUZZ
@given(data=st.binary(max_size=2048))
def test_manifest_parser_only_raises_orca_diff_errors_on_random_bytes(ledger, data: bytes) -> None:
    _run(ledger, "fuzz: manifest bytes", lambda: parse_manifest(data, "fuzz.json"))


@pytest.fixture(scope="module")
def manifest_doc(kit: Kit) -> dict:
    doc = kit.manifest_doc()
    doc.pop("manifest_sha256")
    return doc


@FUZZ
@given(choice=st.data())
def test_manifest_parser_only_raises_orca_diff_errors_on_re_signed_mutations(ledger, manifest_doc: dict, choice) -> None:
    """Replace, delete or duplicate 1-3 parts of a real manifest, then recompute its checksum."""
    doc = copy.deepcopy(manifest_doc)
    locations = _paths(doc)
    for _ in range(choice.draw(st.integers(1, 3))):
        where = choice.draw(st.sampled_from(locations[1:]))
        parent = doc
        try:
            for k in where[:-1]:
                parent = parent[k]
            key = where[-1]
            action = choice.draw(st.sampled_from(["replace", "delete", "copy-sibling", "number"]))
            if action == "replace":
                parent[key] = choice.draw(json_values)
            elif action == "delete":
                del parent[key]
            elif action == "copy-sibling" and isinstance(parent, list) and parent:
                parent.append(copy.deepcopy(parent[key]))
            elif action == "number":
                parent[key] = choice.draw(st.sampled_from([-1, 0, 1, 2**31, 2**62, 2**62 + 1, 2**63, 2**64]))
        except (KeyError, IndexError, TypeError):
            continue  # the location vanished with an earlier mutation
    data = _sign(doc)
    result = _run(ledger, "fuzz: manifest mutations", lambda: parse_manifest(data, "fuzz.json"))
    if result is not None:  # what is accepted can be serialised again and parsed to the same thing
        again = parse_manifest(result.to_bytes(), "again")
        assert again.to_bytes() == result.to_bytes()


@settings(FUZZ, max_examples=150)
@given(data=st.data())
def test_manifest_parser_on_byte_level_damage_of_a_real_manifest(ledger, kit: Kit, data) -> None:
    raw = bytearray((kit.diff / "orca-diff.json").read_bytes())
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    _run(ledger, "fuzz: manifest byte damage", lambda: parse_manifest(bytes(raw), "fuzz.json"))


# --------------------------------------------------------------------------- safetensors header


header_entries = st.dictionaries(
    st.text(max_size=12),
    st.one_of(json_values, st.fixed_dictionaries({
        "dtype": st.one_of(st.sampled_from(sorted(DTYPE_SIZES)), json_scalars),
        "shape": st.one_of(st.lists(st.integers(-2, 2**65), max_size=4), json_values),
        "data_offsets": st.one_of(st.lists(st.integers(-2**64, 2**65), min_size=0, max_size=3), json_values),
    })), max_size=5)


@FUZZ
@given(raw=st.one_of(st.binary(max_size=512), header_entries.map(lambda d: json.dumps(d).encode())),
       file_size=st.one_of(st.none(), st.integers(0, 2**40)))
def test_safetensors_header_parser_only_raises_orca_diff_errors(ledger, raw: bytes, file_size: int | None) -> None:
    _run(ledger, "fuzz: safetensors header", lambda: parse_safetensors_header(raw, "fuzz", file_size))


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz-files")


@settings(FUZZ, max_examples=200)
@given(prefix=st.one_of(st.binary(max_size=16), st.integers(0, 2**64 - 1).map(lambda n: n.to_bytes(8, "little"))),
       body=st.one_of(st.binary(max_size=256), header_entries.map(lambda d: json.dumps(d).encode())),
       honest_length=st.booleans())
def test_safetensors_file_reader_only_raises_orca_diff_errors(ledger, scratch: Path, prefix: bytes, body: bytes,
                                                                honest_length: bool) -> None:
    path = scratch / "fuzz.safetensors"
    path.write_bytes((len(body).to_bytes(8, "little") if honest_length else prefix) + body)
    _run(ledger, "fuzz: safetensors file", lambda: read_safetensors_header(path))


# --------------------------------------------------------------------------- chunk decoder


CODEC_SHAPES = [(1, "raw", "bytes"), (2, "raw", "planes"), (4, "raw", "planes"), (2, "ulp", "planes"),
                (2, "ulp", "escape"), (4, "ulp", "escape"), (4, "xor", "planes"), (8, "ulp", "planes"),
                (1, "xor", "bytes")]


def _decode(payload: bytes, itemsize: int, transform: str, layout: str, size: int, seed: int) -> np.ndarray:
    base = None if transform == "raw" else np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8)
    out = decode_chunk(payload, base, itemsize, transform, size, layout, where="fuzz")
    assert out.dtype == np.uint8 and out.size == size, "a decoded chunk must be exactly the size asked for"
    return out


@FUZZ
@given(payload=st.binary(max_size=512), shape=st.sampled_from(CODEC_SHAPES), elems=st.integers(1, 64))
def test_chunk_decoder_only_raises_orca_diff_errors_on_random_bytes(ledger, payload: bytes, shape, elems: int) -> None:
    itemsize, transform, layout = shape
    _run(ledger, "fuzz: chunk decoder bytes", lambda: _decode(payload, itemsize, transform, layout, elems * itemsize, 0))


@FUZZ
@given(content=st.binary(max_size=600), shape=st.sampled_from(CODEC_SHAPES), elems=st.integers(1, 64),
       declare=st.booleans())
def test_chunk_decoder_on_well_formed_frames_of_arbitrary_content(ledger, content: bytes, shape, elems: int,
                                                                  declare: bool) -> None:
    """Valid zstd frames whose content is anything (wrong length, escape streams that lie)."""
    itemsize, transform, layout = shape
    frame = zstandard.ZstdCompressor(write_content_size=declare).compress(content)
    _run(ledger, "fuzz: chunk decoder frames", lambda: _decode(frame, itemsize, transform, layout, elems * itemsize, 1))


@FUZZ
@given(data=st.data(), shape=st.sampled_from(CODEC_SHAPES), elems=st.integers(1, 256))
def test_chunk_decoder_on_damaged_real_chunks(ledger, data, shape, elems: int) -> None:
    """Encode a real chunk, damage 1-3 bytes: refused, or decoded to exactly ``size`` bytes (the
    payload sha256 in the manifest is what catches a damaged frame that still decodes)."""
    itemsize, transform, layout = shape
    rng = np.random.default_rng(elems)
    size = elems * itemsize
    target = rng.integers(0, 256, size, dtype=np.uint8)
    base = None if transform == "raw" else np.random.default_rng(2).integers(0, 256, size, dtype=np.uint8)
    payload = bytearray(encode_chunk(target, base, itemsize, transform, layout))
    assert bytes(decode_chunk(bytes(payload), base, itemsize, transform, size, layout)) == target.tobytes()
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(0, len(payload) - 1))
        payload[i] ^= data.draw(st.integers(1, 255))
    _run(ledger, "fuzz: chunk decoder damage", lambda: _decode(bytes(payload), itemsize, transform, layout, size, 2))


# --------------------------------------------------------------------------- atheris (optional)

ATHERIS_HARNESS = textwrap.dedent("""
    import sys
    import atheris
    with atheris.instrument_imports():
        import numpy as np
        from orca_diff.format import parse_manifest
        from orca_diff.containers import parse_safetensors_header
        from orca_diff.codec import decode_chunk
        from orca_diff.errors import OrcaDiffError

    import os
    counts = {"detected": 0, "recovered": 0}
    log = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)

    def one(data: bytes) -> None:
        try:
            _one(data)
        finally:  # counted after every input: libFuzzer exits without running Python's atexit
            os.pwrite(log, (str(counts) + " " * 20).encode(), 0)

    def _one(data: bytes) -> None:
        if not data:
            return
        target, rest = data[0] % 3, data[1:]
        try:
            if target == 0:
                parse_manifest(rest, "fuzz.json")
            elif target == 1:
                parse_safetensors_header(rest, "fuzz", None)
            else:
                base = np.arange(128, dtype=np.uint8)
                out = decode_chunk(rest, base, 2, "ulp", 128, "escape", where="fuzz")
                assert out.size == 128
            counts["recovered"] += 1
        except OrcaDiffError:
            counts["detected"] += 1

    atheris.Setup([sys.argv[0]] + sys.argv[2:], one)
    atheris.Fuzz()
""")


def test_atheris_coverage_guided_fuzzing_finds_no_escaping_exception(ledger, kit: Kit, tmp_path: Path) -> None:
    """Seeded with a real manifest, a real safetensors header and a real escape-layout chunk.
    Skipped where atheris is not installed (see docs/reliability.md)."""
    pytest.importorskip("atheris")
    harness = tmp_path / "harness.py"
    harness.write_text(ATHERIS_HARNESS)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "manifest").write_bytes(b"\0" + (kit.diff / "orca-diff.json").read_bytes())
    shard = sorted(kit.base.glob("*.safetensors"))[0]
    (corpus / "header").write_bytes(b"\1" + read_safetensors_header(shard).raw)
    sym = np.random.default_rng(0).integers(0, 300, 64).astype(np.uint16).view(np.uint8)
    (corpus / "chunk").write_bytes(b"\2" + encode_chunk(sym, np.arange(128, dtype=np.uint8), 2, "ulp", "escape"))
    runs = 5_000
    counts = tmp_path / "counts.txt"
    r = subprocess.run([sys.executable, str(harness), str(counts), f"-runs={runs}", "-seed=1", "-max_len=65536",
                        "-len_control=0", str(corpus)],
                       env=cli_env(), capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"Done {runs} runs" in r.stderr
    found = ast.literal_eval(counts.read_text().strip())
    assert sum(found.values()) >= runs - 1  # the empty input is skipped
    for outcome, n in found.items():
        for _ in range(n):
            ledger.record("fuzz: atheris", "", outcome)
