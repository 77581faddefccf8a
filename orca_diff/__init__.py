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

import sys as _sys
import types as _types

from .errors import (BaseMismatchError, CorruptDiffError, FormatError, HubError, InputNotFoundError,
                     InterruptedError_, MissingExtraError, OrcaDiffError, OutputError, UsageError, VerificationError)

__version__ = "0.4.0"

_API = ("make", "apply", "verify", "MakeReport", "ApplyReport", "VerifyReport")
#: Names that are both a function of the library face and a module of the package (make.py,
#: apply.py, verify.py hold the core): the module object itself is made callable, so
#: ``orca_diff.apply(...)`` calls :func:`orca_diff.api.apply` while ``import orca_diff.apply as m``
#: and ``from orca_diff.apply import apply_diff`` keep working as before.
_CALLABLE_MODULES = ("make", "apply", "verify")


def _callable_module_class(name: str) -> type:
    def __call__(self, *args, **kwargs):
        from . import api

        return getattr(api, name)(*args, **kwargs)

    __call__.__doc__ = f"orca_diff.{name}(...) is orca_diff.api.{name}(...): see docs/library.md"
    return type(f"CallableModule_{name}", (_types.ModuleType,), {"__call__": __call__})


class _Package(_types.ModuleType):
    """This package's module type: when the import system sets one of the callable submodules on
    it (after loading orca_diff/make.py, say), the submodule is made callable first."""

    def __setattr__(self, name: str, value) -> None:
        if name in _CALLABLE_MODULES and isinstance(value, _types.ModuleType) and type(value) is _types.ModuleType:
            value.__class__ = _CALLABLE_CLASSES[name]
        super().__setattr__(name, value)


_CALLABLE_CLASSES = {n: _callable_module_class(n) for n in _CALLABLE_MODULES}
_sys.modules[__name__].__class__ = _Package


def __getattr__(name: str):
    if name in _CALLABLE_MODULES:
        import importlib

        module = importlib.import_module(f"{__name__}.{name}")
        if type(module) is _types.ModuleType:  # loaded before this package's type was set
            module.__class__ = _CALLABLE_CLASSES[name]
        return module
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'orca_diff' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = ["__version__", *_API, "OrcaDiffError", "UsageError", "InputNotFoundError", "FormatError",
           "CorruptDiffError", "BaseMismatchError", "VerificationError", "OutputError", "HubError",
           "MissingExtraError", "InterruptedError_"]
