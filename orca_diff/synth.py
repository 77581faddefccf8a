"""Synthetic LLaMA-shaped models: the demo, the tests and the benchmark all build on these.

``write_llama`` writes an HF folder exactly as ``save_pretrained`` lays it out (real tensor names
and shapes from a LLaMA config, safetensors written by the ``safetensors`` library, sharded with
``model.safetensors.index.json``), with random weights. ``finetune`` derives a "fine-tuned" state
the way real training moves weights: fp32 master weights moved by AdamW-sized steps (each step
moves an element by about ``lr`` in a noisy direction, plus weight decay), then saved in the
target dtype with round-to-nearest-even, so most elements change only in their low mantissa
bits; embedding rows of tokens never seen stay bit-identical; a pad row can be added
(vocab 32000 -> 32001, the new row being the mean of the others as Alpaca/Orca do).

Memory: tensors are generated and written one shard at a time (a shard is bounded by
``max_shard_bytes``), so the benchmark can build multi-GB models.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
from safetensors import TensorSpec, serialize_file

from .bits import cast_bits, float_to_bits, bits_to_float

#: safetensors dtype -> the name the safetensors serializer wants.
SERIALIZER_DTYPE = {
    "F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
}


@dataclass
class LlamaShape:
    """The parts of a LLaMA config that decide tensor names and shapes."""

    vocab_size: int = 512
    hidden_size: int = 64
    intermediate_size: int = 172
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def tensor_shapes(self, vocab_size: int | None = None) -> dict[str, tuple[int, ...]]:
        """HF LLaMA tensor names and shapes, in the order transformers' state_dict lists them."""
        v = vocab_size or self.vocab_size
        h, i, kv = self.hidden_size, self.intermediate_size, self.num_key_value_heads * self.head_dim
        shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
        for layer in range(self.num_hidden_layers):
            p = f"model.layers.{layer}."
            shapes[p + "self_attn.q_proj.weight"] = (h, h)
            shapes[p + "self_attn.k_proj.weight"] = (kv, h)
            shapes[p + "self_attn.v_proj.weight"] = (kv, h)
            shapes[p + "self_attn.o_proj.weight"] = (h, h)
            shapes[p + "mlp.gate_proj.weight"] = (i, h)
            shapes[p + "mlp.up_proj.weight"] = (i, h)
            shapes[p + "mlp.down_proj.weight"] = (h, i)
            shapes[p + "input_layernorm.weight"] = (h,)
            shapes[p + "post_attention_layernorm.weight"] = (h,)
        shapes["model.norm.weight"] = (h,)
        shapes["lm_head.weight"] = (v, h)
        return shapes

    def config_json(self, dtype: str, vocab_size: int | None = None, pad_token_id: int | None = None) -> dict:
        torch_dtype = {"F16": "float16", "BF16": "bfloat16", "F32": "float32"}[dtype]
        cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "bos_token_id": 1,
               "eos_token_id": 2, "hidden_act": "silu", "initializer_range": 0.02, "torch_dtype": torch_dtype,
               "tie_word_embeddings": False, "use_cache": True, **asdict(self)}
        cfg["vocab_size"] = vocab_size or self.vocab_size
        if pad_token_id is not None:
            cfg["pad_token_id"] = pad_token_id
        return cfg


#: Real LLaMA-1 shapes, for the benchmark's larger sizes and for error-message guesses.
LLAMA_7B = LlamaShape(32000, 4096, 11008, 32, 32, 32)
LLAMA_13B = LlamaShape(32000, 5120, 13824, 40, 40, 40)


def _rng_for(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([seed, *name.encode()])


def random_master_weights(shape: LlamaShape, seed: int = 0) -> Iterator[tuple[str, np.ndarray]]:
    """fp32 "pretrained" weights, one tensor at a time: N(0, 0.02) matrices, norms around 1."""
    for name, shp in shape.tensor_shapes().items():
        rng = _rng_for(seed, name)
        if name.endswith("norm.weight"):
            w = 1.0 + 0.05 * rng.standard_normal(shp, dtype=np.float32)
        else:
            w = 0.02 * rng.standard_normal(shp, dtype=np.float32)
        yield name, w


@dataclass
class FineTune:
    """How ``finetune`` moves weights. Defaults mimic a short full fine-tune at lr 2e-5."""

    lr: float = 2e-5
    steps: int = 2000
    #: typical |m_hat / sqrt(v_hat)| of Adam when gradient noise dominates: the per-step move is
    #: this fraction of lr. 0.1 gives a median relative change of ~5e-3 per tensor at the
    #: defaults, the order measured on a real AdamW pair (shared/research/perf-anchors.md).
    adam_ratio: float = 0.1
    drift: float = 0.002  # fraction of steps whose moves share one direction (persistent gradient)
    weight_decay: float = 0.0
    unseen_row_fraction: float = 0.3   # embedding/lm_head rows of tokens never seen: untouched
    frozen: tuple[str, ...] = ("model.layers.0.input_layernorm.weight",)  # tensors left untouched
    add_pad_row: bool = False          # vocab V -> V+1, new row = mean of the others
    #: tokens added to the vocabulary (rows = mean of the others), e.g. Orca 2's
    #: ("[PAD]", "<|im_start|>", "<|im_end|>"); when set it replaces add_pad_row's single "[PAD]"
    added_tokens: tuple[str, ...] = ()
    new_tensors: dict[str, tuple[int, ...]] = field(default_factory=dict)  # tensors only in the target
    seed: int = 1


def finetune_weights(name: str, w: np.ndarray, ft: FineTune) -> np.ndarray:
    """Return the fine-tuned fp32 master copy of one tensor (the input is not modified)."""
    if name in ft.frozen:
        return w
    rng = _rng_for(ft.seed, name)
    # Adam moves each element by ~adam_ratio * lr per step; over n noisy steps the walk spreads
    # as sqrt(n) steps around a persistent drift.
    step = ft.lr * ft.adam_ratio
    drift = rng.standard_normal(w.shape, dtype=np.float32) * np.float32(step * ft.drift * ft.steps)
    walk = rng.standard_normal(w.shape, dtype=np.float32) * np.float32(step * np.sqrt(ft.steps))
    out = w * np.float32(1.0 - ft.lr * ft.weight_decay * ft.steps) + drift + walk
    if name in ("model.embed_tokens.weight", "lm_head.weight") and ft.unseen_row_fraction > 0:
        unseen = _rng_for(ft.seed + 7, "rows").random(w.shape[0]) < ft.unseen_row_fraction
        out[unseen] = w[unseen]
    return out.astype(np.float32)


def _to_dtype_bytes(w32: np.ndarray, dtype: str) -> np.ndarray:
    return cast_bits(float_to_bits(w32, "F32"), "F32", dtype)


def write_shards(folder: Path, tensors: Iterator[tuple[str, str, np.ndarray]], max_shard_bytes: int | None,
                 total_bytes: int) -> list[str]:
    """Write (name, dtype, bit-pattern array) tensors as HF does: one ``model.safetensors`` or
    ``model-0000k-of-0000n.safetensors`` shards plus ``model.safetensors.index.json``.
    Holds at most one shard in memory."""
    folder.mkdir(parents=True, exist_ok=True)
    sharded = max_shard_bytes is not None and total_bytes > max_shard_bytes
    weight_map: dict[str, int] = {}
    current: dict[str, tuple[str, np.ndarray]] = {}
    size = 0

    def flush(index: int) -> None:
        nonlocal current, size
        specs = {k: TensorSpec(dtype=SERIALIZER_DTYPE[d], shape=list(a.shape), data_ptr=a.ctypes.data,
                               data_len=a.nbytes) for k, (d, a) in current.items()}
        tmp = folder / f".shard-{index}.tmp"
        serialize_file(specs, str(tmp), metadata={"format": "pt"})
        for k in current:
            weight_map[k] = index
        current, size = {}, 0

    index = 1
    for name, dtype, arr in tensors:
        if sharded and current and size + arr.nbytes > max_shard_bytes:
            flush(index)
            index += 1
        current[name] = (dtype, np.ascontiguousarray(arr))
        size += arr.nbytes
    flush(index)
    n = index
    names = []
    for i in range(1, n + 1):
        final = "model.safetensors" if not sharded else f"model-{i:05d}-of-{n:05d}.safetensors"
        (folder / f".shard-{i}.tmp").replace(folder / final)
        names.append(final)
    if sharded:
        index_doc = {"metadata": {"total_size": total_bytes},
                     "weight_map": {k: names[v - 1] for k, v in sorted(weight_map.items())}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index_doc, indent=2, sort_keys=True) + "\n")
    return names


#: A real byte-level BPE tokenizer of 924 ids (``<unk>``, ``<s>``, ``</s>``, 256 bytes, 665 merges),
#: built by scripts/build_synth_tokenizer.py with the ``tokenizers`` library and shipped as data,
#: so that writing a model needs neither ``tokenizers`` nor torch.
SYNTH_TOKENIZER = Path(__file__).with_name("synth_tokenizer.json")
BYTE_LEVEL_IDS = 3 + 256  # the specials and the byte alphabet: the smallest vocabulary that tokenises any text


def tokenizer_json(vocab_size: int, added: dict[str, int] | None = None) -> str | None:
    """The shipped tokenizer cut to ``vocab_size`` ids (merge k makes id 259 + k, so a prefix of the
    merges is a valid tokenizer), with ``added`` special tokens (e.g. ``[PAD]``) at their ids;
    None when the vocabulary is too small to hold the byte alphabet."""
    if vocab_size < BYTE_LEVEL_IDS:
        return None
    doc = json.loads(SYNTH_TOKENIZER.read_text(encoding="utf-8"))
    model = doc["model"]
    model["vocab"] = {t: i for t, i in model["vocab"].items() if i < vocab_size}
    model["merges"] = model["merges"][:max(0, vocab_size - BYTE_LEVEL_IDS)]
    doc["added_tokens"] = [t for t in doc["added_tokens"] if t["id"] < vocab_size]
    template = dict(doc["added_tokens"][0])
    for token, index in (added or {}).items():
        doc["added_tokens"].append({**template, "content": token, "id": index})
    return json.dumps(doc, indent=1, ensure_ascii=False, sort_keys=True) + "\n"


def _write_common_files(folder: Path, shape: LlamaShape, dtype: str, vocab: int, pad: int | None,
                        tokenizer_seed: int = 0, added: tuple[str, ...] = ("[PAD]",)) -> None:
    (folder / "config.json").write_text(json.dumps(shape.config_json(dtype, vocab, pad), indent=2) + "\n")
    (folder / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": pad or 0}, indent=2) + "\n")
    # A stand-in for Meta's sentencepiece file, which every LLaMA release carries and `make` takes
    # from the base: opaque bytes that the base and target share. transformers does not read it:
    # the tokenizer it loads is tokenizer.json, a real one (below).
    (folder / "tokenizer.model").write_bytes(np.random.default_rng(tokenizer_seed).bytes(4096))
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    if pad is not None:
        special["pad_token"] = "[PAD]"
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    added_ids = {t: pad + i for i, t in enumerate(added)} if pad is not None else {}
    real = tokenizer_json(shape.vocab_size, added_ids)
    if real is not None:
        (folder / "tokenizer.json").write_text(real, encoding="utf-8")
    tokenizer_class = "PreTrainedTokenizerFast" if real is not None else "LlamaTokenizer"
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": tokenizer_class, "model_max_length": 2048, **special}, indent=2) + "\n")
    if pad is not None:
        (folder / "added_tokens.json").write_text(json.dumps({t: pad + i for i, t in enumerate(added)}) + "\n")


def write_llama(folder: Path, shape: LlamaShape = LlamaShape(), dtype: str = "F16", seed: int = 0,
                max_shard_bytes: int | None = None) -> Path:
    """Write a random "pretrained" LLaMA-shaped HF folder in ``dtype``."""
    shapes = shape.tensor_shapes()
    total = sum(int(np.prod(s)) for s in shapes.values()) * {"F16": 2, "BF16": 2, "F32": 4}[dtype]
    gen = ((n, dtype, _to_dtype_bytes(w, dtype)) for n, w in random_master_weights(shape, seed))
    write_shards(folder, gen, max_shard_bytes, total)
    _write_common_files(folder, shape, dtype, shape.vocab_size, None)
    return folder


def write_finetune(folder: Path, shape: LlamaShape = LlamaShape(), base_seed: int = 0, dtype: str = "F16",
                   ft: FineTune = FineTune(), max_shard_bytes: int | None = None, form: str = "safetensors",
                   bin_shards: int | None = None) -> Path:
    """Write the fine-tune of ``write_llama(shape, seed=base_seed)`` in ``dtype``.

    The base's master weights are regenerated from the seed (not read back), so base and target
    can be written in different dtypes, as when an fp16 base is fine-tuned and saved in bf16/fp32.
    ``form="bin"`` writes HF ``.bin`` shards as ``save_pretrained(safe_serialization=False)`` does
    (``torch.save`` per shard, ``bin_shards`` of them with ``pytorch_model.bin.index.json``, or one
    ``pytorch_model.bin``); it needs torch.
    """
    shapes = shape.tensor_shapes()
    added = ft.added_tokens or (("[PAD]",) if ft.add_pad_row else ())
    vocab = shape.vocab_size + len(added)
    itemsize = {"F16": 2, "BF16": 2, "F32": 4}[dtype]
    total = sum(int(np.prod(s)) for s in shapes.values()) * itemsize
    total += 2 * len(added) * shape.hidden_size * itemsize
    total += sum(int(np.prod(s)) for s in ft.new_tensors.values()) * itemsize

    def gen() -> Iterator[tuple[str, str, np.ndarray]]:
        for name, w in random_master_weights(shape, base_seed):
            out = finetune_weights(name, w, ft)
            if added and name in ("model.embed_tokens.weight", "lm_head.weight"):
                mean = out.mean(axis=0, keepdims=True, dtype=np.float32)
                out = np.concatenate([out] + [mean] * len(added), axis=0)
            yield name, dtype, _to_dtype_bytes(out, dtype)
        for name, shp in ft.new_tensors.items():
            w = 0.02 * _rng_for(ft.seed, name).standard_normal(shp, dtype=np.float32)
            yield name, dtype, _to_dtype_bytes(w, dtype)

    if form == "bin":
        write_bin_shards(folder, gen(), bin_shards, total)
    else:
        write_shards(folder, gen(), max_shard_bytes, total)
    _write_common_files(folder, shape, dtype, vocab, shape.vocab_size if added else None, added=added or ("[PAD]",))
    return folder


def write_bin_shards(folder: Path, tensors: Iterator[tuple[str, str, np.ndarray]], shards: int | None,
                     total_bytes: int) -> list[str]:
    """Write (name, dtype, bit-pattern array) tensors as HF's ``.bin`` form: ``torch.save`` of a
    state dict per file, ``pytorch_model.bin`` or ``shards`` files ``pytorch_model-0000k-of-0000n.bin``
    cut at equal byte counts, plus ``pytorch_model.bin.index.json``. Needs torch (tests only)."""
    import torch  # noqa: PLC0415 - optional

    folder.mkdir(parents=True, exist_ok=True)
    n = shards or 1
    as_torch = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}
    groups: list[dict[str, object]] = [{} for _ in range(n)]
    done = 0
    weight_map: dict[str, str] = {}
    names = ["pytorch_model.bin"] if shards is None else [f"pytorch_model-{i:05d}-of-{n:05d}.bin" for i in range(1, n + 1)]
    for name, dtype, arr in tensors:
        k = min(n - 1, done * n // max(1, total_bytes))
        bits = torch.from_numpy(np.ascontiguousarray(arr).view({2: np.int16, 4: np.int32}[arr.dtype.itemsize]).copy())
        groups[k][name] = bits.view(as_torch[dtype])
        weight_map[name] = names[k]
        done += arr.nbytes
    for k, fname in enumerate(names):
        torch.save(groups[k], folder / fname)
    if shards is not None:
        doc = {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (folder / "pytorch_model.bin.index.json").write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    return names


__all__ = ["LlamaShape", "FineTune", "write_llama", "write_finetune", "LLAMA_7B", "LLAMA_13B",
           "bits_to_float"]
