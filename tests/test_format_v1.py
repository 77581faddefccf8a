"""Diffs of format version 1 (orca-diff 0.1: sha256 tensor digests, zstd codec) keep applying.

tests/data/v1 holds a tiny base and its version-1 diff, made by orca-diff 0.1 (commit f6621f9),
and the sha256 of every file of the fine-tune it was made from.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

from click.testing import CliRunner

from orca_diff.apply import apply_diff
from orca_diff.cli import cli
from orca_diff.format import load_manifest
from orca_diff.verify import verify_diff, verify_model

DATA = Path(__file__).parent / "data" / "v1"


def _expected() -> dict[str, str]:
    lines = (DATA / "target.sha256sum").read_text().splitlines()
    return {name: sha for sha, name in (line.split(None, 1) for line in lines)}


def test_a_version_1_diff_is_read_with_sha256_tensor_digests():
    m = load_manifest(DATA / "diff")
    assert m.format_version == 1 and m.digest_algo == "sha256"
    verify_diff(DATA / "diff", progress=False)


def test_a_version_1_diff_rebuilds_the_fine_tune_byte_for_byte(tmp_path: Path):
    base = shutil.copytree(DATA / "base", tmp_path / "base")
    out = tmp_path / "out"
    apply_diff(base, DATA / "diff", out, progress=False, threads=2)
    got = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.iterdir()}
    assert got == _expected()
    verify_model(out, DATA / "diff", progress=False)


def test_fingerprint_with_sha256_digests_matches_a_version_1_diffs_base():
    m = load_manifest(DATA / "diff")
    r = CliRunner().invoke(cli, ["fingerprint", str(DATA / "base"), "--digest", "sha256", "-q"])
    assert r.exit_code == 0, r.output
    assert r.output.strip() == m.base.fingerprint
    r = CliRunner().invoke(cli, ["fingerprint", str(DATA / "base"), "-q"])
    assert r.output.strip() != m.base.fingerprint  # blake3 digests: the version-2 fingerprint


def test_loading_a_manifest_reserves_its_size_not_the_256_mib_bound():
    """read(n) reserves n bytes: a 30 KB manifest must not cost the bound's 256 MiB each load."""
    import tracemalloc

    tracemalloc.start()
    try:
        load_manifest(DATA / "diff")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, peak
