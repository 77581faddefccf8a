"""Bases held as torch checkpoints: HF ``.bin`` shards and Meta's original ``consolidated.*.pth``.

Both are read with ``torch.load(..., weights_only=True, mmap=True)`` and nothing else: a file
whose pickle asks for anything but tensors and plain containers is refused (FormatError naming
the file); no pickled code ever runs. Tensors come out in HF canonical form (HF names, row-major
little-endian bytes, dtype as stored), so every form of the same weights hashes the same.

Meta's form is converted on the fly exactly as transformers' ``convert_llama_weights_to_hf.py``
(v4.47.1, the last release that ships it) builds its state dict before its final dtype cast:
model-parallel shards (files sorted by name) are concatenated along the dimension each tensor
kind was split on, ``wq``/``wk`` get the rotary permutation, names become HF names, norms come
from shard 0, and ``rope.freqs`` is dropped. The difference from that script, on purpose: it
saves everything as bf16 (a lossy cast of LLaMA-1's fp16); orca-diff keeps the stored dtype.
See docs/bases.md.

Memory: a tensor is built only when asked for (about 2x its size while merging and permuting);
the last two built are kept so that ranged reads of the same tensor by several threads build it
once; plus what the caller holds. Checkpoints are memory-mapped; to keep the mapped pages
from accumulating in the resident set, loaded files are dropped (unmapped) after
``MAP_RELEASE_BYTES`` of tensors have been served from them and re-opened on demand (that costs
one unpickle of the small metadata, not a read of the data).
"""

from __future__ import annotations

import json
import re
import sys
import threading
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import FormatError, InputNotFoundError, UsageError, require_extra, shown
from .base import TensorInfo, list_extra_files, require_regular

#: Tensors served from memory-mapped files before the maps are dropped. This bounds the
#: file-backed part of the resident set (clean page-cache pages the kernel can reclaim anyway);
#: each drop costs one re-unpickle of every open file's metadata when next needed (measured
#: ~0.12 s for a 724-tensor 65B shard), hence not smaller. Anonymous memory is bounded separately
#: (two cached tensors plus one being merged).
MAP_RELEASE_BYTES = 512 * 1024 * 1024

INDEX_NAME = "pytorch_model.bin.index.json"
SINGLE_BIN_NAME = "pytorch_model.bin"
_SHARD_RE = re.compile(r"pytorch_model-(\d+)-of-(\d+)\.bin")
_META_SHARD_RE = re.compile(r"consolidated\.(\d+)\.pth")

#: Rotary frequency tables: deterministic from the config, not weights. transformers < 4.31 saved
#: ``rotary_emb.inv_freq`` buffers in HF checkpoints and Meta's files carry ``rope.freqs``; both
#: are dropped so that every form of the same model has the same tensor table.
_NOT_WEIGHTS = (re.compile(r".*\.rotary_emb\.inv_freq$"), re.compile(r"^rope\.freqs$"))


def _torch():
    return require_extra("torch", "torch", "Reading .bin/.pth checkpoints")


def _dtype_names(torch: Any) -> dict[Any, str]:
    names = {
        torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64",
        torch.int8: "I8", torch.int16: "I16", torch.int32: "I32", torch.int64: "I64",
        torch.uint8: "U8", torch.bool: "BOOL",
    }
    for attr, name in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2"),
                       ("uint16", "U16"), ("uint32", "U32"), ("uint64", "U64")):
        if hasattr(torch, attr):
            names[getattr(torch, attr)] = name
    return names


def _is_weight(name: str) -> bool:
    return not any(p.match(name) for p in _NOT_WEIGHTS)


def tensor_bytes(t: Any) -> np.ndarray:
    """A torch tensor's row-major little-endian bytes as a 1-D uint8 array (no copy when the
    tensor is already contiguous; the array keeps the tensor, and so its mmap, alive)."""
    torch = _torch()
    if sys.byteorder != "little":  # pragma: no cover - no big-endian CI
        raise UsageError("reading torch checkpoints needs a little-endian machine")
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if not t.is_contiguous():  # a copy of at most its storage's size (check_storage ran at load)
        need = int(t.numel()) * int(t.element_size())
        if need > int(t.untyped_storage().nbytes()):
            raise FormatError(f"a tensor claims {need} bytes but its storage holds {int(t.untyped_storage().nbytes())}"
                              " (an expanded view); refused before allocating it")
    flat = t.contiguous().reshape(-1)
    if flat.numel() == 0:
        return np.zeros(0, dtype=np.uint8)
    return flat.view(torch.uint8).numpy()


def load_state_dict(path: Path) -> dict[str, Any]:
    """Load one checkpoint file as ``{name: tensor}``; see :func:`_load`."""
    return _load(path)[0]


def _load(path: Path) -> tuple[dict[str, Any], bool]:
    """Load one checkpoint file as ``{name: tensor}`` with ``weights_only=True`` (memory-mapped
    when the file is in torch's zip format, which every checkpoint since torch 1.6 is).

    Anything else is refused with a FormatError naming the file: a pickle that wants to build
    other objects (the classic malicious ``.bin``), a corrupt file, or a non-dict payload.
    """
    torch = _torch()
    try:
        require_regular(path, "checkpoint")  # before any open that could block on a FIFO
    except OSError as exc:
        raise InputNotFoundError(f"{path}: cannot read ({exc.strerror})") from None
    file_size = path.stat().st_size
    zipped = zipfile.is_zipfile(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipped)
    except FileNotFoundError:
        raise InputNotFoundError(f"{path}: no such file") from None
    except Exception as exc:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, EOFError...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "weights_only" in str(exc) or type(exc).__name__ == "UnpicklingError":
            raise FormatError(
                f"{path}: refused: its pickle asks for more than tensors (torch.load weights_only=True"
                f" said: {first[:200]}); orca-diff never runs code from a checkpoint. Use a"
                " safetensors copy or a checkpoint from a source you trust re-saved as tensors only"
            ) from None
        raise FormatError(f"{path}: not a readable torch checkpoint ({type(exc).__name__}: {first[:200]})") from None
    if not (isinstance(obj, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())):
        raise FormatError(f"{path}: expected a flat {{name: tensor}} state dict, found {type(obj).__name__}")
    for name, t in obj.items():
        check_storage(t, path, name, file_size)
    return obj, zipped


def check_storage(t: Any, path: Path, name: str, file_size: int) -> None:
    """Refuse a tensor whose bytes would not come from the file: a view claiming more elements
    than its storage holds (``expand``, stride 0, overlapping strides) would make any copy of it
    (``contiguous``) allocate the claimed size, e.g. 64 GiB from a 2 KB file. Checked on the
    metadata, before anything is allocated: claimed bytes <= storage bytes <= the file's size."""
    need = int(t.numel()) * int(t.element_size())
    try:
        have = int(t.untyped_storage().nbytes())
    except Exception:  # noqa: BLE001 - a storage we cannot measure is not trusted
        have = -1
    start = int(t.storage_offset()) * int(t.element_size())
    if need > 0 and (have < 0 or need > have - start or have > file_size):
        raise FormatError(f"{path}: tensor {shown(name)!r} claims {need} bytes but its storage holds {max(have, 0)} "
                          f"({file_size}-byte file): an expanded or overlapping view, not stored weights; refused "
                          "before allocating it")


class _Files:
    """Loaded checkpoint files, memory-mapped ones dropped after MAP_RELEASE_BYTES served.

    Files in torch's pre-1.6 format cannot be memory-mapped and sit fully in memory; they are not
    dropped by the byte budget (that would re-read them per tensor). With ``one_unmapped`` (HF
    shards, read one file after another) such a file is dropped when another file is opened.
    """

    def __init__(self, one_unmapped: bool) -> None:
        self._loaded: dict[Path, dict[str, Any]] = {}
        self._unmapped: set[Path] = set()
        self._one_unmapped = one_unmapped
        self._served = 0

    def get(self, path: Path) -> dict[str, Any]:
        sd = self._loaded.get(path)
        if sd is None:
            if self._one_unmapped:
                for other in list(self._unmapped):
                    self._loaded.pop(other, None)
                self._unmapped.clear()
            sd, mapped = _load(path)
            self._loaded[path] = sd
            if not mapped:
                self._unmapped.add(path)
        return sd

    def served(self, nbytes: int) -> None:
        self._served += nbytes
        if self._served >= MAP_RELEASE_BYTES:
            for path in [p for p in self._loaded if p not in self._unmapped]:
                self._loaded.pop(path, None)
            self._served = 0

    def release(self) -> None:
        self._loaded.clear()
        self._unmapped.clear()
        self._served = 0


class _CachedReader:
    """Ranged reads over whole-tensor builds: ``read(name, start, length)`` slices the last
    ``CACHED_TENSORS`` tensors built, so the chunked, multi-threaded reads of apply/make build
    each tensor once. Builds are serialised by a lock (they are memory copies, not compute).
    Cached tensors are private copies, never views of a memory map (a view would keep the map,
    and every page touched in it, alive). Memory: at most CACHED_TENSORS whole tensors plus the
    slices callers still hold."""

    CACHED_TENSORS = 2
    tensors: dict[str, TensorInfo]
    _files: _Files

    def _init_cache(self) -> None:
        self._lock = threading.Lock()
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()

    def _build_bytes(self, name: str) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def read(self, name: str, start: int = 0, length: int | None = None) -> np.ndarray:
        """Bytes ``[start, start+length)`` of tensor ``name`` (the whole tensor by default)."""
        size = self.tensors[name].nbytes
        if length is None:
            length = size - start
        if start < 0 or length < 0 or start + length > size:
            raise ValueError(f"range [{start}, {start + length}) outside tensor {name!r} of {size} bytes")
        with self._lock:
            data = self._cache.get(name)
            if data is None:
                data = self._build_bytes(name)
                self._files.served(data.nbytes)
                self._cache[name] = data
                while len(self._cache) > self.CACHED_TENSORS:
                    self._cache.popitem(last=False)
            else:
                self._cache.move_to_end(name)
        return data[start:start + length]

    def close(self) -> None:
        with self._lock:
            self._cache.clear()
            self._files.release()

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------- HF .bin


class TorchBinModel(_CachedReader):
    """An HF folder of ``pytorch_model*.bin`` shards (``save_pretrained(safe_serialization=False)``)."""

    def __init__(self, path: Path, files: list[Path]):
        torch = _torch()
        dtypes = _dtype_names(torch)
        self.path = path
        self.extra_files = list_extra_files(path)
        self.tensors: dict[str, TensorInfo] = {}
        self._file_of: dict[str, Path] = {}
        self._files = _Files(one_unmapped=True)
        self._init_cache()
        for file in files:
            sd = self._files.get(file)
            for name, t in sd.items():
                if not _is_weight(name):
                    continue
                if t.dtype not in dtypes:
                    raise FormatError(f"{file}: tensor {name!r} has unsupported dtype {t.dtype}")
                if name in self.tensors:
                    raise FormatError(f"{file}: tensor {name!r} also appears in {self._file_of[name].name}")
                self.tensors[name] = TensorInfo(name, dtypes[t.dtype], tuple(int(d) for d in t.shape))
                self._file_of[name] = file
            self._files.release()

    def _build_bytes(self, name: str) -> np.ndarray:
        # A copy, so that the cache never pins a file's memory map past its release.
        return np.array(tensor_bytes(self._files.get(self._file_of[name])[name]))


def _bin_files(folder: Path) -> list[Path]:
    """The weight files of an HF .bin folder, from its index (never a stray *.bin such as
    training_args.bin, which is an arbitrary pickle)."""
    index = folder / INDEX_NAME
    if index.is_file():
        try:
            doc = json.loads(index.read_text())
            weight_map = doc["weight_map"]
            names = list(dict.fromkeys(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise FormatError(f"{index}: not a valid index ({exc})") from None
        files = []
        for n in sorted(names):
            if not isinstance(n, str) or "/" in n or "\\" in n or n.startswith("."):
                raise FormatError(f"{index}: weight_map names an unsafe file {n!r}")
            f = folder / n
            if not f.is_file():
                raise InputNotFoundError(f"{f}: listed in {INDEX_NAME} but missing; download it again")
            files.append(f)
        return files
    single = folder / SINGLE_BIN_NAME
    if single.is_file():
        return [single]
    shards = sorted(p for p in folder.glob("pytorch_model-*-of-*.bin") if _SHARD_RE.fullmatch(p.name))
    if shards:
        raise InputNotFoundError(f"{folder}: has {shards[0].name}... but no {INDEX_NAME}; download the index too")
    raise InputNotFoundError(f"{folder}: no {SINGLE_BIN_NAME} or {INDEX_NAME} found")


# --------------------------------------------------------------------------- Meta original


@dataclass(frozen=True)
class _MetaRule:
    """How one HF tensor is built from Meta's model-parallel shards."""

    keys: str                 # Meta name (format with layer=)
    cat_dim: int | None       # None: taken from shard 0 (replicated)
    permute_heads: str | None = None  # "q" / "kv": apply the rotary permutation with that head count


_LAYER_RULES: dict[str, _MetaRule] = {
    "self_attn.q_proj.weight": _MetaRule("layers.{layer}.attention.wq.weight", 0, "q"),
    "self_attn.k_proj.weight": _MetaRule("layers.{layer}.attention.wk.weight", 0, "kv"),
    "self_attn.v_proj.weight": _MetaRule("layers.{layer}.attention.wv.weight", 0),
    "self_attn.o_proj.weight": _MetaRule("layers.{layer}.attention.wo.weight", 1),
    "mlp.gate_proj.weight": _MetaRule("layers.{layer}.feed_forward.w1.weight", 0),
    "mlp.up_proj.weight": _MetaRule("layers.{layer}.feed_forward.w3.weight", 0),
    "mlp.down_proj.weight": _MetaRule("layers.{layer}.feed_forward.w2.weight", 1),
    "input_layernorm.weight": _MetaRule("layers.{layer}.attention_norm.weight", None),
    "post_attention_layernorm.weight": _MetaRule("layers.{layer}.ffn_norm.weight", None),
}


def permute_rotary(w: Any, n_heads: int, dim1: int, dim2: int) -> Any:
    """transformers' ``permute`` from convert_llama_weights_to_hf.py, verbatim: Meta's rotary
    embedding rotates interleaved pairs, HF's rotates halves, so q/k rows are reordered."""
    return w.view(n_heads, dim1 // n_heads // 2, 2, dim2).transpose(1, 2).reshape(dim1, dim2)


class MetaCheckpoint(_CachedReader):
    """Meta's original release (``params.json`` + ``consolidated.NN.pth``) seen as an HF model."""

    def __init__(self, path: Path, shards: list[Path]):
        torch = _torch()
        dtypes = _dtype_names(torch)
        self.path = path
        self.extra_files = list_extra_files(path)
        if "tokenizer.model" not in self.extra_files and (path.parent / "tokenizer.model").is_file():
            self.extra_files["tokenizer.model"] = path.parent / "tokenizer.model"  # Meta's download layout
        self._shards = shards
        self._files = _Files(one_unmapped=False)
        self._init_cache()
        params_path = path / "params.json"
        try:
            params = json.loads(params_path.read_text())
            params = params.get("model", params)
            self.n_layers = int(params["n_layers"])
            self.n_heads = int(params["n_heads"])
            self.dim = int(params["dim"])
            kv = params.get("n_kv_heads")
            self.n_kv_heads = int(kv) if kv is not None else self.n_heads
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise FormatError(f"{params_path}: not a valid Meta params.json ({type(exc).__name__}: {exc})") from None
        n = len(shards)
        if self.dim % self.n_heads or (self.dim // self.n_heads) % 2:
            raise FormatError(f"{params_path}: dim {self.dim} is not n_heads {self.n_heads} x an even head size")
        if self.n_heads % n or self.n_kv_heads % n:
            raise FormatError(
                f"{path}: {n} consolidated.*.pth shards cannot split {self.n_heads} heads /"
                f" {self.n_kv_heads} key-value heads evenly; is a shard missing or extra?"
            )
        self.head_dim = self.dim // self.n_heads
        self.kv_dim = self.head_dim * self.n_kv_heads

        # HF name -> (rule, Meta key); built in transformers' state_dict order.
        self._plan: dict[str, tuple[_MetaRule, str]] = {}
        infos: dict[str, TensorInfo] = {}
        metas = [self._files.get(s) for s in shards]
        known: set[str] = set()

        def add(hf: str, rule: _MetaRule, key: str) -> None:
            parts = []
            for s, sd in zip(shards, metas):
                if key not in sd:
                    raise FormatError(f"{s}: tensor {key!r} is missing (needed for {hf})")
                parts.append(sd[key])
            if any(p.dtype != parts[0].dtype for p in parts) or parts[0].dtype not in dtypes:
                raise FormatError(f"{path}: {key!r} has dtypes {sorted({str(p.dtype) for p in parts})} across shards")
            shape = list(parts[0].shape)
            if rule.cat_dim is not None:
                for s, p in zip(shards, parts):
                    other = [d for i, d in enumerate(p.shape) if i != rule.cat_dim]
                    if len(p.shape) != len(shape) or other != [d for i, d in enumerate(shape) if i != rule.cat_dim]:
                        raise FormatError(f"{s}: {key!r} has shape {tuple(p.shape)}, inconsistent with shard 0")
                shape[rule.cat_dim] = sum(int(p.shape[rule.cat_dim]) for p in parts)
            infos[hf] = TensorInfo(hf, dtypes[parts[0].dtype], tuple(int(d) for d in shape))
            self._plan[hf] = (rule, key)
            known.add(key)

        embed_parts = [sd.get("tok_embeddings.weight") for sd in metas]
        if any(p is None or p.dim() != 2 for p in embed_parts):
            raise FormatError(f"{shards[0]}: no 2-D 'tok_embeddings.weight'; not a LLaMA checkpoint")
        # LLaMA 1/2 split the embedding along its columns, LLaMA 3 along rows: read it off the shapes.
        embed_dim = 1 if n == 1 or int(embed_parts[0].shape[1]) * n == self.dim else 0
        add("model.embed_tokens.weight", _MetaRule("tok_embeddings.weight", embed_dim), "tok_embeddings.weight")
        for layer in range(self.n_layers):
            for suffix, rule in _LAYER_RULES.items():
                add(f"model.layers.{layer}.{suffix}", rule, rule.keys.format(layer=layer))
        add("model.norm.weight", _MetaRule("norm.weight", None), "norm.weight")
        add("lm_head.weight", _MetaRule("output.weight", 0), "output.weight")
        for s, sd in zip(shards, metas):
            stray = [k for k in sd if k not in known and _is_weight(k)]
            if stray:
                raise FormatError(
                    f"{s}: unexpected tensor {stray[0]!r} (params.json says {self.n_layers} layers);"
                    " not a LLaMA checkpoint orca-diff knows"
                )
        for hf, want in (("model.layers.0.self_attn.q_proj.weight", (self.dim, self.dim)),
                         ("model.layers.0.self_attn.k_proj.weight", (self.kv_dim, self.dim))):
            if self.n_layers and infos[hf].shape != want:
                raise FormatError(
                    f"{path}: {hf} would be {infos[hf].shape} but params.json (dim {self.dim}, n_heads"
                    f" {self.n_heads}, n_kv_heads {self.n_kv_heads}) implies {want}"
                )
        self.tensors = infos
        del metas
        self._files.release()

    def _build(self, name: str) -> Any:
        torch = _torch()
        rule, key = self._plan[name]
        parts = [self._files.get(s)[key] for s in self._shards]
        if rule.cat_dim is None or len(parts) == 1:
            w = parts[0]
        else:
            w = torch.cat(parts, dim=rule.cat_dim)
        del parts
        if rule.permute_heads == "q":
            w = permute_rotary(w, self.n_heads, self.dim, self.dim)
        elif rule.permute_heads == "kv":
            w = permute_rotary(w, self.n_kv_heads, self.kv_dim, self.dim)
        return w

    def _build_bytes(self, name: str) -> np.ndarray:
        rule, _ = self._plan[name]
        data = tensor_bytes(self._build(name))
        if rule.permute_heads is None and (rule.cat_dim is None or len(self._shards) == 1):
            data = np.array(data)  # a view of a memory map: copy it so the cache does not pin the map
        return data


def _meta_shards(folder: Path) -> list[Path]:
    shards = sorted(p for p in folder.glob("consolidated.*.pth") if _META_SHARD_RE.fullmatch(p.name))
    numbers = [int(_META_SHARD_RE.fullmatch(p.name).group(1)) for p in shards]  # type: ignore[union-attr]
    if numbers != list(range(len(shards))):
        raise InputNotFoundError(
            f"{folder}: model-parallel shards must be consolidated.00.pth ... consolidated.{len(shards) - 1:02d}.pth"
            f" without gaps, found {[p.name for p in shards]}"
        )
    return shards


# --------------------------------------------------------------------------- dispatch


def open_torch_model(path: str | Path):
    """Open an HF ``.bin`` folder or a Meta original checkpoint folder as a ModelReader."""
    p = Path(path)
    if not p.is_dir():
        raise UsageError(f"{p}: give the model folder, not a single .bin/.pth file")
    _torch()  # a clear MissingExtraError before anything else
    if (p / "params.json").is_file() and any(p.glob("consolidated.*.pth")):
        return MetaCheckpoint(p, _meta_shards(p))
    if any(p.glob("consolidated.*.pth")):
        raise InputNotFoundError(f"{p}: has consolidated.*.pth but no params.json; copy Meta's params.json next to them")
    return TorchBinModel(p, _bin_files(p))


__all__ = ["open_torch_model", "load_state_dict", "tensor_bytes", "permute_rotary", "MetaCheckpoint",
           "TorchBinModel", "MAP_RELEASE_BYTES"]
