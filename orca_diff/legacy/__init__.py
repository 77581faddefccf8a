"""Historic diff releases: FastChat/Vicuna deltas, Alpaca/WizardLM weight diffs, OpenAssistant XOR.

Each format has its own module (:mod:`.fastchat`, :mod:`.alpaca`, :mod:`.oa_xor`) that rebuilds
exactly the tensors (FastChat, Alpaca) or the files (OpenAssistant) the original script produced
from the same base, streaming one tensor (or one block) at a time. What they share lives in
:mod:`.common` (reports, the streaming safetensors writer, verification), where releases come from
in :mod:`.sources`, and running them (``apply --format``, ``convert``) in :mod:`.run`. This module
is only the face. See docs/legacy.md for each format, its pitfalls and the source files it follows.
"""

from .common import (
    CHUNK_ELEMENTS, FORMATS, MAX_SHARD_BYTES, NOT_MODEL_FILES, PAD_ROW_TENSORS, ConvertReport, LegacyReport,
    SafetensorsWriter, adds_pad_row, copy_model_files, model_fingerprint, require_floats, state_dict_order,
    verify_written,
)
from .run import apply_legacy, convert_legacy, legacy_payload_bytes
from .sources import catalog_legacy, detect_format, resolve_base_for, resolve_legacy_diff

__all__ = [
    "CHUNK_ELEMENTS", "FORMATS", "MAX_SHARD_BYTES", "NOT_MODEL_FILES", "PAD_ROW_TENSORS", "ConvertReport",
    "LegacyReport", "SafetensorsWriter", "adds_pad_row", "apply_legacy", "catalog_legacy", "convert_legacy",
    "copy_model_files", "detect_format", "legacy_payload_bytes", "model_fingerprint", "require_floats",
    "resolve_base_for", "resolve_legacy_diff", "state_dict_order", "verify_written",
]
