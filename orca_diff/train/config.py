"""The settings of a training run as plain values: :class:`Stage`, :class:`TrainConfig`, :func:`load_config`.

Every local path is resolved to an absolute path when the config is built, so a run started
from one directory and continued from another (or with the same file given by an absolute path)
is recognised as the same run when its checkpoint is compared.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ..errors import InputNotFoundError, UsageError
from .schema import MAX_ROW_BYTES, TEMPLATE_CHOICES, check_settings, parse_config_text

MODEL_DIRNAME = "model"          # OUT/model: the final HF folder
CHECKPOINTS_DIRNAME = "checkpoints"
LOG_NAME = "train_log.jsonl"     # one JSON record per line: kind train | eval | system_messages
METRICS_NAME = "metrics.json"    # eval results, system-message summary, last train loss
PLOT_NAME = "loss.png"           # train/eval loss per stage (needs matplotlib: the `plot` extra)
STATE_NAME = "state.json"        # inside a checkpoint: where to continue, and the config it belongs to

SAFETENSORS_TO_TORCH = {"F16": "float16", "BF16": "bfloat16", "F32": "float32"}
TEMPLATES = TEMPLATE_CHOICES            # orca: ### System/User/Response; chatml; llama2; base: the base's own
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
            self.data = [self.data]  # type: ignore[list-item]
        if isinstance(self.data, (list, tuple)):
            self.data = [str(d) if isinstance(d, os.PathLike) else d for d in self.data]
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        for key, value in check_settings({"stages": [values]}, "settings")["stages"][0].items():
            setattr(self, key, value)
        self.data = [resolve_local(d) for d in self.data]


@dataclass
class TrainConfig:
    """Everything a run depends on. Defaults follow Orca where the paper says, else common practice."""

    model: str                                  # base HF folder (or Hub id already in the cache)
    out: str                                    # OUT/model, OUT/checkpoints, OUT/train_log.jsonl
    stages: list[Stage] = field(default_factory=list)
    tokenizer: str | None = None                # default: the model folder
    template: str = "orca"                      # orca (### System/User/Response) | chatml | llama2 | base (the base's own)
    prompt_erasure: bool = False                # Orca 2: the system message is shown to the teacher, not the student
    data_format: str = "auto"                   # auto | orca | sharegpt | alpaca | messages (see data.py)
    columns: dict[str, str] | None = None       # {question: FILE COLUMN, response: ..., system_prompt: ...}
    empty_responses: str = "drop"               # drop (and count per file) | refuse
    max_row_bytes: int = MAX_ROW_BYTES          # one data row may cost at most this (a JSONL line, a parquet row)
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
    save_stage_models: bool = False             # also write OUT/stage-K-model at the end of every stage but the last
    resume: bool = False                        # kept for old scripts: a checkpoint of the same run is always resumed
    trust_pickled_checkpoint: bool = False      # load a torch.distributed.checkpoint (pickled) checkpoint: only your own
    accept_changed_data: bool = False           # continue although a data file changed since the checkpoint
    force: bool = False                         # start again in OUT, replacing what an earlier run wrote there
    stop_after_steps: int | None = None         # checkpoint and stop after N steps of this invocation (time limits)
    eval_data: list[str] = field(default_factory=list)  # held-out Orca files: eval before, every N, at stage ends
    eval_mc: list[str] = field(default_factory=list)  # multiple-choice files (BBH/AGIEval) or "builtin": scored at the end
    eval_every: int = 0                         # also evaluate every N optimizer steps (0: stage ends only)
    log_every: int = 1
    quiet: bool = False
    make_diff_against: str | None = None       # run `orca-diff make` against this base at the end
    diff_out: str | None = None                 # default OUT/diff

    def __post_init__(self) -> None:
        self.stages = [s if isinstance(s, Stage) else Stage(**s) for s in self.stages]
        if isinstance(self.eval_data, (str, os.PathLike)):
            self.eval_data = [self.eval_data]  # type: ignore[list-item]
        self.eval_data = [str(p) if isinstance(p, os.PathLike) else p for p in self.eval_data]
        for name in ("model", "out", "tokenizer", "make_diff_against", "diff_out"):
            if isinstance(getattr(self, name), os.PathLike):
                setattr(self, name, str(getattr(self, name)))
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("stages", "force")}
        values = {k: v for k, v in values.items() if v is not None or k not in ("model", "out")}
        for key, value in check_settings(values, "settings").items():
            setattr(self, key, value)
        if not self.model or not self.out:
            raise UsageError("model and out must be set (in the config file or with --model/--out)")
        self.eval_data = [resolve_local(p) for p in self.eval_data]
        self.eval_mc = [p if p == "builtin" else resolve_local(p) for p in self.eval_mc]
        self.model = _resolve_if_local(self.model)  # type: ignore[assignment]
        self.tokenizer = _resolve_if_local(self.tokenizer)
        self.out = resolve_local(self.out)
        for name in ("make_diff_against", "diff_out"):
            if getattr(self, name) is not None:
                setattr(self, name, resolve_local(getattr(self, name)))
        if not self.stages:
            raise UsageError("no training stages: give --data FILE (repeatable) or a config file with stages:")

    def fingerprint_fields(self) -> dict[str, Any]:
        """The values a checkpoint depends on: resuming with other values would not continue the same run."""
        skip = {"out", "resume", "save_stage_models", "trust_pickled_checkpoint", "accept_changed_data", "force", "max_row_bytes", "save_every", "keep_checkpoints", "stop_after_steps", "log_every", "quiet",
                "make_diff_against", "diff_out", "device", "threads", "eval_data", "eval_every", "eval_mc"}
        return {k: v for k, v in asdict(self).items() if k not in skip}


def load_config(path: str | Path, **overrides: Any) -> TrainConfig:
    """Read a YAML or JSON config file; ``overrides`` (not None) win over the file's values.

    Every key of the file, at every level, is checked against the schema (:mod:`.schema`) first,
    and every problem is reported at once, each with the file, line and key. Data and eval paths in
    the file are relative to the file; paths given as overrides (flags) are relative to the current
    directory.
    """
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"config file {path} does not exist" if not path.exists()
                                 else f"config file {path} is not a file")
    raw, lines = parse_config_text(path)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UsageError(f"{path}: the config must be a mapping of settings, found {type(raw).__name__}")
    clean = check_settings(raw, str(path), lines)
    base_dir = path.parent

    def near_file(p: str) -> str:
        return str(p if Path(p).is_absolute() else (base_dir / p))

    clean["stages"] = [Stage(**{**s, "data": [near_file(p) for p in s["data"]]}) for s in clean.get("stages") or []]
    if clean.get("eval_data"):
        clean["eval_data"] = [near_file(p) for p in clean["eval_data"]]
    if clean.get("eval_mc"):
        clean["eval_mc"] = [p if p == "builtin" else near_file(p) for p in clean["eval_mc"]]
    clean.update({k: v for k, v in overrides.items() if v is not None})
    clean.setdefault("model", None)
    clean.setdefault("out", None)
    if not clean["model"] or not clean["out"]:
        raise UsageError(f"{path}: model and out must be set (in the file or with --model/--out)")
    return TrainConfig(**clean)
