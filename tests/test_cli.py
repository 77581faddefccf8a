"""The CLI: one actionable line per expected failure, documented exit codes, human output."""

from __future__ import annotations

import json

from click.testing import CliRunner

from orca_diff.cli import cli
from orca_diff.errors import BaseMismatchError, OutputError, UsageError

from conftest import file_hashes


def run(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_make_apply_verify_info_through_the_cli(make_pair, tmp_path):
    base, target = make_pair("BF16", add_pad_row=True)
    diff, out = tmp_path / "diff", tmp_path / "out"
    r = run("make", "--base", str(base), "--target", str(target), "--out", str(diff), "--base-name", "tiny", "-q")
    assert r.exit_code == 0, r.output
    assert "base fingerprint" in r.output
    r = run("apply", "--base", str(base), "--diff", str(diff), "--out", str(out), "-q")
    assert r.exit_code == 0, r.output
    assert "every file matches its sha256" in r.output
    assert file_hashes(out) == file_hashes(target)
    r = run("verify", "--diff", str(diff), "--base", str(base), "--model", str(out), "-q")
    assert r.exit_code == 0, r.output
    assert "model OK" in r.output and "base OK" in r.output
    r = run("info", str(diff), "--json")
    doc = json.loads(r.output)
    assert doc["base"]["name"] == "tiny" and doc["target"]["tensors"] == 21 and 0 < doc["ratio"] < 1
    r = run("info", str(diff))
    assert "of payload" in r.output and "tiny" in r.output


def test_wrong_base_exits_with_its_code_one_line_and_no_output(make_pair, tmp_path):
    base, target = make_pair("F16")
    other_base, _ = make_pair("F32")
    diff, out = tmp_path / "diff", tmp_path / "out"
    run("make", "--base", str(base), "--target", str(target), "--out", str(diff), "-q")
    r = CliRunner().invoke(cli, ["apply", "--base", str(other_base), "--diff", str(diff), "--out", str(out), "-q"])
    assert r.exit_code == BaseMismatchError.exit_code
    assert r.output.count("\n") == 1 and r.output.startswith("orca-diff: error:")
    assert "F32" in r.output and "F16" in r.output
    assert "Traceback" not in r.output
    assert not out.exists()


def test_existing_output_is_refused_with_a_hint(make_pair, tmp_path):
    base, target = make_pair("BF16")
    out = tmp_path / "diff"
    out.mkdir()
    (out / "keep").write_text("1")
    r = CliRunner().invoke(cli, ["make", "--base", str(base), "--target", str(target), "--out", str(out)])
    assert r.exit_code == OutputError.exit_code and "--force" in r.output
    assert (out / "keep").read_text() == "1"


def test_a_bin_target_that_is_not_a_torch_zip_travels_verbatim_with_a_note(make_pair, tmp_path):
    """.bin targets are diffed since issue 13 (tests/test_bin_target.py); one make cannot cut is
    still carried byte for byte, and make says so."""
    base, _ = make_pair("BF16")
    t = tmp_path / "bin-target"
    t.mkdir()
    (t / "pytorch_model.bin").write_bytes(b"not really")
    r = CliRunner().invoke(cli, ["make", "--base", str(base), "--target", str(t), "--out", str(tmp_path / "d")])
    assert r.exit_code == 0, r.output
    assert "carried verbatim" in r.output and "Traceback" not in r.output


def test_demo_runs_the_whole_job_without_download(tmp_path):
    r = run("demo", "--hidden", "64", "--layers", "1", "-q", "--workdir", str(tmp_path / "w"))
    assert r.exit_code == 0, r.output
    assert "byte-identical" in r.output and "demo OK" in r.output
    assert (tmp_path / "w" / "rebuilt" / "config.json").exists()


def test_help_texts_have_examples():
    for cmd in ("make", "apply", "verify"):
        r = run(cmd, "--help")
        assert "Example" in r.output, cmd
    assert UsageError.exit_code == 2


def test_the_cli_imports_neither_torch_nor_transformers():
    """Applying a diff is a light install: torch and transformers load only for .bin/.pth bases and training."""
    import subprocess
    import sys
    code = ("import sys, orca_diff.cli, orca_diff.apply, orca_diff.make, orca_diff.verify; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "[]"


def test_a_quiet_apply_loads_no_progress_bar_library(make_pair, tmp_path):
    """tqdm (and the asyncio it pulls in: 30-60 ms, a fifth of applying a 45 MB model) is imported
    only when a bar is shown."""
    import subprocess
    import sys
    from orca_diff.make import make_diff

    base, target = make_pair("BF16")
    make_diff(base, target, tmp_path / "diff")
    code = ("import sys; from orca_diff.cli.main import cli\n"
            "try:\n"
            f"    cli(['apply', '-q', '--base', {str(base)!r}, '--diff', {str(tmp_path / 'diff')!r}, "
            f"'--out', {str(tmp_path / 'out')!r}])\n"
            "except SystemExit as e:\n"
            "    assert not e.code, e.code\n"
            "print(sorted(m for m in ('tqdm', 'asyncio') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "[]"
    assert (tmp_path / "out" / "model.safetensors").exists()
