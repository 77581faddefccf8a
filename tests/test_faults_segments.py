"""Fault injection, segments files: a hostile publisher's manifest of a ``.bin`` target (kind
"segments", re-signed as an attacker can) and hostile ``.bin`` targets handed to make.

* Every hostile manifest must be refused with an OrcaDiffError (one line) by the parser, so
  apply writes nothing; a derandomized hypothesis run mutates a real segments manifest.
* Every hostile ``.bin`` must be refused by make with an OrcaDiffError, or carried so that the
  diff rebuilds it byte for byte (apply + sha256), never hang nor allocate a claimed size.
"""

from __future__ import annotations

import base64
import copy
import json
import os
import struct
import zipfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")

from faultkit import assert_no_output, expect_refusal, expect_safe, ledger, rewrite_manifest  # noqa: E402,F401
from orca_diff.apply import apply_diff  # noqa: E402
from orca_diff.containers.torchzip import read_zip_records  # noqa: E402
from orca_diff.errors import OrcaDiffError  # noqa: E402
from orca_diff.format import MANIFEST_NAME, MAX_INLINE_BYTES, MAX_SEGMENTS, canonical_sha256, parse_manifest  # noqa: E402
from orca_diff.make import make_diff  # noqa: E402
from orca_diff.synth import FineTune, LlamaShape, write_finetune, write_llama  # noqa: E402

from conftest import file_hashes  # noqa: E402

SHAPE = LlamaShape(vocab_size=128, hidden_size=32, intermediate_size=88, num_hidden_layers=1,
                   num_attention_heads=4, num_key_value_heads=4)
SUITE = "segments"


@pytest.fixture(scope="module")
def binkit(tmp_path_factory):
    """A base, a 2-shard ``.bin`` fine-tune and their diff (read-only: copy before damaging)."""
    root = tmp_path_factory.mktemp("segkit")
    base = write_llama(root / "base", SHAPE, "F16", seed=0)
    target = write_finetune(root / "target", SHAPE, base_seed=0, dtype="F16", ft=FineTune(add_pad_row=True),
                            form="bin", bin_shards=2)
    diff = root / "diff"
    make_diff(base, target, diff, chunk_bytes=4096, threads=1, progress=False)
    return {"root": root, "base": base, "target": target, "diff": diff}


def _bins(doc: dict) -> list[dict]:
    return [f for f in doc["target"]["files"] if f.get("kind") == "segments"]


def _first_of(segs: list[dict], kind: str) -> dict:
    return next(s for s in segs if kind in s)


# --------------------------------------------------------------------------- hostile manifests
def _overlap(d):  # a segment grows, the next one shrinks: same total, but a tensor is cut
    segs = _bins(d)[0]["segments"]
    i = next(i for i, s in enumerate(segs) if "tensor" in s)
    segs[i - 1]["size"] += 2
    segs[i]["size"] -= 2


def _gap(d):
    segs = _bins(d)[0]["segments"]
    del segs[1]


def _exceeds(d):
    segs = _bins(d)[0]["segments"]
    segs.append({"size": 4, "data": base64.b64encode(b"abcd").decode()})


def _short_of_size(d):
    _bins(d)[0]["size"] += 1


def _tensor_twice_one_file(d):
    f = _bins(d)[0]
    t = _first_of(f["segments"], "tensor")
    f["segments"].append(dict(t))
    f["size"] += t["size"]


def _tensor_in_two_files(d):
    a, b = _bins(d)[:2]
    t = _first_of(a["segments"], "tensor")
    b["segments"].append(dict(t))
    b["size"] += t["size"]


def _data_wrong_length(d):
    s = _first_of(_bins(d)[0]["segments"], "data")
    s["data"] = base64.b64encode(base64.b64decode(s["data"]) + b"x").decode()


def _data_not_base64(d):
    _first_of(_bins(d)[0]["segments"], "data")["data"] = "not base64!"


def _data_non_ascii(d):
    _first_of(_bins(d)[0]["segments"], "data")["data"] = "\u00e9\u00e9\u00e9\u00e9"


def _data_not_a_string(d):
    _first_of(_bins(d)[0]["segments"], "data")["data"] = [1, 2, 3]


def _data_over_inline_limit(d):  # 4098 bytes: base64 fits the string limit, the segment must not
    f = _bins(d)[0]
    raw = b"\0" * (MAX_INLINE_BYTES + 2)
    f["segments"].append({"size": len(raw), "data": base64.b64encode(raw).decode()})
    f["size"] += len(raw)


def _huge_count(d):
    f = _bins(d)[0]
    f["segments"] = [{"size": 1, "data": "AA=="}] * (MAX_SEGMENTS + 1)
    f["size"] = MAX_SEGMENTS + 1


def _zero_size(d):
    f = _bins(d)[0]
    f["segments"].insert(0, {"size": 0, "data": ""})


def _real_chunk(d: dict) -> dict:
    """A copy of a real chunk of the tensor table (its digest key is the manifest's)."""
    return copy.deepcopy(next(c for t in d["tensors"].values() for c in t["chunks"]))


def _as_chunk_segment(d: dict, **change) -> None:
    """Turn the first inline data segment into a payload-chunks segment, with ``change`` applied."""
    s = _first_of(_bins(d)[0]["segments"], "data")
    s.pop("data")
    c = _real_chunk(d)
    c.update({"start": 0, "size": s["size"], "mode": "raw"}, **change)
    s["chunks"] = [c]


def _chunk_outside_payload(d):
    p = d["payloads"][0]
    _as_chunk_segment(d, payload=p["path"], offset=p["size"] - 1, length=64)


def _chunk_in_unknown_payload(d):
    _as_chunk_segment(d, payload="payload-99999.odz", offset=0)


def _chunk_offset_huge(d):
    _as_chunk_segment(d, offset=2**62)


def _chunk_not_tiling(d):
    _as_chunk_segment(d, start=1)


def _negative_size(d):
    _bins(d)[0]["segments"][0]["size"] = -5


def _huge_size(d):
    _bins(d)[0]["segments"][0]["size"] = 2**64
    _bins(d)[0]["size"] = 2**64


def _float_size(d):
    _bins(d)[0]["segments"][0]["size"] = 1.0


def _bool_size(d):
    _bins(d)[0]["segments"][0]["size"] = True


def _no_source(d):
    _bins(d)[0]["segments"][0].pop(next(k for k in ("tensor", "data", "chunks") if k in _bins(d)[0]["segments"][0]))


def _segments_not_a_list(d):
    _bins(d)[0]["segments"] = {"0": {"size": 1}}


def _segment_not_an_object(d):
    _bins(d)[0]["segments"][0] = 7


def _delta_chunk_in_verbatim(d):
    _as_chunk_segment(d, mode="delta")


def _tensor_unplaced(d):
    f = _bins(d)[0]
    s = _first_of(f["segments"], "tensor")
    s.pop("tensor")
    s["data"] = base64.b64encode(b"\0" * s["size"]).decode() if s["size"] <= MAX_INLINE_BYTES else "AA=="


HOSTILE = {f.__name__.lstrip("_"): f for f in [
    _overlap, _gap, _exceeds, _short_of_size, _tensor_twice_one_file, _tensor_in_two_files, _data_wrong_length,
    _data_not_base64, _data_non_ascii, _data_not_a_string, _data_over_inline_limit, _huge_count, _zero_size,
    _chunk_outside_payload, _chunk_in_unknown_payload, _chunk_offset_huge, _chunk_not_tiling, _negative_size, _huge_size, _float_size, _bool_size, _no_source, _segments_not_a_list,
    _segment_not_an_object, _delta_chunk_in_verbatim, _tensor_unplaced]}


#: The reason a refusal must give, where one reason is the point of the case.
REASON = {"chunk_outside_payload": "outside payload", "chunk_in_unknown_payload": "outside payload",
          "delta_chunk_in_verbatim": "must be raw", "chunk_not_tiling": "tile", "data_over_inline_limit": "inline",
          "tensor_twice_one_file": "placed twice", "tensor_in_two_files": "placed twice", "zero_size": "expected an integer",
          "data_not_base64": "base64", "data_non_ascii": "base64", "huge_count": "segments, more than",
          "overlap": "bytes, the segment", "gap": "segments cover", "exceeds": "segments cover", "short_of_size": "segments cover",
          "data_wrong_length": "data holds"}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_segments_manifest_is_refused_before_anything_is_written(ledger, binkit, tmp_path, case):
    diff = tmp_path / "diff"
    import shutil

    shutil.copytree(binkit["diff"], diff)
    rewrite_manifest(diff, HOSTILE[case])
    out = tmp_path / "out"
    exc = expect_refusal(ledger, SUITE, case, lambda: apply_diff(binkit["base"], diff, out, threads=1, progress=False),
                         (REASON[case],) if case in REASON else ())
    assert "\n" not in str(exc) and "Traceback" not in str(exc)
    assert_no_output(out)


def test_the_kit_diff_rebuilds_exactly(binkit, tmp_path):
    m = parse_manifest((binkit["diff"] / MANIFEST_NAME).read_bytes())
    assert len([f for f in m.files if f.kind == "segments"]) == 2
    apply_diff(binkit["base"], binkit["diff"], tmp_path / "out", threads=1, progress=False)
    assert file_hashes(tmp_path / "out") == file_hashes(binkit["target"])


# --------------------------------------------------------------------------- hypothesis mutations
MUTATE = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                         HealthCheck.function_scoped_fixture])
NUMBERS = [-1, 0, 1, 2, 3, 4, 7, 4096, 4097, 4098, 2**31, 2**62, 2**63, 2**64, -(2**63), 1.5, True, None]
STRINGS = ["", "AA==", "AAAA", "QQ==", "QR==", "=", "A", "====", "AA\n==", "not base64", "\u00e9",
           "model.norm.weight", "lm_head.weight", "no.such.tensor", "payload-00001.odz"]


@MUTATE
@given(data=st.data())
def test_segments_manifest_mutations_only_raise_orca_diff_errors(ledger, binkit, data):
    doc = json.loads((binkit["diff"] / MANIFEST_NAME).read_bytes())
    doc.pop("manifest_sha256")
    files = _bins(doc)
    for _ in range(data.draw(st.integers(1, 3))):
        f = files[data.draw(st.integers(0, len(files) - 1))]
        segs = f["segments"]
        i = data.draw(st.integers(0, len(segs) - 1))
        action = data.draw(st.sampled_from(["size", "file-size", "value", "drop", "dup", "move", "swap", "key",
                                            "chunk"]))
        s = segs[i]
        if action == "size":
            s["size"] = data.draw(st.one_of(st.sampled_from(NUMBERS), st.integers(-5, 5).map(lambda k: s["size"] + k)))
        elif action == "file-size":
            f["size"] = data.draw(st.one_of(st.sampled_from(NUMBERS), st.integers(-5, 5).map(lambda k: f["size"] + k)))
        elif action == "value":
            k = next(k for k in ("tensor", "data", "chunks") if k in s) if any(k in s for k in ("tensor", "data", "chunks")) else "data"
            s[k] = data.draw(st.one_of(st.sampled_from(STRINGS), st.sampled_from(NUMBERS), st.just([]), st.just({})))
        elif action == "drop":
            del segs[i]
        elif action == "dup":
            segs.insert(i, copy.deepcopy(s))
        elif action == "move":  # into the other file
            other = files[(files.index(f) + 1) % len(files)]
            other["segments"].append(segs.pop(i))
        elif action == "swap":
            j = data.draw(st.integers(0, len(segs) - 1))
            segs[i], segs[j] = segs[j], segs[i]
        elif action == "key":
            s[data.draw(st.sampled_from(["tensor", "data", "chunks", "size", "extra"]))] = copy.deepcopy(
                data.draw(st.sampled_from(segs)))
        elif action == "chunk" and "chunks" in s and s["chunks"]:
            c = s["chunks"][0]
            c[data.draw(st.sampled_from(sorted(c)))] = data.draw(st.one_of(st.sampled_from(NUMBERS),
                                                                           st.sampled_from(STRINGS)))
    doc["manifest_sha256"] = canonical_sha256(doc)
    raw = json.dumps(doc).encode()
    try:
        m = parse_manifest(raw, "fuzz.json")
    except OrcaDiffError as exc:
        assert "\n" not in str(exc)
        ledger.record("fuzz: segments mutations", "", "detected")
        return
    except Exception:
        ledger.record("fuzz: segments mutations", "", "unhandled")
        raise
    ledger.record("fuzz: segments mutations", "", "recovered")
    # what is accepted is self-consistent: every segments file is tiled exactly, each tensor placed once
    placed = []
    for f in m.files:
        if f.kind == "segments":
            assert sum(s.size for s in f.segments) == f.size
            assert all(s.size > 0 for s in f.segments)
            assert all(s.data is None or len(s.data) == s.size <= MAX_INLINE_BYTES for s in f.segments)
            placed += [s.tensor for s in f.segments if s.tensor]
    assert len(placed) == len(set(placed))
    assert parse_manifest(m.to_bytes(), "again").to_bytes() == m.to_bytes()


# --------------------------------------------------------------------------- hostile .bin targets
def _eocd(raw: bytes) -> int:
    return raw.rfind(struct.pack("<I", 0x06054B50))


def _central_entries(raw: bytes) -> list[int]:
    """Offsets of the central directory entries."""
    at = _eocd(raw)
    n, _cd_size, cd_offset = struct.unpack("<HII", raw[at + 10:at + 20])
    out, p = [], cd_offset
    for _ in range(n):
        out.append(p)
        nlen, xlen, clen = struct.unpack("<HHH", raw[p + 28:p + 34])
        p += 46 + nlen + xlen + clen
    return out


def _storage_entry(raw: bytes) -> int:
    for p in _central_entries(raw):
        nlen = struct.unpack("<H", raw[p + 28:p + 30])[0]
        if b"/data/" in raw[p + 46:p + 46 + nlen]:
            return p
    raise AssertionError("no storage record")


def _put(raw: bytes, at: int, fmt: str, *vals) -> bytes:
    b = struct.pack(fmt, *vals)
    return raw[:at] + b + raw[at + len(b):]


def z_cd_offset_lies(raw):
    at = _eocd(raw)
    return _put(raw, at + 16, "<I", struct.unpack("<I", raw[at + 16:at + 20])[0] - 7)


def z_cd_size_huge(raw):
    return _put(raw, _eocd(raw) + 12, "<I", 0xFFFFFFF0)


def z_record_offset_lies(raw):  # a storage's local header offset moved by 8: no local header there
    p = _storage_entry(raw)
    return _put(raw, p + 42, "<I", struct.unpack("<I", raw[p + 42:p + 46])[0] + 8)


def z_record_size_grows(raw):  # a storage claims 64 more bytes than it has: runs into the next record
    p = _storage_entry(raw)
    size = struct.unpack("<I", raw[p + 24:p + 28])[0] + 64
    return _put(_put(raw, p + 20, "<I", size), p + 24, "<I", size)


def z_record_past_eof(raw):
    p = _central_entries(raw)[-1]
    return _put(_put(raw, p + 20, "<I", 1 << 30), p + 24, "<I", 1 << 30)


def z_records_overlap(raw):  # two central entries name the same local header
    ps = _central_entries(raw)
    lho = struct.unpack("<I", raw[ps[0] + 42:ps[0] + 46])[0]
    return _put(raw, ps[1] + 42, "<I", lho)


def z_zip64_petabytes(raw):  # sizes 0xFFFFFFFF with a zip64 extra claiming 2**50 bytes
    p = _storage_entry(raw)
    nlen, xlen = struct.unpack("<HH", raw[p + 28:p + 32])
    z64 = struct.pack("<HHQQ", 1, 16, 2**50, 2**50)
    entry = raw[p:p + 46]
    entry = entry[:20] + struct.pack("<II", 0xFFFFFFFF, 0xFFFFFFFF) + entry[28:30] + struct.pack("<H", xlen + len(z64)) + entry[32:]
    new = entry + raw[p + 46:p + 46 + nlen + xlen] + z64
    raw = raw[:p] + new + raw[p + 46 + nlen + xlen:]
    at = _eocd(raw)
    return _put(raw, at + 12, "<I", struct.unpack("<I", raw[at + 12:at + 16])[0] + len(z64))


def z_zip64_short_extra(raw):  # a zip64 marker with an extra too short to hold the value
    p = _storage_entry(raw)
    nlen, xlen = struct.unpack("<HH", raw[p + 28:p + 32])
    z64 = struct.pack("<HH", 1, 4) + b"\xff" * 4
    entry = raw[p:p + 46]
    entry = entry[:24] + struct.pack("<I", 0xFFFFFFFF) + entry[28:30] + struct.pack("<H", xlen + len(z64)) + entry[32:]
    raw = raw[:p] + entry + raw[p + 46:p + 46 + nlen + xlen] + z64 + raw[p + 46 + nlen + xlen:]
    at = _eocd(raw)
    return _put(raw, at + 12, "<I", struct.unpack("<I", raw[at + 12:at + 16])[0] + len(z64))


def z_zip64_locator_lies(raw):  # EOCD says zip64, the locator points past EOF
    at = _eocd(raw)
    raw = _put(raw, at + 16, "<I", 0xFFFFFFFF)
    loc = struct.pack("<IIQI", 0x07064B50, 0, 2**60, 1)
    return raw[:at] + loc + raw[at:]


def z_truncated_half(raw):
    return raw[:len(raw) // 2]


def z_truncated_tail(raw):
    return raw[:-1]


def z_header_only(raw):
    return raw[:4]


def z_storage_bytes_flipped(raw):  # still a valid zip with a valid pickle: the bytes must round-trip
    p = _storage_entry(raw)
    lho = struct.unpack("<I", raw[p + 42:p + 46])[0]
    nlen, xlen = struct.unpack("<HH", raw[lho + 26:lho + 30])
    d = lho + 30 + nlen + xlen
    return raw[:d] + bytes([raw[d] ^ 0xFF]) + raw[d + 1:]


def z_trailing_garbage_after_eocd(raw):
    return raw + b"PK\x05\x06" + b"\0" * 3


def z_comment_hides_a_fake_eocd(raw):
    fake = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 1, 1, 10, 0, 0)
    at = _eocd(raw)
    return _put(raw, at + 20, "<H", len(fake)) + fake


ZIP_ATTACKS = {f.__name__[2:]: f for f in [
    z_cd_offset_lies, z_cd_size_huge, z_record_offset_lies, z_record_size_grows, z_record_past_eof,
    z_records_overlap, z_zip64_petabytes, z_zip64_short_extra, z_zip64_locator_lies, z_truncated_half,
    z_truncated_tail, z_header_only, z_storage_bytes_flipped, z_trailing_garbage_after_eocd,
    z_comment_hides_a_fake_eocd]}


@pytest.fixture(scope="module")
def plain_bin(tmp_path_factory, binkit):
    """A single-file ``.bin`` target (one zip) and its bytes."""
    root = tmp_path_factory.mktemp("plainbin")
    target = write_finetune(root / "target", SHAPE, base_seed=0, dtype="F16", ft=FineTune(add_pad_row=True),
                            form="bin")
    return target, (target / "pytorch_model.bin").read_bytes()


def _hostile_target(tmp_path: Path, plain_bin, data: bytes | None) -> Path:
    import shutil

    target = tmp_path / "target"
    shutil.copytree(plain_bin[0], target)
    if data is not None:
        (target / "pytorch_model.bin").write_bytes(data)
    return target


def _make_then_roundtrip(ledger, case: str, base: Path, target: Path, tmp_path: Path) -> None:
    """make refuses (one line) or its diff rebuilds the target byte for byte."""
    diff, out = tmp_path / "diff", tmp_path / "out"
    want = file_hashes(target)

    def both():
        make_diff(base, target, diff, chunk_bytes=4096, threads=1, progress=False)
        apply_diff(base, diff, out, threads=1, progress=False)

    exc = expect_safe(ledger, SUITE, case, both, out, lambda o: file_hashes(o) == want)
    if exc is not None:
        assert "\n" not in str(exc).strip(), str(exc)
        assert not out.exists()


@pytest.mark.parametrize("case", sorted(ZIP_ATTACKS))
def test_hostile_bin_target_is_refused_or_rebuilt_exactly(ledger, binkit, plain_bin, tmp_path, case):
    hostile = ZIP_ATTACKS[case](plain_bin[1])
    assert hostile != plain_bin[1]
    target = _hostile_target(tmp_path, plain_bin, hostile)
    _make_then_roundtrip(ledger, case, binkit["base"], target, tmp_path)


def test_zip_parser_never_allocates_a_claimed_size(plain_bin, tmp_path):
    """The zip parser refuses sizes the file cannot hold before reading them."""
    for case in ("zip64_petabytes", "cd_size_huge", "record_past_eof", "zip64_locator_lies"):
        p = tmp_path / f"{case}.bin"
        p.write_bytes(ZIP_ATTACKS[case](plain_bin[1]))
        with pytest.raises(OrcaDiffError):
            read_zip_records(p)


def test_pickle_torch_refuses_is_carried_verbatim_and_rebuilt(ledger, binkit, tmp_path):
    target = tmp_path / "target"
    target.mkdir()
    (target / "config.json").write_text("{}")
    torch.save({"model.norm.weight": torch.ones(32), "evil": zipfile.ZipFile}, target / "pytorch_model.bin")
    _make_then_roundtrip(ledger, "pickle refused by weights_only", binkit["base"], target, tmp_path)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs")
def test_a_fifo_named_bin_is_refused_without_hanging(ledger, binkit, plain_bin, tmp_path):
    target = _hostile_target(tmp_path, plain_bin, None)
    (target / "pytorch_model.bin").unlink()
    os.mkfifo(target / "pytorch_model.bin")
    expect_refusal(ledger, SUITE, "fifo .bin",
                   lambda: make_diff(binkit["base"], target, tmp_path / "diff", threads=1, progress=False))
    assert not (tmp_path / "diff" / MANIFEST_NAME).exists()


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="no /dev/zero")
def test_a_bin_symlinked_to_dev_zero_is_refused(ledger, binkit, plain_bin, tmp_path):
    target = _hostile_target(tmp_path, plain_bin, None)
    (target / "pytorch_model.bin").unlink()
    (target / "pytorch_model.bin").symlink_to("/dev/zero")
    expect_refusal(ledger, SUITE, "/dev/zero .bin",
                   lambda: make_diff(binkit["base"], target, tmp_path / "diff", threads=1, progress=False))
    assert not (tmp_path / "diff" / MANIFEST_NAME).exists()


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs")
def test_torchzip_readers_refuse_a_fifo_or_device_without_blocking(tmp_path):
    """The .bin readers themselves (not only make's discovery, which a swap after it could get
    past) open with open_regular: a FIFO or /dev/zero is refused by name, never read or blocked
    on. Run in a subprocess with a timeout, so that a regression fails instead of hanging."""
    import subprocess
    import sys

    os.mkfifo(tmp_path / "fifo.bin")
    (tmp_path / "zero.bin").symlink_to("/dev/zero")
    code = (
        "import sys\nfrom pathlib import Path\n"
        "from orca_diff.errors import FormatError\n"
        "from orca_diff.containers.torchzip import TorchZipModel, is_torch_zip, read_zip_records\n"
        "root = Path(sys.argv[1])\n"
        "for name in ('fifo.bin', 'zero.bin'):\n"
        "    p = root / name\n"
        "    for fn in (is_torch_zip, read_zip_records, lambda q: TorchZipModel(root, [q], {})):\n"
        "        try:\n"
        "            fn(p)\n"
        "        except FormatError as exc:\n"
        "            assert 'not a regular file' in str(exc), exc\n"
        "        else:\n"
        "            raise SystemExit(f'{name}: accepted')\n"
        "print('ok')\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 0 and "ok" in r.stdout, r.stdout + r.stderr


def test_a_zip_with_two_members_of_one_name_is_refused(ledger, binkit, tmp_path):
    """Two ``data/0`` members: torch reads one, a name-keyed map the other. Before the fix make
    placed one tensor at both records (reading the bytes of the wrong one) and died on its own
    manifest ("chunks must tile"); now the ambiguous zip is refused by name."""
    import io
    import warnings

    target = tmp_path / "target"
    target.mkdir()
    (target / "config.json").write_text("{}")
    torch.save({"model.norm.weight": torch.arange(32, dtype=torch.float32), "x": torch.ones(64)}, tmp_path / "o.bin")
    buf = io.BytesIO()
    with zipfile.ZipFile(tmp_path / "o.bin") as zin, zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z, \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate name
        for i in zin.infolist():
            z.writestr(i.filename, zin.read(i.filename))
        dup = next(i.filename for i in zin.infolist() if i.filename.endswith("/data/0"))
        z.writestr(dup, b"\x07" * 128)
    (target / "pytorch_model.bin").write_bytes(buf.getvalue())
    exc = expect_refusal(ledger, SUITE, "duplicate member name",
                         lambda: make_diff(binkit["base"], target, tmp_path / "diff", threads=1, progress=False),
                         ("appears twice",))
    assert "\n" not in str(exc)


@MUTATE
@given(data=st.data())
def test_zip_parser_on_damaged_real_bin_only_raises_orca_diff_errors(ledger, plain_bin, tmp_path_factory, data):
    """Flip bytes of a real ``.bin``'s structure (the central directory, local headers and end
    records): the parser refuses, or returns records that lie inside the file, do not overlap and
    have distinct names."""
    raw = bytearray(plain_bin[1])
    hot = [*range(_eocd(bytes(raw)) - 200, len(raw))]  # end records and the last central entries
    for p in _central_entries(bytes(raw)):
        hot += range(p, p + 46)
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.sampled_from(hot))
        raw[i] = data.draw(st.sampled_from([0x00, 0xFF, raw[i] ^ 0x01, raw[i] ^ 0x80, 0x7F]))
    if data.draw(st.booleans()):
        raw = raw[:data.draw(st.integers(0, len(raw)))]
    path = tmp_path_factory.mktemp("zipfuzz") / "pytorch_model.bin"
    path.write_bytes(bytes(raw))
    try:
        records = read_zip_records(path)
    except OrcaDiffError as exc:
        assert "\n" not in str(exc)
        ledger.record("fuzz: torch zip", "", "detected")
        return
    except Exception:
        ledger.record("fuzz: torch zip", "", "unhandled")
        raise
    ledger.record("fuzz: torch zip", "", "recovered")
    end = 0
    for r in sorted(records, key=lambda r: r.header_offset):
        assert r.header_offset >= end and r.data_offset + r.size <= len(raw)
        end = r.data_offset + r.size
    assert len({r.name for r in records}) == len(records)


@settings(MUTATE, max_examples=15)
@given(data=st.data())
def test_make_on_damaged_real_bin_refuses_or_round_trips(ledger, binkit, plain_bin, tmp_path_factory, data):
    """The same damage, end to end: make refuses with one line, or its diff rebuilds the damaged
    file byte for byte (never a diff of some other file)."""
    raw = bytearray(plain_bin[1])
    hot = [*range(_eocd(bytes(raw)) - 200, len(raw))]
    for p in _central_entries(bytes(raw)):
        hot += range(p, p + 46)
    hot += range(0, 600)  # the first local header and the pickle
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.sampled_from(hot))
        raw[i] = data.draw(st.sampled_from([0x00, 0xFF, raw[i] ^ 0x01, raw[i] ^ 0x80]))
    root = tmp_path_factory.mktemp("makefuzz")
    target = _hostile_target(root, plain_bin, bytes(raw))
    _make_then_roundtrip(ledger, "damaged .bin", binkit["base"], target, root)
