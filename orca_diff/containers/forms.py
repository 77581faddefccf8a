"""Open a model in any supported form: the one dispatch over containers."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import FormatError, InputNotFoundError, UsageError
from .base import ModelReader, list_extra_files, require_regular, list_target_files
from .safetensors import SafetensorsModel

def open_model(path: str | os.PathLike) -> ModelReader:
    """:func:`_open_model` with every tensor name checked to be valid Unicode (a lone surrogate,
    legal in JSON and pickle, would otherwise crash hashing and printing far from its cause)."""
    model = _open_model(path)
    _check_names(model)
    return model


def _refuse_diff(p: Path) -> None:
    """A diff given where a model is expected gets a message saying what it is and what to do."""
    has_weights = p.is_dir() and (any(p.glob("*.safetensors")) or any(p.glob("*.bin")) or any(p.glob("*.pth")))
    if ((p / "orca-diff.json").is_file() and not has_weights) or p.name == "orca-diff.json":
        raise UsageError(f"{p} is an orca-diff diff (it has orca-diff.json), not a model: give it as --diff "
                         "(orca-diff apply --base BASE --diff DIFF --out DIR), and as the model the folder of "
                         "*.safetensors or *.bin weights it was made from or rebuilds")


def _check_names(model: ModelReader) -> None:
    for name in model.tensors:
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            model.close()
            raise FormatError(f"{model.path}: tensor name {ascii(name)[:200]} is not valid Unicode (a lone "
                              "surrogate); this checkpoint cannot be diffed or fingerprinted") from None


def open_target(path: str | os.PathLike) -> tuple[ModelReader, list[str]]:
    """Open a fine-tuned model folder for ``make``: its weight files (safetensors shards, else HF
    ``.bin`` shards read as byte segments, which needs torch) and EVERY other file of the folder
    as ``extra_files`` (see list_target_files). Returns (reader, notes for the user). Files whose
    names no diff may carry (docs/format.md §2) are refused here, naming them."""
    from ..format import MANIFEST_NAME, path_key, path_problem  # noqa: PLC0415 - format imports containers

    p = Path(path)
    if not p.exists():
        raise InputNotFoundError(f"{p}: no such file or folder")
    notes: list[str] = []
    _refuse_diff(p)
    if not p.is_dir():
        require_regular(p, "model file")  # a FIFO or device would block or never end
    if p.is_file():
        if p.suffix == ".safetensors":
            return SafetensorsModel(p, [p], {}), notes
        raise UsageError(f"{p}: give the fine-tuned model's folder (make rebuilds every file of it)")
    shards = sorted(p.glob("*.safetensors"))
    if shards:
        model: ModelReader = SafetensorsModel(p, shards, {})
        weights = set(shards)
        if any(p.glob("pytorch_model*.bin")):
            notes.append(f"{p} holds both safetensors and pytorch_model*.bin weights: the .bin files travel as plain "
                         "bytes (a large diff); remove one form from the folder to make it small")
    else:
        from .pickled import _bin_files, _torch  # noqa: PLC0415 - .bin targets need torch (make only)
        from .torchzip import TorchZipModel, is_torch_zip

        try:
            files = _bin_files(p)
        except InputNotFoundError:
            raise InputNotFoundError(f"{p}: no model weights found (expected *.safetensors, pytorch_model.bin or "
                                     "pytorch_model.bin.index.json with its shards)") from None
        if any(is_torch_zip(f) for f in files):
            _torch()  # naming storages reads the pickle (weights_only); a non-zip file travels whole without it
        model = TorchZipModel(p, files, {})
        weights = set(files)
    try:
        extra, skipped = list_target_files(p, weights)
        keys: dict[str, str] = {}
        for rel in [*(q.relative_to(p).as_posix() for q in sorted(weights)), *extra]:
            problem = path_problem(rel)
            if problem is not None:
                raise FormatError(f"{p / rel}: cannot be carried in a diff: its path has {problem}; rename it")
            key = path_key(rel)
            if key == path_key(MANIFEST_NAME):
                raise FormatError(f"{p / rel}: a file called {MANIFEST_NAME} cannot be part of a model carried by "
                                  "orca-diff (it is the diff's manifest); rename it")
            if key in keys:
                raise FormatError(f"{p}: {keys[key]!r} and {rel!r} differ only in case or Unicode normalisation, "
                                  "so they are one file on macOS and Windows; rename one")
            keys[key] = rel
        model.extra_files = extra
        _check_names(model)
    except BaseException:
        model.close()
        raise
    notes.extend(f"not carried: {s} (not part of the model)" for s in skipped)
    notes.extend(getattr(model, "notes", []))
    return model, notes


def _open_model(path: str | os.PathLike) -> ModelReader:
    """Open a model in any supported form: a safetensors file or folder, an HF ``.bin`` folder,
    or a Meta original checkpoint folder (``params.json`` + ``consolidated.*.pth``).

    Safetensors is preferred when a folder holds several forms. The torch-based forms need the
    ``orca-diff[torch]`` extra and are loaded with ``weights_only=True`` only.
    """
    p = Path(path)
    if not p.exists():
        raise InputNotFoundError(f"{p}: no such file or folder")
    _refuse_diff(p)
    if not p.is_dir():
        require_regular(p, "model file")  # a FIFO or device would block or never end
    if p.is_file():
        if p.suffix == ".safetensors":
            return SafetensorsModel(p, [p], {})
        raise UsageError(f"{p}: give a model folder or a .safetensors file")
    shards = sorted(p.glob("*.safetensors"))
    if shards:
        return SafetensorsModel(p, shards, list_extra_files(p))
    if sorted(p.glob("*.bin")) or sorted(p.glob("consolidated.*.pth")):
        from . import pickled  # noqa: PLC0415 - optional, needs torch

        return pickled.open_torch_model(p)
    raise InputNotFoundError(
        f"{p}: no model weights found (expected *.safetensors, pytorch_model*.bin, or params.json + consolidated.*.pth)"
    )


