"""Held-out evaluation: mean cross-entropy per response token (and its perplexity).

The same template, loss mask and packing as training, no gradient: the number is directly
comparable to the training loss. The trainer calls :func:`evaluate` before the first step, every
``eval_every`` steps and at each stage end (all ranks take part under FSDP, each on its share of
the rows); :func:`evaluate_folder` does it for a saved HF folder (``orca-diff train --eval-only``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Sequence

from ..errors import UsageError, require_extra
from . import data as orca_data
from .system_messages import assign_system_messages

EVAL_STREAM = 1_000_003  # system-message sampling stream of eval rows (stages use their index)


def load_eval_examples(paths: Sequence[str], tokenizer: Any, max_seq_len: int, template: str = "orca",
                       system_messages: str = "keep", seed: int = 0, prompt_erasure: bool = False,
                       read: dict[str, Any] | None = None) -> tuple[list[orca_data.Example], int, dict | None]:
    """Tokenized held-out examples, the number dropped, and the system-message summary (or None).

    ``read``: the reader settings of the run (data_format, columns, empty_responses, max_row_bytes).
    """
    rows = [r for path in paths for r in orca_data.read_orca_rows(path, **(read or {}))]
    summary = None
    if system_messages == "orca":
        rows, summary = assign_system_messages(rows, seed, EVAL_STREAM)
    examples, dropped = orca_data.encode_examples(rows, tokenizer, max_seq_len, template=template,
                                                  prompt_erasure=prompt_erasure)
    if not examples:
        raise UsageError(f"no usable eval example in {', '.join(paths)} ({dropped} dropped: the prompt alone fills"
                         f" max_seq_len={max_seq_len})")
    return examples, dropped, summary


def eval_micro_batches(examples: Sequence[orca_data.Example], max_seq_len: int, micro_batch_size: int,
                       packing: bool) -> list[list[list[int]]]:
    """Rows (packed like training when ``packing``) grouped into micro-batches, in file order."""
    rows = orca_data.pack_greedy([len(e) for e in examples], max_seq_len) if packing \
        else orca_data.one_per_row(len(examples))
    return [rows[i:i + micro_batch_size] for i in range(0, len(rows), micro_batch_size)]


def evaluate(model: Any, examples: Sequence[orca_data.Example], micro_batches: list[list[list[int]]],
             pad_token_id: int, device: Any, autocast_bf16: bool = False, flatten: bool = False,
             rank: int = 0, world: int = 1,
             all_reduce: Callable[[list[float]], list[float]] = lambda v: v,
             progress: bool = False) -> dict[str, float]:
    """``{"loss", "ppl", "targets"}`` of ``model`` on the examples; leaves the model in the mode it was in.

    Under FSDP every rank must run the same number of forward passes, so a rank that runs out of
    micro-batches repeats the first one with weight 0.
    """
    torch = require_extra("torch", "train", "Evaluating a model")
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    mine = micro_batches[rank::world]
    per_rank = math.ceil(len(micro_batches) / world)
    padded = [(b, 1.0) for b in mine] + [(micro_batches[0], 0.0)] * (per_rank - len(mine))
    total = count = 0.0
    try:
        with torch.no_grad():
            for rows, weight in tqdm(padded, desc="eval", leave=False, disable=None if progress else True):
                batch = orca_data.collate(examples, rows, pad_token_id, flatten=flatten)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast_bf16):
                    logits = model(input_ids=batch["input_ids"].to(device),
                                   position_ids=batch["position_ids"].to(device), use_cache=False).logits
                total += weight * float(orca_data.response_loss_sum(logits, batch["labels"]))
                count += weight * batch["n_targets"]
    finally:
        model.train(was_training)
        _reshard(model)
    total, count = all_reduce([total, count])
    loss = total / max(count, 1.0)
    return {"loss": loss, "ppl": math.exp(min(loss, 700.0)), "targets": int(count)}


def _reshard(model: Any) -> None:
    """Under FSDP2 a forward without backward leaves the root's parameters gathered (the root does
    not reshard after forward, expecting the backward); reshard so that checkpointing and the next
    step see the sharded parameters the optimizer holds."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without FSDP2: nothing can be sharded
        return
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def evaluate_folder(model_dir: str | Path, data: Sequence[str], tokenizer: str | None = None, max_seq_len: int = 2048,
                    micro_batch_size: int = 8, template: str = "orca", system_messages: str = "keep", seed: int = 0,
                    packing: bool = True, threads: int | None = None, device: str = "cpu",
                    progress: bool = False, prompt_erasure: bool = False, data_format: str = "auto",
                    columns: dict[str, str] | None = None, empty_responses: str = "drop") -> dict[str, Any]:
    """Evaluate a saved HF folder on Orca files (fp32, no grad): loss, perplexity, targets, examples."""
    torch = require_extra("torch", "train", "Evaluating a model")
    transformers = require_extra("transformers", "train", "Evaluating a model")
    from .loop import from_pretrained_dtype_kwarg

    if threads:
        torch.set_num_threads(threads)
    from .loop import load_pretrained_tokenizer, load_pretrained_model

    tok = load_pretrained_tokenizer(transformers, str(tokenizer or model_dir))
    model = load_pretrained_model(transformers, str(model_dir),
                                  {from_pretrained_dtype_kwarg(transformers): torch.float32}).to(device)
    read = {"data_format": data_format, "columns": columns, "empty_responses": empty_responses}
    examples, dropped, summary = load_eval_examples(list(data), tok, max_seq_len, template, system_messages, seed,
                                                    prompt_erasure, read)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    result = evaluate(model, examples, eval_micro_batches(examples, max_seq_len, micro_batch_size, packing), pad,
                      torch.device(device), progress=progress)
    return {**result, "examples": len(examples), "dropped": dropped, "model": str(model_dir),
            "data": [str(p) for p in data], "template": template,
            **({"system_messages": summary} if summary else {})}


def response_loss(model_dir: str | Path, data: list[str], max_seq_len: int = 2048, tokenizer: str | None = None,
                  micro_batch_size: int = 8) -> float:
    """Mean cross-entropy per response token of an HF folder on Orca files (one example per row)."""
    return evaluate_folder(model_dir, data, tokenizer=tokenizer, max_seq_len=max_seq_len,
                           micro_batch_size=micro_batch_size, packing=False)["loss"]
