"""The paths that used to mislead, each through the CLI: what users see and the exit code the
README's table promises."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from orca_diff.cli import cli
from orca_diff.make import make_diff
from orca_diff.synth import write_llama

from conftest import TINY


def run(*args: str):
    return CliRunner().invoke(cli, list(args))


@pytest.fixture
def pair_and_diff(make_pair, tmp_path):
    base, target = make_pair("F16", add_pad_row=True)
    diff = tmp_path / "diff"
    make_diff(base, target, diff, chunk_bytes=4096)
    return base, target, diff


def test_a_diff_folder_given_as_base_says_it_is_a_diff_and_what_to_do(pair_and_diff, tmp_path):
    base, target, diff = pair_and_diff
    r = run("apply", "--base", str(diff), "--diff", str(diff), "--out", str(tmp_path / "out"))
    assert r.exit_code == 2, r.output
    assert "is an orca-diff diff" in r.output and "--diff" in r.output and "Traceback" not in r.output
    r = run("make", "--base", str(diff), "--target", str(target), "--out", str(tmp_path / "d2"))
    assert r.exit_code == 2 and "is an orca-diff diff" in r.output


def test_a_legacy_delta_without_format_says_what_it_is_and_what_to_do(make_pair, tmp_path):
    base, delta = make_pair("F16")  # a FastChat delta is an HF model folder of differences
    r = run("apply", "--base", str(base), "--diff", str(delta), "--out", str(tmp_path / "out"))
    assert r.exit_code == 3, r.output
    assert "legacy delta" in r.output and "--format fastchat" in r.output and "--base" in r.output


def test_make_warns_when_the_pair_looks_swapped(make_pair, tmp_path):
    base, target = make_pair("F16", add_pad_row=True)
    r = run("make", "--base", str(target), "--target", str(base), "--out", str(tmp_path / "d"), "-q")
    assert r.exit_code == 0, r.output
    assert "swapped" in r.output and "fewer rows" in r.output


def test_make_warns_when_the_pair_looks_unrelated(make_pair, tmp_path):
    _, target = make_pair("F16")
    other = write_llama(tmp_path / "other", TINY, "F16", seed=7)
    r = run("make", "--base", str(other), "--target", str(target), "--out", str(tmp_path / "d"), "-q")
    assert r.exit_code == 0, r.output
    assert "does not look derived from this base" in r.output


def test_make_of_a_real_pair_warns_of_nothing_but_the_unidentified_base(make_pair, tmp_path):
    base, target = make_pair("F16", add_pad_row=True)
    r = run("make", "--base", str(base), "--target", str(target), "--out", str(tmp_path / "d"), "-q")
    assert r.exit_code == 0, r.output
    notes = [line for line in r.output.splitlines() if line.startswith("orca-diff: note:")]
    assert len(notes) == 1 and "not identified as a Hub repo" in notes[0]


@pytest.mark.parametrize("args", [
    ["make", "--base", "{missing}", "--target", "{target}", "--out", "{tmp}/d"],
    ["make", "--base", "{base}", "--target", "{missing}", "--out", "{tmp}/d"],
    ["apply", "--base", "{missing}", "--diff", "{diff}", "--out", "{tmp}/o"],
    ["apply", "--base", "{base}", "--diff", "{missing}", "--out", "{tmp}/o"],
    ["verify", "--diff", "{missing}"],
    ["verify", "--diff", "{diff}", "--model", "{missing}"],
    ["verify", "--diff", "{diff}", "--base", "{missing}"],
    ["info", "{missing}"],
    ["info", "--diff", "{missing}"],
    ["fingerprint", "{missing}"],
    ["push", "{missing}", "--repo", "org/name"],
    ["train", "--data", "{tmp}/x.jsonl", "--model", "{base}", "--out", "{tmp}/run", "--make-diff-against", "{missing}"],
])
def test_a_missing_path_is_exit_code_3_everywhere(pair_and_diff, tmp_path, args):
    base, target, diff = pair_and_diff
    values = {"missing": str(tmp_path / "no" / "such-folder"), "base": str(base), "target": str(target),
              "diff": str(diff), "tmp": str(tmp_path)}
    r = run(*[a.format(**values) for a in args])
    assert r.exit_code == 3, r.output
    assert "no such" in r.output and "Traceback" not in r.output


def test_info_prints_words_not_python_dicts_and_both_option_shapes_work(pair_and_diff):
    _, _, diff = pair_and_diff
    a, b = run("info", str(diff)), run("info", "--diff", str(diff))
    assert a.exit_code == 0 and b.exit_code == 0 and a.output == b.output
    assert "{" not in a.output and "': " not in a.output  # no dict reprs
    assert "delta-coded against the base" in a.output and "% of the model" in a.output
    assert json.loads(run("info", str(diff), "--json").output)["format_version"] == 3
    r = run("info")
    assert r.exit_code == 2 and "which diff" in r.output


def test_the_readme_exit_code_table_matches_the_error_classes():
    from orca_diff import errors

    table = Path(__file__).resolve().parents[1].joinpath("README.md").read_text()
    for cls in (errors.UsageError, errors.InputNotFoundError, errors.FormatError, errors.CorruptDiffError,
                errors.BaseMismatchError, errors.VerificationError, errors.OutputError, errors.HubError,
                errors.MissingExtraError, errors.InterruptedError_):
        assert f"| {cls.exit_code} |" in table, cls


def test_a_rerun_of_a_finished_apply_exits_0_after_checking_the_output(pair_and_diff, tmp_path):
    base, target, diff = pair_and_diff
    out = tmp_path / "out"
    args = ["apply", "--base", str(base), "--diff", str(diff), "--out", str(out), "-q"]
    assert run(*args).exit_code == 0
    r = run(*args)
    assert r.exit_code == 0, r.output
    assert "already holds this model" in r.output and "checked now" in r.output
    # a damaged output is not "finished": the usual refusal of a non-empty folder, exit 8
    victim = next(out.glob("*.safetensors"))
    data = bytearray(victim.read_bytes())
    data[-1] ^= 1
    victim.write_bytes(bytes(data))
    r = run(*args)
    assert r.exit_code == 8, r.output
