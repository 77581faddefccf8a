"""Test helper: one tiny LLaMA written in every form users hold.

* HF safetensors, by :func:`orca_diff.synth.write_llama` (the reference bytes);
* HF ``.bin`` shards, as ``save_pretrained(safe_serialization=False)`` writes them (``torch.save``
  of state dicts, ``pytorch_model-0000k-of-0000n.bin`` + ``pytorch_model.bin.index.json``);
* Meta's original release, derived by the INVERSE of transformers' conversion: q/k rows
  un-permuted, tensors split into model-parallel shards along the dimension each kind is split
  on, Meta names, replicated norms, ``rope.freqs``, ``params.json`` (``vocab_size: -1``) and
  ``checklist.chk``. Like Meta's files, all tensors of a shard are views into one flat storage.

Reading the Meta form back through orca-diff must give the safetensors bytes exactly; that the
inverse here is right is checked independently against transformers' own converter.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import torch

from orca_diff.synth import LlamaShape, write_llama
from orca_diff.containers import SafetensorsModel, list_extra_files, open_model

TORCH_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}
_INT_VIEW = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32}

#: HF layer tensor suffix -> (Meta name suffix, split dim or None for replicated, permute: q/kv/None)
META_LAYER = {
    "self_attn.q_proj.weight": ("attention.wq.weight", 0, "q"),
    "self_attn.k_proj.weight": ("attention.wk.weight", 0, "kv"),
    "self_attn.v_proj.weight": ("attention.wv.weight", 0, None),
    "self_attn.o_proj.weight": ("attention.wo.weight", 1, None),
    "mlp.gate_proj.weight": ("feed_forward.w1.weight", 0, None),
    "mlp.down_proj.weight": ("feed_forward.w2.weight", 1, None),
    "mlp.up_proj.weight": ("feed_forward.w3.weight", 0, None),
    "input_layernorm.weight": ("attention_norm.weight", None, None),
    "post_attention_layernorm.weight": ("ffn_norm.weight", None, None),
}


def hf_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """The HF safetensors model as torch tensors with exactly its bytes (no float conversion)."""
    out = {}
    with SafetensorsModel(folder, sorted(folder.glob("*.safetensors")), {}) as m:
        for name, info in m.tensors.items():
            raw = torch.from_numpy(np.array(m.read(name)))  # a copy: the map is closed after
            out[name] = raw.view(TORCH_DTYPES[info.dtype]).reshape(info.shape)
    return out


def unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of transformers' rotary ``permute`` (HF rows back to Meta's interleaved rows)."""
    dim1, dim2 = w.shape
    return w.reshape(n_heads, 2, dim1 // n_heads // 2, dim2).transpose(1, 2).reshape(dim1, dim2)


def _copy_extras(src: Path, out: Path, skip: tuple[str, ...] = ()) -> None:
    for name, path in list_extra_files(src).items():
        if name not in skip and not name.endswith(".index.json"):
            shutil.copyfile(path, out / name)


def write_hf_bin(src: Path, out: Path, max_shard_bytes: int | None = None, with_inv_freq: bool = False,
                 n_heads: int | None = None) -> Path:
    """Write the HF safetensors model ``src`` as ``.bin`` shards the way transformers did."""
    out.mkdir(parents=True, exist_ok=True)
    sd = hf_state_dict(src)
    if with_inv_freq:  # transformers < 4.31 persisted the rotary buffer in every layer
        cfg = json.loads((src / "config.json").read_text())
        head_dim = cfg["hidden_size"] // (n_heads or cfg["num_attention_heads"])
        inv = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))
        for layer in range(cfg["num_hidden_layers"]):
            sd[f"model.layers.{layer}.self_attn.rotary_emb.inv_freq"] = inv.clone()
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in sd.items():
        nbytes = t.numel() * t.element_size()
        if max_shard_bytes is not None and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    if len(shards) == 1:
        torch.save(shards[0], out / "pytorch_model.bin")
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            fname = f"pytorch_model-{i:05d}-of-{len(shards):05d}.bin"
            torch.save(shard, out / fname)
            weight_map.update({k: fname for k in shard})
        total = sum(t.numel() * t.element_size() for t in sd.values())
        (out / "pytorch_model.bin.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2, sort_keys=True) + "\n")
    _copy_extras(src, out)
    return out


def meta_state_dicts(sd: dict[str, torch.Tensor], n_layers: int, n_heads: int, n_kv_heads: int, n_shards: int,
                     embed_split_dim: int = 1) -> list[dict[str, torch.Tensor]]:
    """Split an HF state dict into Meta's model-parallel shards (the inverse of the conversion)."""
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(n_shards)]

    def put(meta: str, w: torch.Tensor, split: int | None) -> None:
        for i in range(n_shards):
            shards[i][meta] = w if split is None else torch.chunk(w, n_shards, dim=split)[i]

    put("tok_embeddings.weight", sd["model.embed_tokens.weight"], embed_split_dim)
    for layer in range(n_layers):
        for hf_suffix, (meta_suffix, split, perm) in META_LAYER.items():
            w = sd[f"model.layers.{layer}.{hf_suffix}"]
            if perm == "q":
                w = unpermute(w, n_heads)
            elif perm == "kv":
                w = unpermute(w, n_kv_heads)
            put(f"layers.{layer}.{meta_suffix}", w, split)
    put("norm.weight", sd["model.norm.weight"], None)
    put("output.weight", sd["lm_head.weight"], 0)
    return shards


def _as_views_of_one_storage(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Re-home a shard's tensors as views into one flat storage per dtype, as Meta's files are."""
    out: dict[str, torch.Tensor] = {}
    for dtype in {t.dtype for t in sd.values()}:
        names = [n for n, t in sd.items() if t.dtype == dtype]
        flat = torch.empty(sum(sd[n].numel() for n in names), dtype=dtype)
        offset = 0
        for n in names:
            k = sd[n].numel()
            flat[offset:offset + k] = sd[n].reshape(-1)
            out[n] = flat[offset:offset + k].view(sd[n].shape)
            offset += k
    return {n: out[n] for n in sd}


def multiple_of_for(dim: int, intermediate: int) -> int:
    """A ``multiple_of`` for params.json from which Meta's (and the converter's) formula
    ``multiple_of * ceil(int(8 * dim / 3) / multiple_of)`` gives back ``intermediate``."""
    for m in (256, 128, 64, 32, 16, 8, 4, 2, 1):
        if m * ((int(8 * dim / 3) + m - 1) // m) == intermediate:
            return m
    return 256  # not derivable: the converter's config would disagree, the tensors do not care


def write_meta(src: Path, out: Path, n_shards: int = 2, shared_storage: bool = True,
               embed_split_dim: int = 1) -> Path:
    """Write the HF safetensors model ``src`` as Meta's original release of it."""
    out.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((src / "config.json").read_text())
    n_heads, n_kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    sd = hf_state_dict(src)
    shards = meta_state_dicts(sd, cfg["num_hidden_layers"], n_heads, n_kv, n_shards, embed_split_dim)
    head_dim = cfg["hidden_size"] // n_heads
    freqs = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
    checklist = []
    for i, shard in enumerate(shards):
        shard["rope.freqs"] = freqs.clone()
        if shared_storage:
            shard = _as_views_of_one_storage(shard)
        else:
            shard = {k: v.clone() for k, v in shard.items()}
        fname = f"consolidated.{i:02d}.pth"
        torch.save(shard, out / fname)
        checklist.append(f"{hashlib.md5((out / fname).read_bytes()).hexdigest()}  {fname}")
    params = {"dim": cfg["hidden_size"], "multiple_of": multiple_of_for(cfg["hidden_size"], cfg["intermediate_size"]), "n_heads": n_heads, "n_layers": cfg["num_hidden_layers"],
              "norm_eps": cfg["rms_norm_eps"], "vocab_size": -1}
    if n_kv != n_heads:
        params["n_kv_heads"] = n_kv
    (out / "params.json").write_text(json.dumps(params))
    checklist.append(f"{hashlib.md5((out / 'params.json').read_bytes()).hexdigest()}  params.json")
    (out / "checklist.chk").write_text("\n".join(checklist) + "\n")
    shutil.copyfile(src / "tokenizer.model", out / "tokenizer.model")
    return out


def write_all_forms(root: Path, shape: LlamaShape = LlamaShape(), dtype: str = "F16", seed: int = 0,
                    n_shards: int = 2, bin_shard_bytes: int | None = 40_000) -> dict[str, Path]:
    """The same weights as ``{"safetensors": ..., "bin": ..., "meta": ...}`` folders under ``root``."""
    st = write_llama(root / "hf-safetensors", shape, dtype, seed)
    return {
        "safetensors": st,
        "bin": write_hf_bin(st, root / "hf-bin", max_shard_bytes=bin_shard_bytes),
        "meta": write_meta(st, root / "meta", n_shards=n_shards),
    }


def tensor_hashes(path: Path) -> dict[str, tuple[str, tuple[int, ...], str]]:
    """``{name: (dtype, shape, sha256)}`` of a model in any form, through orca-diff's readers."""
    from orca_diff.fingerprint import hash_model

    m = open_model(path)
    try:
        return hash_model(m)
    finally:
        m.close()
