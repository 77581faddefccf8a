"""Training checkpoints (torch.distributed.checkpoint: sharded under FSDP, one file in a single process).

A checkpoint is ``OUT/checkpoints/step-N/``: the model and AdamW state, and ``state.json``
(written last, so its presence marks a complete checkpoint) with where to continue and the
fingerprint of the settings it belongs to. Paths in the fingerprint are absolute (the config
resolves them), so the same run is recognised from any working directory.

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

from ..errors import UsageError, require_extra
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


def latest_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint (one with state.json, written last) under OUT/checkpoints."""
    root = out / CHECKPOINTS_DIRNAME
    done = sorted(p for p in root.glob("step-*") if (p / STATE_NAME).is_file()) if root.is_dir() else []
    return done[-1] if done else None


def save_checkpoint(out: Path, model: Any, optimizer: Any, state: dict[str, Any], cfg: TrainConfig,
                    world: int, main: bool) -> Path:
    """Write OUT/checkpoints/step-N (model + optimizer + where to continue); keep the newest few."""
    torch = require_extra("torch", "train", "orca-diff train")
    import torch.distributed.checkpoint as dcp

    final = out / CHECKPOINTS_DIRNAME / f"step-{state['global_step']:08d}"
    tmp = final.with_name(final.name + ".tmp")
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(final, ignore_errors=True)
        tmp.mkdir(parents=True)
    if world > 1:
        torch.distributed.barrier()
    state_dicts = _model_and_optim_state(model, optimizer)
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
        warnings.filterwarnings("ignore", message=".*single process.*")
        dcp.save(state_dicts, checkpoint_id=str(tmp))
    if world > 1:
        torch.distributed.barrier()
    if main:
        (tmp / STATE_NAME).write_text(json.dumps({**state, "config": fingerprint(cfg, world)}, indent=1))
        os.replace(tmp, final)
        older = sorted(p for p in final.parent.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp"))
        for stale in older[:-cfg.keep_checkpoints]:
            shutil.rmtree(stale, ignore_errors=True)
    if world > 1:
        torch.distributed.barrier()
    return final


def load_checkpoint(path: Path, model: Any, optimizer: Any | None) -> None:
    """Load model (and optimizer, when given) state saved by :func:`save_checkpoint`, in place."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_state_dict

    state = _model_and_optim_state(model, optimizer)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*single process.*")
        dcp.load(state, checkpoint_id=str(path))
    # A tied weight's second name is left out of the checkpoint; loading its first name fills both.
    options = StateDictOptions(strict=not shared_parameter_names(model))
    if optimizer is None:
        set_model_state_dict(model, state["model"], options=options)
    else:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                       options=options)


def read_resume_state(out: Path, cfg: TrainConfig, world: int) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint of *this* run in OUT and its state, or None when OUT has none.

    A checkpoint written under other settings is refused, naming the settings that differ.
    """
    ckpt = latest_checkpoint(out)
    if ckpt is None:
        return None
    state = json.loads((ckpt / STATE_NAME).read_text())
    saved, now = state.pop("config"), fingerprint(cfg, world)
    saved = {**ADDED_SINCE, **saved}  # a checkpoint from before a setting existed ran with its default
    changed = _differences(saved, now)
    if changed:
        details = "; ".join(f"{path}: checkpoint {_short(a)}, now {_short(b)}" for path, a, b in changed[:4])
        raise UsageError(f"{ckpt} was written by a run with different {', '.join(p for p, _, _ in changed)}"
                         f" ({details}); continue it with the same settings (and number of processes), or choose"
                         f" a new --out")
    return ckpt, state


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
