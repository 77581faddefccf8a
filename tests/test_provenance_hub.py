"""Provenance over the Hub (issue 19), with the real huggingface_hub client against
tests/hubserver.py: ``push --sign-key`` publishes the signatures and signs the diff folder, and
``apply --verify-key`` checks every signature before a single payload is downloaded."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

pytest.importorskip("model_signing", reason="the provenance tests need the sign extra: pip install 'orca-diff[sign]'")

from signkit import ec_keypair  # noqa: E402
from test_hub import Runner, one_error_line, world  # noqa: E402,F401  (world: the module's hub and models)
from orca_diff.format import load_manifest  # noqa: E402
from orca_diff.make import make_diff  # noqa: E402
from orca_diff.signing import DERIVATION_SIG, DIFF_SIG, TARGET_SIG, SignWith  # noqa: E402


@pytest.fixture(scope="module")
def release(world, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("signed-release")
    priv, pub = ec_keypair(root / "keys", "publisher")
    _, stranger = ec_keypair(root / "keys", "stranger")
    diff = root / "diff"
    make_diff(world["base"], world["target"], diff, base_name="llama-13b", chunk_bytes=8192,
              payload_file_bytes=12_000, sign=SignWith(priv))
    return {"diff": diff, "priv": priv, "pub": pub, "stranger": stranger, "root": root}


def _payload_requests(hub, manifest) -> list[str]:
    names = {p.path for p in manifest.payloads}
    return [path for _, path in hub.requests if any(path.endswith("/" + n) for n in names)]


def test_push_sign_key_publishes_every_signature_and_apply_verifies_them(world, release, tmp_path):  # noqa: F811
    hub = world["hub"]
    orca = Runner(world, tmp_path)
    r = orca("push", str(release["diff"]), "--repo", "pusher/signed", "--sign-key", str(release["priv"]), "-q",
             HF_TOKEN="hf_writer")
    assert r.returncode == 0, r.stderr
    assert "--verify-key" in r.stdout
    files = hub.files_at("pusher/signed")
    assert {TARGET_SIG, DERIVATION_SIG, DIFF_SIG} <= set(files)
    out = tmp_path / "out"
    a = orca("apply", "--base", "llama-13b", "--diff", "pusher/signed", "--out", str(out), "-q",
             "--verify-key", str(release["pub"]))
    assert a.returncode == 0, a.stderr
    assert "signature diff.sig verified" in a.stdout and "signature target.sig verified" in a.stdout
    assert (out / "model.sig").read_bytes() == (release["diff"] / TARGET_SIG).read_bytes()


def test_a_wrong_key_is_refused_before_any_payload_is_downloaded(world, release, tmp_path):  # noqa: F811
    hub = world["hub"]
    orca = Runner(world, tmp_path)
    assert orca("push", str(release["diff"]), "--repo", "pusher/signed2", "-q", HF_TOKEN="hf_writer").returncode == 0
    hub.clear_log()
    out = tmp_path / "out"
    r = orca("apply", "--base", "llama-13b", "--diff", "pusher/signed2", "--out", str(out), "-q",
             "--verify-key", str(release["stranger"]))
    assert r.returncode == 7, r.stderr
    assert "does not verify" in one_error_line(r)
    assert _payload_requests(hub, load_manifest(release["diff"])) == []
    assert not out.exists()


def test_a_mirror_that_dropped_the_signature_is_refused_when_one_is_required(world, release, tmp_path):  # noqa: F811
    hub = world["hub"]
    orca = Runner(world, tmp_path)
    mirror = tmp_path / "mirror"
    shutil.copytree(release["diff"], mirror)
    for name in (TARGET_SIG, DERIVATION_SIG, DIFF_SIG):
        (mirror / name).unlink(missing_ok=True)
    assert orca("push", str(mirror), "--repo", "mirror/unsigned", "-q", HF_TOKEN="hf_writer").returncode == 0
    hub.clear_log()
    r = orca("apply", "--base", "llama-13b", "--diff", "mirror/unsigned", "--out", str(tmp_path / "out"), "-q",
             "--verify-key", str(release["pub"]))
    assert r.returncode == 7 and "carries no publisher signature" in one_error_line(r)
    assert _payload_requests(hub, load_manifest(release["diff"])) == []


def test_a_push_carries_its_signatures_in_its_one_commit_and_never_leaves_a_stale_one(world, release, tmp_path):  # noqa: F811
    """The signatures are published with the diff (the printed commit holds both); a later push
    of an unsigned diff to the same repo deletes the old release's signature files instead of
    leaving them beside a diff they do not sign."""
    hub = world["hub"]
    orca = Runner(world, tmp_path)
    r = orca("push", str(release["diff"]), "--repo", "pusher/resigned", "--sign-key", str(release["priv"]), "-q",
             HF_TOKEN="hf_writer")
    assert r.returncode == 0, r.stderr
    assert {TARGET_SIG, DERIVATION_SIG, DIFF_SIG} <= set(hub.files_at("pusher/resigned"))
    unsigned = tmp_path / "unsigned"
    make_diff(world["base"], world["target"], unsigned, base_name="llama-13b", chunk_bytes=8192,
              payload_file_bytes=12_000)
    r = orca("push", str(unsigned), "--repo", "pusher/resigned", "-q", HF_TOKEN="hf_writer")
    assert r.returncode == 0, r.stderr
    assert "--verify-key" not in r.stdout and "signature" not in r.stdout
    assert not {TARGET_SIG, DERIVATION_SIG, DIFF_SIG} & set(hub.files_at("pusher/resigned"))
