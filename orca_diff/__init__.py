"""orca-diff: publish fine-tuned LLaMA-family models as exact weight diffs, and rebuild them bit-exactly.

The library face (docs/library.md)::

    import orca_diff

    report = orca_diff.apply("my-org/orca-13b-diff", "orca-13b", base="llama-13b", revision="v1")
    print(report.target_fingerprint)

``make``, ``apply`` and ``verify`` take what the CLI takes (folders, catalog names, Hub repo ids
with a revision) and return typed reports; every expected failure raises a subclass of
:class:`OrcaDiffError`, exported here. Loading is lazy: ``import orca_diff`` costs nothing until
a function is used.
"""

from .errors import (BaseMismatchError, CorruptDiffError, FormatError, HubError, InputNotFoundError,
                     InterruptedError_, MissingExtraError, OrcaDiffError, OutputError, UsageError, VerificationError)

__version__ = "0.2.0"

_API = ("make", "apply", "verify", "MakeReport", "ApplyReport", "VerifyReport")


def __getattr__(name: str):
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'orca_diff' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = ["__version__", *_API, "OrcaDiffError", "UsageError", "InputNotFoundError", "FormatError",
           "CorruptDiffError", "BaseMismatchError", "VerificationError", "OutputError", "HubError",
           "MissingExtraError", "InterruptedError_"]
