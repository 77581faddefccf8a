"""HF ``.bin`` fine-tunes (torch zip files) rebuilt byte for byte, by an apply that has no torch.

The worked example is shaped like microsoft/Orca-2-13b over meta-llama/Llama-2-13b-hf: an fp16
safetensors base with vocabulary V, an fp32 target in 6 ``.bin`` shards with an index, V+3 rows
([PAD], <|im_start|>, <|im_end|>) and added_tokens.json. make needs torch (to name the storages);
apply and verify run in a subprocess where ``import torch`` fails.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from orca_diff.containers.torchzip import file_pieces, name_storages, read_zip_records  # noqa: E402
from orca_diff.errors import FormatError  # noqa: E402
from orca_diff.format import MANIFEST_NAME, canonical_sha256, load_manifest, parse_manifest  # noqa: E402
from orca_diff.make import make_diff  # noqa: E402
from orca_diff.synth import FineTune, LlamaShape, write_finetune, write_llama  # noqa: E402

from conftest import file_hashes  # noqa: E402

#: Orca 2 over Llama-2-13b, scaled down: same tensor names, 3 added tokens, 6 shards.
ORCA2_TINY = LlamaShape(vocab_size=320, hidden_size=64, intermediate_size=172, num_hidden_layers=3,
                        num_attention_heads=4, num_key_value_heads=4)
ORCA2_TOKENS = ("[PAD]", "<|im_start|>", "<|im_end|>")
ROOT = Path(__file__).resolve().parents[1]

#: Runs python with torch unimportable (sys.modules["torch"] = None makes `import torch` raise).
NO_TORCH = ("import sys; sys.modules['torch'] = None; sys.argv = ['orca-diff'] + sys.argv[1:]; "
            "from orca_diff.cli.main import main; main()")


def orca_without_torch(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ORCA_DIFF_DISABLE_PROGRESS_BARS": "1"}
    return subprocess.run([sys.executable, "-c", NO_TORCH, *args], capture_output=True, text=True, env=env,
                          timeout=300)


@pytest.fixture(scope="module")
def orca2(tmp_path_factory):
    root = tmp_path_factory.mktemp("orca2")
    base = write_llama(root / "llama-2-13b-hf", ORCA2_TINY, "F16", seed=0, max_shard_bytes=120_000)
    target = write_finetune(root / "orca-2-13b", ORCA2_TINY, base_seed=0, dtype="F32",
                            ft=FineTune(added_tokens=ORCA2_TOKENS), form="bin", bin_shards=6)
    diff = root / "diff"
    notes: list[str] = []
    make_diff(base, target, diff, chunk_bytes=16384, notes=notes)
    return {"root": root, "base": base, "target": target, "diff": diff, "notes": notes}


def test_orca2_shaped_fp32_bin_target_rebuilds_byte_identical_without_torch(orca2, tmp_path):
    target = orca2["target"]
    assert len(list(target.glob("pytorch_model-*-of-00006.bin"))) == 6
    assert json.loads((target / "added_tokens.json").read_text()) == {"[PAD]": 320, "<|im_start|>": 321, "<|im_end|>": 322}
    out = tmp_path / "orca-2-13b"
    r = orca_without_torch("apply", "--base", str(orca2["base"]), "--diff", str(orca2["diff"]), "--out", str(out), "-q")
    assert r.returncode == 0, r.stderr
    assert file_hashes(out) == file_hashes(target)
    r = orca_without_torch("verify", "--diff", str(orca2["diff"]), "--base", str(orca2["base"]), "--model", str(out))
    assert r.returncode == 0, r.stderr
    assert "model OK" in r.stdout


def test_orca2_shaped_diff_codes_storages_against_the_base_and_is_well_under_the_target(orca2):
    m = load_manifest(orca2["diff"])
    bins = [f for f in m.files if f.path.endswith(".bin")]
    assert len(bins) == 6 and {f.kind for f in bins} == {"segments"}
    emb = m.tensors["model.embed_tokens.weight"]
    assert emb.dtype == "F32" and emb.shape == (323, 64)
    assert emb.encoding.transform == "ulp" and emb.encoding.base_dtype == "F16"
    assert emb.encoding.shared_bytes == 320 * 64 * 4  # the 3 added rows are raw, the rest a delta
    assert all(t.encoding.transform == "ulp" for t in m.tensors.values())
    assert m.payload_bytes < 0.75 * m.target_bytes
    # the zip structure and pickle travel verbatim, never a storage's bytes in the clear
    placed = [s.tensor for f in bins for s in f.segments if s.tensor]
    assert sorted(placed) == sorted(m.tensors)


@pytest.mark.parametrize("dtype", ["BF16", "F16"])
def test_single_bin_target_rebuilds_byte_identical_without_torch(tmp_path, dtype):
    shape = LlamaShape(vocab_size=256, hidden_size=32, intermediate_size=88, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4)
    base = write_llama(tmp_path / "base", shape, "BF16", seed=0)
    target = write_finetune(tmp_path / "target", shape, base_seed=0, dtype=dtype, ft=FineTune(add_pad_row=True), form="bin")
    assert (target / "pytorch_model.bin").is_file() and not (target / "pytorch_model.bin.index.json").exists()
    make_diff(base, target, tmp_path / "diff", chunk_bytes=4096)
    out = tmp_path / "out"
    r = orca_without_torch("apply", "--base", str(base), "--diff", str(tmp_path / "diff"), "--out", str(out), "-q")
    assert r.returncode == 0, r.stderr
    assert file_hashes(out) == file_hashes(target)


def test_shared_storages_views_and_strided_tensors_rebuild_exactly(tmp_path, make_pair):
    """Tied weights (one storage, two names), a view into a storage and a transposed tensor: each
    storage is named after a tensor covering it exactly or kept verbatim; the file is exact."""
    base, _ = make_pair("F32")
    from orca_diff.containers import open_model

    b = open_model(base)
    emb = torch.from_numpy(b.read("model.embed_tokens.weight").view("float32").reshape(b.tensors["model.embed_tokens.weight"].shape).copy())
    q = torch.from_numpy(b.read("model.layers.0.self_attn.q_proj.weight").view("float32").reshape(32, 32).copy())
    b.close()
    sd = {"model.embed_tokens.weight": emb + 1e-6, "lm_head.weight": None, "model.layers.0.self_attn.q_proj.weight": q.t(),
          "row": emb[3], "model.norm.weight": torch.ones(32)}
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"]  # tied: the same storage
    target = tmp_path / "target"
    target.mkdir()
    torch.save(sd, target / "pytorch_model.bin")
    (target / "config.json").write_text("{}")
    records = read_zip_records(target / "pytorch_model.bin")
    named, notes = name_storages(target / "pytorch_model.bin", records)
    names = {st.info.name for st in named.values()}
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names  # one record, first name
    assert "model.layers.0.self_attn.q_proj.weight" not in names  # transposed: not row-major, verbatim
    assert "row" in names  # a view: its bytes are a tensor, the rest of its storage verbatim
    assert any("holds no contiguous tensor" in n for n in notes) and any("(a view)" in n for n in notes)
    pieces = file_pieces((target / "pytorch_model.bin").stat().st_size, records, named)
    assert sum(p.size for p in pieces) == (target / "pytorch_model.bin").stat().st_size
    make_diff(base, target, tmp_path / "diff", chunk_bytes=4096)
    out = tmp_path / "out"
    r = orca_without_torch("apply", "--base", str(base), "--diff", str(tmp_path / "diff"), "--out", str(out), "-q")
    assert r.returncode == 0, r.stderr
    assert file_hashes(out) == file_hashes(target)


# --------------------------------------------------------------------------- hostile manifests
def rewrite(diff: Path, edit) -> bytes:
    doc = json.loads((diff / MANIFEST_NAME).read_text())
    doc.pop("manifest_sha256")
    edit(doc)
    doc["manifest_sha256"] = canonical_sha256(doc)
    return json.dumps(doc).encode()


def first_bin(doc: dict) -> dict:
    return next(f for f in doc["target"]["files"] if f.get("kind") == "segments")


def _grow_first(d: dict) -> None:
    first_bin(d)["segments"][0]["size"] += 1


def _place_twice(d: dict) -> None:
    segs = first_bin(d)["segments"]
    t = next(s for s in segs if "tensor" in s)
    segs.append(dict(t))
    first_bin(d)["size"] += t["size"]


def _two_sources(d: dict) -> None:
    seg = next(s for s in first_bin(d)["segments"] if "tensor" in s)
    seg["data"] = base64.b64encode(b"x" * seg["size"]).decode()


def _bad_base64(d: dict) -> None:
    next(s for s in first_bin(d)["segments"] if "data" in s)["data"] = "***"


def _wrong_size(d: dict) -> None:
    next(s for s in first_bin(d)["segments"] if "tensor" in s)["size"] += 4


def _unknown_tensor(d: dict) -> None:
    next(s for s in first_bin(d)["segments"] if "tensor" in s)["tensor"] = "no.such.tensor"


@pytest.mark.parametrize("edit, message", [
    (_grow_first, "segments cover|data holds"),
    (_place_twice, "placed twice"),
    (_two_sources, "exactly one of"),
    (_bad_base64, "base64"),
    (_wrong_size, "has .* bytes, the segment"),
    (_unknown_tensor, "not in the tensor table"),
])
def test_hostile_segments_are_refused(orca2, edit, message):
    with pytest.raises(FormatError, match=message):
        parse_manifest(rewrite(orca2["diff"], edit))


def _zip64_file(path: Path, members: list[tuple[str, bytes]]) -> None:
    """A stored zip whose central directory uses zip64 fields for every size and offset (what
    torch writes for shards over 4 GiB, like Orca 2's ~10 GB ones), built by hand."""
    import struct
    import zlib

    body, central = b"", b""
    for name, data in members:
        offset = len(body)
        nb = name.encode()
        pad = b"\0" * ((-(offset + 30 + len(nb) + 4)) % 64)
        extra = struct.pack("<HH", 0xFB, len(pad)) + pad  # torch-style alignment padding
        crc = zlib.crc32(data)
        body += struct.pack("<IHHHHHIIIHH", 0x04034B50, 45, 0, 0, 0, 0, crc, len(data), len(data), len(nb),
                            len(extra)) + nb + extra + data
        z64 = struct.pack("<HHQQQ", 1, 24, len(data), len(data), offset)
        central += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 45, 45, 0, 0, 0, 0, crc, 0xFFFFFFFF, 0xFFFFFFFF,
                               len(nb), len(z64), 0, 0, 0, 0, 0xFFFFFFFF) + nb + z64
    cd_offset = len(body)
    eocd64_at = cd_offset + len(central)
    eocd64 = struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, len(members), len(members), len(central),
                         cd_offset)
    locator = struct.pack("<IIQI", 0x07064B50, 0, eocd64_at, 1)
    eocd = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0)
    path.write_bytes(body + central + eocd64 + locator + eocd)


def test_zip64_central_directories_are_read(tmp_path):
    members = [("archive/data.pkl", b"pickle"), ("archive/data/0", bytes(range(256)) * 3), ("archive/version", b"3\n")]
    _zip64_file(tmp_path / "z.bin", members)
    import zipfile

    assert zipfile.ZipFile(tmp_path / "z.bin").read("archive/data/0") == members[1][1]  # a valid zip
    records = read_zip_records(tmp_path / "z.bin")
    raw = (tmp_path / "z.bin").read_bytes()
    assert [r.name for r in records] == [m[0] for m in members]
    for r, (_, data) in zip(records, members):
        assert raw[r.data_offset:r.data_offset + r.size] == data
        assert r.data_offset % 64 == 0


def test_a_compressed_or_truncated_zip_is_refused_by_name(tmp_path):
    import zipfile

    with zipfile.ZipFile(tmp_path / "c.bin", "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("archive/data/0", b"x" * 1000)
    with pytest.raises(FormatError, match="compressed"):
        read_zip_records(tmp_path / "c.bin")
    (tmp_path / "t.bin").write_bytes((tmp_path / "c.bin").read_bytes()[:-30])
    with pytest.raises(FormatError, match="not a torch zip"):
        read_zip_records(tmp_path / "t.bin")


@pytest.mark.parametrize("kind", ["pre-1.6 format", "pickle torch refuses"])
def test_a_bin_make_cannot_cut_travels_verbatim_and_still_rebuilds_exactly(make_pair, tmp_path, kind):
    base, _ = make_pair("F32")
    target = tmp_path / "target"
    target.mkdir()
    if kind == "pre-1.6 format":
        torch.save({"model.norm.weight": torch.ones(32)}, target / "pytorch_model.bin",
                   _use_new_zipfile_serialization=False)
    else:
        torch.save({"model.norm.weight": torch.ones(32), "hook": print}, target / "pytorch_model.bin")
    (target / "config.json").write_text("{}")
    notes: list[str] = []
    make_diff(base, target, tmp_path / "diff", notes=notes)
    assert any("verbatim" in n for n in notes)
    out = tmp_path / "out"
    r = orca_without_torch("apply", "--base", str(base), "--diff", str(tmp_path / "diff"), "--out", str(out), "-q")
    assert r.returncode == 0, r.stderr
    assert file_hashes(out) == file_hashes(target)
