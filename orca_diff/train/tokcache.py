"""Tokenization cached once per stage's data, memory-mapped, shared by every rank.

Tokenizing FLAN-5M takes about 55 minutes, and every rank did it on every start (issue 24.8).
The encoded examples of a stage are written once to ``OUT/cache/tokens-<key>/`` (``ids.npy``: all
token ids end to end in the smallest dtype that holds the vocabulary; ``offsets.npy``,
``prompt_lens.npy``; ``masks.npy`` + ``has_mask.npy`` for multi-turn targets; ``meta.json``) by
rank 0 under a temporary name and renamed when complete; every rank then maps the same files
read-only (``np.load(mmap_mode="r")``), so the page cache holds one copy per machine and a
restart reads instead of tokenizing.

The key is the sha256 of everything that decides the tokens: the data files' sha256, the
tokenizer (its full serialized form, added tokens and chat template), the template, max_seq_len,
prompt erasure, the data layout settings, and the system-message mode with its seed and stage. A
cache entry is content-addressed: an entry that does not match its key is never used, and a stale
one is simply not looked up.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .data import Example

CACHE_DIRNAME = "cache"
VERSION = 1


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of what decides the tokenizer's output (its serialized form, specials, chat template)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    extra = json.dumps({"added": sorted((str(k), int(v)) for k, v in tokenizer.get_added_vocab().items()),
                        "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
                        "bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id,
                        "chat_template": str(getattr(tokenizer, "chat_template", None))}, sort_keys=True)
    return hashlib.sha256((body + extra).encode("utf-8", "surrogatepass")).hexdigest()


def cache_key(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps({**parts, "version": VERSION}, sort_keys=True, default=str).encode()).hexdigest()


def _write(folder: Path, examples: list[Example], dropped: int, summary: Any, key: str) -> None:
    tmp = folder.with_name(folder.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    dtype = examples[0].input_ids.dtype if examples else np.uint16
    lengths = np.array([len(e) for e in examples], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    ids = np.concatenate([np.asarray(e.input_ids, dtype=dtype) for e in examples]) if examples \
        else np.zeros(0, dtype)
    has_mask = np.array([e.target_mask is not None for e in examples], dtype=bool)
    masks = np.concatenate([e.target_mask if e.target_mask is not None else np.zeros(len(e), bool)
                            for e in examples]) if examples else np.zeros(0, bool)
    for name, arr in (("ids", ids), ("offsets", offsets), ("prompt_lens", np.array([e.prompt_len for e in examples],
                                                                                      dtype=np.int64)),
                      ("has_mask", has_mask), ("masks", masks)):
        np.save(tmp / f"{name}.npy", arr)
    (tmp / "meta.json").write_text(json.dumps({"key": key, "examples": len(examples), "dropped": dropped,
                                               "summary": summary}), encoding="utf-8")
    try:
        os.replace(tmp, folder)
    except OSError:  # another process finished the same entry first: theirs is as good
        shutil.rmtree(tmp, ignore_errors=True)


def _read(folder: Path, key: str) -> tuple[list[Example], int, Any] | None:
    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        if meta.get("key") != key:
            return None
        ids = np.load(folder / "ids.npy", mmap_mode="r", allow_pickle=False)
        offsets = np.load(folder / "offsets.npy", allow_pickle=False)
        prompt_lens = np.load(folder / "prompt_lens.npy", allow_pickle=False)
        has_mask = np.load(folder / "has_mask.npy", allow_pickle=False)
        masks = np.load(folder / "masks.npy", mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError):
        return None
    if len(offsets) != meta["examples"] + 1 or int(offsets[-1]) != len(ids):
        return None
    examples = [Example(ids[offsets[i]:offsets[i + 1]], int(prompt_lens[i]),
                        np.asarray(masks[offsets[i]:offsets[i + 1]]) if has_mask[i] else None)
                for i in range(meta["examples"])]
    return examples, int(meta["dropped"]), meta["summary"]


def cached_examples(out: Path, parts: dict[str, Any], build: Callable[[], tuple[list[Example], int, Any]],
                    main: bool, barrier: Callable[[], None]) -> tuple[list[Example], int, Any, bool]:
    """(examples, dropped, summary, from_cache): rank 0 builds a missing entry, every rank maps it."""
    key = cache_key(parts)
    folder = out / CACHE_DIRNAME / f"tokens-{key[:32]}"
    hit = _read(folder, key) if folder.is_dir() else None
    built = None
    if hit is None and main:
        built = build()
        _write(folder, *built, key)
    barrier()
    if hit is None:
        hit = _read(folder, key)
    if hit is None:  # could not be written (read-only disk...): every rank tokenizes for itself
        return (*(built or build()), False)
    return (*hit, built is None)
