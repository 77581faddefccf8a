"""Provenance: a release signed by its publisher in the OpenSSF model-signing format, checked on
the rebuilt bytes, and an in-toto attestation of the derivation "this base + this diff = that model".

The checksums of a diff detect accidents; anyone can recompute them. A signature says *who*
published the model. orca-diff writes and reads exactly what PyPI ``model-signing`` (pinned to
1.1.1) writes and reads, a Sigstore bundle around a DSSE envelope around an in-toto statement
listing the sha256 of every file, so the OpenSSF tool verifies a rebuilt folder by itself
(``model_signing verify key MODEL --signature MODEL/model.sig --public_key PUB``). What is signed
comes from the sha256s orca-diff measures anyway (make while encoding, apply while writing): no
file is read twice. The cryptography is model_signing's: its signers and verifiers are used as
they are (through its ``_signing`` modules, which is why the version is pinned).

Files (docs/format.md section 9):

* ``model.sig`` in the model folder: the publisher's signature of the fine-tune (a target file
  like any other, so the rebuilt folder carries it);
* ``target.sig`` in the diff folder: the same bytes, readable before any payload is fetched;
* ``derivation.sig``: a signed in-toto link statement, subject the target's files, materials the
  base's weight files and the diff's files;
* ``diff.sig``: the OpenSSF signature of the diff folder itself (``push --sign-key``).

Needs the ``sign`` extra (``pip install 'orca-diff[sign]'``); the core never imports this module
unless a signature is made or checked.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Mapping

from .errors import MissingExtraError, SignatureError, UsageError, shown
from .identity import GIT_PATHS, IDENTITY_IGNORED, SIGNATURE_NAME, covered_files, ignored, model_digest, order_key

TARGET_SIG = "target.sig"
DERIVATION_SIG = "derivation.sig"
DIFF_SIG = "diff.sig"
#: Every signature file a diff folder may hold (fetched with the manifest, before any payload).
DIFF_SIGNATURE_FILES = (TARGET_SIG, DERIVATION_SIG, DIFF_SIG)
#: What the diff folder's own signature leaves out: itself, the model card (``push`` renders it
#: again for the repo; the tool never reads it) and git metadata.
DIFF_SIG_IGNORED = (DIFF_SIG, "README.md", *GIT_PATHS)
#: The in-toto predicate of the derivation attestation: a link (name, command, materials).
LINK_PREDICATE = "https://in-toto.io/attestation/link/v0.3"
DERIVATION_STEP = "orca-diff make"
#: Largest signature file read (a bundle with a certificate chain is a few KB).
MAX_SIGNATURE_BYTES = 16 << 20
INSTALL_HINT = "pip install 'orca-diff[sign]'"


def _require() -> Any:
    try:
        import model_signing  # noqa: F401
        from model_signing._signing import sign_certificate, sign_ec_key, sign_sigstore, sign_sigstore_pb, signing

        return signing, sign_ec_key, sign_certificate, sign_sigstore, sign_sigstore_pb
    except ImportError as exc:
        raise MissingExtraError(f"signing and verifying releases needs the 'model-signing' package: {INSTALL_HINT} "
                                f"({exc})") from None


@dataclass(frozen=True)
class SignWith:
    """How a publisher signs: an EC private key (PEM), optionally with its signing certificate and
    the chain up to a root (the OpenSSF ``key`` and ``certificate`` methods)."""

    private_key: Path
    certificate: Path | None = None
    chain: tuple[Path, ...] = ()
    password: str | None = None

    def signer(self) -> Any:
        _, ec_key, certificate, _, _ = _require()
        for p in (self.private_key, self.certificate, *self.chain):
            if p is not None and not Path(p).is_file():
                raise UsageError(f"{p}: no such key or certificate file")
        try:
            if self.certificate is not None:
                return certificate.Signer(Path(self.private_key), Path(self.certificate), [Path(c) for c in self.chain])
            return ec_key.Signer(Path(self.private_key), self.password)
        except Exception as exc:  # a malformed, encrypted or non-EC key: said as such
            raise UsageError(f"{self.private_key}: cannot sign with this key ({type(exc).__name__}: {exc}); "
                             "model signing needs an EC private key in PEM (P-256, P-384 or P-521)") from None


@dataclass(frozen=True)
class VerifyWith:
    """How a user checks who signed: the publisher's public key, a certificate chain (the signing
    certificate travels in the bundle), or a Sigstore identity and issuer (optionally against a
    given trusted-root/client-trust file, which makes the check offline)."""

    public_key: Path | None = None
    certificate_chain: tuple[Path, ...] = ()
    use_certificate: bool = False
    identity: str | None = None
    issuer: str | None = None
    trust_config: Path | None = None

    def __post_init__(self) -> None:
        ways = [self.public_key is not None, self.use_certificate or bool(self.certificate_chain),
                self.identity is not None or self.issuer is not None]
        if sum(ways) != 1:
            raise UsageError("verify with exactly one of --verify-key, --verify-certificate, "
                             "--verify-identity/--verify-issuer")
        if ways[2] and not (self.identity and self.issuer):
            raise UsageError("Sigstore verification needs both --verify-identity and --verify-issuer")

    @property
    def sigstore(self) -> bool:
        return self.identity is not None

    def describe(self) -> str:
        if self.public_key is not None:
            return f"public key {self.public_key}"
        if self.sigstore:
            return f"Sigstore identity {self.identity} issued by {self.issuer}"
        return "certificate chain " + (", ".join(map(str, self.certificate_chain)) or "(system roots)")

    def verifier(self) -> Any:
        _, ec_key, certificate, sigstore, _ = _require()
        for p in (self.public_key, *self.certificate_chain, self.trust_config):
            if p is not None and not Path(p).is_file():
                raise UsageError(f"{p}: no such key, certificate or trust file")
        try:
            if self.public_key is not None:
                return ec_key.Verifier(Path(self.public_key))
            if self.sigstore:
                return sigstore.Verifier(identity=self.identity, oidc_issuer=self.issuer,  # type: ignore[arg-type]
                                         trust_config=Path(self.trust_config) if self.trust_config else None)
            return certificate.Verifier([Path(c) for c in self.certificate_chain])
        except Exception as exc:
            raise UsageError(f"cannot verify with {self.describe()}: {type(exc).__name__}: {exc}") from None


# --------------------------------------------------------------------------- reading


def _read_bundle(sig: Path, how: VerifyWith) -> Any:
    _, _, _, sigstore, pb = _require()
    if not sig.is_file():  # an HF cache snapshot file is a link to its blob
        raise SignatureError(f"{sig}: signature file missing")
    if sig.stat().st_size > MAX_SIGNATURE_BYTES:
        raise SignatureError(f"{sig}: {sig.stat().st_size} bytes: not a signature")
    try:
        return (sigstore.Signature if how.sigstore else pb.Signature).read(sig)
    except Exception as exc:
        raise SignatureError(f"{sig}: not an OpenSSF model signature (Sigstore bundle) "
                             f"({type(exc).__name__}: {str(exc)[:200]})") from None


def _verified_payload(sig: Path, how: VerifyWith) -> dict:
    """The in-toto statement inside ``sig`` once its signature checks out with ``how``."""
    signing = _require()[0]
    signature = _read_bundle(sig, how)
    verifier = how.verifier()
    try:
        payload_type, payload = verifier._verify_signed_content(signature)
    except Exception as exc:
        raise SignatureError(f"{sig}: the signature does not verify with {how.describe()} "
                             f"({type(exc).__name__}: {str(exc)[:300]}); this release was not signed by that "
                             "publisher, or was altered after signing: do not use it") from None
    if payload_type != signing._IN_TOTO_JSON_PAYLOAD_TYPE:
        raise SignatureError(f"{sig}: signed payload is {payload_type!r}, not an in-toto statement")
    try:
        doc = json.loads(payload)
    except ValueError:
        raise SignatureError(f"{sig}: signed payload is not JSON") from None
    if not isinstance(doc, dict) or doc.get("_type") != signing._IN_TOTO_STATEMENT_TYPE:
        raise SignatureError(f"{sig}: signed payload is not an in-toto v1 statement")
    return doc


@dataclass
class SignedModel:
    """What a verified model signature says: the sha256 of every signed file."""

    path: Path
    signer: str
    name: str
    root: str
    files: dict[str, str]
    ignore_paths: tuple[str, ...]

    @property
    def ignores(self) -> tuple[str, ...]:
        """What may be left unsigned: git metadata (always ignored by model_signing's verifier) and
        the signature file. Stricter than model_signing on purpose: a path the publisher listed in
        ``ignore_paths`` is NOT exempt, since every byte of the model must be signed (a
        ``config.json`` or a code file left out could change what loads)."""
        return IDENTITY_IGNORED

    def covers(self, rel: str) -> bool:
        return not ignored(rel, self.ignores)

    def check_file(self, rel: str, sha256: str, where: str | os.PathLike) -> None:
        """A file of the model, as measured: refused unless the statement signs exactly these bytes."""
        if not self.covers(rel):
            return
        want = self.files.get(rel)
        if want is None:
            left = " (the publisher excluded it with ignore_paths)" if ignored(rel, self.ignore_paths) else ""
            raise SignatureError(f"{where}: not covered by the publisher's signature {self.path}{left}; every file "
                                 "of the model must be signed; nothing was published")
        if want != sha256:
            raise SignatureError(f"{where}: sha256 {sha256[:12]}… but the publisher signed {want[:12]}… "
                                 f"({self.path}); the file differs from the signed model; nothing was published")

    def check_all(self, files: Mapping[str, str], what: str) -> int:
        """Every file of ``files`` ({path: sha256}) is signed with these bytes and every signed file
        is there. Returns the number of files checked."""
        ours = {p: s for p, s in files.items() if self.covers(p)}
        for rel in sorted(set(self.files) - set(ours), key=order_key):
            raise SignatureError(f"{self.path}: signs {shown(rel)!r}, which {what} does not have: the signature is "
                                 "of another model (or release)")
        for rel in sorted(ours, key=order_key):
            self.check_file(rel, ours[rel], f"{what}: {shown(rel)}")
        return len(ours)


def read_signed_model(sig: str | os.PathLike, how: VerifyWith) -> SignedModel:
    """Verify the OpenSSF signature ``sig`` with ``how`` and return what it signs. Only the
    default serialization (one sha256 per file) is read: it is what orca-diff can compare with the
    sha256s it measures."""
    sig = Path(sig)
    doc = _verified_payload(sig, how)
    signing = _require()[0]
    if doc.get("predicateType") != signing._PREDICATE_TYPE:
        raise SignatureError(f"{sig}: predicate {str(doc.get('predicateType'))[:100]!r} is not an OpenSSF model "
                             f"signature ({signing._PREDICATE_TYPE})")
    try:
        manifest = signing.dsse_payload_to_manifest(doc)  # also checks the subject's root digest
    except Exception as exc:
        raise SignatureError(f"{sig}: malformed model signature ({type(exc).__name__}: {str(exc)[:200]})") from None
    params = manifest.serialization_type
    if params.get("method") != "files" or params.get("hash_type") != "sha256":
        raise SignatureError(f"{sig}: signed per {params.get('method')!r} with {params.get('hash_type')!r}; orca-diff "
                             "checks signatures made per file with sha256 (model_signing's default): check this "
                             "model with `model_signing verify` after rebuilding it")
    files = {rd.identifier: rd.digest.digest_hex for rd in manifest.resource_descriptors()}
    return SignedModel(sig, how.describe(), manifest.model_name, doc["subject"][0]["digest"]["sha256"], files,
                       tuple(str(p) for p in params.get("ignore_paths", ())))


# --------------------------------------------------------------------------- signing


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _bundle_bytes(signature: Any) -> bytes:
    """The bundle JSON exactly as model_signing writes it."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="orca-diff-sig-") as d:
        p = Path(d) / "sig"
        signature.write(p)
        return p.read_bytes()


def model_signature(files: Mapping[str, str], model_name: str, how: SignWith,
                    ignore_paths: Iterable[str] = IDENTITY_IGNORED) -> bytes:
    """The OpenSSF signature (bundle bytes) of a model folder whose files have the sha256s
    ``files`` — the statement ``model_signing sign`` writes for that folder with
    ``--signature model.sig``, built from measured sha256s instead of a second read."""
    signing = _require()[0]
    from model_signing import manifest as ms_manifest
    from model_signing._hashing.hashing import Digest

    ignore_paths = tuple(ignore_paths)
    keep = covered_files(files, ignore_paths)
    if not keep:
        raise UsageError("nothing to sign: the model has no file outside the ignored paths")
    items = [ms_manifest.FileManifestItem(path=PurePosixPath(rel), digest=Digest("sha256", bytes.fromhex(files[rel])))
             for rel in keep]
    serialization = ms_manifest._FileSerialization("sha256", False, [Path(p) for p in ignore_paths])
    payload = signing.Payload(ms_manifest.Manifest(model_name, items, serialization))
    return _bundle_bytes(how.signer().sign(payload))


class _StatementPayload:
    """What model_signing's signers sign: an object with an in-toto ``statement``."""

    def __init__(self, statement: Any):
        self.statement = statement


def _descriptors(records: Mapping[str, str], prefix: str = "") -> list[dict]:
    return [{"name": prefix + rel, "digest": {"sha256": records[rel]}} for rel in sorted(records, key=order_key)]


def derivation_statement(target: Mapping[str, str], base_files: Mapping[str, str], diff_files: Mapping[str, str],
                         base: Mapping[str, str | None], tool: str) -> dict:
    """The derivation as an in-toto v1 statement (plain JSON), predicate a link: subject the
    target's files, materials the base's weight files ("base:" + path) and the diff's files
    ("diff:" + path)."""
    return {
        "_type": "https://in-toto.io/Statement/v1",
        "subject": _descriptors({p: s for p, s in target.items() if not ignored(p)}),
        "predicateType": LINK_PREDICATE,
        "predicate": {
            "name": DERIVATION_STEP,
            "command": ["orca-diff", "apply", "--base", "BASE", "--diff", "DIFF", "--out", "MODEL"],
            "materials": _descriptors(base_files, "base:") + _descriptors(diff_files, "diff:"),
            "byproducts": {},
            "environment": {"tool": tool, **{f"base_{k}": v for k, v in base.items() if v}},
        },
    }


def sign_statement(doc: dict, how: SignWith) -> bytes:
    """A Sigstore bundle over the in-toto statement ``doc`` (any predicate), signed as
    model_signing signs its own."""
    _require()
    from in_toto_attestation.v1 import statement as st

    subjects = [st.ResourceDescriptor(name=d["name"], digest=d["digest"]).pb for d in doc["subject"]]
    stmt = st.Statement(subjects=subjects, predicate_type=doc["predicateType"], predicate=doc["predicate"])
    return _bundle_bytes(how.signer().sign(_StatementPayload(stmt)))


def read_derivation(sig: str | os.PathLike, how: VerifyWith) -> dict:
    """The verified derivation statement of ``sig``."""
    sig = Path(sig)
    doc = _verified_payload(sig, how)
    if doc.get("predicateType") != LINK_PREDICATE or not isinstance(doc.get("predicate"), dict):
        raise SignatureError(f"{sig}: not an orca-diff derivation attestation (predicate {LINK_PREDICATE})")
    return doc


def _records(items: object, sig: Path, what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    if not isinstance(items, list):
        raise SignatureError(f"{sig}: malformed {what}")
    for d in items:
        try:
            out[str(d["name"])] = str(d["digest"]["sha256"])
        except (TypeError, KeyError):
            raise SignatureError(f"{sig}: malformed {what} entry") from None
    return out


def _compare(found: Mapping[str, str], signed: Mapping[str, str], sig: Path, what: str) -> None:
    for name in sorted(set(found) | set(signed)):
        a, b = found.get(name), signed.get(name)
        if a != b:
            said = "missing from the diff" if a is None else "not in the attestation" if b is None else \
                f"sha256 {a[:12]}…, attested {b[:12]}…"
            raise SignatureError(f"{sig}: {what} {shown(name)!r}: {said}; the diff is not the one the publisher "
                                 "attested: do not use it")


# --------------------------------------------------------------------------- a release


@dataclass
class ReleaseCheck:
    """What was proved about a diff's signatures before it was used (lines for the user), and the
    signed statement every rebuilt file is then held to."""

    model: SignedModel | None = None
    lines: list[str] = field(default_factory=list)


def diff_signatures(diff_dir: Path) -> list[str]:
    return [n for n in DIFF_SIGNATURE_FILES if (Path(diff_dir) / n).is_file()]


def unsigned_note(diff_dir: Path) -> str | None:
    """For apply without a verify option: say the release is signed and how to check it."""
    names = diff_signatures(diff_dir)
    if not names:
        return None
    return (f"this release is signed ({', '.join(names)}) but the signature was not checked: add --verify-key "
            "PUBLIC_KEY.pem (or --verify-certificate CHAIN.pem, or --verify-identity ID --verify-issuer URL) "
            f"to prove who published it ({INSTALL_HINT})")


def check_diff_signature(diff_dir: Path, how: VerifyWith) -> SignedModel | None:
    """The diff folder's own signature (``diff.sig``), when present, checked before its manifest is
    trusted: the manifest's exact bytes must be the signed ones. Returns the statement (its
    payload records are compared once the manifest is parsed) or None when there is none."""
    from .format import MANIFEST_NAME

    sig = Path(diff_dir) / DIFF_SIG
    if not sig.is_file():
        return None
    signed = read_signed_model(sig, how)
    raw = (Path(diff_dir) / MANIFEST_NAME).read_bytes()
    signed.check_file(MANIFEST_NAME, hashlib.sha256(raw).hexdigest(), Path(diff_dir) / MANIFEST_NAME)
    if MANIFEST_NAME not in signed.files:
        raise SignatureError(f"{sig}: does not sign {MANIFEST_NAME}: not the signature of an orca-diff diff")
    return signed


def check_release(diff_dir: str | os.PathLike, manifest: Any, how: VerifyWith,
                  diff_signed: SignedModel | None = None) -> ReleaseCheck:
    """Everything that can be proved from the signatures and the manifest alone, before any payload
    is read or downloaded: the target's signature verifies with ``how`` and signs exactly the
    files (paths and sha256s) the manifest rebuilds; the derivation attestation, when present,
    verifies and names this manifest, its payloads and the base's weight files; the diff's own
    signature (already checked against the manifest's bytes) lists these payloads."""
    from .format import MANIFEST_NAME

    diff_dir = Path(diff_dir)
    out = ReleaseCheck()
    sig = diff_dir / TARGET_SIG
    if not sig.is_file():
        raise SignatureError(f"{diff_dir}: this diff carries no publisher signature ({TARGET_SIG}) but "
                             f"{how.describe()} was required; refusing it (ask the publisher for a signed release)")
    signed = read_signed_model(sig, how)
    files = {f.path: f.sha256 for f in manifest.files}
    n = signed.check_all(files, "the diff's model")
    if SIGNATURE_NAME in files and files[SIGNATURE_NAME] != hashlib.sha256(sig.read_bytes()).hexdigest():
        raise SignatureError(f"{sig}: differs from the {SIGNATURE_NAME} the diff rebuilds; the release was altered")
    out.model = signed
    out.lines.append(f"signature {TARGET_SIG} verified with {how.describe()}: it signs the {n} files this diff "
                     f"rebuilds (model digest {signed.root})")
    if diff_signed is not None:
        payloads = {p.path: p.sha256 for p in manifest.payloads}
        for rel, sha in payloads.items():
            diff_signed.check_file(rel, sha, f"payload {rel}")
        for rel in (TARGET_SIG, DERIVATION_SIG):
            if (diff_dir / rel).is_file():
                diff_signed.check_file(rel, hashlib.sha256((diff_dir / rel).read_bytes()).hexdigest(), diff_dir / rel)
        from .format import path_problem

        missing = [r for r in diff_signed.files if r != MANIFEST_NAME and r not in payloads
                   and (path_problem(r) is not None or not (diff_dir / r).is_file())]
        if missing:
            raise SignatureError(f"{diff_dir / DIFF_SIG}: signs {shown(missing[0])!r}, which this diff does not have")
        out.lines.append(f"signature {DIFF_SIG} verified: it signs this manifest and its {len(payloads)} payload files")
    dsig = diff_dir / DERIVATION_SIG
    if dsig.is_file():
        doc = read_derivation(dsig, how)
        _compare({f: s for f, s in files.items() if not ignored(f)}, _records(doc.get("subject"), dsig, "subject"),
                 dsig, "target file")
        materials = _records(doc["predicate"].get("materials"), dsig, "materials")
        diff_files = {"diff:" + MANIFEST_NAME: hashlib.sha256((diff_dir / MANIFEST_NAME).read_bytes()).hexdigest(),
                      **{"diff:" + p.path: p.sha256 for p in manifest.payloads}}
        base_files = {"base:" + p: bf.sha256 for p, bf in manifest.base.weight_files.items()}
        _compare({**base_files, **diff_files}, materials, dsig, "material")
        out.lines.append(f"attestation {DERIVATION_SIG} verified: this manifest, its {len(manifest.payloads)} payloads "
                         f"and the base's {len(base_files)} weight files (sha256) give the signed model")
    return out


def sign_diff_folder(diff_dir: str | os.PathLike, manifest: Any, how: SignWith) -> bytes:
    """``diff.sig`` for a diff folder whose payloads were just verified against ``manifest``: the
    OpenSSF signature of the folder (manifest, payloads, target/derivation signatures), README.md
    left out. ``model_signing verify`` checks it on the downloaded folder too."""
    from .containers import file_sha256
    from .format import MANIFEST_NAME

    diff_dir = Path(diff_dir)
    files = {MANIFEST_NAME: file_sha256(diff_dir / MANIFEST_NAME), **{p.path: p.sha256 for p in manifest.payloads}}
    for rel in (TARGET_SIG, DERIVATION_SIG):
        if (diff_dir / rel).is_file():
            files[rel] = file_sha256(diff_dir / rel)
    return model_signature(files, diff_dir.name or "diff", how, DIFF_SIG_IGNORED)


def statement_unverified(sig: str | os.PathLike) -> SignedModel:
    """What an OpenSSF signature file claims to sign, read without checking who signed it (no
    key given): bundle JSON, base64 DSSE payload, in-toto statement, and its root digest recomputed
    from the resources it lists. Core install only (no model_signing needed)."""
    import base64

    sig = Path(sig)
    try:
        if sig.stat().st_size > MAX_SIGNATURE_BYTES:
            raise ValueError("too large")
        bundle = json.loads(sig.read_bytes())
        doc = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"], validate=True))
        pred = doc["predicate"]
        ser = pred["serialization"]
        if ser.get("method") != "files" or ser.get("hash_type") != "sha256":
            raise ValueError(f"signed per {ser.get('method')!r} with {ser.get('hash_type')!r}, not per file with sha256")
        h = hashlib.sha256()
        files: dict[str, str] = {}
        for r in pred["resources"]:
            if r["algorithm"] != "sha256":
                raise ValueError("a resource not hashed with sha256")
            h.update(bytes.fromhex(r["digest"]))
            files[str(r["name"])] = str(r["digest"])
        root = doc["subject"][0]["digest"]["sha256"]
        if h.hexdigest() != root:
            raise ValueError("its root digest is not the digest of the resources it lists")
        return SignedModel(sig, "nobody checked (no verify option given)", str(doc["subject"][0].get("name", "")),
                           root, files, tuple(str(p) for p in ser.get("ignore_paths", ())))
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
        raise SignatureError(f"{sig}: not an OpenSSF model signature ({type(exc).__name__}: {str(exc)[:200]}); "
                             "re-sign the model with model_signing, or remove the file") from None


def inline_file(rel: str, data: bytes) -> Any:
    """A target file held entirely in the manifest (inline segments of at most MAX_INLINE_BYTES):
    how make adds the signature it makes to the model it rebuilds."""
    from .format import MAX_INLINE_BYTES, FileEntry, Segment

    step = MAX_INLINE_BYTES
    segs = tuple(Segment(o, len(data[o:o + step]), data=data[o:o + step]) for o in range(0, len(data), step))
    return FileEntry(rel, len(data), hashlib.sha256(data).hexdigest(), "segments", segments=segs)


class MakeProvenance:
    """What ``make`` does about signatures, in three steps around its encoding:

    1. ``start`` (before anything is encoded): a target that carries ``model.sig`` has its
       signature read (and verified, with ``verify``); ``sign``'s key is loaded (a bad key fails
       before hours of encoding);
    2. ``files`` (files measured, manifest not yet written): the pre-signed statement must sign
       exactly the files make read (else refused, naming the file), or ``sign`` signs them and the
       signature becomes the model's ``model.sig``; ``target.sig`` is written to the diff;
    3. ``diff`` (manifest written): with ``sign``, the derivation attestation over the manifest's
       bytes, the payloads and the base's weight files."""

    def __init__(self, sign: SignWith | None = None, verify: VerifyWith | None = None,
                 notes: list[str] | None = None):
        self.sign, self.verify = sign, verify
        self.notes = notes if notes is not None else []
        self.presigned: Path | None = None
        self.signed: SignedModel | None = None
        self.lines: list[str] = []

    def start(self, target_files: Mapping[str, Path]) -> None:
        from .format import path_key

        found = [rel for rel in target_files if path_key(rel) == path_key(SIGNATURE_NAME)]
        if found:
            self.presigned = Path(target_files[found[0]])
            if found[0] != SIGNATURE_NAME:
                raise UsageError(f"{self.presigned}: name it {SIGNATURE_NAME} (the OpenSSF signature's name)")
            if self.sign is not None:
                raise UsageError(f"{self.presigned}: the target is already signed; drop --sign-key (its signature is "
                                 "checked and travels in the diff) or remove the file to sign the model anew")
            self.signed = (read_signed_model(self.presigned, self.verify) if self.verify is not None
                           else statement_unverified(self.presigned))
        elif self.verify is not None:
            raise SignatureError(f"the target carries no {SIGNATURE_NAME}, but a signature check was asked for")
        if self.sign is not None:
            self.sign.signer()

    def files(self, manifest: Any, folder: Path, model_name: str) -> None:
        files = {f.path: f.sha256 for f in manifest.files}
        if self.presigned is not None and self.signed is not None:
            try:
                self.signed.check_all(files, "the target")
            except SignatureError as exc:
                raise SignatureError(f"{self.presigned}: the target's signature does not match its files: {exc}; "
                                     "re-sign the model as published, or remove the signature") from None
            data = self.presigned.read_bytes()
            if hashlib.sha256(data).hexdigest() != files[SIGNATURE_NAME]:
                raise SignatureError(f"{self.presigned}: changed while make was reading it; run make again")
            _write_atomic(folder / TARGET_SIG, data)
            who = "verified with " + self.verify.describe() if self.verify else \
                "its statement matches the files; who signed it was not checked (add --verify-key PUB)"
            self.lines.append(f"{SIGNATURE_NAME} of the target: {who}; copied to {TARGET_SIG}")
        elif self.sign is not None:
            data = model_signature(files, model_name, self.sign)
            manifest.files.append(inline_file(SIGNATURE_NAME, data))
            _write_atomic(folder / TARGET_SIG, data)
            self.lines.append(f"signed the target's {len(covered_files(files))} files: {TARGET_SIG} (and {SIGNATURE_NAME} "
                              "in the rebuilt model)")

    def diff(self, manifest: Any, folder: Path) -> None:
        from .format import MANIFEST_NAME

        if self.sign is None:
            return
        diff_files = {MANIFEST_NAME: hashlib.sha256((folder / MANIFEST_NAME).read_bytes()).hexdigest(),
                      **{p.path: p.sha256 for p in manifest.payloads}}
        doc = derivation_statement({f.path: f.sha256 for f in manifest.files},
                                   {p: bf.sha256 for p, bf in manifest.base.weight_files.items()}, diff_files,
                                   {"repo": manifest.base.repo, "revision": manifest.base.revision,
                                    "fingerprint": manifest.base.fingerprint}, manifest.tool)
        _write_atomic(folder / DERIVATION_SIG, sign_statement(doc, self.sign))
        self.lines.append(f"attested the derivation: {DERIVATION_SIG} (base weight files + this diff = the model)")


def fetch_signed_release(spec: str, how: VerifyWith, progress: bool | None = None) -> str:
    """For a diff named as a Hub repo (or catalog name): fetch its manifest and signature files
    only, and run every signature check on them, so a release that is not the publisher's is
    refused before any payload is downloaded. Returns the spec pinned to the commit checked
    (``repo@sha``: the full download then fills that same snapshot, whatever lands on the branch
    meanwhile), or ``spec`` itself for a local diff (checked by apply itself)."""
    from .format import load_manifest
    from .hub.catalog import lookup
    from .hub.resolve import _hub_ref, _local, resolve_diff
    from .hub.transfer import RepoRef, _hf, _progress, hub_errors

    if _local(spec) is not None:
        return spec
    entry = lookup(spec, "diff")
    ref = RepoRef(entry.repo, entry.revision) if entry is not None else _hub_ref(spec)
    folder = resolve_diff(spec, progress=progress, manifest_only=True)
    if ref is not None:
        import logging

        hub_log = logging.getLogger("huggingface_hub._snapshot_download")
        level = hub_log.level
        hub_log.setLevel(logging.ERROR)  # "No files matched": an unsigned release is said below, in one line
        try:
            with _progress(progress), hub_errors(ref, "diff"):
                _hf().snapshot_download(ref.repo_id, revision=folder.name, allow_patterns=list(DIFF_SIGNATURE_FILES))
        finally:
            hub_log.setLevel(level)
    diff_signed = check_diff_signature(folder, how)
    check_release(folder, load_manifest(folder), how, diff_signed)
    return f"{ref.repo_id}@{folder.name}" if ref is not None else spec


def check_before_push(diff_dir: str | os.PathLike, manifest: Any) -> None:
    """Refuse to publish signature files that no longer match the diff (a diff remade or edited
    after signing): every user with the key would then be refused. No key is needed for this:
    the statements are read unverified and compared with the files."""
    from .containers import file_sha256
    from .format import MANIFEST_NAME

    diff_dir = Path(diff_dir)
    hint = "re-sign (make/push --sign-key) or remove the stale signature file"
    if (diff_dir / TARGET_SIG).is_file():
        try:
            statement_unverified(diff_dir / TARGET_SIG).check_all({f.path: f.sha256 for f in manifest.files},
                                                                  "the diff's model")
        except SignatureError as exc:
            raise SignatureError(f"{exc}; {hint}") from None
    if (diff_dir / DIFF_SIG).is_file():
        stmt = statement_unverified(diff_dir / DIFF_SIG)
        files = {MANIFEST_NAME: file_sha256(diff_dir / MANIFEST_NAME), **{p.path: p.sha256 for p in manifest.payloads}}
        for rel in (TARGET_SIG, DERIVATION_SIG):
            if (diff_dir / rel).is_file():
                files[rel] = file_sha256(diff_dir / rel)
        if stmt.files != files:
            raise SignatureError(f"{diff_dir / DIFF_SIG}: does not sign this diff folder as it is now; {hint}")


def write_signature(path: Path, data: bytes) -> None:
    _write_atomic(Path(path), data)


__all__ = ["SignWith", "VerifyWith", "SignedModel", "ReleaseCheck", "read_signed_model", "model_signature",
           "derivation_statement", "sign_statement", "read_derivation", "check_release", "check_diff_signature",
           "sign_diff_folder", "unsigned_note", "diff_signatures", "TARGET_SIG", "DERIVATION_SIG", "DIFF_SIG",
           "DIFF_SIGNATURE_FILES", "model_digest", "fetch_signed_release", "MakeProvenance", "statement_unverified", "inline_file"]
