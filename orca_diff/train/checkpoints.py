"""Training checkpoints in a format that needs no pickle: safetensors for tensors, JSON for the rest.

A checkpoint is ``OUT/checkpoints/step-N/``:

* ``rank-00000-of-00002.safetensors`` … one per process: this rank's part of every tensor of the
  model and AdamW state (under FSDP2 the local shard of each DTensor, else the whole tensor);
* ``tree.json``: the structure of the model and optimizer state dicts, with every tensor replaced
  by ``{"tensor": "t17"}`` (its key in the rank files) and every other value (learning rates,
  betas, param-group names) written as JSON;
* ``state.json`` (written last, so its presence marks a complete checkpoint): where to continue,
  the fingerprint of the settings and the digests of the data files it belongs to.

Why not torch.distributed.checkpoint: its reader ``pickle.load`` s ``.metadata``, so a run folder
copied from someone else (or planted in a shared one) ran code the moment a rerun resumed from it.
Nothing here is unpickled: safetensors and JSON carry no code. A checkpoint in the old format is
refused with one line; ``trust_pickled_checkpoint`` (``--trust-pickled-checkpoint``) loads it
for a user who wrote it themselves.

Exact resume: loading copies every saved tensor bit for bit into the state dicts the model and a
freshly created optimizer produce (same names, shapes, dtypes, and the same world size, which the
fingerprint checks), then hands them to ``set_state_dict``; the scalar state goes back as written.

Size: fp32 weights + AdamW's two fp32 moments = 12 bytes per parameter, plus small metadata
(measured figures in docs/training.md). A tied weight (``lm_head`` = the input embedding) is one
parameter under two names and is stored once, under its first name.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

from ..errors import FormatError, UsageError, require_extra
from .config import CHECKPOINTS_DIRNAME, STATE_NAME, TrainConfig


# Settings added after checkpoints were first written, with the behaviour those checkpoints had.
ADDED_SINCE = {"template": "orca", "system_messages": "keep"}


def fingerprint(cfg: TrainConfig, world: int) -> dict[str, Any]:
    values = {**cfg.fingerprint_fields(), "world": world}
    return json.loads(json.dumps(values, default=str))


def shared_parameter_names(model: Any) -> set[str]:
    """Names under which a parameter already listed under another name appears (tied weights)."""
    first: dict[int, str] = {}
    repeats = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first:
            repeats.add(name)
        else:
            first[id(param)] = name
    return repeats


def _model_and_optim_state(model: Any, optimizer: Any | None) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if optimizer is None:
        state = {"model": get_model_state_dict(model)}
    else:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
    repeats = shared_parameter_names(model)
    state["model"] = {k: v for k, v in state["model"].items() if k not in repeats}
    return state


TREE_NAME = "tree.json"
FORMAT = "orca-diff-checkpoint-1"   # safetensors per rank + tree.json + state.json
PICKLED_MARKER = ".metadata"       # torch.distributed.checkpoint's pickled index: never read unasked


def rank_file_name(rank: int, world: int) -> str:
    return f"rank-{rank:05d}-of-{world:05d}.safetensors"


def latest_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint (one with state.json, written last) under OUT/checkpoints."""
    root = out / CHECKPOINTS_DIRNAME
    done = sorted(p for p in root.glob("step-*") if (p / STATE_NAME).is_file()) if root.is_dir() else []
    return done[-1] if done else None


def _local(tensor: Any) -> Any:
    """This rank's part of a tensor: the local shard of an FSDP2 DTensor, else the tensor itself."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _split_tree(obj: Any, tensors: dict[str, Any]) -> Any:
    """JSON-able structure of a state dict, each tensor moved into ``tensors`` under a short key."""
    torch = require_extra("torch", "train", "orca-diff train")
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = _local(obj).detach().contiguous().cpu()
        return {"tensor": key}
    if isinstance(obj, dict):
        if not all(isinstance(k, (str, int)) for k in obj):
            raise UsageError("a training state key is neither a string nor an int; cannot checkpoint it")
        return {"dict": [[k, _split_tree(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return {"tuple" if isinstance(obj, tuple) else "list": [_split_tree(v, tensors) for v in obj]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return {"value": obj}
    raise UsageError(f"a training state value of type {type(obj).__name__} cannot be checkpointed without pickle")


def save_checkpoint(out: Path, model: Any, optimizer: Any, state: dict[str, Any], cfg: TrainConfig,
                    world: int, main: bool, rank: int = 0, digests: dict[str, str] | None = None) -> Path:
    """Write OUT/checkpoints/step-N (model + optimizer + where to continue); keep the newest few."""
    torch = require_extra("torch", "train", "orca-diff train")
    from safetensors.torch import save_file

    final = out / CHECKPOINTS_DIRNAME / f"step-{state['global_step']:08d}"
    tmp = final.with_name(final.name + ".tmp")
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(final, ignore_errors=True)
        tmp.mkdir(parents=True)
    if world > 1:
        torch.distributed.barrier()
    tensors: dict[str, Any] = {}
    tree = _split_tree(_model_and_optim_state(model, optimizer), tensors)
    save_file(tensors, str(tmp / rank_file_name(rank, world)), metadata={"format": FORMAT})
    if main:
        (tmp / TREE_NAME).write_text(json.dumps(tree), encoding="utf-8")
    if world > 1:
        torch.distributed.barrier()
    if main:
        record = {**state, "format": FORMAT, "world": world, "config": fingerprint(cfg, world)}
        if digests is not None:
            record["data_digests"] = digests
        (tmp / STATE_NAME).write_text(json.dumps(record, indent=1))
        os.replace(tmp, final)
        older = sorted(p for p in final.parent.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp"))
        for stale in older[:-cfg.keep_checkpoints]:
            shutil.rmtree(stale, ignore_errors=True)
    if world > 1:
        torch.distributed.barrier()
    return final


def _fill_tree(template: Any, saved: Any, tensors: Any, where: str) -> Any:
    """``template`` (a fresh state dict) with every value replaced by the saved one, tensors copied
    bit for bit into the template's own (sharded) tensors."""
    torch = require_extra("torch", "train", "orca-diff train")
    kind = next(iter(saved)) if isinstance(saved, dict) and len(saved) == 1 else None
    if isinstance(template, torch.Tensor):
        if kind != "tensor" or saved["tensor"] not in tensors.keys():
            raise FormatError(f"{where}: the checkpoint has no tensor here; it does not belong to this model")
        loaded = tensors.get_tensor(saved["tensor"])
        local = _local(template)
        if tuple(loaded.shape) != tuple(local.shape) or loaded.dtype != local.dtype:
            raise FormatError(f"{where}: checkpoint tensor {tuple(loaded.shape)} {loaded.dtype}, the model's"
                              f" {tuple(local.shape)} {local.dtype}; it does not belong to this model")
        with torch.no_grad():
            local.copy_(loaded)
        return template
    if isinstance(template, dict):
        if kind != "dict":
            raise FormatError(f"{where}: the checkpoint's structure differs from this model and optimizer")
        items = {k: v for k, v in saved["dict"]}
        if {str(k) for k in template} != {str(k) for k in items}:
            raise FormatError(f"{where}: the checkpoint holds other entries than this model and optimizer")
        by_str = {str(k): v for k, v in items.items()}
        return {k: _fill_tree(v, by_str[str(k)], tensors, f"{where}.{k}") for k, v in template.items()}
    if isinstance(template, (list, tuple)):
        if kind not in ("list", "tuple") or len(saved[kind]) != len(template):
            raise FormatError(f"{where}: the checkpoint's structure differs from this model and optimizer")
        values = [_fill_tree(t, s, tensors, f"{where}[{i}]") for i, (t, s) in enumerate(zip(template, saved[kind]))]
        return tuple(values) if isinstance(template, tuple) else values
    if kind != "value":
        raise FormatError(f"{where}: the checkpoint's structure differs from this model and optimizer")
    return saved["value"]


def check_checkpoint_format(path: Path, trust_pickled: bool = False) -> str:
    """``"safetensors"`` for this module's format, ``"pickled"`` for a torch.distributed.checkpoint
    one the user said they trust; anything else is refused before a byte of it is loaded."""
    if (path / TREE_NAME).is_file():
        return "safetensors"
    if (path / PICKLED_MARKER).exists():
        if trust_pickled:
            return "pickled"
        raise FormatError(
            f"{path} is a torch.distributed.checkpoint checkpoint, whose {PICKLED_MARKER} is read by unpickling,"
            f" which runs any code a copied or shared run folder puts there; orca-diff does not load it. If you"
            f" wrote it yourself (orca-diff before its safetensors checkpoints), continue with"
            f" --trust-pickled-checkpoint; otherwise start a new --out")
    raise FormatError(f"{path}: no {TREE_NAME}; not a checkpoint orca-diff wrote (choose a new --out)")


def load_checkpoint(path: Path, model: Any, optimizer: Any | None, rank: int = 0, world: int = 1,
                    trust_pickled: bool = False) -> None:
    """Load model (and optimizer, when given) state saved by :func:`save_checkpoint`, in place."""
    from safetensors import safe_open

    if check_checkpoint_format(path, trust_pickled) == "pickled":
        _load_pickled_checkpoint(path, model, optimizer)
        return
    try:
        tree = json.loads((path / TREE_NAME).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise FormatError(f"{path / TREE_NAME}: unreadable ({exc}); choose a new --out") from None
    template = _model_and_optim_state(model, optimizer)
    saved_tree = tree if optimizer is not None else {"dict": [kv for kv in tree.get("dict", []) if kv[0] == "model"]}
    shard = path / rank_file_name(rank, world)
    if not shard.is_file():
        raise FormatError(f"{shard} is missing: the checkpoint is incomplete or from another number of processes")
    try:
        with safe_open(str(shard), "pt") as tensors:
            state = _fill_tree(template, saved_tree, tensors, path.name)
    except FormatError:
        raise
    except Exception as exc:  # a damaged safetensors file: its parser refuses, no code runs
        raise FormatError(f"{shard}: not a readable safetensors file ({exc}); choose a new --out") from None
    _set_state(model, optimizer, state)


def _load_pickled_checkpoint(path: Path, model: Any, optimizer: Any | None) -> None:
    """The old torch.distributed.checkpoint format; only on the user's explicit word that they trust it."""
    import torch.distributed.checkpoint as dcp

    state = _model_and_optim_state(model, optimizer)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*single process.*")
        dcp.load(state, checkpoint_id=str(path))
    _set_state(model, optimizer, state)


def _set_state(model: Any, optimizer: Any | None, state: dict) -> None:
    """Hand a loaded ``{"model", "optim"}`` state to the model (and optimizer), whatever format it
    came from. A tied weight's second name is left out of a checkpoint; loading its first name
    fills both, so the load is not strict then."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_state_dict

    options = StateDictOptions(strict=not shared_parameter_names(model))
    if optimizer is None:
        set_model_state_dict(model, state["model"], options=options)
    else:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                       options=options)


def read_resume_state(out: Path, cfg: TrainConfig, world: int, digests: dict[str, str] | None = None,
                      ) -> tuple[Path, dict[str, Any], list[str]] | None:
    """The newest checkpoint of *this* run in OUT, its state and what to say about it; None when OUT has none.

    The same run: the same settings, and the same stages up to the one the checkpoint is in. Stages
    that have not started yet may differ (fix a stage-2 path or learning rate after stage 1 has
    trained: the run continues from stage 1's end; the change is said in one line and recorded in
    ``history``). A checkpoint of other settings is refused, naming the settings that differ; so is
    data that changed since the checkpoint (``digests``: {path: sha256} now), unless
    ``cfg.accept_changed_data``. The checkpoint's format is checked before anything else is read.
    """
    ckpt = latest_checkpoint(out)
    if ckpt is None:
        return None
    check_checkpoint_format(ckpt, cfg.trust_pickled_checkpoint)
    try:
        state = json.loads((ckpt / STATE_NAME).read_text(encoding="utf-8"))
        saved = state.pop("config")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, AttributeError) as exc:
        raise FormatError(f"{ckpt / STATE_NAME}: unreadable ({exc}); choose a new --out") from None
    now = fingerprint(cfg, world)
    saved = {**ADDED_SINCE, **saved}  # a checkpoint from before a setting existed ran with its default
    started = state["next_stage"] + (1 if state["next_step"] > 0 else 0)  # stages trained on, wholly or partly
    saved_stages, now_stages = saved.pop("stages"), now.pop("stages")
    changed = _differences(saved, now)
    kept_stages = min(started, len(saved_stages))
    if len(now_stages) < kept_stages:
        changed.append(("stages", f"{len(saved_stages)} stages", f"{len(now_stages)} stages"))
    else:
        changed += _differences(saved_stages[:kept_stages], now_stages[:kept_stages], "stages")
    if changed:
        details = "; ".join(f"{path}: checkpoint {_short(a)}, now {_short(b)}" for path, a, b in changed[:4])
        raise UsageError(f"{ckpt} was written by a run with different {', '.join(p for p, _, _ in changed)}"
                         f" ({details}); continue it with the same settings (and number of processes), or choose"
                         f" a new --out")
    notes: list[str] = []
    history = list(state.get("history", []))
    if saved_stages[kept_stages:] != now_stages[kept_stages:]:
        notes.append(f"stages {kept_stages + 1}.. differ from those the checkpoint's run had"
                     f" ({len(saved_stages)} then, {len(now_stages)} now); continuing after stage {kept_stages} with the"
                     f" stages as configured now")
        history.append({"event": "later stages changed", "global_step": state["global_step"],
                        "from_stage": kept_stages + 1, "stages_before": saved_stages[kept_stages:],
                        "stages_now": now_stages[kept_stages:]})
    recorded = state.get("data_digests")
    if digests is not None and recorded is not None:
        used = [p for s in cfg.stages[:kept_stages] for p in s.data]
        moved = [p for p in dict.fromkeys(used) if p in recorded and recorded[p] != digests.get(p)]
        if moved and not cfg.accept_changed_data:
            first = moved[0]
            raise UsageError(f"{first} changed since {ckpt} was written (sha256 {recorded[first][:12]}..., now"
                             f" {str(digests.get(first))[:12]}...){f' (and {len(moved) - 1} more)' if len(moved) > 1 else ''};"
                             f" the run would not continue on the data it trained on. Restore the file, continue"
                             f" anyway with --accept-changed-data, or choose a new --out")
        if moved:
            notes.append(f"continuing although {', '.join(moved)} changed since the checkpoint (--accept-changed-data)")
            history.append({"event": "data changed, accepted", "global_step": state["global_step"],
                            "files": {p: {"then": recorded[p], "now": digests.get(p)} for p in moved}})
    elif digests is not None and recorded is None:
        notes.append(f"{ckpt} records no data digests (an older orca-diff): changed data cannot be detected")
    state["history"] = history
    return ckpt, state, notes


def _differences(saved: Any, now: Any, path: str = "") -> list[tuple[str, Any, Any]]:
    """(where, checkpoint value, current value) for every leaf that differs, e.g. ``stages[0].lr``."""
    if isinstance(saved, dict) and isinstance(now, dict):
        return [d for k in sorted(set(saved) | set(now))
                for d in _differences(saved.get(k), now.get(k), f"{path}.{k}" if path else k)]
    if isinstance(saved, list) and isinstance(now, list) and len(saved) == len(now):
        return [d for i, (a, b) in enumerate(zip(saved, now)) for d in _differences(a, b, f"{path}[{i}]")]
    return [] if saved == now else [(path, saved, now)]


def _short(value: Any, limit: int = 160) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= limit else text[:limit - 3] + "..."
