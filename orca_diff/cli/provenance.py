"""The signing and verifying options of ``make``, ``apply``, ``verify`` and ``push``, each set
collected into one argument (``sign`` / ``verify``) so a command grows by one parameter."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Callable

import click

_FILE = click.Path(dir_okay=False, path_type=Path)


def verify_options(f: Callable) -> Callable:
    """--verify-key / --verify-certificate / --verify-identity + --verify-issuer [+ --verify-trust-root],
    passed to the command as ``verify`` (a signing.VerifyWith, or None)."""

    @functools.wraps(f)
    def wrapper(*args, verify_key, verify_certificate, verify_identity, verify_issuer, verify_trust_root, **kw):
        verify = None
        if verify_key or verify_certificate or verify_identity or verify_issuer or verify_trust_root:
            from ..signing import VerifyWith

            if verify_trust_root and not (verify_identity or verify_issuer):
                from ..errors import UsageError

                raise UsageError("--verify-trust-root goes with --verify-identity and --verify-issuer (Sigstore)")
            verify = VerifyWith(public_key=verify_key, certificate_chain=tuple(verify_certificate),
                                use_certificate=bool(verify_certificate), identity=verify_identity,
                                issuer=verify_issuer, trust_config=verify_trust_root)
        return f(*args, verify=verify, **kw)

    for opt in reversed([
        click.option("--verify-key", type=_FILE, default=None, help="Check the publisher's OpenSSF signature with "
                     "this public key (PEM) first; refuse an unsigned release (needs orca-diff[sign])."),
        click.option("--verify-certificate", type=_FILE, multiple=True, help="Same, for a release signed with a "
                     "certificate: the chain (PEM) to trust; repeatable."),
        click.option("--verify-identity", default=None, help="Same, for Sigstore: the signer's identity (e-mail or "
                     "workflow URI); with --verify-issuer."),
        click.option("--verify-issuer", default=None, help="The OIDC issuer of --verify-identity."),
        click.option("--verify-trust-root", type=_FILE, default=None, help="Sigstore client trust config (JSON) to "
                     "verify against instead of the public instance's (offline)."),
    ]):
        wrapper = opt(wrapper)
    return wrapper


def sign_options(f: Callable) -> Callable:
    """--sign-key [--sign-certificate --sign-chain], passed as ``sign`` (a signing.SignWith, or None)."""

    @functools.wraps(f)
    def wrapper(*args, sign_key, sign_certificate, sign_chain, **kw):
        sign = None
        if sign_key or sign_certificate or sign_chain:
            from ..errors import UsageError
            from ..signing import SignWith

            if sign_key is None:
                raise UsageError("--sign-certificate and --sign-chain go with --sign-key (the certificate's private key)")
            sign = SignWith(sign_key, sign_certificate, tuple(sign_chain))
        return f(*args, sign=sign, **kw)

    for opt in reversed([
        click.option("--sign-key", type=_FILE, default=None, help="Sign with this EC private key (PEM), in the "
                     "OpenSSF model-signing format (needs orca-diff[sign])."),
        click.option("--sign-certificate", type=_FILE, default=None, help="The signing certificate of --sign-key "
                     "(PEM), for certificate signing."),
        click.option("--sign-chain", type=_FILE, multiple=True, help="Certificates up to the root (PEM), repeatable."),
    ]):
        wrapper = opt(wrapper)
    return wrapper
