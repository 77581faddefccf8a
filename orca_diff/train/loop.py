"""Orca-style progressive explanation tuning: the training entrypoint, readable in one sitting.

Orca (arXiv 2306.02707) fine-tunes LLaMA-13B on (system message, user query, teacher response)
triplets, with the loss on the response tokens only, examples packed into 2,048-token rows, a
``[PAD]`` token added to the tokenizer (vocabulary 32,001), and *progressive learning*: first the
~5M ChatGPT responses, then the ~1M GPT-4 responses. Here that is:

* a :class:`TrainConfig` of plain values, with an ordered list of :class:`Stage` s (data files,
  epochs or steps, learning rate), loadable from YAML/JSON (:func:`load_config`);
* :func:`train`, which loads the base with transformers, adds the pad token and resizes the
  embeddings if the tokenizer has none, and runs AdamW with linear warmup + cosine decay per stage,
  gradient accumulation, bf16 autocast on GPU, optional gradient checkpointing, periodic
  checkpoints (torch.distributed.checkpoint) that ``resume=True`` continues from exactly, and
  writes an HF folder of safetensors (``OUT/model``) that ``orca-diff make`` consumes.

Scale comes from PyTorch, not from this file: under ``torchrun --nproc_per_node N`` every decoder
layer is sharded with FSDP2 (``torch.distributed.fsdp.fully_shard``); run plainly it is one
process on one GPU or on the CPU. See docs/training.md for the multi-GPU command.

The data side (template, loss mask, packing without cross-example attention) is in
:mod:`orca_diff.orca_data`. torch and transformers are imported inside functions (the ``train``
extra), so importing this module costs nothing.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import numpy as np

from . import orca_data
from .errors import InputNotFoundError, MissingExtraError, OutputError, UsageError, require_extra

MODEL_DIRNAME = "model"          # OUT/model: the final HF folder
CHECKPOINTS_DIRNAME = "checkpoints"
LOG_NAME = "train_log.jsonl"
STATE_NAME = "state.json"        # inside a checkpoint: where to continue, and the config it belongs to

SAFETENSORS_TO_TORCH = {"F16": "float16", "BF16": "bfloat16", "F32": "float32"}


# ---------------------------------------------------------------------------------------------
# Configuration: plain values
# ---------------------------------------------------------------------------------------------

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
        self.data = [str(d) for d in self.data]
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
    max_seq_len: int = 2048                     # Orca: 2,048
    packing: bool = True                        # Orca: packing (~2.7 examples per row)
    micro_batch_size: int = 1                   # rows per forward pass per process
    grad_accum: int = 1                         # micro-batches per optimizer step per process
    weight_decay: float = 0.0                   # decoupled, on matrices only (not norms)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    grad_clip: float = 1.0                      # max global grad norm; 0 disables
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0                   # cosine ends at lr * min_lr_ratio
    gradient_checkpointing: bool = False
    bf16: bool | None = None                    # None: bf16 autocast iff on CUDA
    attn_implementation: str | None = None      # None: transformers' default (sdpa)
    device: str = "auto"                        # auto | cpu | cuda
    save_dtype: str = "auto"                    # auto (the base's dtype) | F16 | BF16 | F32
    pad_token: str = "[PAD]"                    # added when the tokenizer has none
    seed: int = 0
    save_every: int = 0                         # checkpoint every N optimizer steps (0: stage ends only)
    keep_checkpoints: int = 2
    resume: bool = False
    stop_after_steps: int | None = None         # checkpoint and stop after N steps of this invocation (time limits)
    log_every: int = 1
    quiet: bool = False
    make_diff_against: str | None = None       # run `orca-diff make` against this base at the end
    diff_out: str | None = None                 # default OUT/diff

    def __post_init__(self) -> None:
        self.stages = [s if isinstance(s, Stage) else Stage(**s) for s in self.stages]
        self.betas = tuple(self.betas)  # type: ignore[assignment]
        if not self.stages:
            raise UsageError("no training stages: give --data FILE (repeatable) or a config file with stages:")
        for name in ("max_seq_len", "micro_batch_size", "grad_accum", "log_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise UsageError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.save_dtype not in ("auto", *SAFETENSORS_TO_TORCH):
            raise UsageError(f"save_dtype must be auto, F16, BF16 or F32, got {self.save_dtype!r}")

    def fingerprint_fields(self) -> dict[str, Any]:
        """The values a checkpoint depends on: resuming with other values would not continue the same run."""
        skip = {"out", "resume", "save_every", "keep_checkpoints", "stop_after_steps", "log_every", "quiet",
                "make_diff_against", "diff_out", "device"}
        return {k: v for k, v in asdict(self).items() if k not in skip}


def load_config(path: str | Path, **overrides: Any) -> TrainConfig:
    """Read a YAML or JSON config file; ``overrides`` (not None) win over the file's values."""
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
    stages = []
    for i, s in enumerate(raw.get("stages") or []):
        if not isinstance(s, dict) or "data" not in s:
            raise UsageError(f"{path}: stage {i + 1} must be a mapping with at least data:")
        s = dict(s)
        data = s["data"] if isinstance(s["data"], list) else [s["data"]]
        s["data"] = [str(p if Path(p).is_absolute() else (base_dir / p)) for p in data]  # relative to the file
        stages.append(Stage(**s))
    raw["stages"] = stages
    raw.update({k: v for k, v in overrides.items() if v is not None})
    raw.setdefault("model", None)
    raw.setdefault("out", None)
    if not raw["model"] or not raw["out"]:
        raise UsageError(f"{path}: model and out must be set (in the file or with --model/--out)")
    return TrainConfig(**raw)


# ---------------------------------------------------------------------------------------------
# Small pieces of the loop
# ---------------------------------------------------------------------------------------------

def lr_at(step: int, total_steps: int, peak_lr: float, warmup_steps: int, min_lr_ratio: float) -> float:
    """Linear warmup to ``peak_lr``, then cosine decay to ``peak_lr * min_lr_ratio`` at the last step."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    decay_steps = max(total_steps - warmup_steps - 1, 1)
    progress = min((step - warmup_steps) / decay_steps, 1.0)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return peak_lr * (min_lr_ratio + (1.0 - min_lr_ratio) * cosine)


@dataclass
class Runtime:
    """Where this process runs: rank/world from torchrun's environment, the device, precision."""

    rank: int
    world: int
    device: Any
    autocast_bf16: bool

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_runtime(cfg: TrainConfig) -> Runtime:
    torch = require_extra("torch", "train", "orca-diff train")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    use_cuda = torch.cuda.is_available() if cfg.device == "auto" else cfg.device.startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but torch sees no CUDA GPU; use --device cpu")
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if use_cuda else "gloo")
    bf16 = use_cuda if cfg.bf16 is None else (cfg.bf16 and use_cuda)
    return Runtime(rank, world, device, bf16)


def _all_reduce_sum(torch: Any, rt: Runtime, values: list[float]) -> list[float]:
    """Sum numbers over all ranks (identity in a single process)."""
    if rt.world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=rt.device)
    torch.distributed.all_reduce(t)
    return t.tolist()


def _from_pretrained_dtype_kwarg(transformers: Any) -> str:
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


def _base_save_dtype(cfg: TrainConfig, model_config: Any) -> str:
    """``auto``: the dtype the base's embedding is stored in, so the diff compares like with like."""
    if cfg.save_dtype != "auto":
        return cfg.save_dtype
    if Path(cfg.model).is_dir():
        from .tensors import open_model

        reader = open_model(cfg.model)
        try:
            infos = reader.tensors
            info = infos.get("model.embed_tokens.weight") or next(iter(infos.values()))
            if info.dtype in SAFETENSORS_TO_TORCH:
                return info.dtype
        finally:
            reader.close()
    name = str(getattr(model_config, "torch_dtype", None) or "float32").replace("torch.", "")
    return {v: k for k, v in SAFETENSORS_TO_TORCH.items()}.get(name, "F32")


def load_tokenizer_and_model(cfg: TrainConfig, rt: Runtime) -> tuple[Any, Any, bool, str]:
    """Tokenizer + fp32 model; add the pad token and resize when missing. Returns (tok, model, added, save_dtype)."""
    torch = require_extra("torch", "train", "orca-diff train")
    transformers = require_extra("transformers", "train", "orca-diff train")
    if cfg.packing:
        try:
            from transformers.masking_utils import find_packed_sequence_indices  # noqa: F401
        except ImportError:
            raise MissingExtraError(
                f"packing without cross-example attention needs transformers>=4.53 (found {transformers.__version__});"
                " upgrade transformers or pass --no-packing"
            ) from None
    if Path(cfg.model).exists() is False and os.sep in cfg.model:
        raise InputNotFoundError(f"base model {cfg.model} does not exist (expected an HF folder with config.json)")
    tokenizer = transformers.AutoTokenizer.from_pretrained(cfg.tokenizer or cfg.model)
    added = False
    if tokenizer.pad_token is None:
        # Orca adds "[[PAD]]" to LLaMA's 32,000 tokens -> 32,001; the new embedding rows are the
        # mean of the others (transformers' mean_resizing), which is what most replications do.
        tokenizer.add_special_tokens({"pad_token": cfg.pad_token})
        added = True
    kwargs: dict[str, Any] = {_from_pretrained_dtype_kwarg(transformers): torch.float32}  # fp32 master weights
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    model = transformers.AutoModelForCausalLM.from_pretrained(cfg.model, **kwargs)
    save_dtype = _base_save_dtype(cfg, model.config)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    return tokenizer, model, added, save_dtype


def prepare_model(model: Any, cfg: TrainConfig, rt: Runtime) -> Any:
    """Gradient checkpointing, then FSDP2 sharding under torchrun or a plain move to the device."""
    torch = require_extra("torch", "train", "orca-diff train")
    model.config.use_cache = False
    if cfg.gradient_checkpointing:  # renamed in transformers 5; the old name still works but warns
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if rt.world == 1:
        return model.to(rt.device)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(rt.device.type, (rt.world,))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if rt.autocast_bf16 \
        else MixedPrecisionPolicy()
    block_names = set(getattr(model, "_no_split_modules", None) or [])  # e.g. LlamaDecoderLayer
    for module in model.modules():
        if type(module).__name__ in block_names:
            fully_shard(module, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def make_optimizer(model: Any, cfg: TrainConfig, lr: float) -> Any:
    """AdamW; weight decay on matrices only (norm weights are not decayed), as nanoGPT does."""
    torch = require_extra("torch", "train", "orca-diff train")
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=cfg.betas, eps=cfg.eps)


# ---------------------------------------------------------------------------------------------
# Data plan: which packed rows each rank sees at each step
# ---------------------------------------------------------------------------------------------

@dataclass
class StagePlan:
    """The packed rows of a stage and the deterministic order in which steps consume them.

    Rows are permuted per epoch from (seed, stage, epoch), so a resumed run sees exactly the rows
    the uninterrupted run would have. One optimizer step takes ``micro_batch_size * grad_accum *
    world`` rows; the last step of an epoch wraps around to the start of the permutation so that
    every rank always runs the same number of forward passes (FSDP needs that).
    """

    examples: list[orca_data.Example]
    rows: list[list[int]]
    rows_per_step: int
    total_steps: int
    seed: int
    stage_index: int

    @property
    def steps_per_epoch(self) -> int:
        return max(1, math.ceil(len(self.rows) / self.rows_per_step))

    def rows_for(self, step: int, rank: int, world: int, micro_batch_size: int) -> list[list[list[int]]]:
        """This rank's micro-batches (each a list of rows) for optimizer step ``step``."""
        epoch, within = divmod(step, self.steps_per_epoch)
        order = np.random.default_rng([self.seed, self.stage_index, epoch]).permutation(len(self.rows))
        picked = [int(order[(within * self.rows_per_step + k) % len(order)]) for k in range(self.rows_per_step)]
        micro = []
        for a in range(self.rows_per_step // (micro_batch_size * world)):
            start = (a * world + rank) * micro_batch_size
            micro.append([self.rows[i] for i in picked[start:start + micro_batch_size]])
        return micro


def build_stage_plan(stage: Stage, stage_index: int, tokenizer: Any, cfg: TrainConfig, rt: Runtime) -> StagePlan:
    rows: list[dict[str, str]] = []
    for path in stage.data:
        rows.extend(orca_data.read_orca_rows(path))
    examples, dropped = orca_data.encode_examples(rows, tokenizer, cfg.max_seq_len)
    if not examples:
        raise UsageError(f"stage {stage.name or stage_index + 1}: no usable example in {', '.join(stage.data)}"
                         f" ({dropped} dropped: prompt alone fills max_seq_len={cfg.max_seq_len})")
    # Orca: shuffle the examples, then partition them into rows that fit max_len.
    order = np.random.default_rng([cfg.seed, stage_index]).permutation(len(examples))
    examples = [examples[i] for i in order]
    if cfg.packing:
        packed = orca_data.pack_greedy([len(e) for e in examples], cfg.max_seq_len)
    else:
        packed = orca_data.one_per_row(len(examples))
    rows_per_step = cfg.micro_batch_size * cfg.grad_accum * rt.world
    plan = StagePlan(examples, packed, rows_per_step, 0, cfg.seed, stage_index)
    plan.total_steps = stage.max_steps or max(1, math.ceil(stage.epochs * plan.steps_per_epoch))
    if rt.main and not cfg.quiet:
        print(f"stage {stage_index + 1} ({stage.name or Path(stage.data[0]).name}): {len(examples)} examples"
              f" ({dropped} dropped) in {len(packed)} rows, {plan.total_steps} steps of {rows_per_step} rows,"
              f" lr {stage.lr:g}", flush=True)
    return plan


# ---------------------------------------------------------------------------------------------
# Checkpoints (torch.distributed.checkpoint: sharded under FSDP, one file in a single process)
# ---------------------------------------------------------------------------------------------

def _fingerprint(cfg: TrainConfig, world: int) -> dict[str, Any]:
    values = {**cfg.fingerprint_fields(), "world": world}
    return json.loads(json.dumps(values, default=str))


def latest_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint (one with state.json, written last) under OUT/checkpoints."""
    root = out / CHECKPOINTS_DIRNAME
    done = sorted(p for p in root.glob("step-*") if (p / STATE_NAME).is_file()) if root.is_dir() else []
    return done[-1] if done else None


def save_checkpoint(out: Path, model: Any, optimizer: Any, state: dict[str, Any], cfg: TrainConfig,
                    rt: Runtime) -> Path:
    """Write OUT/checkpoints/step-N (model + optimizer + where to continue); keep the newest few."""
    torch = require_extra("torch", "train", "orca-diff train")
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    final = out / CHECKPOINTS_DIRNAME / f"step-{state['global_step']:08d}"
    tmp = final.with_name(final.name + ".tmp")
    if rt.main:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(final, ignore_errors=True)
        tmp.mkdir(parents=True)
    if rt.world > 1:
        torch.distributed.barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
        warnings.filterwarnings("ignore", message=".*single process.*")
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    if rt.world > 1:
        torch.distributed.barrier()
    if rt.main:
        (tmp / STATE_NAME).write_text(json.dumps({**state, "config": _fingerprint(cfg, rt.world)}, indent=1))
        os.replace(tmp, final)
        older = sorted(p for p in final.parent.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp"))
        for stale in older[:-cfg.keep_checkpoints]:
            shutil.rmtree(stale, ignore_errors=True)
    if rt.world > 1:
        torch.distributed.barrier()
    return final


def load_checkpoint(path: Path, model: Any, optimizer: Any | None) -> None:
    """Load model (and optimizer, when given) state saved by :func:`save_checkpoint`, in place."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_state_dict,
                                                         set_model_state_dict, set_state_dict)

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*single process.*")
        if optimizer is None:
            state = {"model": get_model_state_dict(model)}
            dcp.load(state, checkpoint_id=str(path))
        else:
            model_sd, optim_sd = get_state_dict(model, optimizer)
            state = {"model": model_sd, "optim": optim_sd}
            dcp.load(state, checkpoint_id=str(path))
    if optimizer is None:
        set_model_state_dict(model, state["model"])
    else:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def read_resume_state(out: Path, cfg: TrainConfig, rt: Runtime) -> tuple[Path, dict[str, Any]] | None:
    ckpt = latest_checkpoint(out)
    if ckpt is None:
        return None
    state = json.loads((ckpt / STATE_NAME).read_text())
    saved, now = state.pop("config"), _fingerprint(cfg, rt.world)
    changed = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    if changed:
        raise UsageError(f"{ckpt} was written by a run with different {', '.join(changed)}; resume with the same"
                         f" settings (and number of processes) or start a new --out")
    return ckpt, state


# ---------------------------------------------------------------------------------------------
# Saving the result
# ---------------------------------------------------------------------------------------------

def save_hf_model(model: Any, tokenizer: Any, folder: Path, save_dtype: str, use_cache: bool, rt: Runtime) -> None:
    """Write an HF folder of safetensors (cast to ``save_dtype``) + tokenizer, via a temporary name."""
    torch = require_extra("torch", "train", "orca-diff train")
    if rt.world > 1:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        # Gathers the full weights to rank 0's CPU memory (13B fp32: 52 GB), one tensor at a time.
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        full = model.state_dict()
    if not rt.main:
        return
    dtype = getattr(torch, SAFETENSORS_TO_TORCH[save_dtype])
    state_dict = {k: v.detach().to("cpu", dtype) for k, v in full.items()}
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.config.use_cache = use_cache
    model.save_pretrained(tmp, state_dict=state_dict)  # safetensors: the default since transformers 4.35
    tokenizer.save_pretrained(tmp)
    # save_pretrained records the dtype of the fp32 master weights; record the dtype actually written.
    config_path = tmp / "config.json"
    config = json.loads(config_path.read_text())
    config["dtype" if "dtype" in config else "torch_dtype"] = SAFETENSORS_TO_TORCH[save_dtype]
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if not list(tmp.glob("*.safetensors")) or list(tmp.glob("*.bin")):
        raise OutputError(f"{tmp}: transformers did not write safetensors shards; upgrade transformers (>=4.35)")
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------

def train(cfg: TrainConfig, on_step: Callable[[dict[str, Any]], None] | None = None) -> Path:
    """Run all stages; return OUT/model (or the checkpoint folder when ``stop_after_steps`` stopped it).

    ``on_step`` receives every logged record (also appended to OUT/train_log.jsonl).
    """
    torch = require_extra("torch", "train", "orca-diff train")
    transformers = require_extra("transformers", "train", "orca-diff train")
    from tqdm.auto import tqdm

    rt = setup_runtime(cfg)
    out = Path(cfg.out)
    model_dir = out / MODEL_DIRNAME
    resume = read_resume_state(out, cfg, rt) if cfg.resume else None
    if not cfg.resume and (model_dir.exists() or latest_checkpoint(out) is not None):
        raise OutputError(f"{out} already holds a training run; pass --resume to continue it or choose a new --out")
    if cfg.quiet or not rt.main:
        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
    out.mkdir(parents=True, exist_ok=True)
    if rt.main:
        (out / "train_config.json").write_text(json.dumps(asdict(cfg), indent=1, default=str))

    torch.manual_seed(cfg.seed)
    tokenizer, model, added_pad, save_dtype = load_tokenizer_and_model(cfg, rt)
    use_cache = bool(getattr(model.config, "use_cache", True))
    if rt.main and not cfg.quiet:
        note = f"added pad token {cfg.pad_token!r} -> vocabulary {len(tokenizer)}" if added_pad else "pad token present"
        print(f"model {cfg.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, {note};"
              f" device {rt.device} x{rt.world}, bf16 autocast {'on' if rt.autocast_bf16 else 'off'}, saving {save_dtype}",
              flush=True)
    model = prepare_model(model, cfg, rt)
    model.train()
    log_file = open(out / LOG_NAME, "a", encoding="utf-8") if rt.main else None

    # flash-attention sees example boundaries in position_ids only in a batch of one row.
    flatten = "flash" in str(getattr(model.config, "_attn_implementation", "") or "")
    global_step = resume[1]["global_step"] if resume else 0
    steps_this_run = 0
    first_stage = resume[1]["next_stage"] if resume else 0
    try:
        for stage_index in range(first_stage, len(cfg.stages)):
            stage = cfg.stages[stage_index]
            plan = build_stage_plan(stage, stage_index, tokenizer, cfg, rt)
            optimizer = make_optimizer(model, cfg, stage.lr)  # each stage is a fresh fine-tuning run
            start = 0
            if resume and stage_index == first_stage:
                start = resume[1]["next_step"]
                load_checkpoint(resume[0], model, optimizer if start > 0 else None)
            warmup = min(stage.warmup_steps if stage.warmup_steps is not None else cfg.warmup_steps, plan.total_steps)
            bar = tqdm(total=plan.total_steps, initial=start, desc=f"stage {stage_index + 1}",
                       disable=True if (cfg.quiet or not rt.main) else None)
            window_tokens, window_start = 0.0, time.perf_counter()
            for step in range(start, plan.total_steps):
                lr = lr_at(step, plan.total_steps, stage.lr, warmup, cfg.min_lr_ratio)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                batches = [orca_data.collate(plan.examples, rows, tokenizer.pad_token_id, flatten=flatten)
                           for rows in plan.rows_for(step, rt.rank, rt.world, cfg.micro_batch_size)]
                # Normalise by the response tokens of the whole step (all micro-batches, all ranks):
                # the gradient is then the mean over tokens, however the rows were split.
                step_targets, step_tokens = _all_reduce_sum(
                    torch, rt, [sum(b["n_targets"] for b in batches), sum(b["n_tokens"] for b in batches)])
                loss_sum = 0.0
                for batch in batches:
                    with torch.autocast(rt.device.type, dtype=torch.bfloat16, enabled=rt.autocast_bf16):
                        logits = model(input_ids=batch["input_ids"].to(rt.device),
                                       position_ids=batch["position_ids"].to(rt.device), use_cache=False).logits
                    loss = orca_data.response_loss_sum(logits, batch["labels"])
                    # FSDP averages gradients over ranks, so scale by world to get sum / global targets.
                    (loss * rt.world / max(step_targets, 1)).backward()
                    loss_sum += float(loss.detach())
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip) if cfg.grad_clip > 0 else None
                if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP2
                    grad_norm = grad_norm.full_tensor()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                global_step += 1
                steps_this_run += 1
                (loss_total,) = _all_reduce_sum(torch, rt, [loss_sum])
                window_tokens += step_tokens
                bar.update(1)
                if rt.main and (global_step % cfg.log_every == 0 or step == plan.total_steps - 1):
                    elapsed = time.perf_counter() - window_start
                    record = {"stage": stage_index + 1, "step": step + 1, "global_step": global_step,
                              "loss": loss_total / max(step_targets, 1), "lr": lr, "tokens": int(step_tokens),
                              "targets": int(step_targets), "tokens_per_s": window_tokens / max(elapsed, 1e-9),
                              "grad_norm": float(grad_norm) if grad_norm is not None else None}
                    bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}", tok_s=f"{record['tokens_per_s']:.0f}")
                    log_file.write(json.dumps(record) + "\n")
                    log_file.flush()
                    if on_step:
                        on_step(record)
                    window_tokens, window_start = 0.0, time.perf_counter()
                stage_done = step == plan.total_steps - 1
                stop = cfg.stop_after_steps is not None and steps_this_run >= cfg.stop_after_steps
                periodic = cfg.save_every > 0 and global_step % cfg.save_every == 0
                if periodic or stage_done or stop:
                    where = {"next_stage": stage_index + 1, "next_step": 0} if stage_done \
                        else {"next_stage": stage_index, "next_step": step + 1}
                    ckpt = save_checkpoint(out, model, optimizer, {**where, "global_step": global_step}, cfg, rt)
                    if stop and not (stage_done and stage_index == len(cfg.stages) - 1):
                        bar.close()
                        if rt.main and not cfg.quiet:
                            print(f"stopped after global step {global_step}; checkpoint {ckpt}; rerun with --resume",
                                  flush=True)
                        return ckpt
            bar.close()
        if resume and first_stage >= len(cfg.stages):
            load_checkpoint(resume[0], model, None)  # everything was trained already: just (re)write the model
        save_hf_model(model, tokenizer, model_dir, save_dtype, use_cache, rt)
    finally:
        if log_file:
            log_file.close()
    if rt.main and not cfg.quiet:
        print(f"wrote {model_dir}", flush=True)
    if cfg.make_diff_against and rt.main:
        from .make import make_diff

        diff_out = Path(cfg.diff_out) if cfg.diff_out else out / "diff"
        make_diff(cfg.make_diff_against, model_dir, diff_out)
        if not cfg.quiet:
            print(f"wrote the diff against {cfg.make_diff_against} to {diff_out}", flush=True)
    if rt.world > 1:
        torch.distributed.barrier()
    return model_dir


# ---------------------------------------------------------------------------------------------
# Evaluation helper (used by the tests and handy for a quick check of a trained folder)
# ---------------------------------------------------------------------------------------------

def response_loss(model_dir: str | Path, data: list[str], max_seq_len: int = 2048, tokenizer: str | None = None,
                  micro_batch_size: int = 8) -> float:
    """Mean cross-entropy per response token of an HF folder on Orca files (CPU/GPU, no grad)."""
    torch = require_extra("torch", "train", "Evaluating a model")
    transformers = require_extra("transformers", "train", "Evaluating a model")
    tok = transformers.AutoTokenizer.from_pretrained(str(tokenizer or model_dir))
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(model_dir), **{_from_pretrained_dtype_kwarg(transformers): torch.float32})
    model.eval()
    rows = [r for path in data for r in orca_data.read_orca_rows(path)]
    examples, _ = orca_data.encode_examples(rows, tok, max_seq_len)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(examples), micro_batch_size):
            batch = orca_data.collate(examples, [[i] for i in range(start, min(start + micro_batch_size, len(examples)))], pad)
            logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
            total += float(orca_data.response_loss_sum(logits, batch["labels"]))
            count += batch["n_targets"]
    return total / max(count, 1)
