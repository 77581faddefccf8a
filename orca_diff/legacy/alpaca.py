"""Stanford Alpaca / WizardLM weight diffs: ``tuned = diff + raw`` in fp32, after a [PAD] row.

What ``recover`` in ``weight_diff.py`` (tatsu-lab/stanford_alpaca; copied verbatim as
``WizardLM/src/weight_diff_wizard.py`` in nlpxucan/WizardLM) does, and so what this module does:

1. the raw LLaMA and the diff are loaded with ``torch_dtype=torch.float32`` (an fp16 base is
   widened exactly; a bf16 base too, but it is not the fp16 base the diff was made from);
2. if the raw tokenizer has no pad token, ``smart_tokenizer_and_embedding_resize`` adds
   ``[PAD]``, grows ``embed_tokens`` and ``lm_head`` by one row and sets that row to the MEAN of
   the existing rows (``weight[:-1].mean(dim=0, keepdim=True)``, a torch fp32 reduction — this
   module calls the same torch function so the row is bit-identical with the same torch);
3. for every tensor of the DIFF's state dict, ``diff.add_(raw)`` in fp32;
4. the "naive integrity check": ``allsum = sum(t.sum() for t in state_dict)`` (fp32 sums,
   state-dict order) must be within 1e-2 of a published constant (50637.1836 for
   tatsu-lab/alpaca-7b-wdiff; WizardLM's copy has the check commented out).

Differences, on purpose: the result is streamed tensor by tensor (memory: a few copies of the
largest tensor in fp32, not the two whole fp32 models the script holds), written as safetensors
(fp32, as ``save_pretrained`` of the recovered fp32 model writes it), and when the integrity check
fails the error says which tensor groups differ and the likely cause instead of a bare assertion.
The rotary ``inv_freq`` buffers that transformers < 4.31 kept in the state dict (and so in the
constant) are accounted for; see docs/legacy.md.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ..bits import cast_bits
from ..errors import BaseMismatchError, VerificationError, require_extra
from ..progress import byte_bar
from ..containers import DTYPE_SIZES, ModelReader, TensorInfo, open_model
from .common import LegacyReport, SafetensorsWriter, adds_pad_row, require_floats, copy_model_files, model_fingerprint, state_dict_order, verify_written

COMPUTE_DTYPE = "F32"
DEFAULT_ATOL = 1e-2
_UINT = {2: np.uint16, 4: np.uint32, 8: np.uint64}


def _torch():
    return require_extra("torch", "torch", "Recovering an Alpaca/WizardLM weight diff (its [PAD] row is a torch mean)")


def group_of(name: str) -> str:
    """The tensor group a name belongs to, for the integrity diagnosis."""
    if name == "model.embed_tokens.weight":
        return "embed_tokens"
    if name == "lm_head.weight":
        return "lm_head"
    if "self_attn." in name:
        return "attention"
    if ".mlp." in name:
        return "mlp"
    if name.endswith("norm.weight"):
        return "norms"
    return "other"


def as_f32(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Raw bytes of ``dtype`` as float32 values, as ``from_pretrained(torch_dtype=float32)`` casts."""
    return cast_bits(raw.view(_UINT[DTYPE_SIZES[dtype]]), dtype, COMPUTE_DTYPE).view(np.float32)


def base_has_pad_token(extra_files: dict[str, Path]) -> str | None:
    """The pad token the base's tokenizer files define, if any (then Alpaca adds no [PAD] row)."""
    for rel in ("special_tokens_map.json", "tokenizer_config.json"):
        path = extra_files.get(rel)
        if path is None:
            continue
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        pad = doc.get("pad_token") if isinstance(doc, dict) else None
        if isinstance(pad, dict):
            pad = pad.get("content")
        if pad:
            return str(pad)
    return None


def plan(raw: ModelReader, diff: ModelReader) -> tuple[list[TensorInfo], bool]:
    """The output tensors (the diff's state-dict order, fp32) and whether the [PAD] row is added."""
    infos: list[TensorInfo] = []
    pad = False
    for name in state_dict_order(diff.tensors):
        d = diff.tensors[name]
        r = raw.tensors.get(name)
        if r is None:
            raise BaseMismatchError(f"base {raw.path}: has no tensor {name!r}, which the diff has (weight_diff.py fails"
                                    " with a KeyError here); is it a LLaMA of the size the diff names?")
        require_floats(name, ((r, "base"), (d, "diff")), "a weight diff")
        if r.shape == d.shape:
            infos.append(TensorInfo(name, COMPUTE_DTYPE, d.shape))
            continue
        if adds_pad_row(name, r, d):
            pad_token = base_has_pad_token(raw.extra_files)
            if pad_token is not None:
                raise BaseMismatchError(
                    f"base {raw.path}: its tokenizer already defines pad_token {pad_token!r}, so weight_diff.py adds no"
                    f" [PAD] row and fails on {name!r} ({r.shape[0]} vs {d.shape[0]} rows); use a base whose"
                    " tokenizer has no pad token (Meta's LLaMA converted with convert_llama_weights_to_hf.py)")
            pad = True
            infos.append(TensorInfo(name, COMPUTE_DTYPE, d.shape))
            continue
        raise BaseMismatchError(
            f"base {raw.path}: tensor {name!r} is {list(r.shape)} but the diff's is {list(d.shape)} (the size of tensor"
            f" a ({r.shape[0] if r.shape else 0}) must match the size of tensor b ({d.shape[0] if d.shape else 0}));"
            " nothing was written. The diff expects the plain LLaMA of its size (32000-row vocabulary; the [PAD] row"
            " is added by the recovery itself)")
    return infos, pad


def inv_freq_total(config_path: Path | None) -> float | None:
    """Sum over all layers of the rotary ``inv_freq`` buffers transformers < 4.31 kept in the
    state dict (and so in Alpaca's allsum), computed as LlamaRotaryEmbedding did in fp32."""
    if config_path is None:
        return None
    try:
        cfg = json.loads(config_path.read_text(encoding="utf-8"))
        layers, hidden, heads = int(cfg["num_hidden_layers"]), int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        theta = float(cfg.get("rope_theta", 10000.0))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    torch = _torch()
    dim = hidden // heads
    inv = 1.0 / (theta ** (torch.arange(0, dim, 2).float() / dim))
    return float(layers * inv.sum())


def integrity_message(allsum: float, expected: float, atol: float, base: ModelReader, groups: dict[str, float],
                      base_groups: dict[str, float], expected_groups: dict[str, float] | None) -> str:
    """The diagnosis when the naive integrity check fails: which groups, and the likely cause."""
    gap = allsum - expected
    head = (f"naive integrity check failed: the recovered weights sum to {allsum:.4f}, the release's constant is"
            f" {expected:.4f} (gap {gap:+.4f}, tolerance {atol}); nothing was kept.")
    if expected_groups:
        bad = [f"{g} (found {groups.get(g, 0.0):.4f}, expected {v:.4f})" for g, v in expected_groups.items()
               if abs(groups.get(g, 0.0) - v) > atol]
        where = "; ".join(bad) if bad else "no single group (small differences spread over all groups)"
        return (f"{head} Tensor groups that differ from the publisher's: {where}. The diff's own bytes are fixed, so"
                " these are the parts of your base that differ from the one the diff was made from.")
    dtypes = sorted({i.dtype for i in base.tensors.values()})
    parts = ", ".join(f"{g} {v:.4f}" for g, v in base_groups.items())
    if dtypes == ["BF16"]:
        cause = ("your base is bf16, but the diff was made from an fp16 LLaMA: newer convert_llama_weights_to_hf.py"
                 " versions save bf16, which rounds LLaMA-1's fp16 weights; use an fp16 conversion of Meta's files")
    else:
        cause = ("your base is a different conversion or copy of LLaMA than the publisher's (for example"
                 " decapoda-research/llama-7b-hf, another transformers version's conversion, or a damaged shard);"
                 " note that a q/k permutation difference does NOT change these sums, so a gap means different values")
    return (f"{head} The release records no per-group sums; your base's per-group sums are: {parts}. The diff's"
            f" sums are fixed, so the whole gap comes from the base. Likely cause: {cause}.")


def _base_evidence(raw: ModelReader, diff: ModelReader, infos: list[TensorInfo], raw_dir: Path,
                   check_integrity: bool, checks: list[str]) -> None:
    """The fp32 twin of the FastChat check (:mod:`.evidence`): a weight diff is ``tuned - raw`` in
    fp32, so on its own base the small entries add back exactly. Refuses before writing."""
    from .evidence import sample_exactness

    ev = sample_exactness(raw, diff, [i.name for i in infos], as_f32)
    if ev.refutes and check_integrity:
        raise BaseMismatchError(
            f"base {raw_dir}: not the base this weight diff was made from, by the evidence of its bytes: "
            f"{ev.describe()}; nothing was written. Use the LLaMA the release names, or pass --skip-base-check "
            "to rebuild anyway")
    if ev.conclusive:
        enforced = "" if check_integrity or not ev.refutes else " (not enforced: --skip-base-check)"
        checks.append(f"base evidence{enforced}: {ev.describe()}")


def rebuild(raw_dir: Path, diff_dir: Path, out_dir: Path, *, entry: dict[str, Any], threads: int | None,
            progress: bool | None, check_integrity: bool = True) -> LegacyReport:
    """Write ``diff + raw`` (weight_diff.py's recover) into the empty folder ``out_dir``."""
    torch = _torch()
    legacy = entry.get("legacy") or {}
    raw = open_model(raw_dir)
    diff = open_model(diff_dir)
    checks: list[str] = []
    notes: list[str] = []
    try:
        infos, pad = plan(raw, diff)
        if legacy.get("integrity_sum") is None:  # nothing recorded of the base: judge it by the diff's bytes
            _base_evidence(raw, diff, infos, raw_dir, check_integrity, checks)
        if pad:
            notes.append("added the [PAD] row to the base's embed_tokens and lm_head as the mean of the other rows "
                         f"(smart_tokenizer_and_embedding_resize), computed by torch {torch.__version__}")
        writer = SafetensorsWriter(out_dir, infos)
        allsum: Any = 0  # as in weight_diff.py: Python sum() of fp32 0-d tensors
        groups: dict[str, float] = {}
        base_groups: dict[str, float] = {}
        try:
            with byte_bar(sum(i.nbytes for i in infos), "recovering", progress) as bar:
                for info in infos:
                    r_info, d_info = raw.tensors[info.name], diff.tensors[info.name]
                    r = torch.from_numpy(as_f32(np.asarray(raw.read(info.name)), r_info.dtype).copy()).reshape(r_info.shape)
                    base_groups[group_of(info.name)] = base_groups.get(group_of(info.name), 0.0) + float(r.double().sum())
                    if r_info.shape != info.shape:
                        resized = torch.empty(info.shape, dtype=torch.float32)
                        resized[: r_info.shape[0]] = r
                        resized[r_info.shape[0]:] = resized[: r_info.shape[0]].mean(dim=0, keepdim=True)
                        r = resized
                    d = torch.from_numpy(as_f32(np.asarray(diff.read(info.name)), d_info.dtype).copy()).reshape(d_info.shape)
                    d.add_(r)
                    del r
                    s = d.sum()
                    allsum = allsum + s
                    groups[group_of(info.name)] = groups.get(group_of(info.name), 0.0) + float(s)
                    writer.begin(info.name)
                    writer.write(d.reshape(-1).view(torch.uint8).numpy())
                    bar.update(info.nbytes)
                    del d
            writer.close()
        except BaseException:
            writer.abort()
            raise
        total = float(allsum)
        expected = legacy.get("integrity_sum")
        if expected is not None and check_integrity:
            atol = float(legacy.get("integrity_atol", DEFAULT_ATOL))
            if abs(total - float(expected)) <= atol:
                checks.append(f"naive integrity check: weights sum to {total:.4f}, the release's constant {expected}")
            else:
                inv = inv_freq_total(diff.extra_files.get("config.json"))
                if inv is not None and abs(total + inv - float(expected)) <= atol:
                    checks.append(f"naive integrity check: weights sum to {total:.4f}; with the rotary inv_freq "
                                  f"buffers ({inv:.4f}) that transformers < 4.31 kept in the state dict, "
                                  f"{total + inv:.4f} = the release's constant {expected}")
                else:
                    raise VerificationError(integrity_message(total, float(expected), atol, raw, groups, base_groups,
                                                              legacy.get("group_sums")))
        elif expected is None:
            notes.append("no integrity constant known for this release (none in its catalog entry; WizardLM's"
                         " weight_diff_wizard.py has the check commented out): it records nothing about its base,"
                         " which was judged by the evidence of the diff's bytes (see the check above); the model"
                         " digest identifies the result")
        checks.append("group sums: " + ", ".join(f"{g}={v:.4f}" for g, v in groups.items()))
        files = copy_model_files(diff.extra_files, out_dir)
        checks += verify_written(out_dir, writer)
        fingerprint = model_fingerprint({i.name: i for i in infos}, writer.tensor_sha256)
        want = legacy.get("target_fingerprint")
        if want and check_integrity:
            if fingerprint != want:
                raise VerificationError(f"rebuilt model has tensor fingerprint {fingerprint}, the release's is {want}: the base"
                                        " differs from the publisher's; nothing was kept")
            checks.append(f"tensor fingerprint (sha256 per tensor) matches the release's ({fingerprint})")
        return LegacyReport(out_dir, "alpaca", len(writer.file_sha256) + len(files) +
                            (1 if len(writer.file_names) > 1 else 0), writer.bytes_written, 0.0, fingerprint,
                            checks, notes)
    finally:
        raw.close()
        diff.close()


__all__ = ["rebuild", "plan", "group_of", "inv_freq_total", "integrity_message", "base_has_pad_token"]
