"""``orca-diff train``: the click layer over :func:`orca_diff.train.train` (the ``train`` extra)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from ..errors import InputNotFoundError, UsageError

STAGE_FLAGS = ("epochs", "max_steps", "lr", "warmup_steps")


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
              help="YAML/JSON file with the settings and the ordered list of stages (see examples/train_stages.yaml). "
                   "Flags override its values.")
@click.option("--model", default=None, help="Base model: an HF folder (config.json + safetensors/.bin).")
@click.option("--tokenizer", default=None, help="Tokenizer folder (default: the model folder).")
@click.option("--template", type=click.Choice(["orca", "chatml", "llama2", "base"]), default=None,
              help="Prompt layout, written into OUT/model as its chat template: orca (### System/User/Response, the "
                   "orca_mini layout), chatml (as Orca 2 shipped), llama2 (Llama-2 chat), or base (the base "
                   "tokenizer's own chat template) [orca].")
@click.option("--prompt-erasure", is_flag=True, default=None,
              help="Orca 2's prompt erasure: the system message the teacher saw is left out of what the model trains on.")
@click.option("--format", "data_format", type=click.Choice(["auto", "orca", "sharegpt", "alpaca", "messages"]),
              default=None, help="Layout of the data files [auto: told from the first row's columns].")
@click.option("--columns", default=None, metavar="NAME=COLUMN,...",
              help="Map your columns onto the orca ones, e.g. question=prompt,response=completion,system_prompt=sys.")
@click.option("--empty-responses", type=click.Choice(["drop", "refuse"]), default=None,
              help="Rows whose response is empty or null: drop them (counted per file) or refuse the file [drop].")
@click.option("--system-messages", type=click.Choice(["keep", "orca"]), default=None,
              help="orca: rows without a system prompt get one of Orca's 16, sampled (--seed) from those the paper "
                   "uses for the row's FLAN sub-collection (id prefix niv/t0/cot/flan or a sub_collection field) [keep].")
@click.option("--pad-token", default=None, help="Pad token added when the tokenizer has none [[PAD]].")
@click.option("--out", default=None, type=click.Path(), help="Run folder: OUT/model, OUT/checkpoints, OUT/train_log.jsonl.")
@click.option("--data", multiple=True, type=click.Path(dir_okay=False),
              help="Orca .jsonl/.parquet file (system_prompt, question, response). Repeat for progressive "
                   "stages, in order; replaces the config's stages.")
@click.option("--epochs", type=float, default=None, help="Epochs per --data stage [1].")
@click.option("--max-steps", type=click.IntRange(1), default=None, help="Optimizer steps per --data stage (overrides --epochs).")
@click.option("--lr", type=float, default=None, help="Peak learning rate per --data stage [1e-5].")
@click.option("--warmup-steps", type=click.IntRange(0), default=None, help="Linear warmup steps per stage [0].")
@click.option("--min-lr-ratio", type=float, default=None,
              help="Cosine decays towards lr * this, reached one step after the last, so every step trains [0].")
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
@click.option("--threads", type=click.IntRange(1), default=None, help="CPU threads for torch (torch.set_num_threads) [torch's default].")
@click.option("--save-dtype", type=click.Choice(["auto", "F16", "BF16", "F32"]), default=None,
              help="Dtype of the saved weights [auto: the base's].")
@click.option("--save-every", type=click.IntRange(0), default=None, help="Checkpoint every N optimizer steps [0: stage ends].")
@click.option("--save-stage-models", is_flag=True, default=None,
              help="Also write OUT/stage-K-model (an HF folder like OUT/model) at the end of every stage but the last.")
@click.option("--resume", is_flag=True, default=None,
              help="Continue from the newest checkpoint in OUT. Optional: the same command continues a run of the same "
                   "settings by itself.")
@click.option("--force", is_flag=True, default=None,
              help="Train again in OUT from the start, replacing what an earlier run wrote there (model, checkpoints, "
                   "log, metrics; and the diff with --make-diff-against). Without it a finished run is checked, not redone.")
@click.option("--accept-changed-data", is_flag=True, default=None,
              help="Continue a run although a data file it trained on changed since its checkpoint (recorded in its state).")
@click.option("--trust-pickled-checkpoint", is_flag=True, default=None,
              help="Load a checkpoint in torch.distributed.checkpoint's pickled format (orca-diff before safetensors "
                   "checkpoints). Unpickling runs code: only for checkpoints you wrote yourself.")
@click.option("--stop-after-steps", type=click.IntRange(1), default=None,
              help="Checkpoint and stop after N optimizer steps of this invocation (time-limited jobs; rerun to continue).")
@click.option("--eval", "eval_data", multiple=True, type=click.Path(dir_okay=False),
              help="Held-out Orca file (repeatable): response-only loss and perplexity before training, at each stage "
                   "end and every --eval-every steps, in the log, OUT/metrics.json and OUT/loss.png.")
@click.option("--eval-mc", "eval_mc", multiple=True,
              help="Multiple-choice set (repeatable): a BBH task .json, an AGIEval .jsonl, or builtin (a 12-question "
                   "sample). Each choice scored by log-likelihood, accuracy per task, on the saved model at the end "
                   "(and with --eval-only).")
@click.option("--eval-every", type=click.IntRange(0), default=None, help="Also evaluate every N optimizer steps [0: stage ends].")
@click.option("--eval-only", is_flag=True, default=False,
              help="Only measure --model on --eval (no training); with --out, also write OUT/metrics.json.")
@click.option("--seed", type=int, default=None, help="Data order and new embedding rows [0].")
@click.option("--make-diff-against", "make_diff_against", default=None, type=click.Path(file_okay=False),
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
    Continue an interrupted run (Ctrl-C, a crash, --stop-after-steps): run the same command again.
    Held-out loss while training, and of a saved model alone:
      orca-diff train ... --eval heldout.jsonl --eval-every 200
      orca-diff train --eval-only --model runs/orca/model --eval heldout.jsonl
    """
    from ..train import Stage, TrainConfig, load_config
    from ..train import train as run_training

    eval_only = flags.pop("eval_only")
    flags["eval_data"] = list(flags["eval_data"]) or None
    flags["eval_mc"] = list(flags["eval_mc"]) or None
    if flags.get("columns") is not None:
        flags["columns"] = parse_columns(flags["columns"])
    if eval_only:
        _eval_only(config_file, data, flags)
        return
    against = flags.get("make_diff_against")
    if against is not None and not Path(against).is_dir():  # exit 3 like every missing input, not click's 2
        raise InputNotFoundError(f"--make-diff-against {against}: no such base folder")
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


def parse_columns(text: str) -> dict[str, str]:
    """``question=prompt,response=completion`` -> {"question": "prompt", "response": "completion"}."""
    mapping = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, column = part.partition("=")
        if not sep or not name.strip() or not column.strip():
            raise UsageError(f"--columns {text!r}: expected NAME=COLUMN pairs separated by commas,"
                             f" e.g. question=prompt,response=completion")
        mapping[name.strip()] = column.strip()
    return mapping


def _eval_only(config_file: str | None, data: tuple[str, ...], flags: dict[str, Any]) -> None:
    from ..train import METRICS_NAME, evaluate_folder

    if config_file or data:
        raise UsageError("--eval-only measures one model: give --model DIR --eval FILE (no --config or --data)")
    if not flags.get("model") or not (flags.get("eval_data") or flags.get("eval_mc")):
        raise UsageError("--eval-only needs --model DIR and --eval FILE (or --eval-mc SET)")
    keys = {"tokenizer": None, "max_seq_len": 2048, "micro_batch_size": 8, "template": "orca",
            "system_messages": "keep", "seed": 0, "packing": True, "threads": None, "prompt_erasure": False,
            "data_format": "auto", "columns": None, "empty_responses": "drop"}
    run_settings = _run_settings_of(Path(flags["model"]))
    defaults = {k: run_settings.get(k, v) for k, v in keys.items() if k not in ("tokenizer", "threads")}
    kwargs = {k: flags[k] if flags.get(k) is not None else defaults.get(k, default) for k, default in keys.items()}
    device = flags.get("device") or "auto"
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    if run_settings and not flags.get("quiet"):
        click.echo(f"{flags['model']}: evaluating with its run's settings (template {kwargs['template']}, max_seq_len"
                   f" {kwargs['max_seq_len']}, micro_batch_size {kwargs['micro_batch_size']}, packing"
                   f" {kwargs['packing']}); flags override them")
    paths = flags["eval_data"] or []
    result: dict[str, Any] = {}
    if paths:
        result = evaluate_folder(flags["model"], paths, device=device, progress=not flags.get("quiet"), **kwargs)
    per_set = {}
    if len(paths) > 1:
        from ..train.loop import eval_set_name

        per_set = {eval_set_name(p, paths): evaluate_folder(flags["model"], [p], device=device, **kwargs)
                   for p in paths}
    mc = None
    if flags.get("eval_mc"):
        from ..train.mcq import score_folder

        mc = score_folder(flags["model"], flags["eval_mc"], kwargs["template"], kwargs["max_seq_len"], device,
                          kwargs["tokenizer"])
    if not flags.get("quiet"):
        if result:
            click.echo(f"{flags['model']}: loss {result['loss']:.4f}, perplexity {result['ppl']:.2f} over"
                       f" {result['targets']} response tokens of {result['examples']} examples")
        for name, r in per_set.items():
            click.echo(f"  {name}: loss {r['loss']:.4f}, perplexity {r['ppl']:.2f} over {r['targets']} response tokens")
        if mc:
            for note in mc["notes"]:
                click.echo(f"  --eval-mc: {note}")
            click.echo(f"{flags['model']}: multiple choice, mean accuracy {mc['mean_accuracy']:.3f} over"
                       f" {len(mc['tasks'])} tasks")
            for task, r in mc["tasks"].items():
                click.echo(f"  {task}: accuracy {r['accuracy']:.3f} ({r['questions']} questions)")
    if flags.get("out"):
        out = Path(flags["out"])
        if out.exists() and not out.is_dir():
            from ..errors import OutputError

            raise OutputError(f"--out {out} is a file; give a folder for metrics.json")
        out.mkdir(parents=True, exist_ok=True)
        doc = {"eval_only": result, **({"eval_sets": per_set} if per_set else {}), **({"eval_mc": mc} if mc else {})}
        (out / METRICS_NAME).write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")


def _run_settings_of(model_dir: Path) -> dict[str, Any]:
    """The settings of the run that wrote ``model_dir`` (OUT/model beside OUT/train_config.json), or {}."""
    path = model_dir / ".." / "train_config.json"
    if model_dir.name != "model" or not path.is_file():
        return {}
    try:
        settings = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return settings if isinstance(settings, dict) else {}


COMMANDS = [train]
