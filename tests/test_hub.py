"""The Hub side: catalog names, downloads, errors, push, and apply by name, end to end.

These tests drive the real huggingface_hub client (written against 2.4.0) against the small
Hub-compatible server in tests/hubserver.py on 127.0.0.1. huggingface_hub reads HF_ENDPOINT,
HF_HOME and HF_HUB_OFFLINE when it is imported, so every Hub command runs in a subprocess
(``python -m orca_diff.cli``) with its own environment and a fresh HF cache per test unless a
test says otherwise. No test touches the network.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import subprocess
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from hubserver import CLIENT_VERSION, FakeHub, free_port

import huggingface_hub
from orca_diff.hub.catalog import load_catalog, lookup
from orca_diff.hub.card import is_generated_card, render_card
from orca_diff.cli import cli
from orca_diff.errors import FormatError, HubError, InputNotFoundError
from orca_diff.format import load_manifest
from orca_diff.hub.transfer import parse_repo_spec, select_base_files
from orca_diff.make import make_diff
from orca_diff.synth import FineTune, LlamaShape, write_finetune, write_llama

BASE_REPO = "test-org/llama-13b-tiny"
DIFF_REPO = "test-org/orca-tiny-diff"
PINNED_DIFF_REPO = "test-org/orca-tiny-diff-pinned"
GATED_REPO = "gated-org/llama-gated"
SHAPE = LlamaShape(vocab_size=256, hidden_size=32, intermediate_size=86, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=4)


def test_written_against_the_installed_client_version():
    """If this fails, re-check tests/hubserver.py against the new client before trusting the rest."""
    assert huggingface_hub.__version__ == CLIENT_VERSION


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny base (safetensors shards, plus files a download must skip), its fine-tune, diffs
    of it, and a running hub serving them."""
    root = tmp_path_factory.mktemp("hubworld")
    base, target = root / "base", root / "target"
    write_llama(base, SHAPE, "F16", seed=0, max_shard_bytes=40_000)
    write_finetune(target, SHAPE, base_seed=0, dtype="F16", ft=FineTune(add_pad_row=True), max_shard_bytes=40_000)
    # Small payload files so a diff is several files (resume is per file).
    diff = root / "diff"
    make_diff(base, target, diff, base_name="llama-13b", chunk_bytes=8192, payload_file_bytes=12_000)
    hub = FakeHub().start()
    base_files = {p.name: p.read_bytes() for p in base.iterdir()}
    skipped = {"pytorch_model.bin": os.urandom(2000), "README.md": b"# llama\n",
               "original/consolidated.00.pth": os.urandom(2000)}
    base_sha = hub.add_repo(BASE_REPO, {**base_files, **skipped})
    hub.add_repo(GATED_REPO, base_files, gated=True, readers=("hf_granted",))
    diff_files = {p.name: p.read_bytes() for p in diff.iterdir()}
    diff_sha = hub.add_repo(DIFF_REPO, {**diff_files, "notes/extra.bin": os.urandom(3000)})
    pinned = root / "diff-pinned"
    make_diff(base, target, pinned, base_name="llama-13b", base_repo=BASE_REPO, base_revision=base_sha,
              chunk_bytes=8192, payload_file_bytes=12_000)
    hub.add_folder(PINNED_DIFF_REPO, pinned)
    catalog = root / "catalog.json"
    catalog.write_text(json.dumps({
        "bases": {"llama-13b": {"repo": BASE_REPO, "revision": "main", "status": "public"}},
        "diffs": {"orca": {"repo": DIFF_REPO, "revision": "main", "base": "llama-13b", "status": "public"}},
    }))
    yield {"root": root, "base": base, "target": target, "diff": diff, "hub": hub, "catalog": catalog,
           "base_sha": base_sha, "diff_sha": diff_sha, "skipped": skipped}
    hub.stop()


@pytest.fixture
def hub(world) -> FakeHub:
    world["hub"].clear_log()
    world["hub"].clear_failures()
    return world["hub"]


class Runner:
    """Runs ``orca-diff`` in a subprocess pointed at the test hub, with its own HF cache."""

    def __init__(self, world, tmp_path: Path):
        self.world = world
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING", "ORCA_DIFF_"))}
        self.env.update(HF_ENDPOINT=world["hub"].url, HF_HOME=str(tmp_path / "hf-home"), HF_HUB_DISABLE_XET="1",
                        HF_HUB_DISABLE_TELEMETRY="1", ORCA_DIFF_CATALOG=str(world["catalog"]),
                        XDG_CONFIG_HOME=str(tmp_path / "config"), HOME=str(tmp_path / "home"))

    def __call__(self, *args: str, cwd: Path | None = None, **env: str | None) -> subprocess.CompletedProcess:
        return self.run_python("-m", "orca_diff.cli", *args, cwd=cwd, **env)

    def run_python(self, *args: str, cwd: Path | None = None, **env: str | None) -> subprocess.CompletedProcess:
        full = dict(self.env)
        if cwd is not None:  # the package must stay importable from another working directory
            full["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), full.get("PYTHONPATH", "")])
        for k, v in env.items():
            if v is None:
                full.pop(k, None)
            else:
                full[k] = v
        return subprocess.run([sys.executable, *args], env=full, capture_output=True, text=True, timeout=180, cwd=cwd)


@pytest.fixture
def orca(world, hub, tmp_path) -> Runner:
    return Runner(world, tmp_path)


def assert_same_files(model: Path, expected: Path) -> None:
    names = sorted(p.name for p in expected.iterdir())
    assert sorted(p.name for p in model.iterdir()) == names
    for name in names:
        assert (model / name).read_bytes() == (expected / name).read_bytes(), name


def one_error_line(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("orca-diff: error: "), lines[0]
    assert "Traceback" not in result.stderr
    return lines[0]


# --------------------------------------------------------------------------- the headline
def test_apply_by_catalog_names_rebuilds_byte_identical_model(world, hub, orca, tmp_path):
    r = orca("apply", "--base", "llama-13b", "--diff", "orca", "--out", str(tmp_path / "out"), "-q")
    assert r.returncode == 0, r.stderr
    assert_same_files(tmp_path / "out", world["target"])


def test_apply_without_base_fetches_the_base_named_in_the_manifest(world, hub, orca, tmp_path):
    assert load_manifest(world["diff"]).base.name == "llama-13b"
    r = orca("apply", "--diff", "orca", "--out", str(tmp_path / "out"), "-q")
    assert r.returncode == 0, r.stderr
    assert_same_files(tmp_path / "out", world["target"])
    assert any(path.startswith(f"/api/models/{BASE_REPO}") for _, path in hub.requests)


def test_apply_by_repo_ids_at_pinned_revisions(world, hub, orca, tmp_path):
    r = orca("apply", "--base", f"{BASE_REPO}@{world['base_sha']}", "--diff", f"{DIFF_REPO}@{world['diff_sha']}",
             "--out", str(tmp_path / "out"), "-q")
    assert r.returncode == 0, r.stderr
    assert_same_files(tmp_path / "out", world["target"])
    # A pinned sha needs no branch look-up.
    assert not any("/revision/main" in path for _, path in hub.requests)


def test_apply_uses_the_repo_and_revision_recorded_in_the_manifest(world, hub, orca, tmp_path):
    r = orca("apply", "--diff", PINNED_DIFF_REPO, "--out", str(tmp_path / "out"), "-q",
             ORCA_DIFF_CATALOG=None)  # no catalog entry needed: the manifest says where its base is
    assert r.returncode == 0, r.stderr
    assert_same_files(tmp_path / "out", world["target"])
    assert f"/{BASE_REPO}/resolve/{world['base_sha']}/config.json" in [p for _, p in hub.requests]


# --------------------------------------------------------------------------- only what is needed
def test_download_fetches_only_the_files_a_base_needs(world, hub, orca):
    r = orca("download", "llama-13b", "-q")
    assert r.returncode == 0, r.stderr
    folder = Path(r.stdout.strip())
    gets = hub.file_gets(BASE_REPO)
    assert sorted(gets) == sorted(p.name for p in world["base"].iterdir())  # each once, safetensors only
    for skipped in world["skipped"]:
        assert skipped not in gets
    assert sorted(p.name for p in folder.iterdir()) == sorted(gets)
    assert str(folder).startswith(orca.env["HF_HOME"])  # the standard HF cache


def test_download_fetches_only_the_manifest_and_payload_files_of_a_diff(world, hub, orca):
    r = orca("download", "orca")
    assert r.returncode == 0, r.stderr
    manifest = load_manifest(world["diff"])
    assert len(manifest.payloads) >= 3
    assert sorted(hub.file_gets(DIFF_REPO)) == sorted(["orca-diff.json", *(p.path for p in manifest.payloads)])
    assert "notes/extra.bin" not in hub.file_gets() and "README.md" not in hub.file_gets()
    assert f"at commit {world['diff_sha']}" in r.stderr


def test_a_second_download_is_served_from_the_cache(world, hub, orca):
    assert orca("download", "orca", "-q").returncode == 0
    hub.clear_log()
    r = orca("download", "orca", "-q")
    assert r.returncode == 0, r.stderr
    assert hub.file_gets() == []


def test_with_a_complete_cache_neither_offline_mode_nor_a_dead_hub_matters(world, hub, orca, tmp_path):
    # a streamed apply keeps no copy of the diff: `download` (or apply --keep-diff) fills the cache
    assert orca("download", "orca", "-q").returncode == 0
    assert orca("apply", "--diff", "orca", "--out", str(tmp_path / "online"), "-q").returncode == 0
    hub.clear_log()
    r = orca("apply", "--diff", "orca", "--out", str(tmp_path / "offline"), "-q", HF_HUB_OFFLINE="1")
    assert r.returncode == 0, r.stderr
    assert_same_files(tmp_path / "offline", world["target"])
    assert [p for p in hub.requests if p[1] != "/api/agent-harnesses"] == []
    r = orca("apply", "--diff", "orca", "--out", str(tmp_path / "hub-down"), "-q",
             HF_ENDPOINT=f"http://127.0.0.1:{free_port()}")
    assert r.returncode == 0, r.stderr
    assert_same_files(tmp_path / "hub-down", world["target"])


def test_offline_mode_refuses_a_cache_miss_in_one_line(orca):
    for name in ("orca", "llama-13b"):
        miss = orca("download", name, "-q", HF_HUB_OFFLINE="1")
        assert miss.returncode == 9
        assert "HF_HUB_OFFLINE=1 and" in one_error_line(miss)


# --------------------------------------------------------------------------- resume
def test_an_interrupted_download_resumes_fetching_only_the_missing_files(world, hub, orca):
    from orca_diff.hub.stream import RETRIES

    manifest = load_manifest(world["diff"])
    victim = manifest.payloads[-1].path
    size = manifest.payloads[-1].size
    # The transfer is cut halfway; every retry (a Range request for the rest) then gets a 503.
    failure = hub.fail_downloads(DIFF_REPO, victim, "drop", then=503)
    first = orca("download", "orca", "-q", ORCA_DIFF_BACKOFF_S="0.01")
    assert first.returncode == 9
    line = one_error_line(first)
    assert "503" in line and victim in line and "rerun the same command to resume" in line
    assert failure.count == 1 + RETRIES  # the cut made progress, then RETRIES tries without any
    done_first = hub.file_gets(DIFF_REPO)
    assert set(done_first) == {"orca-diff.json", *(p.path for p in manifest.payloads)}

    hub.clear_failures()
    hub.clear_log()
    second = orca("download", "orca", "-q")
    assert second.returncode == 0, second.stderr
    assert hub.file_gets(DIFF_REPO) == [victim]  # finished files were kept
    # ... and of the cut file, only the bytes that had not arrived (the partial blob was kept)
    assert hub.ranges == [(victim, f"bytes={size // 2}-{size - 1}")]
    folder = Path(second.stdout.strip())
    assert (folder / victim).read_bytes() == (world["diff"] / victim).read_bytes()


def test_a_damaged_cached_payload_is_fetched_again_and_checked(world, hub, orca):
    first = orca("download", "orca", "-q")
    folder = Path(first.stdout.strip())
    payload = load_manifest(world["diff"]).payloads[0].path
    blob = (folder / payload).resolve()
    data = bytearray(blob.read_bytes())
    data[10] ^= 0xFF
    blob.write_bytes(bytes(data))
    hub.clear_log()
    r = orca("download", "orca", "-q")
    assert r.returncode == 0, r.stderr
    assert hub.file_gets(DIFF_REPO) == [payload]
    assert (folder / payload).read_bytes() == (world["diff"] / payload).read_bytes()


# --------------------------------------------------------------------------- errors read well
def test_an_unknown_repo_is_one_clear_line(orca):
    r = orca("download", "nobody/nothing-here")
    assert r.returncode == 9
    line = one_error_line(r)
    assert "nobody/nothing-here not found" in line


def test_an_unknown_revision_is_one_clear_line(orca):
    r = orca("download", f"{BASE_REPO}@no-such-branch")
    assert r.returncode == 9
    assert "revision 'no-such-branch' not found" in one_error_line(r)


def test_a_gated_repo_without_a_token_says_request_access_and_log_in(world, orca):
    r = orca("download", GATED_REPO, "--kind", "base", HF_TOKEN=None)
    assert r.returncode == 9
    line = one_error_line(r)
    assert f"request access at {world['hub'].url}/{GATED_REPO}" in line
    assert "not logged in" in line and "login" in line


def test_a_gated_repo_with_a_token_lacking_access_says_request_access(world, orca):
    r = orca("download", GATED_REPO, "--kind", "base", HF_TOKEN="hf_someone_else")
    assert r.returncode == 9
    line = one_error_line(r)
    assert f"request access at {world['hub'].url}/{GATED_REPO}" in line
    assert "not been granted access" in line


def test_a_gated_repo_downloads_with_a_granted_hf_token(world, hub, orca):
    r = orca("download", GATED_REPO, "--kind", "base", "-q", HF_TOKEN="hf_granted")
    assert r.returncode == 0, r.stderr
    assert "config.json" in hub.file_gets(GATED_REPO)


def test_a_hub_that_is_down_is_one_clear_line(orca):
    down = f"http://127.0.0.1:{free_port()}"
    r = orca("apply", "--diff", "orca", "--out", "never-written", HF_ENDPOINT=down)
    assert r.returncode == 9
    line = one_error_line(r)
    assert f"cannot reach the Hub at {down}" in line
    assert not Path("never-written").exists()


def test_a_placeholder_catalog_entry_is_refused_with_the_reason(orca, tmp_path):
    r = orca("apply", "--diff", "orca", "--out", str(tmp_path / "out"), ORCA_DIFF_CATALOG=None)
    assert r.returncode == 3
    line = one_error_line(r)
    assert "placeholder" in line and "ORCA_DIFF_CATALOG" in line


# --------------------------------------------------------------------------- push
def test_push_then_apply_from_the_pushed_repo_round_trips(world, hub, orca, tmp_path):
    r = orca("push", str(world["diff"]), "--repo", "pusher/orca-pushed", "-q", HF_TOKEN="hf_writer")
    assert r.returncode == 0, r.stderr
    files = hub.files_at("pusher/orca-pushed")
    manifest = load_manifest(world["diff"])
    assert set(files) == {".gitattributes", "README.md", "orca-diff.json", *(p.path for p in manifest.payloads)}
    assert any(path.endswith("/lfs/objects/batch") for _, path in hub.requests)  # payloads went through LFS
    card = files["README.md"].decode()
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["library_name"] == "orca-diff" and meta["inference"] is False
    assert {"orca-diff", "weight-diff"} <= set(meta["tags"])
    assert "orca-diff apply --diff pusher/orca-pushed --out" in card

    out = tmp_path / "out"
    r = orca("apply", "--base", "llama-13b", "--diff", "pusher/orca-pushed", "--out", str(out), "-q")
    assert r.returncode == 0, r.stderr
    assert_same_files(out, world["target"])
    # The card's verify command, as written: verify --diff "$(orca-diff download REPO -q)" --model DIR
    assert 'orca-diff verify --diff "$(orca-diff download pusher/orca-pushed -q)" --model rebuilt-model' in card
    folder = orca("download", "pusher/orca-pushed", "-q").stdout.strip()
    v = orca("verify", "--diff", folder, "--model", str(out), "-q")
    assert v.returncode == 0, v.stderr


def test_push_without_a_token_says_how_to_log_in(world, orca):
    r = orca("push", str(world["diff"]), "--repo", "pusher/no-token", HF_TOKEN=None)
    assert r.returncode == 9
    assert "hf auth login" in one_error_line(r)
    assert "pusher/no-token" not in world["hub"].repos


def test_push_keeps_a_card_the_publisher_edited(world, hub, orca, tmp_path):
    import shutil

    diff = tmp_path / "diff"
    shutil.copytree(world["diff"], diff)
    (diff / "README.md").write_text("---\nlicense: other\nlibrary_name: orca-diff\n---\nMy own words.\n")
    r = orca("push", str(diff), "--repo", "pusher/edited-card", "-q", HF_TOKEN="hf_writer")
    assert r.returncode == 0, r.stderr
    assert hub.files_at("pusher/edited-card")["README.md"].endswith(b"My own words.\n")


# --------------------------------------------------------------------------- scripts/
SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def test_the_download_and_rebuild_scripts_do_what_the_card_says(world, hub, orca, tmp_path):
    base = orca.run_python(str(SCRIPTS / "download_base.py"), "--for-diff", "orca", "-q")
    assert base.returncode == 0, base.stderr
    assert sorted(p.name for p in Path(base.stdout.strip()).iterdir()) == sorted(p.name for p in world["base"].iterdir())
    diff = orca.run_python(str(SCRIPTS / "download_diff.py"), "orca", "-q")
    assert diff.returncode == 0, diff.stderr
    assert (Path(diff.stdout.strip()) / "orca-diff.json").is_file()
    hub.clear_log()
    out = tmp_path / "out"
    r = orca.run_python(str(SCRIPTS / "rebuild.py"), "--diff", "orca", "--out", str(out), "-q")
    assert r.returncode == 0, r.stderr
    assert_same_files(out, world["target"])
    assert hub.file_gets() == []  # everything came from the cache the two downloads filled
    bad = orca.run_python(str(SCRIPTS / "download_base.py"), "nobody/nothing")
    assert bad.returncode == 9 and bad.stderr.startswith("download_base: error: ")


# --------------------------------------------------------------------------- in-process units
def test_base_file_selection_prefers_safetensors_then_bin_then_pth():
    both = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json",
            "pytorch_model-00001-of-00002.bin", "pytorch_model.bin.index.json", "config.json", "README.md",
            "original/consolidated.00.pth", "tokenizer.model"]
    label, files = select_base_files(both)
    assert label == "safetensors"
    assert files == ["config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                     "model.safetensors.index.json", "tokenizer.model"]
    label, files = select_base_files([f for f in both if "safetensors" not in f])
    assert label == "pytorch .bin" and "pytorch_model-00001-of-00002.bin" in files and "README.md" not in files
    label, files = select_base_files(["consolidated.00.pth", "params.json", "tokenizer.model", "checklist.chk"])
    assert label == "Meta .pth" and files == ["consolidated.00.pth", "params.json", "tokenizer.model"]


def test_base_file_selection_adds_files_the_diff_copies_and_refuses_missing_ones():
    _, files = select_base_files(["model.safetensors", "tokenizer.model", "added_tokens.json", "extra.txt"],
                                 needed=["extra.txt"])
    assert "extra.txt" in files
    with pytest.raises(HubError, match="no special.txt"):
        select_base_files(["model.safetensors"], needed=["special.txt"])
    with pytest.raises(HubError, match="no model weights"):
        select_base_files(["README.md", "config.json"])


def test_repo_specs_split_at_the_revision():
    assert parse_repo_spec("org/name@v1.0") == parse_repo_spec("org/name@v1.0")
    ref = parse_repo_spec("org/name@0123abc")
    assert (ref.repo_id, ref.revision) == ("org/name", "0123abc")
    assert parse_repo_spec("org/name").revision is None


def test_shipped_catalog_names_llama_13b_and_orca_and_is_honest_about_placeholders(monkeypatch, tmp_path):
    monkeypatch.delenv("ORCA_DIFF_CATALOG", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    cat = load_catalog()
    for name in ("llama-7b", "llama-13b", "llama-30b", "llama-65b", "llama-2-7b", "llama-2-13b", "llama-2-70b"):
        assert name in cat["bases"]
    assert cat["bases"]["llama-13b"].repo == "huggyllama/llama-13b"
    assert cat["bases"]["llama-2-70b"].status == "gated"
    orca = cat["diffs"]["orca"]
    assert orca.is_placeholder and "placeholder" in orca.repo and orca.base == "llama-13b"


def test_user_catalogs_override_in_order_config_file_then_env(monkeypatch, tmp_path):
    config = tmp_path / "cfg" / "orca-diff" / "catalog.json"
    config.parent.mkdir(parents=True)
    config.write_text(json.dumps({"bases": {"llama-13b": {"repo": "cfg-org/llama-13b"},
                                            "mine": {"repo": "cfg-org/mine", "revision": "v2"}}}))
    env_file = tmp_path / "env.json"
    env_file.write_text(json.dumps({"bases": {"llama-13b": {"repo": "env-org/llama-13b"}}}))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    monkeypatch.delenv("ORCA_DIFF_CATALOG", raising=False)
    assert lookup("llama-13b", "base").repo == "cfg-org/llama-13b"
    assert lookup("mine", "base").spec == "cfg-org/mine@v2"
    monkeypatch.setenv("ORCA_DIFF_CATALOG", str(env_file))
    assert lookup("LLaMA-13B", "base").repo == "env-org/llama-13b"
    assert lookup("llama-7b", "base").repo == "huggyllama/llama-7b"  # shipped entries stay


def test_a_broken_user_catalog_is_reported_with_its_path(monkeypatch, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"bases": {"x": {"repo": "not a repo id"}}}))
    monkeypatch.setenv("ORCA_DIFF_CATALOG", str(bad))
    with pytest.raises(FormatError, match="bad.json.*'repo' must be a Hub repo id"):
        load_catalog()
    monkeypatch.setenv("ORCA_DIFF_CATALOG", str(tmp_path / "missing.json"))
    with pytest.raises(InputNotFoundError, match="ORCA_DIFF_CATALOG"):
        load_catalog()


def test_catalog_command_lists_the_names(monkeypatch, tmp_path):
    monkeypatch.delenv("ORCA_DIFF_CATALOG", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    r = CliRunner().invoke(cli, ["catalog"])
    assert r.exit_code == 0, r.output
    assert "llama-13b" in r.output and "huggyllama/llama-13b@main" in r.output
    orca_row = next(line for line in r.output.splitlines() if line.split()[:1] == ["orca"])
    assert "placeholder" in orca_row.split()
    data = json.loads(CliRunner().invoke(cli, ["catalog", "--json"]).output)
    assert data["diffs"]["orca"]["base"] == "llama-13b"


def test_an_unknown_name_lists_what_the_catalog_knows(monkeypatch, tmp_path):
    monkeypatch.delenv("ORCA_DIFF_CATALOG", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    r = CliRunner().invoke(cli, ["apply", "--base", "llama-13", "--diff", str(tmp_path / "nope"), "--out", "x"])
    assert r.exit_code == 3
    assert "no such file or folder" in r.output
    r = CliRunner().invoke(cli, ["download", "not_a_name"])
    assert r.exit_code == 2 and "orca-diff catalog" in r.output


def test_the_card_is_hub_metadata_plus_a_loud_warning_and_the_commands(world):
    manifest = load_manifest(world["root"] / "diff-pinned")
    card = render_card(manifest, repo_id="me/orca-13b-diff")
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta == {"base_model": BASE_REPO, "license": "other", "license_name": "same-as-base-model",
                    "library_name": "orca-diff", "inference": False, "tags": ["orca-diff", "weight-diff"]}
    assert huggingface_hub.ModelCard(card).data.base_model == BASE_REPO  # the client parses it too
    assert "This is a weight diff, not a model" in card
    assert "orca-diff apply --diff me/orca-13b-diff --out rebuilt-model" in card
    assert "orca-diff verify" in card
    for f in manifest.files:
        assert f"{f.sha256}  {f.path}" in card
    assert render_card(manifest, license="llama2").count("license: \"llama2\"") == 1


def test_the_card_claims_a_base_model_only_when_the_diff_records_its_repo(world, monkeypatch, tmp_path):
    monkeypatch.delenv("ORCA_DIFF_CATALOG", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    unpinned = load_manifest(world["diff"])  # names "llama-13b" but records no repo
    meta = yaml.safe_load(render_card(unpinned).split("---\n")[1])
    assert "base_model" not in meta  # a catalog name alone (no fingerprint) is not proof


def test_push_can_tell_a_generated_card_from_an_edited_one(world):
    card = render_card(load_manifest(world["diff"]))
    assert is_generated_card(card)
    assert not is_generated_card(card.replace("Rebuild the model", "Rebuild my model"))
    assert not is_generated_card("---\nlicense: mit\n---\nhand written\n")


# --------------------------------------------------------------------------- make from the Hub, the wrong base refused early
TARGET_REPO = "test-org/orca-tiny-finetune"
OTHER_BASE_REPO = "other-org/llama-7b-tiny"
MIRROR_REPO = "mirror-org/llama-13b-tiny-copy"


@pytest.fixture(scope="module")
def hub_made(world, tmp_path_factory):
    """A fine-tune published on the hub, a diff made from Hub ids only, a wrong base and a mirror."""
    root = tmp_path_factory.mktemp("hubmade")
    hub = world["hub"]
    target_sha = hub.add_folder(TARGET_REPO, world["target"])
    other = write_llama(root / "other", SHAPE, "F16", seed=5, max_shard_bytes=40_000)
    hub.add_folder(OTHER_BASE_REPO, other)
    # a mirror: the same weights under other shard names, plus files of its own
    mirror_files = {f"renamed-{p.name}" if p.suffix == ".safetensors" else p.name: p.read_bytes()
                    for p in world["base"].iterdir()}
    hub.add_repo(MIRROR_REPO, {**mirror_files, "README.md": b"# a mirror\n"})
    runner = Runner(world, root)
    hub.clear_log()
    r = runner("make", "--base", BASE_REPO, "--target", f"{TARGET_REPO}@{target_sha}", "--out", str(root / "diff"), "-q")
    assert r.returncode == 0, r.stderr
    catalog = root / "catalog.json"
    catalog.write_text(json.dumps({"bases": {"llama-7b": {"repo": OTHER_BASE_REPO, "status": "public"}}}))
    return {"root": root, "diff": root / "diff", "target_sha": target_sha, "make_stderr": r.stderr,
            "make_requests": list(hub.requests), "catalog": catalog}


def test_make_from_hub_ids_records_the_base_repo_and_its_resolved_sha(world, hub_made):
    m = load_manifest(hub_made["diff"])
    assert (m.base.repo, m.base.revision) == (BASE_REPO, world["base_sha"])
    assert len(m.base.revision) == 40
    hub_files = world["hub"].files_at(BASE_REPO)
    assert m.base.weight_files and all(
        hashlib.sha256(hub_files[rel]).hexdigest() == bf.sha256 for rel, bf in m.base.weight_files.items())
    # only what make needs of the base: no .bin of the other form, no original/ folder
    gets = [path for _, path in hub_made["make_requests"] if "/resolve/" in path and BASE_REPO in path]
    assert not any(g.endswith((".bin", ".pth")) for g in gets)
    # the target: all its files
    assert {f.path for f in m.files} == {p.name for p in world["target"].iterdir()}
    assert "not identified" not in hub_made["make_stderr"]


def test_apply_with_an_empty_cache_rebuilds_from_the_recorded_base(world, hub, tmp_path, hub_made):
    orca = Runner(world, tmp_path)
    r = orca("apply", "--diff", str(hub_made["diff"]), "--out", str(tmp_path / "out"), "-q", ORCA_DIFF_CATALOG=None)
    assert r.returncode == 0, r.stderr
    assert_same_files(tmp_path / "out", world["target"])


@pytest.mark.parametrize("base", [OTHER_BASE_REPO, "llama-7b"])
def test_a_wrong_base_repo_is_refused_before_any_weight_is_downloaded(world, hub, tmp_path, hub_made, base):
    orca = Runner(world, tmp_path)
    r = orca("apply", "--base", base, "--diff", str(hub_made["diff"]), "--out", str(tmp_path / "out"), "-q",
             ORCA_DIFF_CATALOG=str(hub_made["catalog"]))
    assert r.returncode == 6, r.stderr
    line = one_error_line(r)
    assert OTHER_BASE_REPO in line and "nothing was downloaded" in line and BASE_REPO in line
    assert hub.file_gets(OTHER_BASE_REPO) == []  # not even config.json
    assert not (tmp_path / "out").exists()
    r = orca("verify", "--diff", str(hub_made["diff"]), "--base", OTHER_BASE_REPO)
    assert r.returncode == 6 and hub.file_gets(OTHER_BASE_REPO) == []


def test_a_mirror_holding_the_same_files_is_accepted(world, hub, tmp_path, hub_made):
    orca = Runner(world, tmp_path)
    r = orca("apply", "--base", MIRROR_REPO, "--diff", str(hub_made["diff"]), "--out", str(tmp_path / "out"), "-q")
    assert r.returncode == 0, r.stderr
    assert_same_files(tmp_path / "out", world["target"])
    assert "README.md" not in hub.file_gets(MIRROR_REPO)


def test_info_fingerprint_and_verify_model_take_hub_ids(world, hub, tmp_path, hub_made):
    orca = Runner(world, tmp_path)
    r = orca("info", DIFF_REPO)
    assert r.returncode == 0, r.stderr
    assert "{" not in r.stdout and "rebuilds:" in r.stdout
    r2 = orca("info", "--diff", DIFF_REPO)
    assert r2.returncode == 0 and r2.stdout == r.stdout
    assert [p for p in world["hub"].file_gets(DIFF_REPO)] == ["orca-diff.json"]  # info needs only the manifest
    r = orca("fingerprint", BASE_REPO, "-q")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == load_manifest(hub_made["diff"]).base.fingerprint
    r = orca("verify", "--diff", str(hub_made["diff"]), "--model", f"{TARGET_REPO}@{hub_made['target_sha']}", "-q")
    assert r.returncode == 0, r.stderr
    assert "model OK" in r.stdout


def test_make_from_a_local_folder_in_the_hf_cache_records_its_repo_and_sha(world, hub, tmp_path):
    orca = Runner(world, tmp_path)
    r = orca("download", BASE_REPO, "-q")
    assert r.returncode == 0, r.stderr
    snapshot = Path(r.stdout.strip())
    out = tmp_path / "diff"
    r = orca("make", "--base", str(snapshot), "--target", str(world["target"]), "--out", str(out), "-q")
    assert r.returncode == 0, r.stderr
    m = load_manifest(out)
    assert (m.base.repo, m.base.revision) == (BASE_REPO, world["base_sha"])


def test_make_says_when_the_base_cannot_be_identified(world, tmp_path):
    r = CliRunner().invoke(cli, ["make", "--base", str(world["base"]), "--target", str(world["target"]),
                                 "--out", str(tmp_path / "d"), "-q"])
    assert r.exit_code == 0, r.output
    assert "not identified as a Hub repo" in r.output and "--base" in r.output


def test_the_readme_orca2_walkthrough_runs_as_written(world, hub, tmp_path):
    """The README's Orca 2 commands, verbatim, against a hub serving tiny models under the real
    repo names (Llama-2 gated, as on the Hub; a token that has been granted access)."""
    torch = pytest.importorskip("torch")  # the publisher's make reads the .bin target with torch
    del torch
    from orca_diff.synth import FineTune as FT

    shape = LlamaShape(vocab_size=96, hidden_size=32, intermediate_size=86, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4)
    base = write_llama(tmp_path / "llama", shape, "F16", seed=3, max_shard_bytes=40_000)
    target = write_finetune(tmp_path / "orca2", shape, base_seed=3, dtype="F32", form="bin", bin_shards=6,
                            ft=FT(added_tokens=("[PAD]", "<|im_start|>", "<|im_end|>")))
    hub.add_folder("meta-llama/Llama-2-13b-hf", base, gated=True, readers=("hf_writer",))
    hub.add_folder("microsoft/Orca-2-13b", target)
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("### Worked example: Orca 2", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = [line.split("#")[0].split() for line in section.splitlines() if line.startswith("orca-diff ")]
    assert [c[1] for c in commands] == ["make", "info", "push", "apply", "verify"]
    work = tmp_path / "work"
    work.mkdir()
    orca = Runner(world, tmp_path)
    for cmd in commands:
        r = orca(*cmd[1:], cwd=work, HF_TOKEN="hf_writer")
        assert r.returncode == 0, (cmd, r.stderr)
        if cmd[1] == "info":
            assert "meta-llama/Llama-2-13b-hf at commit" in r.stdout
    assert_same_files(work / "orca-2-13b", target)


def test_make_from_a_catalog_name_records_the_name_the_repo_and_the_resolved_sha(world, hub, tmp_path):
    orca = Runner(world, tmp_path)
    out = tmp_path / "diff"
    r = orca("make", "--base", "llama-13b", "--target", str(world["target"]), "--out", str(out), "-q")
    assert r.returncode == 0, r.stderr
    b = load_manifest(out).base
    assert (b.name, b.repo, b.revision) == ("llama-13b", BASE_REPO, world["base_sha"])
