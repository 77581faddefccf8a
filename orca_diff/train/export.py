"""Write the trained model as an HF folder that ships exactly what was trained.

* Weights are cast to the base's dtype (so ``orca-diff make`` compares like with like) without
  breaking weight sharing: tensors that were one tensor in the model (tied input embedding and
  ``lm_head``) are cast once and stay one tensor, so ``save_pretrained`` leaves the tied copy out
  of the safetensors file, as it does for the base, and ``config.json`` keeps
  ``tie_word_embeddings: true``.
* The tokenizer carries the chat template the model was trained with (``orca`` template), or the
  base's own (``base`` template), and ``generation_config.json`` the pad token id.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from ..errors import OutputError, require_extra
from .config import SAFETENSORS_TO_TORCH
from .data import ORCA_CHAT_TEMPLATE, PRESET_TEMPLATES


def tied_weight_pairs(model: Any) -> dict[str, str]:
    """{tied name: source name} the model declares (transformers 5: a dict; 4.x: a list of names)."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if not getattr(config, "tie_word_embeddings", False):
        return {}
    keys = getattr(model, "_tied_weights_keys", None) or {}
    if isinstance(keys, dict):
        return dict(keys)
    source = next((n for n, p in model.named_parameters() if p is model.get_input_embeddings().weight), None)
    return {k: source for k in keys if source}


def cast_state_dict(state_dict: dict[str, Any], dtype: Any, tied: dict[str, str]) -> dict[str, Any]:
    """Cast every tensor to ``dtype`` on the CPU, keeping shared tensors shared.

    Casting tensor by tensor makes two copies of a tied weight, which ``save_pretrained`` would
    then write twice (an untied model, and a file bigger by a whole vocabulary x hidden matrix).
    Tensors over the same storage are cast once; a declared tied pair (``tied``: target ->
    source) that holds equal values is also made one tensor, which covers full state dicts
    gathered from FSDP, where the sharing is lost.
    """
    torch = require_extra("torch", "train", "Saving the trained model")
    cast: dict[str, Any] = {}
    memo: dict[tuple, Any] = {}
    for name, tensor in state_dict.items():
        storage = tensor.untyped_storage().data_ptr()
        key = (storage, tensor.storage_offset(), tuple(tensor.shape), tuple(tensor.stride()))
        if key not in memo:
            memo[key] = tensor.detach().to("cpu", dtype)
        cast[name] = memo[key]
    for target, source in tied.items():
        if target in cast and source in cast and cast[target] is not cast[source] \
                and torch.equal(cast[target], cast[source]):
            cast[target] = cast[source]
    return cast


def save_hf_model(model: Any, tokenizer: Any, folder: Path, save_dtype: str, use_cache: bool, template: str,
                  world: int, main: bool) -> None:
    """Write an HF folder of safetensors (cast to ``save_dtype``) + tokenizer, via a temporary name."""
    torch = require_extra("torch", "train", "orca-diff train")
    if world > 1:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        # Gathers the full weights to rank 0's CPU memory (13B fp32: 52 GB), one tensor at a time.
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        full = model.state_dict()
    if not main:
        return
    tied = tied_weight_pairs(model)
    state_dict = cast_state_dict(full, getattr(torch, SAFETENSORS_TO_TORCH[save_dtype]), tied)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.config.use_cache = use_cache
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and tokenizer.pad_token_id is not None:
        generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(tmp, state_dict=state_dict)  # safetensors: the default since transformers 4.35
    base_template = getattr(tokenizer, "chat_template", None)
    if template == "orca":
        tokenizer.chat_template = ORCA_CHAT_TEMPLATE
    elif template in PRESET_TEMPLATES:
        tokenizer.chat_template = PRESET_TEMPLATES[template]
    try:
        tokenizer.save_pretrained(tmp)  # transformers 5: chat_template.jinja
    finally:
        tokenizer.chat_template = base_template
    # save_pretrained records the dtype of the fp32 master weights; record the dtype actually written.
    config_path = tmp / "config.json"
    config = json.loads(config_path.read_text())
    old_key = "torch_dtype" in config and "dtype" not in config  # transformers < 4.56 writes torch_dtype
    config["torch_dtype" if old_key else "dtype"] = SAFETENSORS_TO_TORCH[save_dtype]
    if tied:
        config["tie_word_embeddings"] = True
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if not list(tmp.glob("*.safetensors")) or list(tmp.glob("*.bin")):
        raise OutputError(f"{tmp}: transformers did not write safetensors shards; upgrade transformers (>=4.35)")
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
