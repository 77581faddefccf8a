"""Provenance (issue 19): a release signed by its publisher in the OpenSSF model-signing format,
verified on the rebuilt bytes, with an attested derivation; each refusal in its own test.

Keys and certificate chains are made here (tests/signkit.py); nothing touches the network. The
OpenSSF tool itself (``model_signing``, PyPI model-signing 1.1.1) checks what orca-diff signs and
rebuilds, and signs targets orca-diff then checks.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("model_signing", reason="the provenance tests need the sign extra: pip install 'orca-diff[sign]'")

from click.testing import CliRunner  # noqa: E402

from conftest import file_hashes  # noqa: E402
from faultkit import rewrite_manifest  # noqa: E402
from signkit import certificate_chain, ec_keypair  # noqa: E402
from orca_diff.apply import apply_diff  # noqa: E402
from orca_diff.cli import cli  # noqa: E402
from orca_diff.errors import BaseMismatchError, SignatureError, UsageError  # noqa: E402
from orca_diff.format import MANIFEST_NAME, load_manifest  # noqa: E402
from orca_diff.identity import SIGNATURE_NAME, model_digest  # noqa: E402
from orca_diff.make import make_diff  # noqa: E402
from orca_diff.signing import (DERIVATION_SIG, DIFF_SIG, TARGET_SIG, SignWith, VerifyWith,  # noqa: E402
                               check_release, read_signed_model, sign_diff_folder, write_signature)
from orca_diff.verify import verify_model  # noqa: E402

MS = [sys.executable, "-m", "model_signing"]


def ms(*args: str) -> subprocess.CompletedProcess:
    """The OpenSSF CLI, as a user runs it."""
    return subprocess.run([*MS, *map(str, args)], capture_output=True, text=True, timeout=120)


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, Path]:
    priv, pub = ec_keypair(tmp_path / "keys", "publisher")
    other_priv, other_pub = ec_keypair(tmp_path / "keys", "stranger")
    return {"priv": priv, "pub": pub, "other_priv": other_priv, "other_pub": other_pub}


@pytest.fixture
def signed(make_pair, keys, tmp_path: Path):
    """A base, its fine-tune, and a diff made with --sign-key."""
    base, target = make_pair("BF16", add_pad_row=True)
    (target / ".gitattributes").write_text("*.safetensors filter=lfs\n")
    diff = tmp_path / "diff"
    make_diff(base, target, diff, threads=2, progress=False, sign=SignWith(keys["priv"]))
    return base, target, diff


def _key(keys, name="pub") -> VerifyWith:
    return VerifyWith(public_key=keys[name])


# --------------------------------------------------------------------------- the happy path


def test_make_signs_the_target_and_apply_verifies_every_rebuilt_file(signed, keys, tmp_path: Path) -> None:
    base, target, diff = signed
    for name in (TARGET_SIG, DERIVATION_SIG):
        assert (diff / name).is_file()
    out = tmp_path / "out"
    r = apply_diff(base, diff, out, threads=2, progress=False, verify=_key(keys))
    assert any("signature target.sig verified" in line for line in r.provenance), r.provenance
    assert any("attestation derivation.sig verified" in line for line in r.provenance), r.provenance
    # the rebuilt folder is the target plus the signature make wrote for it
    assert file_hashes(out) == {**file_hashes(target), SIGNATURE_NAME: hashlib.sha256((diff / TARGET_SIG).read_bytes()).hexdigest()}
    assert r.model_digest == model_digest(file_hashes(target)) == read_signed_model(diff / TARGET_SIG, _key(keys)).root


def test_the_openssf_tool_verifies_the_rebuilt_folder(signed, keys, tmp_path: Path) -> None:
    base, _, diff = signed
    out = tmp_path / "out"
    apply_diff(base, diff, out, threads=2, progress=False, verify=_key(keys))
    v = ms("verify", "key", out, "--signature", out / SIGNATURE_NAME, "--public_key", keys["pub"])
    assert v.returncode == 0 and "Verification succeeded" in v.stdout, v.stdout + v.stderr
    bad = ms("verify", "key", out, "--signature", out / SIGNATURE_NAME, "--public_key", keys["other_pub"])
    assert bad.returncode != 0  # the tool is really checking


def test_a_target_signed_with_the_openssf_tool_is_checked_and_travels(make_pair, keys, tmp_path: Path) -> None:
    base, target = make_pair("BF16")
    s = ms("sign", "key", target, "--signature", target / SIGNATURE_NAME, "--private_key", keys["priv"])
    assert s.returncode == 0, s.stderr
    diff, out = tmp_path / "diff", tmp_path / "out"
    notes: list[str] = []
    make_diff(base, target, diff, threads=2, progress=False, notes=notes, verify_target=_key(keys))
    assert any("verified with public key" in n for n in notes), notes
    assert (diff / TARGET_SIG).read_bytes() == (target / SIGNATURE_NAME).read_bytes()
    apply_diff(base, diff, out, threads=2, progress=False, verify=_key(keys))
    assert file_hashes(out) == file_hashes(target)
    assert ms("verify", "key", out, "--signature", out / SIGNATURE_NAME, "--public_key", keys["pub"]).returncode == 0


def test_certificate_signing_and_verification(make_pair, tmp_path: Path) -> None:
    pki = certificate_chain(tmp_path / "pki")
    other = certificate_chain(tmp_path / "pki2", "other")
    base, target = make_pair("BF16")
    diff, out = tmp_path / "diff", tmp_path / "out"
    make_diff(base, target, diff, threads=2, progress=False,
              sign=SignWith(pki["leaf_key"], pki["leaf"], (pki["intermediate"], pki["root"])))
    apply_diff(base, diff, out, threads=2, progress=False, verify=VerifyWith(certificate_chain=(pki["chain"],)))
    v = ms("verify", "certificate", out, "--signature", out / SIGNATURE_NAME, "--certificate_chain", pki["chain"])
    assert v.returncode == 0, v.stdout + v.stderr
    with pytest.raises(SignatureError, match="does not verify"):
        apply_diff(base, diff, tmp_path / "out2", progress=False, verify=VerifyWith(certificate_chain=(other["chain"],)))
    assert not (tmp_path / "out2").exists()


def test_model_digest_equals_the_librarys_root_digest(make_pair, keys, tmp_path: Path) -> None:
    """Our identity, computed from measured sha256s, is the subject digest model_signing signs for
    the same folder (paths chosen so that component order and string order differ)."""
    _, target = make_pair("BF16")
    (target / "a").mkdir()
    (target / "a" / "b.json").write_text("{}")
    (target / "a-b.json").write_text("[]")
    (target / ".gitattributes").write_text("x")
    (target / "sub").mkdir()
    (target / "sub" / ".gitattributes").write_text("nested ones are model files")
    sig = tmp_path / "lib.sig"
    assert ms("sign", "key", target, "--signature", sig, "--private_key", keys["priv"]).returncode == 0
    payload = json.loads(base64.b64decode(json.loads(sig.read_text())["dsseEnvelope"]["payload"]))
    library_root = payload["subject"][0]["digest"]["sha256"]
    # by hand, from sha256sum-style digests of the bytes
    shas = {p.relative_to(target).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in target.rglob("*") if p.is_file()}
    assert model_digest(shas) == library_root
    r = CliRunner().invoke(cli, ["fingerprint", "--model", str(target), "-q"])
    assert r.exit_code == 0 and r.output.strip() == library_root, r.output


def test_every_command_prints_one_identity(signed, keys, tmp_path: Path) -> None:
    base, target, diff = signed
    out = tmp_path / "out"
    want = model_digest(file_hashes(target))
    runner = CliRunner()
    a = runner.invoke(cli, ["apply", "--base", str(base), "--diff", str(diff), "--out", str(out), "-q",
                            "--verify-key", str(keys["pub"])])
    assert a.exit_code == 0, a.output
    v = runner.invoke(cli, ["verify", "--diff", str(diff), "--model", str(out), "-q", "--verify-key", str(keys["pub"])])
    assert v.exit_code == 0, v.output
    i = runner.invoke(cli, ["info", str(diff)])
    f = runner.invoke(cli, ["fingerprint", "--model", str(out), "-q"])
    again = runner.invoke(cli, ["apply", "--base", str(base), "--diff", str(diff), "--out", str(out), "-q"])
    for r in (a, v, i, f, again):
        assert r.exit_code == 0 and f"{want}" in r.output, r.output
    for r in (a, v, i, again):
        assert f"model digest {want}" in r.output
    assert "signed: signature target.sig verified" in a.output


# --------------------------------------------------------------------------- refusals, one each


def test_wrong_key_is_refused_before_any_output(signed, keys, tmp_path: Path) -> None:
    base, _, diff = signed
    out = tmp_path / "out"
    with pytest.raises(SignatureError, match="target.sig: the signature does not verify with public key"):
        apply_diff(base, diff, out, progress=False, verify=_key(keys, "other_pub"))
    assert not out.exists()


def test_signature_over_another_model_is_refused(make_pair, keys, tmp_path: Path) -> None:
    base, target = make_pair("BF16")
    _, other = make_pair("BF16", lr=3e-3)
    assert ms("sign", "key", other, "--signature", tmp_path / "other.sig", "--private_key", keys["priv"]).returncode == 0
    diff = tmp_path / "diff"
    make_diff(base, target, diff, threads=2, progress=False)
    shutil.copyfile(tmp_path / "other.sig", diff / TARGET_SIG)  # genuinely signed, by the right key, another model
    with pytest.raises(SignatureError, match="sha256 .* but the publisher signed"):
        apply_diff(base, diff, tmp_path / "out", progress=False, verify=_key(keys))
    assert not (tmp_path / "out").exists()


def test_target_file_changed_after_signing_is_refused_by_make(make_pair, keys, tmp_path: Path) -> None:
    base, target = make_pair("BF16")
    assert ms("sign", "key", target, "--signature", target / SIGNATURE_NAME, "--private_key", keys["priv"]).returncode == 0
    cfg = target / "config.json"
    cfg.write_text(cfg.read_text().replace("}", ', "auto_map": {"AutoModel": "evil.Model"}}', 1))
    with pytest.raises(SignatureError, match=r"model\.sig: the target's signature does not match its files.*config\.json"):
        make_diff(base, target, tmp_path / "diff", threads=2, progress=False)  # even without a key
    assert not (tmp_path / "diff").exists()


def test_rebuilt_file_differing_from_the_signed_one_is_never_published(signed, keys, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The per-file hook: even if the up-front check were passed, a rebuilt file whose measured
    sha256 is not the signed one stays unpublished."""
    import orca_diff.signing as signing_mod

    base, _, diff = signed
    real = signing_mod.check_release

    def lenient(*a, **kw):
        rc = real(*a, **kw)
        rc.model.files["config.json"] = "00" * 32
        return rc

    monkeypatch.setattr(signing_mod, "check_release", lenient)
    out = tmp_path / "out"
    with pytest.raises(SignatureError, match=r"config\.json.*: sha256 .* but the publisher signed 000000000000"):
        apply_diff(base, diff, out, threads=2, progress=False, verify=_key(keys))
    assert not out.exists()


def test_resigned_manifest_with_the_original_signature_is_refused(make_pair, keys, tmp_path: Path) -> None:
    """The .bin-style forgery in general form: a file's bytes and sha256 changed in the manifest,
    manifest_sha256 recomputed; the publisher's signature still names the true sha256."""
    base, target = make_pair("BF16")
    diff = tmp_path / "diff"
    make_diff(base, target, diff, threads=2, progress=False, sign=SignWith(keys["priv"]))

    def forge(doc: dict) -> None:
        f = next(f for f in doc["target"]["files"] if f["path"] == "config.json")
        f["sha256"] = hashlib.sha256(b"forged").hexdigest()

    rewrite_manifest(diff, forge)
    load_manifest(diff)  # self-consistent: every accident check passes
    with pytest.raises(SignatureError, match="config.json"):
        apply_diff(base, diff, tmp_path / "out", progress=False, verify=_key(keys))


def test_signature_swapped_between_releases_is_refused(make_pair, keys, tmp_path: Path) -> None:
    base, t1 = make_pair("BF16")
    _, t2 = make_pair("BF16", lr=3e-3)
    d1, d2 = tmp_path / "d1", tmp_path / "d2"
    make_diff(base, t1, d1, threads=2, progress=False, sign=SignWith(keys["priv"]))
    make_diff(base, t2, d2, threads=2, progress=False, sign=SignWith(keys["priv"]))
    shutil.copyfile(d1 / TARGET_SIG, d2 / TARGET_SIG)
    with pytest.raises(SignatureError):
        apply_diff(base, d2, tmp_path / "out", progress=False, verify=_key(keys))
    # the derivation attestation of release 1 on release 2 is refused too
    d3 = tmp_path / "d3"
    make_diff(base, t2, d3, threads=2, progress=False, sign=SignWith(keys["priv"]))
    shutil.copyfile(d1 / DERIVATION_SIG, d3 / DERIVATION_SIG)
    with pytest.raises(SignatureError, match="derivation.sig"):
        apply_diff(base, d3, tmp_path / "out3", progress=False, verify=_key(keys))


def test_unsigned_diff_is_refused_when_a_signature_is_required(make_pair, keys, tmp_path: Path) -> None:
    base, target = make_pair("BF16")
    diff = tmp_path / "diff"
    make_diff(base, target, diff, threads=2, progress=False)
    with pytest.raises(SignatureError, match="carries no publisher signature"):
        apply_diff(base, diff, tmp_path / "out", progress=False, verify=_key(keys))
    r = CliRunner().invoke(cli, ["apply", "--base", str(base), "--diff", str(diff), "--out", str(tmp_path / "o"), "-q",
                                 "--verify-key", str(keys["pub"])])
    assert r.exit_code == SignatureError.exit_code and "carries no publisher signature" in r.output


def test_without_a_verify_option_apply_says_the_release_is_signed(signed, tmp_path: Path) -> None:
    base, _, diff = signed
    r = apply_diff(base, diff, tmp_path / "out", progress=False)
    assert any("this release is signed" in n and "--verify-key" in n for n in r.notes), r.notes


def test_derivation_attestation_binds_base_weight_files(signed, keys, tmp_path: Path) -> None:
    base, _, diff = signed
    m = load_manifest(diff)
    assert m.base.weight_files  # recorded from the bytes read
    for rel, bf in m.base.weight_files.items():
        assert bf.sha256 == hashlib.sha256((base / rel).read_bytes()).hexdigest()

    def other_base(doc: dict) -> None:
        for rec in doc["base"]["weight_files"].values():
            rec["sha256"] = "11" * 32

    rewrite_manifest(diff, other_base)  # a manifest re-checksummed to claim another base's files
    with pytest.raises(SignatureError, match=r"derivation\.sig: material 'base:"):
        apply_diff(base, diff, tmp_path / "out", progress=False, verify=_key(keys))


def test_derivation_names_the_exact_manifest(signed, keys, tmp_path: Path) -> None:
    base, _, diff = signed
    rewrite_manifest(diff, lambda d: d.update(tool="orca-diff 9.9"))  # harmless-looking, re-checksummed
    with pytest.raises(SignatureError, match=r"derivation.sig: material 'diff:orca-diff.json'"):
        check_release(diff, load_manifest(diff), _key(keys))


def test_make_refuses_to_sign_an_already_signed_target(make_pair, keys, tmp_path: Path) -> None:
    base, target = make_pair("BF16")
    assert ms("sign", "key", target, "--signature", target / SIGNATURE_NAME, "--private_key", keys["priv"]).returncode == 0
    with pytest.raises(UsageError, match="already signed"):
        make_diff(base, target, tmp_path / "diff", progress=False, sign=SignWith(keys["priv"]))


def test_make_verifies_a_presigned_target_with_the_given_key(make_pair, keys, tmp_path: Path) -> None:
    base, target = make_pair("BF16")
    assert ms("sign", "key", target, "--signature", target / SIGNATURE_NAME, "--private_key", keys["other_priv"]).returncode == 0
    with pytest.raises(SignatureError, match="model.sig: the signature does not verify"):
        make_diff(base, target, tmp_path / "diff", progress=False, verify_target=_key(keys))
    assert not (tmp_path / "diff").exists()


def test_a_bad_signing_key_fails_before_encoding(make_pair, tmp_path: Path) -> None:
    base, target = make_pair("BF16")
    bad = tmp_path / "bad.key"
    bad.write_text("not a key")
    with pytest.raises(UsageError, match="cannot sign with this key"):
        make_diff(base, target, tmp_path / "diff", progress=False, sign=SignWith(bad))


# --------------------------------------------------------------------------- the diff's own signature


def test_diff_signature_is_checked_before_the_manifest_is_trusted(signed, keys, tmp_path: Path) -> None:
    base, _, diff = signed
    write_signature(diff / DIFF_SIG, sign_diff_folder(diff, load_manifest(diff), SignWith(keys["priv"])))
    v = ms("verify", "key", diff, "--signature", diff / DIFF_SIG, "--public_key", keys["pub"])
    assert v.returncode == 0, v.stdout + v.stderr  # the OpenSSF tool checks the diff folder too
    r = apply_diff(base, diff, tmp_path / "out", progress=False, verify=_key(keys))
    assert any("diff.sig verified" in line for line in r.provenance)
    raw = (diff / MANIFEST_NAME).read_bytes()
    (diff / MANIFEST_NAME).write_bytes(raw.replace(b'"tool": "', b'"tool":  "', 1))  # same JSON, other bytes
    with pytest.raises(SignatureError, match="orca-diff.json: sha256"):
        apply_diff(base, diff, tmp_path / "out2", progress=False, verify=_key(keys))


def test_verify_diff_checks_signatures_and_says_what_it_decoded(signed, keys) -> None:
    base, _, diff = signed
    runner = CliRunner()
    r = runner.invoke(cli, ["verify", "--diff", str(diff), "-q", "--verify-key", str(keys["pub"])])
    assert r.exit_code == 0, r.output
    assert "signed: signature target.sig verified" in r.output and "attestation derivation.sig verified" in r.output
    assert "NOT checked" in r.output  # delta chunks need the base: said, not claimed
    r = runner.invoke(cli, ["verify", "--diff", str(diff), "--base", str(base), "-q"])
    assert r.exit_code == 0 and "NOT checked" not in r.output and "payloads rebuild the manifest's records" in r.output
    bad = runner.invoke(cli, ["verify", "--diff", str(diff), "-q", "--verify-key", str(keys["other_pub"])])
    assert bad.exit_code == SignatureError.exit_code, bad.output


def test_apply_without_the_extra_works_and_a_verify_option_names_it(signed, tmp_path: Path) -> None:
    """The core install: a signed diff applies without model_signing; asking for a check names the extra."""
    base, _, diff = signed
    code = ("import sys, builtins; real = builtins.__import__\n"
            "def imp(name, *a, **k):\n"
            "    if name.startswith('model_signing') or name.startswith('in_toto'): raise ImportError(name)\n"
            "    return real(name, *a, **k)\n"
            "builtins.__import__ = imp\n"
            "from orca_diff.cli import main; sys.argv = ['orca-diff'] + sys.argv[1:]; main()\n")
    ok = subprocess.run([sys.executable, "-c", code, "apply", "--base", str(base), "--diff", str(diff), "--out",
                         str(tmp_path / "o1"), "-q"], capture_output=True, text=True)
    assert ok.returncode == 0 and "this release is signed" in ok.stderr, ok.stdout + ok.stderr
    no = subprocess.run([sys.executable, "-c", code, "apply", "--base", str(base), "--diff", str(diff), "--out",
                         str(tmp_path / "o2"), "-q", "--verify-key", str(diff / TARGET_SIG)], capture_output=True, text=True)
    assert no.returncode == 10 and "orca-diff[sign]" in no.stderr, no.stdout + no.stderr


def test_verify_model_holds_every_file_to_the_signature(signed, keys, tmp_path: Path) -> None:
    base, target, diff = signed
    out = tmp_path / "out"
    apply_diff(base, diff, out, progress=False)
    rc = check_release(diff, load_manifest(diff), _key(keys))
    report = verify_model(out, diff, signed=rc.model)
    assert report.model_digest == model_digest(file_hashes(target))


# --------------------------------------------------------------------------- the .bin forgery


def test_bin_forgery_swapping_names_in_data_pkl_changes_the_identity_and_is_refused(keys, tmp_path: Path) -> None:
    """The adversarial pass's forgery: in a .bin target, swap the q_proj and k_proj names inside
    data.pkl (so torch.load gives q_proj the k_proj weights), rewrite that file's sha256 and the
    manifest checksum. Every tensor record still holds, so the tensor fingerprint is unchanged;
    the model digest is not, and a signed release refuses it before writing anything."""
    pytest.importorskip("torch")
    from conftest import TINY
    from orca_diff.synth import FineTune, write_finetune, write_llama

    base = write_llama(tmp_path / "base", TINY, "F16", seed=0)
    target = write_finetune(tmp_path / "target", TINY, base_seed=0, dtype="F16", ft=FineTune(), form="bin", bin_shards=1)
    diff = tmp_path / "diff"
    make_diff(base, target, diff, threads=2, progress=False, sign=SignWith(keys["priv"]))
    genuine = apply_diff(base, diff, tmp_path / "genuine", progress=False)
    a, b = b"layers.0.self_attn.q_proj", b"layers.0.self_attn.k_proj"
    state: dict = {}

    def forge(doc: dict) -> None:
        f = next(f for f in doc["target"]["files"] if f["path"].endswith(".bin"))
        offset = 0
        for seg in f["segments"]:
            if "data" in seg:
                data = base64.b64decode(seg["data"])
                if a in data and b in data:
                    swapped = data.replace(a, b"\0" * len(a)).replace(b, a).replace(b"\0" * len(a), b)
                    seg["data"] = base64.b64encode(swapped).decode()
                    raw = bytearray((tmp_path / "genuine" / f["path"]).read_bytes())
                    raw[offset:offset + len(data)] = swapped
                    f["sha256"] = hashlib.sha256(raw).hexdigest()
                    state["done"] = True
                    return
            offset += seg["size"]

    rewrite_manifest(diff, forge)
    assert state.get("done"), "data.pkl's names were not found inline"
    forged = apply_diff(base, diff, tmp_path / "forged", progress=False)  # every accident check passes
    assert forged.target_fingerprint == genuine.target_fingerprint  # the old identity is blind to it
    assert forged.model_digest != genuine.model_digest  # the model digest is not
    with pytest.raises(SignatureError, match=r"pytorch_model.*\.bin"):
        apply_diff(base, diff, tmp_path / "out", progress=False, verify=_key(keys))
    assert not (tmp_path / "out").exists()


def test_empty_tensor_set_no_longer_gives_a_shared_identity(make_pair, tmp_path: Path) -> None:
    """Two different models whose tensors all travel verbatim had the empty set's fingerprint
    (e3b0c44298fc1c14); their model digests differ."""
    from orca_diff.fingerprint import base_fingerprint

    assert base_fingerprint({}) == "e3b0c44298fc1c14"
    m1 = {"pytorch_model.bin": hashlib.sha256(b"one").hexdigest()}
    m2 = {"pytorch_model.bin": hashlib.sha256(b"two").hexdigest()}
    assert model_digest(m1) != model_digest(m2)


# --------------------------------------------------------------------------- Sigstore, offline


def _trust_config(path: Path) -> Path:
    """A Sigstore client trust config built from the public instance's trusted root as sigstore
    ships it (no TUF fetch): what --verify-trust-root takes for an offline check."""
    import sigstore

    store = Path(sigstore.__file__).parent / "_store" / "https%3A%2F%2Ftuf-repo-cdn.sigstore.dev"
    path.write_text(json.dumps({"mediaType": "application/vnd.dev.sigstore.clienttrustconfig.v0.1+json",
                                "trustedRoot": json.loads((store / "trusted_root.json").read_text()),
                                "signingConfig": json.loads((store / "signing_config.v0.2.json").read_text())}))
    return path


def test_sigstore_verification_runs_offline_from_a_trust_root_and_refuses_what_it_cannot_prove(
        signed, tmp_path: Path) -> None:
    base, _, diff = signed
    how = VerifyWith(identity="publisher@example.com", issuer="https://accounts.google.com",
                     trust_config=_trust_config(tmp_path / "trust.json"))
    with pytest.raises(SignatureError, match="target.sig: not an OpenSSF model signature.*certificate"):
        apply_diff(base, diff, tmp_path / "out", progress=False, verify=how)  # a key bundle is not a Sigstore one
    assert not (tmp_path / "out").exists()


def test_sigstore_refuses_a_certificate_outside_its_trust_root(make_pair, tmp_path: Path) -> None:
    pki = certificate_chain(tmp_path / "pki")
    base, target = make_pair("BF16")
    diff = tmp_path / "diff"
    make_diff(base, target, diff, progress=False, sign=SignWith(pki["leaf_key"], pki["leaf"], (pki["intermediate"], pki["root"])))
    how = VerifyWith(identity="publisher@example.com", issuer="https://accounts.google.com",
                     trust_config=_trust_config(tmp_path / "trust.json"))
    with pytest.raises(SignatureError):
        apply_diff(base, diff, tmp_path / "out", progress=False, verify=how)


def test_verify_options_are_checked_as_a_set(signed, keys, tmp_path: Path) -> None:
    base, _, diff = signed
    runner = CliRunner()
    for extra, said in ((["--verify-identity", "a@b.c"], "needs both"),
                        (["--verify-key", str(keys["pub"]), "--verify-identity", "a@b.c", "--verify-issuer", "x"],
                         "exactly one"),
                        (["--verify-trust-root", str(keys["pub"])], "goes with")):
        r = runner.invoke(cli, ["apply", "--base", str(base), "--diff", str(diff), "--out", str(tmp_path / "o"), *extra])
        assert r.exit_code == UsageError.exit_code and said in r.output, r.output
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------- red team


def test_a_signature_that_leaves_a_model_file_out_is_refused(make_pair, keys, tmp_path: Path) -> None:
    """model_signing lets a signer exclude paths; a config.json (or a code file) left unsigned could
    change what loads, so orca-diff requires every file to be signed."""
    base, target = make_pair("BF16")
    s = ms("sign", "key", target, "--signature", target / SIGNATURE_NAME, "--private_key", keys["priv"],
           "--ignore-paths", target / "config.json")
    assert s.returncode == 0, s.stderr
    with pytest.raises(SignatureError, match=r"config\.json: not covered .*excluded it with ignore_paths"):
        make_diff(base, target, tmp_path / "diff", progress=False, verify_target=_key(keys))


def test_verify_model_refuses_an_unsigned_file_planted_in_the_model_folder(signed, keys, tmp_path: Path) -> None:
    base, _, diff = signed
    out = tmp_path / "out"
    apply_diff(base, diff, out, progress=False)
    (out / "modeling_evil.py").write_text("import os\n")
    r = CliRunner().invoke(cli, ["verify", "--diff", str(diff), "--model", str(out), "-q", "--verify-key", str(keys["pub"])])
    assert r.exit_code == SignatureError.exit_code and "modeling_evil.py: in the model folder but not signed" in r.output
    plain = CliRunner().invoke(cli, ["verify", "--diff", str(diff), "--model", str(out), "-q"])
    assert plain.exit_code == 0 and "modeling_evil.py is not part of the diff's model" in plain.output


def test_a_hostile_signature_file_is_one_clear_error(signed, keys, tmp_path: Path) -> None:
    base, _, diff = signed
    for content in (b"", b"{", b'{"mediaType": 1}', b"\xff" * 100, json.dumps({"dsseEnvelope": {"payload": "!!"}}).encode()):
        (diff / TARGET_SIG).write_bytes(content)
        with pytest.raises(SignatureError, match="target.sig"):
            apply_diff(base, diff, tmp_path / "out", progress=False, verify=_key(keys))
    assert not (tmp_path / "out").exists()


def test_a_diff_signature_naming_paths_outside_the_folder_is_not_followed(signed, keys, tmp_path: Path) -> None:
    from orca_diff.signing import model_signature

    base, _, diff = signed
    m = load_manifest(diff)
    files = {MANIFEST_NAME: hashlib.sha256((diff / MANIFEST_NAME).read_bytes()).hexdigest(),
             **{p.path: p.sha256 for p in m.payloads}, "../outside.txt": "00" * 32,
             **{n: hashlib.sha256((diff / n).read_bytes()).hexdigest() for n in (TARGET_SIG, DERIVATION_SIG)}}
    write_signature(diff / DIFF_SIG, model_signature(files, "diff", SignWith(keys["priv"]), (DIFF_SIG, "README.md")))
    (tmp_path / "outside.txt").write_text("x")
    with pytest.raises(SignatureError, match=r"signs '\.\./outside\.txt', which this diff does not have"):
        apply_diff(base, diff, tmp_path / "out", progress=False, verify=_key(keys))


# --------------------------------------------------------------------------- no claim taken on trust


def test_verify_diff_catches_payloads_that_do_not_rebuild_the_tensor_records(make_pair, tmp_path: Path) -> None:
    """A tensor record rewritten (and both fingerprints re-derived, manifest re-checksummed): the
    payloads are intact, so a sha256 pass says OK; decoding them does not."""
    from orca_diff.fingerprint import base_fingerprint

    base, target = make_pair("BF16", add_pad_row=True)
    diff = tmp_path / "diff"
    make_diff(base, target, diff, progress=False)
    victim = "model.layers.1.mlp.up_proj.weight"

    def forge(doc: dict) -> None:
        doc["tensors"][victim]["blake3"] = "ab" * 32
        doc["target"]["fingerprint"] = base_fingerprint(
            {n: (t["dtype"], tuple(t["shape"]), t["blake3"]) for n, t in doc["tensors"].items()})

    rewrite_manifest(diff, forge)
    r = CliRunner().invoke(cli, ["verify", "--diff", str(diff), "--base", str(base), "-q"])
    assert r.exit_code != 0 and victim in r.output and "decode to bytes" in r.output, r.output
    plain = CliRunner().invoke(cli, ["verify", "--diff", str(diff), "-q"])
    assert "NOT checked" in plain.output  # without the base it does not claim what it could not decode


def test_make_records_base_weight_files_from_their_bytes_not_a_cache_blob_name(make_pair, tmp_path: Path) -> None:
    """An HF cache snapshot links each file to a blob named after the sha256 the server claimed;
    a blob whose bytes do not hash to its name must not be recorded under that name: it is a
    damaged copy, refused naming the file (and a good blob is recorded from its bytes)."""
    base, target = make_pair("BF16")
    cache = tmp_path / "hub" / "models--org--base"
    snap = cache / "snapshots" / ("c" * 40)
    (cache / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for p in base.iterdir():
        blob = cache / "blobs" / ("f" * 64 if p.suffix == ".safetensors" else hashlib.sha256(p.read_bytes()).hexdigest())
        shutil.copyfile(p, blob)
        (snap / p.name).symlink_to(blob)
    with pytest.raises(BaseMismatchError, match=r"model\.safetensors.*damaged"):
        make_diff(snap, target, tmp_path / "diff", progress=False)
    assert not (tmp_path / "diff").exists()
    for p in base.iterdir():  # the blobs named after their true sha256: recorded, from the bytes
        if p.suffix == ".safetensors":
            good = cache / "blobs" / hashlib.sha256(p.read_bytes()).hexdigest()
            (cache / "blobs" / ("f" * 64)).rename(good)
            (snap / p.name).unlink()
            (snap / p.name).symlink_to(good)
    m = make_diff(snap, target, tmp_path / "diff", progress=False)
    for rel, bf in m.base.weight_files.items():
        assert bf.sha256 == hashlib.sha256((snap / rel).read_bytes()).hexdigest() != "f" * 64


def test_push_refuses_a_signature_that_no_longer_matches_the_diff(signed, keys) -> None:
    from orca_diff.signing import check_before_push

    _, _, diff = signed
    check_before_push(diff, load_manifest(diff))  # as made: fine
    rewrite_manifest(diff, lambda d: next(f for f in d["target"]["files"] if f["path"] == "config.json")
                     .update(sha256="22" * 32))
    with pytest.raises(SignatureError, match="stale signature"):
        check_before_push(diff, load_manifest(diff))


def test_make_cli_signs_with_a_key_or_a_certificate(make_pair, tmp_path: Path) -> None:
    base, target = make_pair("BF16")
    pki = certificate_chain(tmp_path / "pki")
    runner = CliRunner()
    r = runner.invoke(cli, ["make", "--base", str(base), "--target", str(target), "--out", str(tmp_path / "d"), "-q",
                            "--sign-key", str(pki["leaf_key"]), "--sign-certificate", str(pki["leaf"]),
                            "--sign-chain", str(pki["intermediate"]), "--sign-chain", str(pki["root"])])
    assert r.exit_code == 0 and "signed the target's" in r.output, r.output
    v = runner.invoke(cli, ["verify", "--diff", str(tmp_path / "d"), "-q", "--verify-certificate", str(pki["chain"])])
    assert v.exit_code == 0 and "signature target.sig verified with certificate chain" in v.output, v.output
    bad = runner.invoke(cli, ["make", "--base", str(base), "--target", str(target), "--out", str(tmp_path / "e"),
                              "--sign-certificate", str(pki["leaf"])])
    assert bad.exit_code == UsageError.exit_code and "go with --sign-key" in bad.output
    assert not (tmp_path / "e").exists()
