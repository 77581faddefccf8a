"""Shared fixtures: tiny LLaMA-shaped model pairs, written the way HF writes them."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import pytest

from orca_diff.synth import FineTune, LlamaShape, write_finetune, write_llama

os.environ.setdefault("ORCA_DIFF_DISABLE_PROGRESS_BARS", "1")

#: Small enough for milliseconds, big enough for several chunks with a 4 KiB chunk size.
TINY = LlamaShape(vocab_size=320, hidden_size=32, intermediate_size=88, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=4)


@pytest.fixture
def make_pair(tmp_path: Path) -> Callable[..., tuple[Path, Path]]:
    """``make_pair(base_dtype, target_dtype, shard=None, **finetune)`` -> (base_dir, target_dir)."""
    counter = iter(range(1000))

    def build(base_dtype: str = "BF16", target_dtype: str | None = None, shard: int | None = None,
              shape: LlamaShape = TINY, **ft: object) -> tuple[Path, Path]:
        i = next(counter)
        base = write_llama(tmp_path / f"base{i}", shape, base_dtype, seed=0, max_shard_bytes=shard)
        target = write_finetune(tmp_path / f"target{i}", shape, base_seed=0, dtype=target_dtype or base_dtype,
                                ft=FineTune(**ft), max_shard_bytes=shard)  # type: ignore[arg-type]
        return base, target

    return build


def file_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file in a folder (relative path -> hex), the byte-identity oracle."""
    import hashlib

    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}
