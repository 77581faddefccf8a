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


def test_bf16_single_bin_target_rebuilds_byte_identical_without_torch(tmp_path):
    shape = LlamaShape(vocab_size=256, hidden_size=32, intermediate_size=88, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4)
    base = write_llama(tmp_path / "base", shape, "BF16", seed=0)
    target = write_finetune(tmp_path / "target", shape, base_seed=0, dtype="BF16", ft=FineTune(add_pad_row=True), form="bin")
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
    assert any("not exactly one contiguous tensor" in n for n in notes)
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
