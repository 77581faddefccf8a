"""Publishing again: `push` to a repo that already holds a diff, against the real client.

The first push of a repo was always tested; a second one never was, because the test Hub's 409
reply to create_repo lacked the "url" that huggingface_hub 2.4.0 reads from it (the real Hub sends
it). These tests push twice, as a publisher releasing a new version does.
"""

from __future__ import annotations

from pathlib import Path

from hubserver import free_port
from test_hub import SHAPE, Runner, assert_same_files, hub, one_error_line, orca, world  # noqa: F401 - fixtures

from orca_diff.format import load_manifest
from orca_diff.make import make_diff
from orca_diff.synth import FineTune, write_finetune


def test_the_test_hub_answers_409_with_the_url_as_the_hub_does(world):
    """huggingface_hub's create_repo(exist_ok=True) returns RepoUrl(reply["url"]) after a 409."""
    import huggingface_hub

    world["hub"].add_repo("pusher/exists", {"a.txt": b"x"})
    api = huggingface_hub.HfApi(endpoint=world["hub"].url, token="hf_writer")
    url = api.create_repo("pusher/exists", exist_ok=True)
    assert url.repo_id == "pusher/exists"


def _second_version(world, tmp_path: Path) -> tuple[Path, Path]:
    """Another fine-tune of the same base, as a diff with fewer (bigger) payload files."""
    target2 = write_finetune(tmp_path / "target2", SHAPE, base_seed=0, dtype="F16", ft=FineTune(seed=7),
                             max_shard_bytes=40_000)
    diff2 = tmp_path / "diff2"
    make_diff(world["base"], target2, diff2, base_name="llama-13b", chunk_bytes=8192, payload_file_bytes=1 << 30)
    return target2, diff2


def test_pushing_a_new_version_updates_the_repo_and_both_commits_rebuild(world, hub, orca, tmp_path):
    repo = "pusher/orca-versions"
    first = orca("push", str(world["diff"]), "--repo", repo, "-q", HF_TOKEN="hf_writer")
    assert first.returncode == 0, first.stderr
    v1 = first.stdout.split("commit ")[1].split(")")[0]
    target2, diff2 = _second_version(world, tmp_path)
    old_payloads = {p.path for p in load_manifest(world["diff"]).payloads}
    new_payloads = {p.path for p in load_manifest(diff2).payloads}
    assert old_payloads - new_payloads  # the new version drops payload files

    second = orca("push", str(diff2), "--repo", repo, "-q", HF_TOKEN="hf_writer")
    assert second.returncode == 0, second.stderr
    assert "KeyError" not in second.stderr
    assert "removed" in second.stdout
    files = set(hub.files_at(repo))
    assert files == {".gitattributes", "README.md", "orca-diff.json", *new_payloads}  # stale payloads deleted

    out1, out2 = tmp_path / "v1", tmp_path / "v2"
    r = orca("apply", "--base", "llama-13b", "--diff", f"{repo}@{v1}", "--out", str(out1), "-q")
    assert r.returncode == 0, r.stderr
    assert_same_files(out1, world["target"])
    r = orca("apply", "--base", "llama-13b", "--diff", repo, "--out", str(out2), "-q")
    assert r.returncode == 0, r.stderr
    assert_same_files(out2, target2)


def test_a_card_edited_on_the_hub_is_kept_by_the_next_push(world, hub, orca, tmp_path):
    repo = "pusher/orca-edited-on-hub"
    assert orca("push", str(world["diff"]), "--repo", repo, "-q", HF_TOKEN="hf_writer").returncode == 0
    edited = b"---\nlicense: other\nlibrary_name: orca-diff\n---\nEdited on the Hub.\n"
    hub._commit(hub.repos[repo], "main", {"README.md": edited}, [], "edit card")
    _target2, diff2 = _second_version(world, tmp_path)
    r = orca("push", str(diff2), "--repo", repo, "-q", HF_TOKEN="hf_writer")
    assert r.returncode == 0, r.stderr
    assert hub.files_at(repo)["README.md"] == edited
    assert "kept the repo's README.md" in r.stdout


def test_push_with_no_network_says_it_cannot_push_in_plain_words(world, orca):
    r = orca("push", str(world["diff"]), "--repo", "me/x", HF_TOKEN="hf_writer",
             HF_ENDPOINT=f"http://127.0.0.1:{free_port()}")
    assert r.returncode == 9
    line = one_error_line(r)
    assert "to push to me/x" in line and "fetch push" not in line and "cache" not in line


def test_push_takes_the_token_as_an_option_like_hf_upload(world, hub, orca):
    r = orca("push", str(world["diff"]), "--repo", "pusher/by-option", "--token", "hf_writer", "-q", HF_TOKEN=None)
    assert r.returncode == 0, r.stderr
    assert "orca-diff.json" in hub.files_at("pusher/by-option")


def test_push_revision_commits_to_a_new_branch_and_leaves_main_alone(world, hub, orca, tmp_path):
    repo = "pusher/orca-branches"
    assert orca("push", str(world["diff"]), "--repo", repo, "-q", HF_TOKEN="hf_writer").returncode == 0
    main_before = hub.files_at(repo)
    _target2, diff2 = _second_version(world, tmp_path)
    r = orca("push", str(diff2), "--repo", repo, "--revision", "v2", "-q", HF_TOKEN="hf_writer")
    assert r.returncode == 0, r.stderr
    assert hub.files_at(repo) == main_before
    assert hub.files_at(repo, "v2")["orca-diff.json"] == (diff2 / "orca-diff.json").read_bytes()
