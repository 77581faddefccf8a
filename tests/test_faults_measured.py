"""Fault injection, part 7 (issue 12): what is printed is what was measured, in words that are true.

* a re-signed manifest whose tensor record (and the fingerprint derived from it) is not the
  tensor's real digest: apply and ``verify --model`` measure every tensor and refuse, naming it
  (before, apply printed the manifest's fingerprint as "the model fingerprint");
* the fingerprints apply and verify print are computed from the bytes (checked against an
  independent ``hash_model``), also after a resume;
* ``info`` says its fingerprints are recorded claims, and no manifest string reaches the terminal
  raw: control characters and lone surrogates are escaped (in ``info`` and in error lines);
* a payload removed while apply runs is a corrupt diff (exit 5), not an output error;
* ``--diff DIR/orca-diff.json`` means the diff DIR.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import orca_diff.apply as apply_mod
from faultkit import Kit, expect_refusal, kit, ledger, rewrite_manifest, run_cli  # noqa: F401
from orca_diff.apply import apply_diff
from orca_diff.containers import open_model
from orca_diff.errors import CorruptDiffError, InterruptedError_, VerificationError
from orca_diff.fingerprint import base_fingerprint, hash_model
from orca_diff.format import MANIFEST_NAME
from orca_diff.outdir import staging_dir
from orca_diff.verify import verify_model

SUITE = "measured"
VICTIM = "model.layers.1.self_attn.v_proj.weight"


def _refingerprint(doc: dict) -> None:
    """Recompute both fingerprints from the (edited) records, as a forger would."""
    key = "blake3" if doc["format_version"] >= 2 else "sha256"
    doc["target"]["fingerprint"] = base_fingerprint(
        {n: (t["dtype"], tuple(t["shape"]), t[key]) for n, t in doc["tensors"].items()})
    doc["base"]["fingerprint"] = base_fingerprint(
        {n: (t["dtype"], tuple(t["shape"]), t[key]) for n, t in doc["base"]["tensors"].items()})


def _forged(kit: Kit, dest: Path) -> tuple[Path, str]:
    diff = kit.copy_diff(dest)

    def edit(doc: dict) -> None:
        doc["tensors"][VICTIM]["blake3"] = "ab" * 32
        _refingerprint(doc)

    doc = rewrite_manifest(diff, edit)
    return diff, doc["target"]["fingerprint"]


def _true_fingerprint(folder: Path) -> str:
    with open_model(folder) as m:
        return base_fingerprint(hash_model(m, algo="blake3"))


def test_apply_measures_every_tensor_and_refuses_a_forged_record(kit: Kit, ledger, tmp_path: Path) -> None:
    diff, fake_fp = _forged(kit, tmp_path / "diff")
    out = tmp_path / "out"
    exc = expect_refusal(ledger, SUITE, "tensor record forged, fingerprint re-derived, manifest re-signed",
                         lambda: apply_diff(kit.base, diff, out, threads=2, progress=False), must_name=(VICTIM,))
    assert isinstance(exc, VerificationError)
    assert not out.exists()
    r = run_cli("apply", "--base", str(kit.base), "--diff", str(diff), "--out", str(tmp_path / "cli"), "-q")
    assert r.returncode == VerificationError.exit_code and fake_fp not in r.stdout + r.stderr, r.stdout + r.stderr
    ledger.record(SUITE, "forged record through the CLI", "detected")


def test_verify_model_measures_tensors_not_only_files(kit: Kit, ledger, tmp_path: Path) -> None:
    diff, _ = _forged(kit, tmp_path / "diff")
    exc = expect_refusal(ledger, SUITE, "verify --model of the genuine model against a forged record",
                         lambda: verify_model(kit.target, diff), must_name=(VICTIM,))
    assert isinstance(exc, VerificationError)
    assert verify_model(kit.target, kit.diff).fingerprint == _true_fingerprint(kit.target)


def test_the_printed_fingerprints_are_measured(kit: Kit, ledger, tmp_path: Path) -> None:
    out = tmp_path / "out"
    r = run_cli("apply", "--base", str(kit.base), "--diff", str(kit.diff), "--out", str(out), "-q")
    assert r.returncode == 0, r.stderr
    from conftest import file_hashes
    from orca_diff.identity import model_digest

    true_digest = model_digest(file_hashes(kit.target))  # the model identity, from the target's own bytes
    assert f"model digest {true_digest}" in r.stdout and "measured" in r.stdout, r.stdout
    assert "base fingerprint" in r.stdout and "(measured)" in r.stdout or "tensors checked" in r.stdout
    if "base fingerprint" in r.stdout:
        assert _true_fingerprint(kit.base) in r.stdout
    v = run_cli("verify", "--diff", str(kit.diff), "--base", str(kit.base), "--model", str(out), "-q")
    assert v.returncode == 0 and f"model digest {true_digest}" in v.stdout, v.stdout + v.stderr
    ledger.record(SUITE, "printed fingerprints equal independent measurements", "recovered")


def test_a_resumed_apply_measures_the_files_it_keeps(kit: Kit, ledger, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    real = apply_mod._write_all
    calls = {"n": 0}

    def dying(sf, data):
        calls["n"] += 1
        if calls["n"] == 12:
            raise KeyboardInterrupt
        real(sf, data)

    monkeypatch.setattr(apply_mod, "_write_all", dying)
    with pytest.raises(InterruptedError_):
        apply_diff(kit.base, kit.diff, out, threads=1, progress=False)
    monkeypatch.setattr(apply_mod, "_write_all", real)
    r = apply_diff(kit.base, kit.diff, out, threads=1, progress=False)
    assert r.resumed_files > 0
    assert r.target_fingerprint == _true_fingerprint(kit.target)
    kit.assert_identical(out)
    ledger.record(SUITE, "resume measures kept files", "recovered")


def test_info_says_recorded_and_escapes_control_characters_and_surrogates(kit: Kit, ledger, tmp_path: Path) -> None:
    diff = kit.copy_diff(tmp_path / "diff")
    fake_line = "\x1b[2K\rfingerprint=0000000000000000 (measured, verified)\n\x07"
    rewrite_manifest(diff, lambda d: (d["base"].update(name="tiny" + fake_line, revision="\ud800rev"),
                                      d.update(tool="orca-diff \udcff\u202e")))
    for args in (("info", str(diff)), ("info", str(diff), "--json")):
        r = run_cli(*args)
        assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
        assert not any(c in r.stdout for c in "\x1b\r\x07\u202e"), repr(r.stdout)
        # the forged text stays inside its own line: it cannot draw a line of its own
        assert not any(line.startswith("fingerprint=0000000000000000") for line in r.stdout.splitlines())
        ledger.record(SUITE, f"control characters and surrogates in {' '.join(args[:1] + args[2:])}", "detected")
    r = run_cli("info", str(diff))
    assert "(recorded)" in r.stdout and "verify" in r.stdout and "fingerprint BASE" in r.stdout
    assert "\\x1b" in r.stdout and "\\ud800" in r.stdout  # shown, escaped


def test_error_lines_escape_names_from_the_manifest(kit: Kit, ledger, tmp_path: Path) -> None:
    diff = kit.copy_diff(tmp_path / "diff")
    evil = "model.norm.weight\x1b[2K\r\ud800"

    def edit(doc: dict) -> None:
        bt = doc["base"]["tensors"].pop("model.norm.weight")
        doc["base"]["tensors"][evil] = bt
        for t in doc["tensors"].values():
            if t["encoding"].get("base_tensor") == "model.norm.weight":
                t["encoding"]["base_tensor"] = evil
        _refingerprint(doc)

    rewrite_manifest(diff, edit)
    r = run_cli("apply", "--base", str(kit.base), "--diff", str(diff), "--out", str(tmp_path / "out"), "-q")
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    assert "\x1b" not in r.stderr and "\r" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, repr(r.stderr)
    ledger.record(SUITE, "control characters in a tensor name of an error line", "detected")


def test_a_payload_removed_during_apply_is_a_corrupt_diff(kit: Kit, ledger, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    diff = kit.copy_diff(tmp_path / "diff")
    payloads = sorted(diff.glob("payload-*.odz"))
    real = apply_mod._rebuild

    def remove_then_rebuild(*a, **kw):
        payloads[-1].unlink()  # after the presence check and the base check, before the rebuild reads it
        return real(*a, **kw)

    monkeypatch.setattr(apply_mod, "_rebuild", remove_then_rebuild)
    out = tmp_path / "out"
    exc = expect_refusal(ledger, SUITE, "payload removed during apply",
                         lambda: apply_diff(kit.base, diff, out, threads=2, progress=False),
                         must_name=(payloads[-1].name, "download"))
    assert isinstance(exc, CorruptDiffError) and exc.exit_code == 5
    assert not out.exists()


def test_diff_given_as_its_manifest_file(kit: Kit, ledger, tmp_path: Path) -> None:
    out = tmp_path / "out"
    apply_diff(kit.base, kit.diff / MANIFEST_NAME, out, threads=1, progress=False)
    kit.assert_identical(out)
    r = run_cli("apply", "--base", str(kit.base), "--diff", str(kit.diff / MANIFEST_NAME), "--out",
                str(tmp_path / "cli"), "-q")
    assert r.returncode == 0, r.stderr
    v = run_cli("verify", "--diff", str(kit.diff / MANIFEST_NAME), "--model", str(out), "-q")
    assert v.returncode == 0, v.stderr
    ledger.record(SUITE, "--diff DIR/orca-diff.json", "recovered")
    assert not staging_dir(out).exists()
    assert json.loads((kit.diff / MANIFEST_NAME).read_bytes())["format"] == "orca-diff"
