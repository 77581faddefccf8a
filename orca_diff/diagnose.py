"""Guess why a base does not match the one a diff was made from.

``apply`` and ``verify`` refuse a wrong base before writing anything; this module turns the bare
fact ("tensor X differs") into a likely cause a user can act on: a different model family or
size (read from tensor shapes), a different dtype (fp32 or bf16 instead of fp16), a different
conversion of Meta's checkpoint (the rotary q/k permutation applied zero or two times), a vocab
with an added pad token, or a single corrupted file. Only shapes and dtypes are needed, plus
(optionally) the base's reader to test the q/k permutation on actual bytes. torch is not needed.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Mapping, Sequence

import numpy as np

from .digests import BLAKE3, SHA256, digest_bytes
from .containers import ModelReader, TensorInfo

Expected = Mapping[str, tuple[str, Sequence[int], str]]

#: (hidden, layers) -> the LLaMA-family sizes with those shapes. LLaMA-2 7B/13B have the same
#: shapes as LLaMA-1's (they differ in context length, which is not in the tensors).
KNOWN_SIZES: dict[tuple[int, int], str] = {
    (4096, 32): "7B",
    (5120, 40): "13B",
    (6656, 60): "30B",
    (8192, 80): "65B/70B",
}

#: head_dim values tried by the permutation check when the base has no config.json to read.
_HEAD_DIM_CANDIDATES = (128, 64, 256, 96, 80, 160, 32, 16, 8, 4, 2)

_DTYPE_WORDS = {"F16": "fp16", "BF16": "bf16", "F32": "fp32", "F64": "fp64"}


def _shape(x: Sequence[int]) -> tuple[int, ...]:
    return tuple(int(d) for d in x)


def describe_llama(shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    """A short human description of a LLaMA-shaped tensor table, or None if it is not one."""
    embed = shapes.get("model.embed_tokens.weight")
    if embed is None or len(embed) != 2:
        return None
    vocab, hidden = embed
    layers = 0
    while f"model.layers.{layers}.self_attn.q_proj.weight" in shapes:
        layers += 1
    k = shapes.get("model.layers.0.self_attn.k_proj.weight")
    gate = shapes.get("model.layers.0.mlp.gate_proj.weight")
    parts = [f"hidden {hidden}", f"{layers} layers"]
    if gate:
        parts.append(f"intermediate {gate[0]}")
    parts.append(f"vocab {vocab}")
    size = KNOWN_SIZES.get((hidden, layers))
    name = f"LLaMA {size}" if size else "LLaMA-shaped"
    if k is not None and k[0] != hidden:
        parts.append(f"k_proj {k[0]} rows: grouped-query attention")
        if size == "65B/70B":
            name = "LLaMA-2 70B"
        elif (hidden, layers) == (4096, 32):
            name = "a GQA 7B/8B (Mistral 7B or LLaMA-3 8B)"
    elif size == "65B/70B":
        name = "LLaMA-1 65B"
    return f"{name} ({', '.join(parts)})"


def _dominant_dtype(dtypes: list[str]) -> str | None:
    return Counter(dtypes).most_common(1)[0][0] if dtypes else None


def _permute_rows(data: np.ndarray, rows: int, cols_bytes: int, n_heads: int, inverse: bool) -> np.ndarray:
    """transformers' rotary permute (``inverse=False``) or its inverse on raw row bytes.

    permute: ``w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)``.
    Only whole rows move, so it works on bytes of any dtype.
    """
    half = rows // n_heads // 2
    w = data.reshape(rows, cols_bytes)
    if inverse:
        return np.ascontiguousarray(w.reshape(n_heads, 2, half, cols_bytes).transpose(0, 2, 1, 3)).reshape(-1)
    return np.ascontiguousarray(w.reshape(n_heads, half, 2, cols_bytes).transpose(0, 2, 1, 3)).reshape(-1)


def _configured_heads(reader: ModelReader, name: str) -> list[int]:
    """Head counts read from the base's config.json / params.json, if it has one."""
    key_value = ".k_proj." in name
    for fname in ("config.json", "params.json"):
        path = reader.extra_files.get(fname)
        if path is None:
            continue
        try:
            cfg = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        cfg = cfg.get("model", cfg) if isinstance(cfg, dict) else {}
        heads = cfg.get("num_attention_heads", cfg.get("n_heads"))
        if key_value:
            heads = cfg.get("num_key_value_heads", cfg.get("n_kv_heads")) or heads
        if isinstance(heads, int) and heads > 0:
            return [heads]
    return []


def permutation_check(reader: ModelReader, name: str, expected_sha: str) -> str | None:
    """Does ``name`` (a q_proj/k_proj) match ``expected_sha`` once the rotary permutation is
    applied, or undone? Returns "permute" / "unpermute" / None. Reads one tensor."""
    info = reader.tensors.get(name)
    if info is None or len(info.shape) != 2:
        return None
    rows, cols = info.shape
    data = np.asarray(reader.read(name))
    heads = _configured_heads(reader, name)
    heads += [rows // hd for hd in _HEAD_DIM_CANDIDATES if rows % hd == 0 and hd % 2 == 0 and rows // hd not in heads]
    for n_heads in heads:
        if n_heads <= 0 or rows % (2 * n_heads):
            continue
        for inverse, verdict in ((False, "permute"), (True, "unpermute")):
            moved = _permute_rows(data, rows, cols * info.itemsize, n_heads, inverse)
            # the recorded digest is sha256 (format 1) or BLAKE3 (format 2): either proves it
            if expected_sha in (digest_bytes(moved, SHA256), digest_bytes(moved, BLAKE3)):
                return verdict
    return None


def explain_base_mismatch(
    expected: Expected,
    found_infos: Mapping[str, TensorInfo],
    first_bad: str,
    found_sha: str | None,
    *,
    reader: ModelReader | None = None,
) -> str:
    """One line guessing why the base differs from the diff's base.

    ``expected`` is the diff's record of its base (``{name: (dtype, shape, sha256)}``),
    ``found_infos`` the given base's tensor table, ``first_bad`` the first tensor that differs
    and ``found_sha`` its sha256 in the given base (None when missing or not hashed). With
    ``reader`` (the given base) a q/k permutation check is made on one tensor's bytes.
    """
    hints: list[str] = []
    exp_shapes = {n: _shape(s) for n, (_, s, _) in expected.items()}
    found_shapes = {n: tuple(i.shape) for n, i in found_infos.items()}

    # A different family or size, read from shapes.
    family_differs = False
    exp_desc, found_desc = describe_llama(exp_shapes), describe_llama(found_shapes)
    if exp_desc and found_desc and exp_desc != found_desc:
        e_embed, f_embed = exp_shapes["model.embed_tokens.weight"], found_shapes["model.embed_tokens.weight"]
        rest = lambda shapes: {n: s for n, s in shapes.items() if "embed_tokens" not in n and "lm_head" not in n}  # noqa: E731
        if f_embed[1] == e_embed[1] and f_embed[0] != e_embed[0] and rest(exp_shapes) == rest(found_shapes):
            added = f_embed[0] - e_embed[0]
            hints.append(
                f"this base has vocab {f_embed[0]} where the diff's base has {e_embed[0]}"
                + (": it already has an added (pad) token, so it is probably a fine-tune, not the original model"
                   if added > 0 else "")
            )
        else:
            hints.append(f"the diff was made from {exp_desc} but this base is {found_desc}")
        family_differs = True

    # A different dtype.
    exp_dtype = _dominant_dtype([d for d, _, _ in expected.values()])
    found_dtype = _dominant_dtype([i.dtype for i in found_infos.values()])
    if exp_dtype and found_dtype and exp_dtype != found_dtype:
        e, f = _DTYPE_WORDS.get(exp_dtype, exp_dtype), _DTYPE_WORDS.get(found_dtype, found_dtype)
        hint = f"the diff needs a {e} base but this base is stored in {f}"
        if found_dtype == "F32" and exp_dtype in ("F16", "BF16"):
            hint += (f" (if it was upcast from the {e} release, casting it back to {e} gives the exact bytes;"
                     f" otherwise use the original {e} checkpoint)")
        elif found_dtype == "BF16" and exp_dtype == "F16":
            hint += (" (transformers' convert_llama_weights_to_hf saves bf16, a lossy cast of Meta's fp16"
                     " originals that cannot be undone: give the original Meta folder with params.json and"
                     " consolidated.*.pth instead, orca-diff converts it itself)")
        hints.append(hint)

    # Missing / unexpected tensors.
    missing = [] if family_differs else [n for n in expected if n not in found_infos]
    unexpected = [] if family_differs else [n for n in found_infos if n not in expected]
    if missing:
        hints.append(f"{len(missing)} tensor(s) of the diff's base are missing from this base (first: {missing[0]})")
    if unexpected:
        what = f"{len(unexpected)} tensor(s) not in the diff's base (first: {unexpected[0]})"
        if all(n.endswith("rotary_emb.inv_freq") for n in unexpected):
            what += "; rotary_emb.inv_freq buffers were saved by transformers before 4.31 and are not weights"
        hints.append(f"this base has {what}")

    # Same names, dtypes and shapes: a conversion difference or a modified file.
    if not hints and first_bad in found_infos and first_bad in expected:
        verdict = None
        if reader is not None and (".q_proj." in first_bad or ".k_proj." in first_bad):
            try:
                verdict = permutation_check(reader, first_bad, expected[first_bad][2])
            except Exception:  # noqa: BLE001 - a hint must never mask the real error
                verdict = None
        if verdict == "permute":
            hints.append(
                f"{first_bad} matches once the rotary q/k permutation is applied: this base keeps Meta's"
                " interleaved q/k layout (a conversion that skipped the permutation); give the original Meta"
                " folder (params.json + consolidated.*.pth) or a transformers conversion"
            )
        elif verdict == "unpermute":
            hints.append(
                f"{first_bad} matches once the rotary q/k permutation is undone: this base was permuted twice"
                " (converted from an already converted checkpoint); give the original Meta folder or a"
                " single transformers conversion"
            )
        else:
            hints.append(
                f"names, dtypes and shapes all match but the bytes of {first_bad} differ: a corrupted or"
                " modified file (re-download the shard holding it), or a different checkpoint of the same"
                " architecture; compare `orca-diff fingerprint BASE --json` with the diff's base"
            )
    if not hints:
        hints.append(f"tensor {first_bad} differs")
    return "; ".join(hints) + "."


def explain_damaged_tensor(reader: ModelReader, name: str) -> str:
    """What to do when a tensor passed the sampled check but its full digest differs: the base is
    the right checkpoint (its sampled blocks match) with bytes changed between them, so the file
    holding the tensor is damaged or was edited; naming that file says what to download again."""
    headers = getattr(reader, "headers", {})  # safetensors: relative file name -> header
    where = next((rel for rel, h in headers.items() if any(e.info.name == name for e in h.entries)), None)
    held = f"the file holding it, {where}," if where else "the file holding it"
    return (f"Its sampled blocks match, so this is the right base with bytes changed between them: {held} is "
            "damaged or was edited; download that file again (`orca-diff verify --base BASE --diff DIFF` checks "
            "every tensor) and rerun.")


__all__ = ["explain_base_mismatch", "explain_damaged_tensor", "describe_llama", "permutation_check", "KNOWN_SIZES"]
