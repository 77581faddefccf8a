"""FastChat / Vicuna delta weights: ``target = base + delta`` in fp16.

What ``fastchat/model/apply_delta.py`` (lm-sys/FastChat) does, and so what this module does:
both models are loaded with ``torch_dtype=torch.float16`` (so a bf16 or fp32 base is first
rounded to fp16, round-to-nearest-even), then for every tensor of the BASE's state dict
``param.data += delta.state_dict()[name]``: an fp16 add, correctly rounded (torch computes it in
fp32 and rounds once; fp32 has enough bits that this equals a single IEEE fp16 rounding, which
is also what numpy's float16 add does). A tensor of the base missing from the delta is an error
(FastChat asserts); a tensor only in the delta is refused too (FastChat's model would keep that
parameter as initialised, i.e. random: a silently wrong model).

v0 deltas (lmsys/vicuna-*-delta-v0) hold 32001 rows in ``embed_tokens`` and ``lm_head`` while
LLaMA has 32000. The apply_delta of that era (before commit 00d9e667 "Release new weights v1.1",
fschat <= 0.1.10) added a ``[PAD]`` token to the base tokenizer, resized the base embeddings to
32001 and set the new row to ZERO before adding, so the pad row of the result is ``0 + delta``.
Newer FastChat fails with "The size of tensor a (32000) must match the size of tensor b (32001)";
orca-diff does what the old tool did, and says so.

The rebuilt model is written as safetensors (what ``save_pretrained`` writes with current
transformers), the tensors bit-identical to FastChat's; config and tokenizer files come from the
delta (FastChat >= #647 saves the delta's tokenizer; its low-memory path saves the delta's config).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..bits import cast_bits
from ..errors import BaseMismatchError, FormatError, VerificationError
from ..pipeline import default_threads, ordered_map
from ..progress import byte_bar
from ..containers import DTYPE_SIZES, ModelReader, TensorInfo, open_model, read_range
from .common import (CHUNK_ELEMENTS, PAD_ROW_TENSORS, adds_pad_row, require_floats, LegacyReport, SafetensorsWriter, copy_model_files, model_fingerprint,
               state_dict_order, verify_written)

COMPUTE_DTYPE = "F16"
_UINT = {2: np.uint16, 4: np.uint32, 8: np.uint64}


def as_f16(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Raw little-endian bytes of ``dtype`` as float16 values, cast as ``.to(torch.float16)`` does."""
    bits = raw.view(_UINT[DTYPE_SIZES[dtype]])
    return cast_bits(bits, dtype, COMPUTE_DTYPE).view(np.float16)


def plan(base: ModelReader, delta: ModelReader) -> tuple[list[TensorInfo], int]:
    """The output tensors (base state-dict order, fp16) and how many zero pad rows the v0 rule
    appends to the base (0 or 1). Raises before anything is written when the pair cannot work."""
    infos: list[TensorInfo] = []
    pad_rows: set[int] = set()
    only_in_delta = [n for n in state_dict_order(delta.tensors) if n not in base.tensors]
    if only_in_delta:
        raise BaseMismatchError(
            f"base {base.path}: has no tensor {only_in_delta[0]!r}, which the delta has"
            f"{f' (and {len(only_in_delta) - 1} more)' if len(only_in_delta) > 1 else ''}; FastChat's apply_delta"
            " would leave it as the model class initialised it (random), and the model would be wrong. Nothing was"
            " written; use the complete base the delta was made for")
    for name in state_dict_order(base.tensors):
        b = base.tensors[name]
        d = delta.tensors.get(name)
        if d is None:
            raise FormatError(f"delta {delta.path}: has no tensor {name!r}, which the base has (FastChat's apply_delta"
                              " stops with an AssertionError here); is this the base the delta was made for?")
        require_floats(name, ((b, "base"), (d, "delta")), "a FastChat delta")
        if b.shape == d.shape:
            infos.append(TensorInfo(name, COMPUTE_DTYPE, b.shape))
            continue
        if adds_pad_row(name, b, d):
            pad_rows.add(1)
            infos.append(TensorInfo(name, COMPUTE_DTYPE, d.shape))
            continue
        hint = ""
        if name in PAD_ROW_TENSORS and len(b.shape) == 2 and len(d.shape) == 2 and b.shape[1] == d.shape[1]:
            if b.shape[0] > d.shape[0]:
                hint = (f" The base already has {b.shape[0] - d.shape[0]} extra row(s) (a pad token added):"
                        " use the plain LLaMA conversion (32000 rows) as base.")
            else:
                hint = (f" Only v0 deltas add rows, and exactly one ([PAD]); {d.shape[0] - b.shape[0]} extra rows"
                        " mean the delta was made from another base.")
        raise BaseMismatchError(
            f"base {base.path}: tensor {name!r} is {list(b.shape)} but the delta's is {list(d.shape)} (FastChat"
            f" fails with 'The size of tensor a ({b.shape[0] if b.shape else 0}) must match the size of tensor b"
            f" ({d.shape[0] if d.shape else 0})'); nothing was written.{hint} Is the base the LLaMA size the"
            " delta names?")
    rows = {i.name: i.shape[0] - base.tensors[i.name].shape[0] for i in infos if i.name in PAD_ROW_TENSORS}
    if pad_rows and len(set(rows.values())) > 1:
        raise FormatError(f"delta {delta.path}: embed_tokens and lm_head disagree on the vocabulary size {rows}")
    return infos, 1 if pad_rows else 0


def effective_base_fingerprint(base: ModelReader, names: list[str]) -> str:
    """Fingerprint of the base as FastChat computes with it (every tensor cast to fp16), so a
    bf16 and an fp16 copy of the same LLaMA agree exactly when FastChat's results would."""
    import hashlib

    from ..fingerprint import base_fingerprint

    hashes = {}
    for name in names:
        info = base.tensors[name]
        h = hashlib.sha256()
        for start in range(0, info.numel, CHUNK_ELEMENTS):
            n = min(CHUNK_ELEMENTS, info.numel - start)
            raw = read_range(base, name, start * info.itemsize, n * info.itemsize)
            h.update(as_f16(raw, info.dtype).view(np.uint8))
        hashes[name] = (COMPUTE_DTYPE, info.shape, h.hexdigest())
    return base_fingerprint(hashes)


def base_evidence(base: ModelReader, delta: ModelReader, infos: list[TensorInfo], base_dir: Path,
                  check_integrity: bool, checks: list[str]) -> str:
    """Judge the base by the delta's bytes (:mod:`.evidence`), since the format records nothing
    about it: refuse (before writing) when the evidence is clear, unless told not to check.
    Returns the one line every run prints about it; the measured figure goes to ``checks``."""
    from .evidence import sample_exactness

    said = "a FastChat delta records nothing about its base (no name, no hash, no sum)"
    ev = sample_exactness(base, delta, [i.name for i in infos], as_f16)
    if ev.refutes and check_integrity:
        raise BaseMismatchError(
            f"base {base_dir}: not the base this FastChat delta was made from, by the evidence of its bytes: "
            f"{ev.describe()}; nothing was written. Use the LLaMA the delta names, or pass --skip-base-check "
            "to rebuild anyway")
    if not ev.conclusive:
        return f"{said}, and too few of its elements were testable to judge the base by its bytes"
    if ev.refutes:
        checks.append(f"base evidence (not enforced: --skip-base-check): {ev.describe()}")
        return f"{said}; the evidence of its bytes says this is NOT its base, rebuilt anyway as asked"
    checks.append(f"base evidence: {ev.describe()}")
    if ev.inexact:
        return (f"{said}; by its bytes this base is close to the delta's but not the same copy (another precision "
                "or conversion?): the rebuilt model may differ slightly from the publisher's")
    return f"{said}: the base was judged by the evidence of the delta's bytes (see the check above)"


def rebuild(base_dir: Path, delta_dir: Path, out_dir: Path, *, entry: dict[str, Any], threads: int | None,
            progress: bool | None, check_integrity: bool = True) -> LegacyReport:
    """Write ``base + delta`` (FastChat's apply_delta) into the empty folder ``out_dir``."""
    legacy = entry.get("legacy") or {}
    base = open_model(base_dir)
    delta = open_model(delta_dir)
    notes: list[str] = []
    checks: list[str] = []
    try:
        infos, pad = plan(base, delta)
        want = legacy.get("base_fingerprint")
        if want and check_integrity:
            found = effective_base_fingerprint(base, [i.name for i in infos])
            if found != want:
                raise BaseMismatchError(
                    f"base {base_dir}: fingerprint {found} (its tensors as fp16), but the release was made from"
                    f" {want}; nothing was written. Use the base the catalog names ({entry.get('base')}).")
            checks.append(f"base fingerprint {found} matches the release's")
        if not want:
            notes.append(base_evidence(base, delta, infos, base_dir, check_integrity, checks))
        if pad:
            notes.append("v0 delta: the base's embed_tokens and lm_head got one zero [PAD] row before adding, as "
                         "FastChat's apply_delta did up to fschat 0.1.10 (removed in commit 00d9e667)")
        cast = sorted({base.tensors[i.name].dtype for i in infos} - {COMPUTE_DTYPE})
        if cast:
            notes.append(f"base tensors in {', '.join(cast)} were rounded to fp16 first, as apply_delta's "
                         "from_pretrained(torch_dtype=torch.float16) does")
        writer = SafetensorsWriter(out_dir, infos)
        jobs = [(i, s, min(CHUNK_ELEMENTS, i.numel - s)) for i in infos for s in range(0, max(i.numel, 1), CHUNK_ELEMENTS)]

        def compute(job: tuple[TensorInfo, int, int]) -> tuple[TensorInfo, int, np.ndarray]:
            info, start, n = job
            b, d = base.tensors[info.name], delta.tensors[info.name]
            dv = as_f16(read_range(delta, info.name, start * d.itemsize, n * d.itemsize), d.dtype)
            b_n = max(0, min(n, b.numel - start))  # elements past the base's end: the zero pad row
            bv = np.zeros(n, dtype=np.float16)
            if b_n:
                bv[:b_n] = as_f16(read_range(base, info.name, start * b.itemsize, b_n * b.itemsize), b.dtype)
            with np.errstate(over="ignore", invalid="ignore"):
                return info, start, np.add(bv, dv).view(np.uint8)

        try:
            with byte_bar(sum(i.nbytes for i in infos), "applying delta", progress) as bar:
                for info, start, data in ordered_map(compute, jobs, threads or default_threads()):
                    if start == 0:
                        writer.begin(info.name)
                    writer.write(data)
                    bar.update(data.nbytes)
            writer.close()
        except BaseException:
            writer.abort()
            raise
        files = copy_model_files(delta.extra_files, out_dir)
        checks += verify_written(out_dir, writer)
        fingerprint = model_fingerprint({i.name: i for i in infos}, writer.tensor_sha256)
        want_target = legacy.get("target_fingerprint")
        if want_target:
            if fingerprint != want_target:
                raise VerificationError(f"rebuilt model has tensor fingerprint {fingerprint}, the release's is {want_target}:"
                                        " the base differs from the publisher's; nothing was kept")
            checks.append(f"tensor fingerprint (sha256 per tensor) matches the release's ({fingerprint})")
        return LegacyReport(out_dir, "fastchat", len(writer.file_sha256) + len(files) +
                            (1 if len(writer.file_names) > 1 else 0), writer.bytes_written, 0.0, fingerprint,
                            checks, notes)
    finally:
        base.close()
        delta.close()


__all__ = ["rebuild", "plan", "as_f16", "effective_base_fingerprint"]
