"""Model containers behind one reader interface: safetensors, HF ``.bin`` and Meta ``.pth``.

The data path reads one way: a container reader yields tensors as raw little-endian bytes in HF
canonical names (:class:`ModelReader`); the codec turns them into chunks; a writer rebuilds files.
Only :mod:`.pickled` needs torch, and it is imported lazily.
"""

from .base import (
    DTYPE_SIZES, FLOAT_DTYPES, WEIGHT_SUFFIXES, DuplicateKeyError, ModelReader, TensorInfo, file_sha256,
    hash_tensor_range, list_extra_files, list_target_files, read_exact, read_range, tensor_digest, tensor_sha256, unique_keys,
)
from .forms import open_model, open_target
from .safetensors import (
    MAX_HEADER_BYTES, SafetensorsEntry, SafetensorsHeader, SafetensorsModel, parse_safetensors_header,
    read_safetensors_header,
)

__all__ = [
    "DTYPE_SIZES", "FLOAT_DTYPES", "WEIGHT_SUFFIXES", "MAX_HEADER_BYTES", "DuplicateKeyError", "ModelReader",
    "TensorInfo", "SafetensorsEntry", "SafetensorsHeader", "SafetensorsModel", "file_sha256", "hash_tensor_range",
    "list_extra_files", "list_target_files", "open_model", "open_target", "parse_safetensors_header", "read_exact", "read_range",
    "read_safetensors_header", "tensor_digest", "tensor_sha256", "unique_keys",
]
