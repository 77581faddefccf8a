"""The GPU check of `orca-diff train`: a few minutes on one machine, one line per check, exit 1 on a failure.

What CI cannot test (no GPU there): CUDA, NCCL, bf16 autocast, flash-attention, FSDP2 across
GPUs. With a tiny LLaMA (orca_diff.synth, its real byte-level tokenizer) and the project's
synthetic sample in two stages, it runs the `orca-diff train` command a user runs and checks:

1. ``fp32``: the loss curve on the device equals the CPU's (fp32 both) within ``--rtol`` (1e-4);
2. ``bf16``: with bf16 autocast (the CUDA default) the curve stays within 5e-2 of the CPU's;
3. ``resume``: stopped after 3 steps and rerun with the same command, every step is logged once
   and the curve equals the uninterrupted run on the same device (1e-5);
4. ``fsdp``: with several GPUs, torchrun --nproc_per_node N (FSDP2 over NCCL) equals one GPU (1e-4);
5. ``flash``: with flash-attn installed, attn_implementation flash_attention_2 (bf16) within 5e-2.

    python scripts/gpu_check.py                 # the device torch finds (cuda if any)
    python scripts/gpu_check.py --device cpu    # the same checks on the CPU (the tests run this)

Prints one JSON line per check ({"check", "ok", "max_rel_diff", ...}) and a last line summing up.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "examples" / "orca_sample.jsonl"
STAGES = """max_seq_len: 128
micro_batch_size: 2
grad_accum: 2
warmup_steps: 1
save_dtype: F32
stages:
  - name: one
    data: {data}
    max_steps: 4
    lr: 2.0e-3
  - name: two
    data: {data}
    max_steps: 3
    lr: 1.0e-3
"""


def losses(out: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines() if line.strip()]
    return [(r["global_step"], r["loss"]) for r in rows if r["kind"] == "train"]


def max_rel(a: list[tuple[int, float]], b: list[tuple[int, float]]) -> float:
    if [s for s, _ in a] != [s for s, _ in b]:
        return float("inf")
    return max(abs(x - y) / max(abs(y), 1e-12) for (_, x), (_, y) in zip(a, b))


def train(args: list[str], nproc: int = 1, env: dict | None = None) -> subprocess.CompletedProcess:
    head = [sys.executable, "-m", "orca_diff.cli"] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), "-m",
         "orca_diff.cli"]
    proc = subprocess.run(head + ["train", *args, "-q"], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, **(env or {})}, timeout=900)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-2000:] + proc.stderr[-4000:])
    return proc


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default=None, help="cuda | cpu [cuda when torch sees one]")
    parser.add_argument("--rtol", type=float, default=1e-4)
    parser.add_argument("--keep", default=None, help="keep the runs in this folder")
    opts = parser.parse_args()
    import torch

    from orca_diff.synth import LlamaShape, write_llama

    device = opts.device or ("cuda" if torch.cuda.is_available() else "cpu")
    gpus = torch.cuda.device_count() if device == "cuda" else 0
    root = Path(opts.keep or tempfile.mkdtemp(prefix="orca-diff-gpu-check-"))
    root.mkdir(parents=True, exist_ok=True)
    base = write_llama(root / "base", LlamaShape(vocab_size=1024, hidden_size=64, intermediate_size=172,
                                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
                       "BF16")
    config = root / "stages.yaml"
    config.write_text(STAGES.format(data=SAMPLE))
    common = ["--config", str(config), "--model", str(base), "--threads", "2"]
    results = []

    def check(name: str, ok: bool, **info) -> None:
        results.append(ok)
        print(json.dumps({"check": name, "ok": ok, **info}), flush=True)

    started = time.perf_counter()
    if train([*common, "--device", "cpu", "--no-bf16", "--out", str(root / "cpu")]).returncode != 0:
        check("cpu reference", False)
        return 1
    cpu = losses(root / "cpu")
    if device == "cpu":  # the reference itself: the run is not repeated
        (root / "fp32").symlink_to(root / "cpu")
        print(json.dumps({"check": "fp32", "skipped": "the device is the CPU reference"}), flush=True)
    else:
        proc = train([*common, "--device", device, "--no-bf16", "--out", str(root / "fp32")])
        diff = max_rel(losses(root / "fp32"), cpu) if proc.returncode == 0 else float("inf")
        check("fp32", diff <= opts.rtol, device=device, max_rel_diff=diff, steps=len(cpu))
    if device == "cuda":
        proc = train([*common, "--device", device, "--bf16", "--out", str(root / "bf16")])
        diff = max_rel(losses(root / "bf16"), cpu) if proc.returncode == 0 else float("inf")
        check("bf16", diff <= 5e-2, max_rel_diff=diff)
    resumed = root / "resumed"
    ok = train([*common, "--device", device, "--no-bf16", "--out", str(resumed), "--stop-after-steps", "3"]).returncode == 0
    ok = ok and train([*common, "--device", device, "--no-bf16", "--out", str(resumed)]).returncode == 0
    diff = max_rel(losses(resumed), losses(root / "fp32")) if ok else float("inf")
    check("resume", diff <= 1e-5, max_rel_diff=diff, steps_logged=[s for s, _ in losses(resumed)] if ok else None)
    if gpus > 1:
        proc = train([*common, "--device", device, "--no-bf16", "--out", str(root / "fsdp"),
                      "--micro-batch-size", "1"], nproc=2)
        single = root / "single-mb1"
        train([*common, "--device", device, "--no-bf16", "--out", str(single), "--micro-batch-size", "1",
               "--grad-accum", "4"])
        diff = max_rel(losses(root / "fsdp"), losses(single)) if proc.returncode == 0 else float("inf")
        check("fsdp", diff <= opts.rtol, processes=2, max_rel_diff=diff)
    else:
        print(json.dumps({"check": "fsdp", "skipped": f"{gpus} GPU(s): FSDP2 over NCCL needs 2"}), flush=True)
    try:
        import flash_attn  # noqa: F401
        has_flash = device == "cuda"
    except ImportError:
        has_flash = False
    if has_flash:
        proc = train([*common, "--device", device, "--bf16", "--attn-implementation", "flash_attention_2",
                      "--out", str(root / "flash")])
        diff = max_rel(losses(root / "flash"), cpu) if proc.returncode == 0 else float("inf")
        check("flash", diff <= 5e-2, max_rel_diff=diff)
    else:
        print(json.dumps({"check": "flash", "skipped": "flash-attn not installed or no CUDA"}), flush=True)
    print(json.dumps({"summary": f"{sum(results)}/{len(results)} checks passed", "device": device,
                      "cuda": torch.cuda.get_device_name(0) if device == "cuda" else None,
                      "seconds": round(time.perf_counter() - started, 1), "runs": str(root)}), flush=True)
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
