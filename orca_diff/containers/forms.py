"""Open a model in any supported form: the one dispatch over containers."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import InputNotFoundError, UsageError
from .base import ModelReader, list_extra_files
from .safetensors import SafetensorsModel

def open_model(path: str | os.PathLike) -> ModelReader:
    """Open a model in any supported form: a safetensors file or folder, an HF ``.bin`` folder,
    or a Meta original checkpoint folder (``params.json`` + ``consolidated.*.pth``).

    Safetensors is preferred when a folder holds several forms. The torch-based forms need the
    ``orca-diff[torch]`` extra and are loaded with ``weights_only=True`` only.
    """
    p = Path(path)
    if not p.exists():
        raise InputNotFoundError(f"{p}: no such file or folder")
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


