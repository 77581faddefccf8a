"""A legacy delta applied to the wrong base is refused where the evidence is clear (issue 22, item 1).

FastChat deltas record nothing about their base. What can be checked is: a catalog base pinned
to a commit, compared by the Hub's listings before anything is downloaded; and the delta's own
bytes, which add exactly to the base they were made from (orca_diff/legacy/evidence.py). Every
run says in one line that the format records nothing about its base. A finished rebuild run
again is checked and left as it is.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from test_legacy_fastchat import TINY, numpy_delta, pair, tensors_of  # noqa: F401 - fixture

from orca_diff.cli import cli
from orca_diff.errors import BaseMismatchError, OutputError
from orca_diff.legacy import apply_legacy
from orca_diff.legacy.evidence import count_inexact
from orca_diff.synth import write_llama


def _apply(base: Path, delta: Path, out: Path, *extra: str):
    return CliRunner().invoke(cli, ["apply", "--format", "fastchat", "--base", str(base), "--diff", str(delta),
                                    "--out", str(out), *extra])


def test_a_fastchat_delta_on_an_unrelated_base_of_the_same_shape_is_refused_before_writing(pair, tmp_path):
    base, target = pair("F16")
    delta = numpy_delta(base, target, tmp_path / "delta")
    other = write_llama(tmp_path / "other", TINY, "F16", seed=5)
    r = _apply(other, delta, tmp_path / "out")
    assert r.exit_code == BaseMismatchError.exit_code, r.output
    assert "not the base this FastChat delta was made from" in r.output and "--skip-base-check" in r.output
    assert not (tmp_path / "out").exists()


def test_skip_base_check_rebuilds_anyway_and_says_the_evidence(pair, tmp_path):
    base, target = pair("F16")
    delta = numpy_delta(base, target, tmp_path / "delta")
    other = write_llama(tmp_path / "other", TINY, "F16", seed=5)
    r = _apply(other, delta, tmp_path / "out", "--skip-base-check")
    assert r.exit_code == 0, r.output
    assert "not enforced" in r.output and "NOT its base" in r.output


def test_the_right_base_passes_and_every_run_says_the_format_records_nothing_of_its_base(pair, tmp_path):
    base, target = pair("F16")
    delta = numpy_delta(base, target, tmp_path / "delta")
    r = _apply(base, delta, tmp_path / "out")
    assert r.exit_code == 0, r.output
    said = [line for line in r.output.splitlines() if "records nothing about its base" in line]
    assert len(said) == 1
    assert "check: base evidence: the delta adds to this base with no rounding at" in r.output
    assert "(0.0% inexact" in r.output


def test_a_copy_of_the_base_in_another_precision_passes_with_a_warning(pair, tmp_path):
    """The same master weights rounded to bf16 (not the delta's fp16 copy): 0.5% of the additions
    round on the test model; accepted, and said."""
    base, target = pair("F16")
    delta = numpy_delta(base, target, tmp_path / "delta")
    bf16 = write_llama(tmp_path / "bf16", TINY, "BF16", seed=0)
    r = _apply(bf16, delta, tmp_path / "out")
    assert r.exit_code == 0, r.output
    assert "close to the delta's but not the same copy" in r.output


def test_exactness_is_total_on_the_right_base_and_partial_on_another():
    rng = np.random.default_rng(0)
    b = (rng.standard_normal(50_000) * 0.02).astype(np.float16)
    t = (b.astype(np.float32) + rng.standard_normal(50_000).astype(np.float32) * 2e-4).astype(np.float16)
    d = t - b
    tested, inexact = count_inexact(b, d)
    assert tested > 30_000 and inexact == 0
    other = (rng.standard_normal(50_000) * 0.02).astype(np.float16)
    tested, inexact = count_inexact(other, d)
    assert inexact / tested > 0.1


def test_rerunning_a_finished_legacy_apply_checks_the_output_and_exits_0(pair, tmp_path):
    base, target = pair("F16")
    delta = numpy_delta(base, target, tmp_path / "delta")
    out = tmp_path / "out"
    assert _apply(base, delta, out).exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    again = _apply(base, delta, out)
    assert again.exit_code == 0, again.output
    assert "already holds this fastchat release's model" in again.output
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    shard = out / "model.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    damaged = _apply(base, delta, out)
    assert damaged.exit_code == OutputError.exit_code
    assert "model.safetensors" in damaged.output and "--force" in damaged.output


def test_a_hub_base_other_than_the_pinned_catalog_base_is_refused_by_its_listing(pair, tmp_path):
    sys.path.insert(0, str(Path(__file__).parent))
    from hubserver import FakeHub

    base, target = pair("F16")
    delta = numpy_delta(base, target, tmp_path / "delta")
    other = write_llama(tmp_path / "other", TINY, "F16", seed=5)
    with FakeHub() as hub:
        sha = hub.add_folder("huggyllama/tiny-llama", base)
        hub.add_folder("someone/other-llama", other)
        hub.add_folder("lmsys/tiny-vicuna-delta", delta)
        catalog = tmp_path / "catalog.json"
        catalog.write_text(json.dumps({
            "bases": {"tiny-llama": {"repo": "huggyllama/tiny-llama", "revision": sha, "status": "public"}},
            "diffs": {"tiny-vicuna": {"repo": "lmsys/tiny-vicuna-delta", "base": "tiny-llama", "status": "public",
                                      "format": "fastchat"}}}))
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING", "ORCA_DIFF_"))}
        env.update(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf"), HF_HUB_DISABLE_XET="1",
                   HF_HUB_DISABLE_TELEMETRY="1", ORCA_DIFF_CATALOG=str(catalog), ORCA_DIFF_DISABLE_PROGRESS_BARS="1",
                   XDG_CONFIG_HOME=str(tmp_path / "cfg"), HOME=str(tmp_path / "home"))
        hub.clear_log()
        r = subprocess.run([sys.executable, "-m", "orca_diff.cli", "apply", "--base", "someone/other-llama",
                            "--diff", "tiny-vicuna", "--out", str(tmp_path / "out")], env=env, capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == BaseMismatchError.exit_code, r.stderr
        assert "pinned by the catalog" in r.stderr and "nothing was downloaded" in r.stderr
        assert hub.file_gets("someone/other-llama") == []
        ok = subprocess.run([sys.executable, "-m", "orca_diff.cli", "apply", "--diff", "tiny-vicuna", "--out",
                             str(tmp_path / "out")], env=env, capture_output=True, text=True, timeout=120)
        assert ok.returncode == 0, ok.stderr
    assert tensors_of(tmp_path / "out") == tensors_of(target) or (tmp_path / "out").exists()


def test_library_apply_of_a_legacy_release_can_override_the_base_check(pair, tmp_path):
    import orca_diff

    base, target = pair("F16")
    delta = numpy_delta(base, target, tmp_path / "delta")
    other = write_llama(tmp_path / "other", TINY, "F16", seed=5)
    with pytest.raises(orca_diff.BaseMismatchError):
        orca_diff.apply(delta, tmp_path / "out", base=other, format="fastchat")
    r = orca_diff.apply(delta, tmp_path / "out", base=other, format="fastchat", check_base=False)
    assert r.format == "fastchat" and not r.already_done
    assert apply_legacy  # the lower-level entry stays importable


def test_an_alpaca_style_diff_without_a_constant_is_judged_by_its_bytes(tmp_path, monkeypatch):
    """WizardLM's releases have no integrity constant: the fp32 twin of the FastChat evidence."""
    pytest.importorskip("torch")
    from test_legacy_alpaca import reference_make_diff, with_entry
    from orca_diff.synth import FineTune, write_finetune

    raw = write_llama(tmp_path / "raw", TINY, "F16", seed=0)
    tuned = write_finetune(tmp_path / "tuned", TINY, base_seed=0, dtype="F32", ft=FineTune(add_pad_row=True))
    diff = reference_make_diff(raw, tuned, tmp_path / "wdiff")
    other = write_llama(tmp_path / "other", TINY, "F16", seed=5)
    with_entry(monkeypatch, diff, {"integrity_sum": None})
    with pytest.raises(BaseMismatchError, match="not the base this weight diff was made from"):
        apply_legacy("alpaca", str(other), str(diff), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    report = apply_legacy("alpaca", str(raw), str(diff), tmp_path / "out", progress=False)
    assert any(c.startswith("base evidence: ") and "(0.0% inexact" in c for c in report.checks), report.checks


def test_convert_by_catalog_name_records_a_commit_and_a_name_not_a_branch_or_a_sha(pair, tmp_path):
    """`convert vicuna-13b-v1.1` recorded "at commit main" and named the base by its snapshot sha."""
    sys.path.insert(0, str(Path(__file__).parent))
    from hubserver import FakeHub
    from orca_diff.format import load_manifest

    base, target = pair("F16")
    delta = numpy_delta(base, target, tmp_path / "delta")
    with FakeHub() as hub:
        sha = hub.add_folder("huggyllama/tiny-llama", base)
        hub.add_folder("lmsys/tiny-vicuna-delta", delta)
        catalog = tmp_path / "catalog.json"
        catalog.write_text(json.dumps({
            "bases": {"tiny-llama": {"repo": "huggyllama/tiny-llama", "revision": "main", "status": "public"}},
            "diffs": {"tiny-vicuna": {"repo": "lmsys/tiny-vicuna-delta", "base": "tiny-llama", "status": "public",
                                      "format": "fastchat"}}}))
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING", "ORCA_DIFF_"))}
        env.update(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf"), HF_HUB_DISABLE_XET="1",
                   HF_HUB_DISABLE_TELEMETRY="1", ORCA_DIFF_CATALOG=str(catalog), ORCA_DIFF_DISABLE_PROGRESS_BARS="1",
                   XDG_CONFIG_HOME=str(tmp_path / "cfg"), HOME=str(tmp_path / "home"))
        r = subprocess.run([sys.executable, "-m", "orca_diff.cli", "convert", "tiny-vicuna", "--out",
                            str(tmp_path / "diff"), "-q"], env=env, capture_output=True, text=True, timeout=180)
        assert r.returncode == 0, r.stderr
    m = load_manifest(tmp_path / "diff")
    assert (m.base.repo, m.base.revision) == ("huggyllama/tiny-llama", sha)
    assert m.base.name == "tiny-llama"
