"""The library face, used as a script author would: `import orca_diff`, call make/apply/verify
with what the CLI takes (folders, catalog names, Hub ids and revisions), read typed reports, catch
typed errors. Hub calls run in a subprocess (huggingface_hub reads HF_ENDPOINT when imported)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from test_hub import (BASE_REPO, DIFF_REPO, Runner, assert_same_files, hub, orca, world)  # noqa: F401 - fixtures

import orca_diff
from conftest import file_hashes


def test_the_package_root_offers_make_apply_verify_reports_and_errors():
    for name in ("make", "apply", "verify", "MakeReport", "ApplyReport", "VerifyReport", "OrcaDiffError",
                 "BaseMismatchError", "CorruptDiffError", "HubError", "OutputError", "UsageError"):
        assert name in orca_diff.__all__ and getattr(orca_diff, name) is not None, name
    assert issubclass(orca_diff.BaseMismatchError, orca_diff.OrcaDiffError)


def test_make_apply_verify_on_folders_return_typed_reports(make_pair, tmp_path):
    base, target = make_pair("BF16")
    made = orca_diff.make(base, target, tmp_path / "diff")
    assert isinstance(made, orca_diff.MakeReport)
    assert made.payload_bytes < made.target_bytes and made.base_fingerprint
    rebuilt = orca_diff.apply(tmp_path / "diff", tmp_path / "out", base=base)
    assert isinstance(rebuilt, orca_diff.ApplyReport) and not rebuilt.already_done
    assert file_hashes(tmp_path / "out") == file_hashes(target)
    again = orca_diff.apply(tmp_path / "diff", tmp_path / "out", base=base)
    assert again.already_done and again.bytes_written == 0
    assert again.target_fingerprint == rebuilt.target_fingerprint
    checked = orca_diff.verify(tmp_path / "diff", base=base, model=tmp_path / "out")
    assert isinstance(checked, orca_diff.VerifyReport)
    assert checked.model_fingerprint == rebuilt.target_fingerprint and checked.base_tensors_checked > 0


def test_a_wrong_base_raises_the_typed_error_and_writes_nothing(make_pair, tmp_path):
    base, target = make_pair("BF16")
    from orca_diff.synth import write_llama
    from conftest import TINY

    other = write_llama(tmp_path / "other", TINY, "BF16", seed=9)
    orca_diff.make(base, target, tmp_path / "diff")
    with pytest.raises(orca_diff.BaseMismatchError):
        orca_diff.apply(tmp_path / "diff", tmp_path / "out", base=other)
    assert not (tmp_path / "out").exists()
    with pytest.raises(orca_diff.BaseMismatchError) as err:
        orca_diff.verify(tmp_path / "diff", base=other)
    assert "nothing was written" not in str(err.value)


SCRIPT = """
import sys
import orca_diff

out = sys.argv[1]
r = orca_diff.apply({diff!r}, out, base="llama-13b", revision={rev!r})
print("rebuilt", r.files, r.target_fingerprint, r.format)
v = orca_diff.verify({diff!r}, revision={rev!r}, model=out)
print("verified", v.model_fingerprint == r.target_fingerprint)
try:
    orca_diff.apply("test-org/no-such-diff", out + "-2")
except orca_diff.HubError as exc:
    print("hub error:", exc)
"""


def test_a_script_rebuilds_by_hub_id_and_revision_and_catches_typed_errors(world, hub, orca, tmp_path):
    script = tmp_path / "rebuild.py"
    script.write_text(textwrap.dedent(SCRIPT.format(diff=DIFF_REPO, rev=world["diff_sha"])))
    out = tmp_path / "model"
    r = orca.run_python(str(script), str(out))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("rebuilt ") and lines[0].endswith(" orca-diff")
    assert lines[1] == "verified True"
    assert lines[2].startswith("hub error:") and "test-org/no-such-diff" in lines[2]
    assert_same_files(out, world["target"])
    assert r.stderr == ""  # a library prints nothing unless asked (progress=False by default)


def test_docs_library_page_exists_and_shows_the_three_functions():
    page = (Path(__file__).resolve().parents[1] / "docs" / "library.md").read_text()
    for call in ("orca_diff.make(", "orca_diff.apply(", "orca_diff.verify(", "except orca_diff."):
        assert call in page, call
