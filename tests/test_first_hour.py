"""What a newcomer hits in the first hour (issue 22): help examples, provenance checks, the Hub's
conventions, exit codes and words. Each test names the behaviour a new user expects."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import TINY, file_hashes
from test_hub import (BASE_REPO, DIFF_REPO, SHAPE, Runner, hub, one_error_line, orca, world)  # noqa: F401

from orca_diff.cli import cli
from orca_diff.errors import BaseMismatchError, FormatError, OutputError, UsageError
from orca_diff.format import load_manifest
from orca_diff.hub.catalog import load_catalog
from orca_diff.make import make_diff
from orca_diff.synth import FineTune, write_finetune, write_llama

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- 2. help examples


def _help_examples(args: list[str]) -> list[list[str]]:
    text = CliRunner().invoke(cli, [*args, "--help"]).output
    return [shlex.split(line.strip())[1:] for line in text.splitlines() if line.strip().startswith("orca-diff ")]


COMMANDS = [[], ["apply"], ["make"], ["verify"], ["download"], ["push"], ["info"], ["convert"], ["catalog"]]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c[0] if c else "orca-diff")
def test_help_examples_parse_and_name_no_placeholder(command):
    """Every example line of --help is a command click accepts, and none names a catalog
    placeholder (the `orca` entry: no Orca-1 diff was ever published)."""
    placeholders = {e.name for kind in load_catalog().values() for e in kind.values() if e.is_placeholder}
    examples = _help_examples(command)
    for argv in examples:
        ctx = cli.make_context("orca-diff", list(argv), resilient_parsing=False)
        sub = cli.get_command(ctx, argv[0])
        assert sub is not None, argv
        sub.make_context(argv[0], list(argv[1:]))  # raises on an unknown option or a missing argument
        assert not placeholders & set(argv), argv
    # nor does any option's help name one as an example
    text = CliRunner().invoke(cli, [*command, "--help"]).output
    for name in placeholders:
        assert f"({name})" not in text and f", {name})" not in text, name


def test_the_headline_flow_runs_as_the_help_shows_it(make_pair, tmp_path):
    """`make`, `apply --diff D --out M` (the base the diff names, a folder here), `verify`."""
    base, target = make_pair("BF16")
    r = CliRunner().invoke(cli, ["make", "--base", str(base), "--target", str(target), "--out", str(tmp_path / "d"), "-q"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(cli, ["apply", "--base", str(base), "--diff", str(tmp_path / "d"), "--out", str(tmp_path / "m"), "-q"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(cli, ["verify", "--diff", str(tmp_path / "d"), "--model", str(tmp_path / "m"), "-q"])
    assert r.exit_code == 0, r.output


def test_the_placeholder_message_is_one_short_paragraph_that_says_it_once():
    r = CliRunner().invoke(cli, ["apply", "--diff", "orca", "--out", "x"], env={"ORCA_DIFF_CATALOG": None})
    assert r.exit_code == 3
    line = r.output.strip()
    assert "\n" not in line and len(line) < 420, (len(line), line)
    assert line.count("catalog") <= 2 and line.count("orca-diff make") == 0 and "placeholder" in line


# --------------------------------------------------------------------------- 3. provenance checked


@pytest.mark.parametrize("repo", ["not a repo id!", "org/na me", "org/x--y", "org/.hidden", "a/b/c"])
def test_make_refuses_a_base_repo_that_huggingface_hub_would_refuse(make_pair, tmp_path, repo):
    base, target = make_pair("BF16")
    r = CliRunner().invoke(cli, ["make", "--base", str(base), "--target", str(target), "--out", str(tmp_path / "d"),
                                 "--base-repo", repo, "--base-revision", "a" * 40, "-q"])
    assert r.exit_code == UsageError.exit_code, r.output
    assert "not a Hub repo id" in r.output and not (tmp_path / "d").exists()


def test_make_refuses_a_revision_that_is_no_git_revision(make_pair, tmp_path):
    base, target = make_pair("BF16")
    r = CliRunner().invoke(cli, ["make", "--base", str(base), "--target", str(target), "--out", str(tmp_path / "d"),
                                 "--base-repo", "org/name", "--base-revision", "has space", "-q"])
    assert r.exit_code == UsageError.exit_code and "not a git revision" in r.output


def test_make_resolves_a_branch_given_as_base_revision_to_its_commit(world, hub, orca, tmp_path):
    r = orca("make", "--base", str(world["base"]), "--target", str(world["target"]), "--out", str(tmp_path / "d"),
             "--base-repo", BASE_REPO, "--base-revision", "main", "-q")
    assert r.returncode == 0, r.stderr
    m = load_manifest(tmp_path / "d")
    assert (m.base.repo, m.base.revision) == (BASE_REPO, world["base_sha"])


def test_a_base_from_the_hf_cache_is_named_by_its_repo_not_by_the_snapshot_sha(world, hub, orca, tmp_path):
    snapshot = Path(orca("download", BASE_REPO, "-q").stdout.strip())
    r = orca("make", "--base", str(snapshot), "--target", str(world["target"]), "--out", str(tmp_path / "d"), "-q")
    assert r.returncode == 0, r.stderr
    m = load_manifest(tmp_path / "d")
    assert m.base.name != snapshot.name
    assert m.base.name in ("llama-13b", BASE_REPO)  # the catalog's name for the repo, else the repo id


def test_a_hub_id_that_huggingface_hub_refuses_is_a_usage_error_not_a_request():
    r = CliRunner().invoke(cli, ["info", "org/bad--name"])
    assert r.exit_code == UsageError.exit_code and "not a Hub repo id" in r.output


# --------------------------------------------------------------------------- 5. the Hub's conventions


def test_revision_option_is_the_same_as_at_rev(world, hub, orca, tmp_path):
    r = orca("apply", "--diff", DIFF_REPO, "--revision", world["diff_sha"], "--base", "llama-13b",
             "--out", str(tmp_path / "m"), "-q")
    assert r.returncode == 0, r.stderr
    assert file_hashes(tmp_path / "m") == file_hashes(world["target"])
    r = orca("info", f"{DIFF_REPO}@main", "--revision", "v9")
    assert r.returncode == UsageError.exit_code and "give it once" in r.stderr, r.stderr
    r = orca("info", DIFF_REPO, "--revision", world["diff_sha"])
    assert r.returncode == 0 and "rebuilds:" in r.stdout, r.stderr


def test_apply_and_download_take_cache_dir_and_token_like_hf(world, hub, orca, tmp_path):
    cache = tmp_path / "my-cache"
    r = orca("download", DIFF_REPO, "--cache-dir", str(cache), "-q", "--token", "hf_anything")
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()).is_relative_to(cache)
    assert not (tmp_path / "hf-home" / "hub").exists() or not any((tmp_path / "hf-home" / "hub").glob("models--*"))


def test_download_local_dir_places_real_files_there(world, hub, orca, tmp_path):
    r = orca("download", DIFF_REPO, "--local-dir", str(tmp_path / "here"), "-q")
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()) == tmp_path / "here"
    assert (tmp_path / "here" / "orca-diff.json").is_file() and not (tmp_path / "here" / "orca-diff.json").is_symlink()
    assert load_manifest(tmp_path / "here").payloads


def test_download_quiet_prints_only_the_folder(world, hub, orca):
    r = orca("download", BASE_REPO, "-q", HF_TOKEN=None)
    assert r.returncode == 0
    assert r.stderr == "" and len(r.stdout.splitlines()) == 1


def test_a_wrong_base_repo_is_refused_before_the_diffs_payload_is_downloaded(world, hub, orca, tmp_path):
    other = write_llama(tmp_path / "other", SHAPE, "F16", seed=5, max_shard_bytes=40_000)
    hub.add_folder("test-org/another-llama", other)
    hub.clear_log()
    pinned = orca("apply", "--base", "test-org/another-llama", "--diff", "test-org/orca-tiny-diff-pinned",
                  "--out", str(tmp_path / "m"), "-q")
    assert pinned.returncode == BaseMismatchError.exit_code, pinned.stderr
    assert hub.file_gets("test-org/orca-tiny-diff-pinned") == ["orca-diff.json"]  # the manifest only


def test_a_legacy_release_is_not_called_a_base_when_the_hub_is_down(tmp_path):
    from hubserver import free_port

    catalog = tmp_path / "c.json"
    catalog.write_text(json.dumps({"bases": {"tiny": {"repo": "o/tiny"}},
                                   "diffs": {"tiny-vicuna": {"repo": "lmsys/tiny-delta", "base": "tiny",
                                                             "format": "fastchat"}}}))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "ORCA_DIFF_CATALOG"))}
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{free_port()}", HF_HOME=str(tmp_path / "hf"),
               ORCA_DIFF_CATALOG=str(catalog), HF_HUB_DISABLE_TELEMETRY="1")
    r = subprocess.run([sys.executable, "-m", "orca_diff.cli", "apply", "--diff", "tiny-vicuna", "--out",
                        str(tmp_path / "o"), "-q"], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 9, r.stderr
    assert "fastchat release lmsys/tiny-delta" in r.stderr and "base lmsys" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "orca_diff.cli", "download", "tiny-vicuna", "-q"], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 9 and "fastchat release lmsys/tiny-delta" in r.stderr, r.stderr


# --------------------------------------------------------------------------- 7. exit codes and words


def _table_code(words: str) -> int:
    for line in (ROOT / "README.md").read_text().splitlines():
        m = re.match(r"^\| (\d+) \| (.*) \|$", line)
        if m and words in m[2]:
            return int(m[1])
    raise AssertionError(f"no exit-code row says {words!r}")


def test_a_truncated_manifest_exits_with_the_code_the_table_gives_it(make_pair, tmp_path):
    base, target = make_pair("BF16")
    make_diff(base, target, tmp_path / "d")
    manifest = tmp_path / "d" / "orca-diff.json"
    manifest.write_bytes(manifest.read_bytes()[:-50])
    r = CliRunner().invoke(cli, ["verify", "--diff", str(tmp_path / "d")])
    assert r.exit_code == _table_code("truncated manifest"), r.output


def test_verify_model_given_a_diff_folder_says_it_is_a_diff(make_pair, tmp_path):
    base, target = make_pair("BF16")
    make_diff(base, target, tmp_path / "d")
    r = CliRunner().invoke(cli, ["verify", "--diff", str(tmp_path / "d"), "--model", str(tmp_path / "d")])
    assert r.exit_code == UsageError.exit_code
    assert "is a diff folder" in r.output and "apply again" not in r.output


def test_verify_with_a_wrong_base_does_not_speak_of_writing(make_pair, tmp_path):
    base, target = make_pair("BF16")
    other = write_llama(tmp_path / "other", TINY, "BF16", seed=9)
    make_diff(base, target, tmp_path / "d")
    r = CliRunner().invoke(cli, ["verify", "--diff", str(tmp_path / "d"), "--base", str(other)])
    assert r.exit_code == BaseMismatchError.exit_code
    assert "nothing was written" not in r.output and "differs" in r.output


def test_a_corrupt_diff_refusal_says_where_the_kept_partial_output_is_and_its_size(tmp_path):
    base = write_llama(tmp_path / "base", TINY, "BF16", seed=0, max_shard_bytes=20_000)
    target = write_finetune(tmp_path / "target", TINY, base_seed=0, dtype="BF16", ft=FineTune(),
                            max_shard_bytes=20_000)
    make_diff(base, target, tmp_path / "d", chunk_bytes=4096, payload_file_bytes=8000)
    m = load_manifest(tmp_path / "d")
    last = tmp_path / "d" / m.payloads[-1].path
    data = bytearray(last.read_bytes())
    data[len(data) // 2] ^= 0xFF
    last.write_bytes(bytes(data))
    r = CliRunner().invoke(cli, ["apply", "--base", str(base), "--diff", str(tmp_path / "d"), "--out",
                                 str(tmp_path / "m"), "-q"])
    assert r.exit_code != 0
    assert r.exit_code == 5
    partial = tmp_path / ".m.orca-diff-partial"
    assert any(p.is_file() and p.stat().st_size for p in partial.rglob("*"))  # files before the bad chunk: kept
    assert str(partial) in r.output and re.search(r"\d+(\.\d+)? (B|KiB|MiB|GiB) already rebuilt", r.output), r.output


def test_apply_on_a_rebuilt_folder_with_one_damaged_file_names_it(make_pair, tmp_path):
    base, target = make_pair("BF16", shard=20_000)
    make_diff(base, target, tmp_path / "d")
    runner = CliRunner()
    assert runner.invoke(cli, ["apply", "--base", str(base), "--diff", str(tmp_path / "d"), "--out",
                               str(tmp_path / "m"), "-q"]).exit_code == 0
    victim = sorted((tmp_path / "m").glob("*.safetensors"))[-1]
    data = bytearray(victim.read_bytes())
    data[-3] ^= 0x01
    victim.write_bytes(bytes(data))
    r = runner.invoke(cli, ["apply", "--base", str(base), "--diff", str(tmp_path / "d"), "--out", str(tmp_path / "m")])
    assert r.exit_code == OutputError.exit_code
    assert victim.name in r.output and "--force" in r.output


def test_convert_help_gives_the_level_the_code_uses():
    from orca_diff.codec import DEFAULT_LEVEL

    text = " ".join(CliRunner().invoke(cli, ["convert", "--help"]).output.split())
    assert f"default {DEFAULT_LEVEL}" in text


def test_one_payload_file_is_not_called_files(make_pair, tmp_path):
    base, target = make_pair("BF16")
    make_diff(base, target, tmp_path / "d")
    assert len(load_manifest(tmp_path / "d").payloads) == 1
    r = CliRunner().invoke(cli, ["verify", "--diff", str(tmp_path / "d"), "-q"])
    assert "1 payload file," in r.output
    assert "1 payload files" not in (tmp_path / "d" / "README.md").read_text()


def test_catalog_columns_fit_long_names_and_show_the_format(tmp_path):
    catalog = tmp_path / "c.json"
    long_name = "a-really-long-catalog-name-for-a-diff"
    catalog.write_text(json.dumps({"diffs": {long_name: {"repo": "org/x", "base": "llama-7b", "format": "fastchat"}}}))
    r = CliRunner().invoke(cli, ["catalog"], env={"ORCA_DIFF_CATALOG": str(catalog)})
    lines = r.output.splitlines()
    header = next(line for line in lines if "FORMAT" in line)
    row = next(line for line in lines if long_name in line)
    assert row.index("org/x@main") == header.index("REPO@REVISION")
    assert row.index("fastchat") == header.index("FORMAT")
    assert json.loads(CliRunner().invoke(cli, ["catalog", "--json"], env={"ORCA_DIFF_CATALOG": str(catalog)}).output
                      )["diffs"][long_name]["format"] == "fastchat"


def test_make_with_the_base_as_target_says_so(make_pair, tmp_path):
    base, _ = make_pair("BF16")
    r = CliRunner().invoke(cli, ["make", "--base", str(base), "--target", str(base), "--out", str(tmp_path / "d")])
    assert r.exit_code == UsageError.exit_code
    assert "is the base" in r.output and not (tmp_path / "d").exists()


START_UP_INTERRUPTS = {
    # right after the package is imported, before the command's modules load
    "after the package": "import os, signal, sys\nsys.argv = ['orca-diff', 'catalog']\nimport orca_diff.cli as c\n"
                         "os.kill(os.getpid(), signal.SIGINT)\nc.main()\n",
    # in the middle of loading click (what `main` imports first)
    "while loading click": "import builtins, os, signal, sys\nsys.argv = ['orca-diff', 'catalog']\n"
                           "import orca_diff.cli as c\nreal = builtins.__import__\n"
                           "def imp(name, *a, **k):\n"
                           "    if name == 'click':\n        os.kill(os.getpid(), signal.SIGINT)\n"
                           "    return real(name, *a, **k)\n"
                           "builtins.__import__ = imp\nc.main()\n",
}


@pytest.mark.parametrize("when", sorted(START_UP_INTERRUPTS))
def test_ctrl_c_during_start_up_is_one_line_without_a_traceback(when, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    script = tmp_path / "orca-diff"  # named as the console script is
    script.write_text(START_UP_INTERRUPTS[when])
    p = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert "Traceback" not in p.stderr, p.stderr
    assert p.returncode == 130, (p.returncode, p.stderr)
    assert p.stderr.strip().splitlines() == ["orca-diff: interrupted during start-up; nothing was done"]


def test_ctrl_c_once_the_command_runs_keeps_the_commands_own_words(tmp_path):
    """After start-up, the command's own handling applies (exit 130, 'rerun ... to resume')."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    script = tmp_path / "orca-diff"
    script.write_text("import os, signal, sys\nsys.argv = ['orca-diff', 'catalog']\nimport orca_diff.cli as c\n"
                      "import orca_diff.hub.catalog as cat\nreal = cat.load_catalog\n"
                      "def slow():\n    os.kill(os.getpid(), signal.SIGINT)\n    return real()\n"
                      "cat.load_catalog = slow\nc.main()\n")
    p = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 130 and "Traceback" not in p.stderr, p.stderr
    assert "rerun the same command" in p.stderr


# --------------------------------------------------------------------------- 8, 9. the card and the README


def test_the_card_says_how_to_install_what_exists(make_pair, tmp_path):
    base, target = make_pair("BF16")
    make_diff(base, target, tmp_path / "d")
    card = (tmp_path / "d" / "README.md").read_text()
    # not on the package index: from source, never a guessed URL (this checkout declares none)
    assert "pip install ./orca-diff" in card and "github.com" not in card
    assert "pip install orca-diff" in card and "once released" in card.lower()  # kept for the day it is published


def test_the_readme_says_how_long_the_tests_take_what_they_install_and_how_to_run_one_file():
    readme = (ROOT / "README.md").read_text()
    assert re.search(r"python -m pytest -q tests/test_\w+\.py", readme)
    assert re.search(r"takes about \d+", readme) and "installs" in readme


def test_info_does_not_present_an_invalid_recorded_repo_or_a_branch_as_a_pinned_hub_base(make_pair, tmp_path):
    """Diffs made before the check may record 'not a repo id!' or 'main': info says what they are."""
    base, target = make_pair("BF16")
    make_diff(base, target, tmp_path / "d", base_repo="not a repo id!", base_revision="main")
    r = CliRunner().invoke(cli, ["info", str(tmp_path / "d")])
    assert r.exit_code == 0, r.output
    assert "NOT a valid Hub repo id" in r.output and "not a commit" in r.output
    assert "Hub repo not a repo id!" not in r.output


def test_token_option_opens_a_gated_repo_as_hf_token_would(world, hub, orca):
    from test_hub import GATED_REPO

    refused = orca("download", GATED_REPO, "-q", HF_TOKEN=None)
    assert refused.returncode == 9
    r = orca("download", GATED_REPO, "--token", "hf_granted", "-q", HF_TOKEN=None)
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()).is_dir()
