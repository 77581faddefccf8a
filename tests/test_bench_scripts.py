"""The measuring scripts measure: scripts/context_bounds.py and scripts/peer_pipelines.py run on a
tiny pair and report what they claim (no timings are asserted)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

import context_bounds  # noqa: E402
import peer_pipelines  # noqa: E402

from orca_diff.synth import LlamaShape  # noqa: E402

SHAPE = LlamaShape(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=1,
                   num_attention_heads=4, num_key_value_heads=4)


@pytest.mark.parametrize("dtype", ["BF16", "F16"])
def test_context_bounds_refining_a_context_never_raises_the_plug_in_bound(make_pair, dtype):
    base, target = make_pair(dtype, shape=SHAPE)
    r = context_bounds.measure(base, target)
    assert r["tensors"] > 0 and r["elements"] * 2 == r["raw_bytes"]
    c = {k: v["percent"] for k, v in r["contexts"].items()}
    shipped = c["exponent x prev token is 0 (shipped)"]
    assert c["order 0 (tokens + raw bits)"] >= c["exponent bucket"] >= shipped - 1e-9
    for label in ("shipped x base's top mantissa bit", "shipped x base's top 2 mantissa bits", "shipped x base's sign",
                  "shipped x row/col change scale (side info)"):
        assert c[label] <= shipped + 1e-9  # a refinement of the shipped context
    assert 0 < shipped < 100


def test_peer_pipelines_rebuild_and_time_every_tool_or_say_why_not(make_pair, tmp_path):
    base, target = make_pair("BF16", shape=SHAPE)
    res = peer_pipelines.run(base, target, tmp_path / "work", repeats=1)  # each rebuild is checked inside
    o = res["orca-diff"]
    assert o["make_s"] > 0 and o["apply_s"] > 0 and 0 < o["bytes"]
    for tool in ("ZipNN delta", "zstd -3 --patch-from"):
        assert ("skipped" in res[tool] and res[tool]["skipped"]) or res[tool]["apply_s"] > 0
    peer_pipelines.print_table(res, sum(p.stat().st_size for p in peer_pipelines.weight_files(target)))


@pytest.mark.skipif(not __import__("orca_diff.entropy").entropy.c_available(), reason="times the C decoder")
def test_decoder_anatomy_builds_its_variants_and_times_only_exact_frames():
    """scripts/decoder_anatomy.py compiles timing-only variants of the shipped C source (each
    edit must find its anchor) and re-encodes with fixed context models, checking every frame it
    times; the encoder's own choice is never larger than a fixed model."""
    import decode_speed
    import decoder_anatomy

    pairs = decode_speed.synthetic_chunks(2, 1 << 19)
    r = decoder_anatomy.measure(pairs, "BF16", repeats=1, passes=1)
    assert set(r["builds"]) == set(decoder_anatomy.VARIANTS) and all(v > 0 for v in r["builds"].values())
    sizes = {k: v["percent"] for k, v in r["models"].items()}
    assert len(sizes) == 1 + len(decoder_anatomy.MODELS) and all(v["gbps"] > 0 for v in r["models"].values())
    chosen = sizes.pop("chosen per chunk (shipped)")
    assert 0 < chosen <= min(sizes.values()) * 1.002
