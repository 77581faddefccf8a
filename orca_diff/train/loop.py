"""Orca-style progressive explanation tuning: the training loop, readable in one sitting.

Orca (arXiv 2306.02707) fine-tunes LLaMA-13B on (system message, user query, teacher response)
triplets, with the loss on the response tokens only, examples packed into 2,048-token rows, a
``[PAD]`` token added to the tokenizer (vocabulary 32,001), and *progressive learning*: first the
~5M ChatGPT responses, then the ~1M GPT-4 responses. Here :func:`train` loads the base with
transformers, adds the pad token and resizes the embeddings if the tokenizer has none, and runs
AdamW with linear warmup + cosine decay per stage, gradient accumulation, bf16 autocast on GPU,
optional gradient checkpointing, held-out evaluation, periodic checkpoints
(torch.distributed.checkpoint) that a rerun of the same command continues from exactly, and
writes an HF folder of safetensors (``OUT/model``) that ``orca-diff make`` consumes.

Scale comes from PyTorch, not from this file: under ``torchrun --nproc_per_node N`` every decoder
layer is sharded with FSDP2 (``torch.distributed.fsdp.fully_shard``); run plainly it is one
process on one GPU or on the CPU. See docs/training.md for the multi-GPU command.

Neighbours: :mod:`.config` (settings), :mod:`.data` (template, mask, packing),
:mod:`.checkpoints`, :mod:`.export` (the saved folder), :mod:`.eval`, :mod:`.plot`,
:mod:`.system_messages`. torch and transformers are imported inside functions (the ``train``
extra), so importing this module costs nothing.
"""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import (FormatError, InputNotFoundError, InterruptedError_, MissingExtraError, OutputError, UsageError,
                      require_extra)
from . import data as orca_data
from . import mcq, outputs, tokcache
from .board import TensorBoard
from .checkpoints import load_checkpoint, read_resume_state, save_checkpoint
from .preflight import check_data, check_folders, data_digests, describe
from .preflight import record as preflight_record
from .config import (LOG_NAME, METRICS_NAME, MODEL_DIRNAME, PLOT_NAME, SAFETENSORS_TO_TORCH, Stage, TrainConfig)
from .eval import eval_micro_batches, evaluate, load_eval_examples
from .readers import read_rows
from .schema import MAX_ROWS_PER_STEP
from .export import save_hf_model
from .plot import plot_available, plot_losses
from .system_messages import assign_system_messages


# ---------------------------------------------------------------------------------------------
# Small pieces of the loop
# ---------------------------------------------------------------------------------------------

def lr_at(step: int, total_steps: int, peak_lr: float, warmup_steps: int, min_lr_ratio: float) -> float:
    """Linear warmup to ``peak_lr``, then cosine decay towards ``peak_lr * min_lr_ratio``.

    The floor is reached one step *after* the last step (``step == total_steps``), so every step
    that runs has a positive rate even with ``min_lr_ratio = 0``: with 2 steps and no warmup the
    rates are ``peak`` and ``peak / 2``; the last step of a long stage trains at a small but
    non-zero rate rather than at exactly the floor.
    """
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    decay_steps = max(total_steps - warmup_steps, 1)
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
    if cfg.threads:
        torch.set_num_threads(cfg.threads)  # CPU intra-op threads (a shared machine, or one process per core)
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


def from_pretrained_dtype_kwarg(transformers: Any) -> str:
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


def _base_save_dtype(cfg: TrainConfig, model_config: Any) -> str:
    """``auto``: the dtype the base's embedding is stored in, so the diff compares like with like."""
    if cfg.save_dtype != "auto":
        return cfg.save_dtype
    if Path(cfg.model).is_dir():
        from ..containers import open_model

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
    tokenizer = load_pretrained_tokenizer(transformers, cfg.tokenizer or cfg.model)
    added = False
    if tokenizer.pad_token is None:
        # Orca adds "[[PAD]]" to LLaMA's 32,000 tokens -> 32,001; the new embedding rows are the
        # mean of the others (transformers' mean_resizing), which is what most replications do.
        tokenizer.add_special_tokens({"pad_token": cfg.pad_token})
        added = True
    if cfg.template == "chatml":  # Orca 2: <|im_start|> and <|im_end|> are single tokens (32,001 -> 32,003)
        missing = [t for t in orca_data.END_OF_TURN_TOKENS["chatml"] + ("<|im_start|>",)
                   if tokenizer.convert_tokens_to_ids(t) in (None, tokenizer.unk_token_id)]
        if missing:
            tokenizer.add_special_tokens({"additional_special_tokens": missing})
    kwargs: dict[str, Any] = {from_pretrained_dtype_kwarg(transformers): torch.float32}  # fp32 master weights
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    model = load_pretrained_model(transformers, cfg.model, kwargs)
    save_dtype = _base_save_dtype(cfg, model.config)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    return tokenizer, model, added, save_dtype


def _first_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__


def load_pretrained_tokenizer(transformers: Any, source: str) -> Any:
    """AutoTokenizer, or one line saying why this folder's tokenizer cannot be loaded."""
    try:
        return transformers.AutoTokenizer.from_pretrained(source)
    except (KeyboardInterrupt, MemoryError):
        raise
    except Exception as exc:
        raise FormatError(f"cannot load a tokenizer from {source} ({_first_line(exc)}); give --tokenizer DIR, a folder"
                          f" with a tokenizer transformers can load (tokenizer.json, or tokenizer.model with"
                          f" sentencepiece installed)") from None


def load_pretrained_model(transformers: Any, source: str, kwargs: dict[str, Any]) -> Any:
    """AutoModelForCausalLM, or one line saying why this folder's weights cannot be loaded."""
    try:
        return transformers.AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except (KeyboardInterrupt, MemoryError):
        raise
    except ImportError as exc:  # e.g. flash_attention_2 without flash-attn
        raise MissingExtraError(f"loading {source}: {_first_line(exc)}") from None
    except Exception as exc:
        raise FormatError(f"cannot load the model {source} ({_first_line(exc)}); expected an HF folder of a"
                          f" causal language model (config.json + safetensors)") from None


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


def build_stage_plan(stage: Stage, stage_index: int, tokenizer: Any, cfg: TrainConfig,
                     rt: Runtime, digests: dict[str, str] | None = None) -> tuple[StagePlan, dict[str, Any] | None]:
    """The stage's packed rows and step count, and the system-message summary (``--system-messages orca``).

    With ``digests`` (the data files' sha256) the tokenized examples come from OUT/cache when an
    earlier start (or another rank) made them (:mod:`.tokcache`).
    """
    torch = require_extra("torch", "train", "orca-diff train")

    def build() -> tuple[list[orca_data.Example], int, Any]:
        rows: list[dict[str, Any]] = []
        for path in stage.data:
            rows.extend(read_rows(path, cfg.data_format, cfg.columns, cfg.empty_responses, cfg.max_row_bytes)[0])
        summary_ = None
        if cfg.system_messages == "orca":
            rows, summary_ = assign_system_messages(rows, cfg.seed, stage_index)
        encoded, dropped_ = orca_data.encode_examples(rows, tokenizer, cfg.max_seq_len, template=cfg.template,
                                                      prompt_erasure=cfg.prompt_erasure)
        return encoded, dropped_, summary_

    if digests is not None and all(p in digests for p in stage.data):
        parts = {"files": [[p, digests[p]] for p in stage.data], "tokenizer": tokcache.tokenizer_fingerprint(tokenizer),
                 "template": cfg.template, "max_seq_len": cfg.max_seq_len, "prompt_erasure": cfg.prompt_erasure,
                 "data_format": cfg.data_format, "columns": cfg.columns, "empty_responses": cfg.empty_responses,
                 "system_messages": cfg.system_messages,
                 "sampling": [cfg.seed, stage_index] if cfg.system_messages == "orca" else None}
        barrier = (lambda: torch.distributed.barrier()) if rt.world > 1 else (lambda: None)
        examples, dropped, summary, from_cache = tokcache.cached_examples(Path(cfg.out), parts, build, rt.main, barrier)
    else:
        (examples, dropped, summary), from_cache = build(), False
    if not examples:
        raise UsageError(f"stage {stage.name or stage_index + 1}: no usable example in {', '.join(stage.data)}"
                         f" ({dropped} dropped: prompt alone fills max_seq_len={cfg.max_seq_len})")
    if from_cache and rt.main and not cfg.quiet:
        print(f"{time.strftime('%H:%M:%S')} stage {stage_index + 1}: tokens read from {Path(cfg.out) / tokcache.CACHE_DIRNAME}"
              f" (tokenized on an earlier start)", flush=True)
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
        print(f"{time.strftime('%H:%M:%S')} stage {stage_index + 1} ({stage.name or Path(stage.data[0]).name}): {len(examples)} examples"
              f" ({dropped} dropped) in {len(packed)} rows, {plan.total_steps} steps of {rows_per_step} rows,"
              f" lr {stage.lr:g}", flush=True)
        if summary:
            print(f"  system messages (seed {cfg.seed}): {summary['assigned']} rows given one of Orca's"
                  f" {summary['per_sub_collection']}, {summary['kept_own']} kept their own,"
                  f" {summary['unknown_sub_collection']} without a known sub-collection left as they are", flush=True)
    return plan, summary


# ---------------------------------------------------------------------------------------------
# The run folder's log, metrics and Ctrl-C
# ---------------------------------------------------------------------------------------------

def read_log(out: Path) -> list[dict[str, Any]]:
    """The records of OUT/train_log.jsonl (kind train, eval or system_messages)."""
    path = out / LOG_NAME
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _open_log(out: Path, upto_step: int | None) -> Any:
    """Open the log for appending. A fresh run (``upto_step`` None) starts it empty; a resumed one
    drops what was logged after its checkpoint, so every step appears exactly once."""
    path = out / LOG_NAME
    kept = [] if upto_step is None else [r for r in read_log(out) if r.get("global_step", 0) <= upto_step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
    os.replace(tmp, path)
    return open(path, "a", encoding="utf-8")


def write_metrics(out: Path, cfg: TrainConfig, model_dir: Path | None = None) -> dict[str, Any]:
    """OUT/metrics.json from the log: every eval, the system-message summaries, throughput."""
    records = read_log(out)
    train_records = [r for r in records if r.get("kind", "train") == "train"]
    evals = [{k: r[k] for k in ("stage", "global_step", "when", "loss", "ppl", "targets") if k in r}
             for r in records if r.get("kind") == "eval"]
    metrics: dict[str, Any] = {
        "eval_data": cfg.eval_data, "template": cfg.template, "seed": cfg.seed,
        "eval": evals,
        "eval_loss_before": evals[0]["loss"] if evals and evals[0]["global_step"] == 0 else None,
        "eval_loss_last": evals[-1]["loss"] if evals else None,
        "train_steps": len(train_records),
        "train_loss_last": train_records[-1]["loss"] if train_records else None,
        "tokens_per_s_mean": (float(np.mean([r["tokens_per_s"] for r in train_records])) if train_records else None),
        "system_messages": [{k: v for k, v in r.items() if k != "kind"} for r in records
                            if r.get("kind") == "system_messages"],
        "model": str(model_dir) if model_dir else None,
    }
    saved = [r for r in records if r.get("kind") == "eval_saved"]
    if saved:
        masters = [e for e in evals if e["global_step"] == saved[-1]["global_step"]]
        metrics["eval_loss_saved_model"] = saved[-1]["loss"]
        metrics["eval_loss_master_weights"] = masters[-1]["loss"] if masters else None
        metrics["saved_model_eval"] = {k: saved[-1][k] for k in ("when", "loss", "ppl", "targets") if k in saved[-1]}
        if masters and metrics["eval_loss_before"] is not None:
            gained = metrics["eval_loss_before"] - masters[-1]["loss"]
            lost = saved[-1]["loss"] - masters[-1]["loss"]
            metrics["rounding_cost_share_of_improvement"] = lost / gained if gained > 0 else None
    mc_records = [r for r in records if r.get("kind") == "eval_mc"]
    if mc_records:
        metrics["eval_mc"] = {k: mc_records[-1][k] for k in ("when", "tasks", "mean_accuracy") if k in mc_records[-1]}
    sets = [{k: r[k] for k in ("set", "stage", "global_step", "when", "loss", "ppl", "targets") if k in r}
            for r in records if r.get("kind") in ("eval_set", "eval_saved_set")]
    if sets:
        metrics["eval_sets"] = sets
    path = out / METRICS_NAME
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(metrics, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return metrics


def round_weights_to(model: Any, dtype: Any) -> None:
    """Round every parameter to ``dtype`` and back, in place (each rank its own shard under FSDP2)."""
    torch = require_extra("torch", "train", "orca-diff train")
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(param.to(dtype).to(param.dtype))


def eval_set_name(path: str, all_paths: list[str]) -> str:
    """A short name for an eval file: its stem, or its file name when stems repeat."""
    stem = Path(path).stem
    return stem if sum(Path(p).stem == stem for p in all_paths) == 1 else str(Path(path).name)


class _CtrlC:
    """First Ctrl-C: finish the current optimizer step, write a checkpoint and stop (exit 130).
    A second Ctrl-C stops at once (the last checkpoint is then where a rerun continues)."""

    def __init__(self) -> None:
        self.requested = False
        self.enabled = threading.current_thread() is threading.main_thread()  # signal handlers live there
        self._previous: Any = None

    def __enter__(self) -> "_CtrlC":
        if self.enabled:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nCtrl-C: finishing this step and writing a checkpoint (Ctrl-C again to stop at once)", flush=True)

    def __exit__(self, *exc: Any) -> None:
        if self.enabled:
            signal.signal(signal.SIGINT, self._previous)


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------

def train(cfg: TrainConfig, on_step: Callable[[dict[str, Any]], None] | None = None) -> Path:
    """Run all stages; return OUT/model (or the checkpoint folder when ``stop_after_steps`` stopped it).

    Rerunning the same settings on the same OUT continues from its newest checkpoint (from any
    working directory); a checkpoint of other settings is refused. Ctrl-C checkpoints and raises
    :class:`InterruptedError_`. ``on_step`` receives every logged record (also appended to
    OUT/train_log.jsonl).
    """
    torch = require_extra("torch", "train", "orca-diff train")
    transformers = require_extra("transformers", "train", "orca-diff train")
    from tqdm.auto import tqdm

    rt = setup_runtime(cfg)
    out = Path(cfg.out)
    model_dir = out / MODEL_DIRNAME
    say = (lambda msg: tqdm.write(f"{time.strftime('%H:%M:%S')} {msg}")) if (rt.main and not cfg.quiet) \
        else (lambda msg: None)
    check_folders(cfg)
    if cfg.micro_batch_size * cfg.grad_accum * rt.world > MAX_ROWS_PER_STEP:
        raise UsageError(f"micro_batch_size x grad_accum x processes = {cfg.micro_batch_size * cfg.grad_accum * rt.world:,}"
                         f" rows per optimizer step, more than {MAX_ROWS_PER_STEP:,}")
    if cfg.force and rt.main:
        removed = outputs.remove_previous_run(out, cfg)
        if removed:
            say(f"--force: removed the previous run's {', '.join(removed)} from {out}")
    if rt.world > 1:
        torch.distributed.barrier()
    reports = check_data(cfg)  # every stage's files, every row, before step 1
    for line in describe(cfg, reports):
        say(line)
    digests = data_digests(cfg, reports)
    mc_questions, mc_notes = mcq.read_all(cfg.eval_mc) if cfg.eval_mc else ([], [])
    for line in mc_notes:
        say(f"--eval-mc: {line}")
    resume = read_resume_state(out, cfg, rt.world, digests)  # refuses a checkpoint of other settings or data
    if resume is None and model_dir.exists():
        raise OutputError(f"{out} already holds a trained model ({model_dir}) and no checkpoint to continue from;"
                          f" choose a new --out (or --force to train again there)")
    if resume and resume[1]["next_stage"] >= len(cfg.stages) and model_dir.exists():
        return outputs.finish_finished_run(out, cfg, resume[0], say, rt.main, rt.world)
    if cfg.quiet or not rt.main:
        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
    out.mkdir(parents=True, exist_ok=True)
    if rt.main:
        (out / "train_config.json").write_text(json.dumps(asdict(cfg), indent=1, default=str))
    history = resume[1].get("history", []) if resume else []
    if resume:
        say(f"continuing from {resume[0]} (global step {resume[1]['global_step']}), a checkpoint of this same run")
        for line in resume[2]:
            say(line)

    torch.manual_seed(cfg.seed)
    tokenizer, model, added_pad, save_dtype = load_tokenizer_and_model(cfg, rt)
    use_cache = bool(getattr(model.config, "use_cache", True))
    note = f"added pad token {cfg.pad_token!r} -> vocabulary {len(tokenizer)}" if added_pad else "pad token present"
    say(f"model {cfg.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, {note};"
        f" device {rt.device} x{rt.world} ({torch.get_num_threads()} CPU threads), bf16 autocast"
        f" {'on' if rt.autocast_bf16 else 'off'}, saving {save_dtype}, template {cfg.template}")
    model = prepare_model(model, cfg, rt)
    model.train()
    log_file = _open_log(out, resume[1]["global_step"] if resume else None) if rt.main else None

    def log(record: dict[str, Any]) -> None:
        if log_file:
            record = {**record, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()
            board.write(record)
            if on_step:
                on_step(record)

    board = TensorBoard(out, rt.main)
    if not resume:
        log({"kind": "data", "global_step": 0, "files": preflight_record(reports)})
    if resume and resume[2]:
        log({"kind": "continued", "global_step": resume[1]["global_step"], "notes": resume[2]})

    # flash-attention sees example boundaries in position_ids only in a batch of one row.
    flatten = "flash" in str(getattr(model.config, "_attn_implementation", "") or "")
    global_step = resume[1]["global_step"] if resume else 0

    evaluation = None
    eval_sets: dict[str, tuple[list, list]] = {}
    read_settings = {"data_format": cfg.data_format, "columns": cfg.columns, "empty_responses": cfg.empty_responses,
                     "max_row_bytes": cfg.max_row_bytes}
    if cfg.eval_data:
        ev_examples, ev_dropped, ev_summary = load_eval_examples(cfg.eval_data, tokenizer, cfg.max_seq_len,
                                                                 cfg.template, cfg.system_messages, cfg.seed,
                                                                 cfg.prompt_erasure, read_settings)
        evaluation = (ev_examples, eval_micro_batches(ev_examples, cfg.max_seq_len, cfg.micro_batch_size, cfg.packing))
        say(f"eval: {len(ev_examples)} held-out examples ({ev_dropped} dropped) from {', '.join(cfg.eval_data)}")
        if ev_summary and not resume:
            log({"kind": "system_messages", "data": "eval", "global_step": 0, **ev_summary})
        if len(cfg.eval_data) > 1:  # each set also reported by its own name, not only pooled
            for path in cfg.eval_data:
                examples_k = load_eval_examples([path], tokenizer, cfg.max_seq_len, cfg.template, cfg.system_messages,
                                                cfg.seed, cfg.prompt_erasure, read_settings)[0]
                eval_sets[eval_set_name(path, cfg.eval_data)] = (
                    examples_k, eval_micro_batches(examples_k, cfg.max_seq_len, cfg.micro_batch_size, cfg.packing))

    def measure(examples: list, batches: list) -> dict[str, Any]:
        return evaluate(model, examples, batches, tokenizer.pad_token_id, rt.device, rt.autocast_bf16,
                        flatten, rt.rank, rt.world, lambda v: _all_reduce_sum(torch, rt, v),
                        progress=rt.main and not cfg.quiet)

    def run_eval(stage_no: int, when: str, kind: str = "eval") -> dict[str, Any] | None:
        if evaluation is None:
            return None
        result = measure(*evaluation)
        log({"kind": kind, "stage": stage_no, "global_step": global_step, "when": when, **result})
        per_set = {}
        for name, (examples_k, batches_k) in eval_sets.items():
            per_set[name] = measure(examples_k, batches_k)
            log({"kind": f"{kind}_set", "set": name, "stage": stage_no, "global_step": global_step, "when": when,
                 **per_set[name]})
        sets = "".join(f"; {name} {r['loss']:.4f}" for name, r in per_set.items())
        say(f"eval {when} (global step {global_step}): loss {result['loss']:.4f}, perplexity {result['ppl']:.2f}"
            f" over {result['targets']} response tokens{sets}")
        if rt.main:
            write_metrics(out, cfg)
        return result

    def refresh_plot() -> None:
        if rt.main and plot_available():
            plot_losses(read_log(out), out / PLOT_NAME)

    steps_this_run = 0
    first_stage = resume[1]["next_stage"] if resume else 0
    if not resume:
        run_eval(0, "before training")
    try:
        with _CtrlC() as ctrl_c:
            for stage_index in range(first_stage, len(cfg.stages)):
                stage = cfg.stages[stage_index]
                plan, summary = build_stage_plan(stage, stage_index, tokenizer, cfg, rt, digests)
                optimizer = make_optimizer(model, cfg, stage.lr)  # each stage is a fresh fine-tuning run
                start = 0
                if resume and stage_index == first_stage:
                    start = resume[1]["next_step"]
                    load_checkpoint(resume[0], model, optimizer if start > 0 else None, rt.rank, rt.world,
                                    cfg.trust_pickled_checkpoint)
                if summary and start == 0:
                    log({"kind": "system_messages", "data": f"stage {stage_index + 1}", "stage": stage_index + 1,
                         "global_step": global_step, **summary})
                warmup = min(stage.warmup_steps if stage.warmup_steps is not None else cfg.warmup_steps,
                             plan.total_steps)
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
                    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip) \
                        if cfg.grad_clip > 0 else None
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
                        record = {"kind": "train", "stage": stage_index + 1, "step": step + 1,
                                  "global_step": global_step, "loss": loss_total / max(step_targets, 1), "lr": lr,
                                  "tokens": int(step_tokens), "targets": int(step_targets),
                                  "tokens_per_s": window_tokens / max(elapsed, 1e-9),
                                  "grad_norm": float(grad_norm) if grad_norm is not None else None}
                        bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}",
                                        tok_s=f"{record['tokens_per_s']:.0f}")
                        log(record)
                        window_tokens, window_start = 0.0, time.perf_counter()
                    stage_done = step == plan.total_steps - 1
                    if stage_done:
                        run_eval(stage_index + 1, f"end of stage {stage_index + 1}")
                        if cfg.save_stage_models and stage_index < len(cfg.stages) - 1:
                            stage_dir = out / f"stage-{stage_index + 1}-model"
                            save_hf_model(model, tokenizer, stage_dir, save_dtype, use_cache, cfg.template, rt.world,
                                          rt.main)
                            model.config.use_cache = False
                            say(f"wrote {stage_dir}: the model as stage {stage_index + 1} left it")
                    elif cfg.eval_every and global_step % cfg.eval_every == 0:
                        run_eval(stage_index + 1, f"step {global_step}")
                    # Every rank learns of a Ctrl-C on any rank at the same step.
                    interrupted = _all_reduce_sum(torch, rt, [float(ctrl_c.requested)])[0] > 0
                    stop = cfg.stop_after_steps is not None and steps_this_run >= cfg.stop_after_steps
                    periodic = cfg.save_every > 0 and global_step % cfg.save_every == 0
                    if periodic or stage_done or stop or interrupted:
                        where = {"next_stage": stage_index + 1, "next_step": 0} if stage_done \
                            else {"next_stage": stage_index, "next_step": step + 1}
                        ckpt = save_checkpoint(out, model, optimizer,
                                               {**where, "global_step": global_step, "history": history}, cfg,
                                               rt.world, rt.main, rt.rank, digests)
                        last = stage_done and stage_index == len(cfg.stages) - 1
                        if (stop or interrupted) and not last:
                            bar.close()
                            if rt.main:
                                write_metrics(out, cfg)
                                refresh_plot()
                            if interrupted:
                                raise InterruptedError_(
                                    f"interrupted after global step {global_step}; checkpoint {ckpt} written. Run the"
                                    f" same command again to continue from it (it resumes automatically)")
                            say(f"stopped after global step {global_step}; checkpoint {ckpt}; run the same command"
                                f" again to continue from it")
                            return ckpt
                bar.close()
                refresh_plot()
            if resume and first_stage >= len(cfg.stages):
                # everything was trained already (the model folder was lost): just write the model again
                load_checkpoint(resume[0], model, None, rt.rank, rt.world, cfg.trust_pickled_checkpoint)
            save_hf_model(model, tokenizer, model_dir, save_dtype, use_cache, cfg.template, rt.world, rt.main)
            if (evaluation is not None or mc_questions) and save_dtype != "F32":
                # What ships is measured: the master weights rounded as save_hf_model rounded them (in
                # place: training is over); the stage-end eval gave the master weights' loss.
                round_weights_to(model, getattr(torch, SAFETENSORS_TO_TORCH[save_dtype]))
            if mc_questions:
                mc = mcq.score(model, tokenizer, mc_questions, rt.device, cfg.template, cfg.max_seq_len,
                               rt.autocast_bf16)
                log({"kind": "eval_mc", "global_step": global_step, "when": f"saved model ({save_dtype})", **mc})
                say(f"multiple choice (saved model): mean accuracy {mc['mean_accuracy']:.3f} over"
                    f" {len(mc['tasks'])} tasks; " + ", ".join(f"{t} {r['accuracy']:.3f}" for t, r in mc["tasks"].items()))
            if evaluation is not None and save_dtype != "F32":
                saved = run_eval(len(cfg.stages), f"saved model ({save_dtype})", kind="eval_saved")
                masters = next((r for r in reversed(read_log(out)) if r.get("kind") == "eval"), None) if rt.main else None
                if saved and masters:
                    say(f"the saved {save_dtype} model: loss {saved['loss']:.4f}; the fp32 master weights"
                        f" {masters['loss']:.4f} (rounding to {save_dtype} costs {saved['loss'] - masters['loss']:+.4f};"
                        f" docs/training.md: what the choices are)")
    finally:
        if log_file:
            log_file.close()
        board.close()
    if rt.main:
        outputs.record_model(out, model_dir)
        write_metrics(out, cfg, model_dir)
        if plot_available():
            plot_losses(read_log(out), out / PLOT_NAME)
            say(f"wrote {model_dir}, {out / METRICS_NAME} and {out / PLOT_NAME}")
        else:
            say(f"wrote {model_dir} and {out / METRICS_NAME}; no loss plot: matplotlib is not installed"
                f" (pip install 'orca-diff[plot]')")
    if cfg.make_diff_against and rt.main:
        outputs.make_or_check_diff(out, cfg, model_dir, say)
    if rt.world > 1:
        torch.distributed.barrier()
    return model_dir
