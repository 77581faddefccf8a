"""The one exception hierarchy of orca-diff.

Every expected failure is an :class:`OrcaDiffError` subclass whose message a user can act on:
which file or tensor, what was expected, what was found, and what to do. The CLI prints the
message on one line and exits with the class's ``exit_code`` (documented in README.md).
"""

from __future__ import annotations


class OrcaDiffError(Exception):
    """Base class: an expected failure with an actionable one-line message."""

    exit_code = 1


class UsageError(OrcaDiffError):
    """The command line or arguments make no sense (missing input, output exists...)."""

    exit_code = 2


class InputNotFoundError(OrcaDiffError):
    """A path, catalog name or Hub repo could not be found."""

    exit_code = 3


class FormatError(OrcaDiffError):
    """A file is not what it claims to be: malformed manifest, safetensors header, chunk."""

    exit_code = 4


class CorruptDiffError(FormatError):
    """A diff's bytes do not match their recorded checksums (truncated, bit-flipped, missing)."""

    exit_code = 5


class BaseMismatchError(OrcaDiffError):
    """The base given is not the base the diff was made from. Raised before any output is written."""

    exit_code = 6


class VerificationError(OrcaDiffError):
    """A rebuilt file or tensor does not hash to what the manifest promises."""

    exit_code = 7


class SignatureError(VerificationError):
    """A publisher's signature is missing where required, does not verify, or signs other bytes
    than the release holds (orca_diff.signing). Raised before the file it concerns is published."""


class OutputError(OrcaDiffError):
    """The output cannot be written: disk full, permission denied, unsafe path, existing output."""

    exit_code = 8


class HubError(OrcaDiffError):
    """A Hugging Face Hub operation failed (not found, gated, offline, unreachable)."""

    exit_code = 9


class MissingExtraError(OrcaDiffError):
    """An optional dependency (an extra such as ``orca-diff[torch]``) is not installed."""

    exit_code = 10


class InputChangedError(OrcaDiffError):
    """An input (the base, the target) was written or replaced while it was being read."""

    exit_code = 11


class InterruptedError_(OrcaDiffError):
    """The user pressed Ctrl-C; the partial state is kept for resuming."""

    exit_code = 130


def require_extra(module: str, extra: str, purpose: str):
    """Import ``module`` or raise a MissingExtraError that names the pip extra to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtraError(
            f"{purpose} needs the '{module}' package: pip install 'orca-diff[{extra}]'"
            f" (for torch, install the pinned CPU wheel first: pip install torch==2.13.0) ({exc})"
        ) from None


def shown(text: str) -> str:
    """``text`` safe to print on a terminal: control characters (which could move the cursor or
    draw a fake line), lone surrogates (which cannot be encoded) and other invisible format
    characters are written as Python escapes; everything else, non-ASCII letters included, is kept."""
    import unicodedata

    out = []
    for ch in text:
        cat = unicodedata.category(ch)
        if cat in ("Cc", "Cs", "Cf", "Zl", "Zp") and ch != " ":
            code = ord(ch)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
        else:
            out.append(ch)
    return "".join(out)
