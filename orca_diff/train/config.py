"""The settings of a training run as plain values: :class:`Stage`, :class:`TrainConfig`, :func:`load_config`.

Every local path is resolved to an absolute path when the config is built, so a run started
from one directory and continued from another (or with the same file given by an absolute path)
is recognised as the same run when its checkpoint is compared.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ..errors import InputNotFoundError, UsageError, require_extra

MODEL_DIRNAME = "model"          # OUT/model: the final HF folder
CHECKPOINTS_DIRNAME = "checkpoints"
LOG_NAME = "train_log.jsonl"     # one JSON record per line: kind train | eval | system_messages
METRICS_NAME = "metrics.json"    # eval results, system-message summary, last train loss
PLOT_NAME = "loss.png"           # train/eval loss per stage (needs matplotlib: the `plot` extra)
STATE_NAME = "state.json"        # inside a checkpoint: where to continue, and the config it belongs to

SAFETENSORS_TO_TORCH = {"F16": "float16", "BF16": "bfloat16", "F32": "float32"}
TEMPLATES = ("orca", "base")            # orca: ### System/User/Response; base: the base tokenizer's chat template
SYSTEM_MESSAGE_MODES = ("keep", "orca")  # orca: empty system prompts get one of the paper's 16, per sub-collection


def resolve_local(path: str | os.PathLike) -> str:
    """An absolute, symlink-free path for anything that names a local file or folder."""
    return str(Path(path).expanduser().resolve())


def _resolve_if_local(value: str | None) -> str | None:
    """Model and tokenizer may be Hub ids: resolve them only when they exist here."""
    if value is None:
        return None
    p = Path(value).expanduser()
    return str(p.resolve()) if p.exists() else value


@dataclass
class Stage:
    """One step of progressive learning: train on ``data`` (one or more files, concatenated)."""

    data: list[str]
    epochs: float = 1.0              # passes over the stage's packed rows (fractions allowed)
    max_steps: int | None = None     # if set, exactly this many optimizer steps (overrides epochs)
    lr: float = 1e-5
    warmup_steps: int | None = None  # None: TrainConfig.warmup_steps
    name: str = ""

    def __post_init__(self) -> None:
        if isinstance(self.data, (str, os.PathLike)):
            self.data = [str(self.data)]
        self.data = [resolve_local(d) for d in self.data]
        if not self.data:
            raise UsageError("a stage needs at least one data file")
        if self.max_steps is None and not self.epochs > 0:
            raise UsageError(f"stage {self.name or self.data[0]}: epochs must be > 0 (or set max_steps)")
        if self.max_steps is not None and self.max_steps < 1:
            raise UsageError(f"stage {self.name or self.data[0]}: max_steps must be >= 1")


@dataclass
class TrainConfig:
    """Everything a run depends on. Defaults follow Orca where the paper says, else common practice."""

    model: str                                  # base HF folder (or Hub id already in the cache)
    out: str                                    # OUT/model, OUT/checkpoints, OUT/train_log.jsonl
    stages: list[Stage] = field(default_factory=list)
    tokenizer: str | None = None                # default: the model folder
    template: str = "orca"                      # orca (### System/User/Response, shipped as the chat template) | base
    system_messages: str = "keep"               # keep | orca (sample one of Orca's 16 for rows without one)
    max_seq_len: int = 2048                     # Orca: 2,048
    packing: bool = True                        # Orca: packing (~2.7 examples per row)
    micro_batch_size: int = 1                   # rows per forward pass per process
    grad_accum: int = 1                         # micro-batches per optimizer step per process
    weight_decay: float = 0.0                   # decoupled, on matrices only (not norms)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    grad_clip: float = 1.0                      # max global grad norm; 0 disables
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0                   # cosine floor, reached one step after the last step
    gradient_checkpointing: bool = False
    bf16: bool | None = None                    # None: bf16 autocast iff on CUDA
    attn_implementation: str | None = None      # None: transformers' default (sdpa)
    device: str = "auto"                        # auto | cpu | cuda
    threads: int | None = None                  # torch.set_num_threads (CPU); None: torch's default
    save_dtype: str = "auto"                    # auto (the base's dtype) | F16 | BF16 | F32
    pad_token: str = "[PAD]"                    # added when the tokenizer has none
    seed: int = 0
    save_every: int = 0                         # checkpoint every N optimizer steps (0: stage ends only)
    keep_checkpoints: int = 2
    resume: bool = False                        # kept for old scripts: a checkpoint of the same run is always resumed
    trust_pickled_checkpoint: bool = False      # load a torch.distributed.checkpoint (pickled) checkpoint: only your own
    stop_after_steps: int | None = None         # checkpoint and stop after N steps of this invocation (time limits)
    eval_data: list[str] = field(default_factory=list)  # held-out Orca files: eval before, every N, at stage ends
    eval_every: int = 0                         # also evaluate every N optimizer steps (0: stage ends only)
    log_every: int = 1
    quiet: bool = False
    make_diff_against: str | None = None       # run `orca-diff make` against this base at the end
    diff_out: str | None = None                 # default OUT/diff

    def __post_init__(self) -> None:
        self.stages = [s if isinstance(s, Stage) else Stage(**s) for s in self.stages]
        self.betas = tuple(self.betas)  # type: ignore[assignment]
        if isinstance(self.eval_data, (str, os.PathLike)):
            self.eval_data = [str(self.eval_data)]
        self.eval_data = [resolve_local(p) for p in self.eval_data]
        self.model = _resolve_if_local(self.model)  # type: ignore[assignment]
        self.tokenizer = _resolve_if_local(self.tokenizer)
        self.out = resolve_local(self.out)
        for name in ("make_diff_against", "diff_out"):
            if getattr(self, name) is not None:
                setattr(self, name, resolve_local(getattr(self, name)))
        if not self.stages:
            raise UsageError("no training stages: give --data FILE (repeatable) or a config file with stages:")
        for name in ("max_seq_len", "micro_batch_size", "grad_accum", "log_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise UsageError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.threads is not None and self.threads < 1:
            raise UsageError(f"threads must be >= 1, got {self.threads}")
        if self.eval_every < 0:
            raise UsageError(f"eval_every must be >= 0, got {self.eval_every}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise UsageError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.save_dtype not in ("auto", *SAFETENSORS_TO_TORCH):
            raise UsageError(f"save_dtype must be auto, F16, BF16 or F32, got {self.save_dtype!r}")
        if self.template not in TEMPLATES:
            raise UsageError(f"template must be one of {', '.join(TEMPLATES)}, got {self.template!r}")
        if self.system_messages not in SYSTEM_MESSAGE_MODES:
            raise UsageError(f"system_messages must be one of {', '.join(SYSTEM_MESSAGE_MODES)},"
                             f" got {self.system_messages!r}")

    def fingerprint_fields(self) -> dict[str, Any]:
        """The values a checkpoint depends on: resuming with other values would not continue the same run."""
        skip = {"out", "resume", "trust_pickled_checkpoint", "save_every", "keep_checkpoints", "stop_after_steps", "log_every", "quiet",
                "make_diff_against", "diff_out", "device", "threads", "eval_data", "eval_every"}
        return {k: v for k, v in asdict(self).items() if k not in skip}


def load_config(path: str | Path, **overrides: Any) -> TrainConfig:
    """Read a YAML or JSON config file; ``overrides`` (not None) win over the file's values.

    Data and eval paths in the file are relative to the file; paths given as overrides (flags)
    are relative to the current directory.
    """
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"config file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() in (".yaml", ".yml"):
        yaml = require_extra("yaml", "train", f"Reading the YAML config {path}")
        raw = yaml.safe_load(text)
    else:
        raw = json.loads(text)
    if not isinstance(raw, dict):
        raise UsageError(f"{path}: the config must be a mapping of settings, found {type(raw).__name__}")
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise UsageError(f"{path}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    base_dir = path.parent

    def near_file(p: str) -> str:
        return str(p if Path(p).is_absolute() else (base_dir / p))

    stages = []
    for i, s in enumerate(raw.get("stages") or []):
        if not isinstance(s, dict) or "data" not in s:
            raise UsageError(f"{path}: stage {i + 1} must be a mapping with at least data:")
        s = dict(s)
        data = s["data"] if isinstance(s["data"], list) else [s["data"]]
        s["data"] = [near_file(p) for p in data]
        stages.append(Stage(**s))
    raw["stages"] = stages
    if raw.get("eval_data"):
        ev = raw["eval_data"] if isinstance(raw["eval_data"], list) else [raw["eval_data"]]
        raw["eval_data"] = [near_file(p) for p in ev]
    raw.update({k: v for k, v in overrides.items() if v is not None})
    raw.setdefault("model", None)
    raw.setdefault("out", None)
    if not raw["model"] or not raw["out"]:
        raise UsageError(f"{path}: model and out must be set (in the file or with --model/--out)")
    return TrainConfig(**raw)
