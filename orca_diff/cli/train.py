"""``orca-diff train``: the click layer over :func:`orca_diff.train.train` (the ``train`` extra)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from ..errors import UsageError

STAGE_FLAGS = ("epochs", "max_steps", "lr", "warmup_steps")


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
              help="YAML/JSON file with the settings and the ordered list of stages (see examples/train_stages.yaml). "
                   "Flags override its values.")
@click.option("--model", default=None, help="Base model: an HF folder (config.json + safetensors/.bin).")
@click.option("--tokenizer", default=None, help="Tokenizer folder (default: the model folder).")
@click.option("--out", default=None, type=click.Path(), help="Run folder: OUT/model, OUT/checkpoints, OUT/train_log.jsonl.")
@click.option("--data", multiple=True, type=click.Path(dir_okay=False),
              help="Orca .jsonl/.parquet file (system_prompt, question, response). Repeat for progressive "
                   "stages, in order; replaces the config's stages.")
@click.option("--epochs", type=float, default=None, help="Epochs per --data stage [1].")
@click.option("--max-steps", type=click.IntRange(1), default=None, help="Optimizer steps per --data stage (overrides --epochs).")
@click.option("--lr", type=float, default=None, help="Peak learning rate per --data stage [1e-5].")
@click.option("--warmup-steps", type=click.IntRange(0), default=None, help="Linear warmup steps per stage [0].")
@click.option("--min-lr-ratio", type=float, default=None, help="Cosine decays to lr * this [0].")
@click.option("--max-seq-len", type=click.IntRange(8), default=None, help="Tokens per packed row [2048].")
@click.option("--packing/--no-packing", default=None, help="Pack several examples per row [packing].")
@click.option("--micro-batch-size", type=click.IntRange(1), default=None, help="Rows per forward pass per process [1].")
@click.option("--grad-accum", type=click.IntRange(1), default=None, help="Micro-batches per optimizer step [1].")
@click.option("--weight-decay", type=float, default=None, help="AdamW weight decay on matrices [0].")
@click.option("--grad-clip", type=float, default=None, help="Max gradient norm, 0 = off [1.0].")
@click.option("--gradient-checkpointing", is_flag=True, default=None, help="Recompute activations in backward (less memory).")
@click.option("--bf16/--no-bf16", default=None, help="bf16 autocast [on with CUDA, off on CPU].")
@click.option("--attn-implementation", default=None, help="sdpa (default), eager, flash_attention_2, flex_attention.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=None, help="[auto]")
@click.option("--save-dtype", type=click.Choice(["auto", "F16", "BF16", "F32"]), default=None,
              help="Dtype of the saved weights [auto: the base's].")
@click.option("--save-every", type=click.IntRange(0), default=None, help="Checkpoint every N optimizer steps [0: stage ends].")
@click.option("--resume", is_flag=True, default=None, help="Continue from the newest checkpoint in OUT.")
@click.option("--stop-after-steps", type=click.IntRange(1), default=None,
              help="Checkpoint and stop after N optimizer steps of this invocation (time-limited jobs; then --resume).")
@click.option("--seed", type=int, default=None, help="Data order and new embedding rows [0].")
@click.option("--make-diff-against", "make_diff_against", default=None, type=click.Path(exists=True, file_okay=False),
              help="After training, run `orca-diff make` with this base folder.")
@click.option("--diff-out", default=None, type=click.Path(), help="Where --make-diff-against writes [OUT/diff].")
@click.option("-q", "--quiet", is_flag=True, default=None, help="No progress bars or messages.")
def train(config_file: str | None, data: tuple[str, ...], **flags: Any) -> None:
    """Fine-tune a LLaMA-family model on Orca explanation traces, stage after stage.

    Each example is a system message, a question and the teacher's response; the loss is on the
    response tokens only, examples are packed into MAX_SEQ_LEN-token rows without attending to
    each other, and a [PAD] token is added when the tokenizer has none (LLaMA: 32000 -> 32001
    rows). Stages run in order, each a fresh AdamW run with warmup + cosine decay, starting from
    the weights the previous stage ended with (Orca's progressive learning). The result is
    OUT/model, an HF folder of safetensors in the base's dtype.

    \b
    A full progressive run, Orca-style (ChatGPT traces first, then GPT-4):
      orca-diff train --model llama-13b-hf --out runs/orca \\
          --data flan5m-chatgpt.parquet --data flan1m-gpt4.parquet \\
          --epochs 4 --lr 1e-5 --max-seq-len 2048 --micro-batch-size 4 --grad-accum 4 \\
          --gradient-checkpointing --save-every 500 --make-diff-against llama-13b-hf
    The same with per-stage settings from a file, on 8 GPUs (FSDP, see docs/training.md):
      torchrun --nproc_per_node 8 -m orca_diff.cli train --config stages.yaml
    A tiny run on the CPU with the project's synthetic sample:
      orca-diff train --config examples/train_stages.yaml --model BASE --out runs/demo
    Continue an interrupted run:
      orca-diff train ... --resume
    """
    from ..train import Stage, TrainConfig, load_config
    from ..train import train as run_training

    stage_flags = {k: flags.pop(k) for k in STAGE_FLAGS}
    settings = {k: v for k, v in flags.items() if v is not None}
    stages = None
    if data:
        per_stage = {k: v for k, v in stage_flags.items() if v is not None}
        stages = [Stage(data=[d], name=Path(d).stem, **per_stage) for d in data]
    elif any(v is not None for k, v in stage_flags.items() if k != "warmup_steps"):
        raise UsageError("--epochs/--max-steps/--lr apply to --data stages; in a config file set them per stage")
    elif stage_flags["warmup_steps"] is not None:
        settings["warmup_steps"] = stage_flags["warmup_steps"]
    if config_file:
        cfg = load_config(config_file, **settings, **({"stages": stages} if stages else {}))
    else:
        if not stages:
            raise UsageError("give --data FILE (one per stage) or --config FILE with stages:")
        if "model" not in settings or "out" not in settings:
            raise UsageError("--model and --out are required (or set them in --config)")
        cfg = TrainConfig(stages=stages, **settings)
    result = run_training(cfg)
    if not cfg.quiet:
        click.echo(f"done: {result}")


COMMANDS = [train]
