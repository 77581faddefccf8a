"""Keys and certificate chains made in the tests (cryptography), for the provenance tests: no
network, nothing stored."""

from __future__ import annotations

import datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def ec_keypair(folder: Path, name: str = "publisher") -> tuple[Path, Path]:
    """(private.pem, public.pem) of a fresh P-256 key."""
    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    priv, pub = folder / f"{name}.key", folder / f"{name}.pub"
    priv.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))
    return priv, pub


def _cert(subject: str, key, issuer_name: x509.Name | None, issuer_key, ca: bool) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    b = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer_name or name)
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=30))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        b = b.add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                          data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                          crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
    else:
        b = b.add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                          data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                          crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING]), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def certificate_chain(folder: Path, name: str = "pki") -> dict[str, Path]:
    """A root CA, an intermediate CA and a code-signing leaf: {"root", "intermediate", "leaf",
    "leaf_key", "chain" (intermediate + root, what a verifier trusts)} as PEM files."""
    folder.mkdir(parents=True, exist_ok=True)
    pem = serialization.Encoding.PEM
    root_key = ec.generate_private_key(ec.SECP256R1())
    root = _cert(f"{name} root", root_key, None, root_key, True)
    inter_key = ec.generate_private_key(ec.SECP256R1())
    inter = _cert(f"{name} intermediate", inter_key, root.subject, root_key, True)
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    leaf = _cert(f"{name} publisher", leaf_key, inter.subject, inter_key, False)
    out = {k: folder / f"{name}-{k}.pem" for k in ("root", "intermediate", "leaf", "leaf_key", "chain")}
    out["root"].write_bytes(root.public_bytes(pem))
    out["intermediate"].write_bytes(inter.public_bytes(pem))
    out["leaf"].write_bytes(leaf.public_bytes(pem))
    out["leaf_key"].write_bytes(leaf_key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))
    out["chain"].write_bytes(inter.public_bytes(pem) + root.public_bytes(pem))
    return out
