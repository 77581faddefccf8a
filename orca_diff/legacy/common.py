"""What the legacy formats share: report types, the [PAD]-row rule, model order, the streaming
safetensors writer and the final verification of what was written."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from ..containers import FLOAT_DTYPES, TensorInfo, file_sha256
from ..errors import FormatError, VerificationError
from ..progress import human_bytes as _human

FORMATS = ("fastchat", "alpaca", "oa-xor")

#: Files of a legacy release folder that are never part of the rebuilt model: Hub/git metadata,
#: the release's own model card, and weight indexes (the rebuilt model gets its own).
NOT_MODEL_FILES = frozenset({"README.md", ".gitattributes", "pytorch_model.bin.index.json",
                             "model.safetensors.index.json", "orca-diff.json"})

#: Shard size of the rebuilt model: transformers 4.x's ``save_pretrained`` default ("5GB").
MAX_SHARD_BYTES = 5 * 10**9

#: Elements processed per step when a tensor is rebuilt in pieces (bounds the working set to a
#: few times 16 MiB whatever the tensor size).
CHUNK_ELEMENTS = 8 << 20


# --------------------------------------------------------------------------- reports


@dataclass
class LegacyReport:
    """What ``apply --format X`` did and proved."""

    out: Path
    format: str
    files: int
    bytes_written: int
    seconds: float
    target_fingerprint: str | None  # over the rebuilt tensors (None for file-level formats)
    checks: list[str] = field(default_factory=list)   # what was verified, one line each
    notes: list[str] = field(default_factory=list)    # behaviours of the original tool we reproduced
    model_digest: str = ""  # the model identity (orca_diff.identity), measured from the rebuilt files
    already_done: bool = False  # a rerun: ``out`` held this release's rebuild, checked now; nothing written

    def summary(self) -> str:
        from ..identity import describe

        if self.already_done:
            return (f"{self.out} already holds this {self.format} release's model: {self.files} files byte-identical "
                    "to what this command wrote (checked now); nothing to do"
                    + (f"; {describe(self.model_digest)}, measured" if self.model_digest else ""))
        fp = f"; {describe(self.model_digest)}, measured" if self.model_digest else ""
        lines = [f"rebuilt {self.out} from a legacy {self.format} release: {self.files} files, "
                 f"{_human(self.bytes_written)} written in {self.seconds:.1f}s{fp}"]
        lines += [f"check: {c}" for c in self.checks]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


@dataclass
class ConvertReport:
    """What ``convert`` wrote, with the size ratio against the legacy release."""

    out: Path
    format: str
    legacy_bytes: int
    diff_bytes: int
    target_bytes: int
    seconds: float
    base_fingerprint: str
    target_fingerprint: str
    notes: list[str] = field(default_factory=list)
    model_digest: str = ""  # of the files the new diff rebuilds (their sha256s as make read them)

    @property
    def ratio(self) -> float:
        return self.diff_bytes / max(1, self.legacy_bytes)

    def summary(self) -> str:
        lines = [f"wrote {self.out}: orca-diff payload {_human(self.diff_bytes)} vs the {self.format} release's "
                 f"{_human(self.legacy_bytes)} ({100 * self.ratio:.1f}%, {1 / max(self.ratio, 1e-12):.2f}x smaller); "
                 f"model {_human(self.target_bytes)}; base fingerprint {self.base_fingerprint}; "
                 f"model digest {self.model_digest} ({self.seconds:.1f}s)"]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


#: The matrices to which Alpaca/WizardLM and FastChat v0 add a [PAD] row (vocab 32000 -> 32001).
PAD_ROW_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")


def adds_pad_row(name: str, base: TensorInfo, other: TensorInfo) -> bool:
    """Whether ``other`` is ``base`` with exactly one row appended: the [PAD] row case."""
    return (name in PAD_ROW_TENSORS and len(base.shape) == 2 and base.shape[1:] == other.shape[1:]
            and other.shape[0] == base.shape[0] + 1)


def require_floats(name: str, tensors: Iterable[tuple[TensorInfo, str]], release: str) -> None:
    """Legacy releases are arithmetic on floats: refuse anything else, naming the tensor."""
    for t, who in tensors:
        if t.dtype not in FLOAT_DTYPES:
            raise FormatError(f"{who} tensor {name!r} is {t.dtype}; {release} holds float tensors only")


# --------------------------------------------------------------------------- model order


_LAYER_ORDER = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
                "input_layernorm.weight", "post_attention_layernorm.weight")
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def state_dict_order(names: Iterable[str]) -> list[str]:
    """Tensor names in the order ``LlamaForCausalLM.state_dict()`` lists them (embedding, layers
    in module order, final norm, lm_head); unknown names keep their relative order at the end.
    The original scripts iterate the state dict, and fp32 sums depend on the order."""
    names = list(names)

    def key(item: tuple[int, str]) -> tuple:
        i, n = item
        if n == "model.embed_tokens.weight":
            return (0, 0, 0, i)
        m = _LAYER_RE.match(n)
        if m and m.group(2) in _LAYER_ORDER:
            return (1, int(m.group(1)), _LAYER_ORDER.index(m.group(2)), i)
        if n == "model.norm.weight":
            return (2, 0, 0, i)
        if n == "lm_head.weight":
            return (3, 0, 0, i)
        return (4, 0, 0, i)

    return [n for _, n in sorted(enumerate(names), key=key)]


# --------------------------------------------------------------------------- writer


class SafetensorsWriter:
    """Writes a model folder as safetensors shards, one tensor (or one piece of a tensor) at a time.

    All tensor infos are known up front, so each shard's header is written first and the data
    streamed after it: memory is what the caller holds, never a shard. Layout: the tensors in
    the given order, cut into shards of at most ``max_shard_bytes`` (``model.safetensors``, or
    ``model-0000k-of-0000n.safetensors`` plus ``model.safetensors.index.json``), header metadata
    ``{"format": "pt"}`` as transformers writes it, header padded with spaces to 8 bytes.
    The sha256 of every tensor and file is computed on the way.
    """

    def __init__(self, folder: Path, infos: list[TensorInfo], max_shard_bytes: int = MAX_SHARD_BYTES):
        self.folder = folder
        self.infos = {i.name: i for i in infos}
        shards: list[list[TensorInfo]] = [[]]
        size = 0
        for info in infos:
            if shards[-1] and size + info.nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(info)
            size += info.nbytes
        n = len(shards)
        self.file_names = ["model.safetensors"] if n == 1 else [f"model-{k:05d}-of-{n:05d}.safetensors"
                                                                 for k in range(1, n + 1)]
        self._shards = shards
        self._order = [i.name for s in shards for i in s]
        self._next = 0
        self._shard = -1
        self._fd = -1
        self._file_hash = hashlib.sha256()
        self._tensor_hash = hashlib.sha256()
        self._left = 0
        self.tensor_sha256: dict[str, str] = {}
        self.file_sha256: dict[str, str] = {}
        self.bytes_written = 0
        if n > 1:
            weight_map = {i.name: self.file_names[k] for k, s in enumerate(shards) for i in s}
            index = {"metadata": {"total_size": sum(i.nbytes for i in infos)},
                     "weight_map": dict(sorted(weight_map.items()))}
            (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")

    @staticmethod
    def header(infos: list[TensorInfo]) -> bytes:
        doc: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for i in infos:
            doc[i.name] = {"dtype": i.dtype, "shape": list(i.shape), "data_offsets": [offset, offset + i.nbytes]}
            offset += i.nbytes
        raw = json.dumps(doc, separators=(",", ":")).encode("utf-8")
        return raw + b" " * (-len(raw) % 8)

    def begin(self, name: str) -> None:
        """Start the next tensor; tensors must come in the order given to the constructor."""
        if self._left:
            raise RuntimeError("previous tensor not finished")
        if self._next >= len(self._order) or self._order[self._next] != name:
            expected = self._order[self._next] if self._next < len(self._order) else "nothing"
            raise RuntimeError(f"tensor {name!r} out of order (expected {expected})")
        shard = next(k for k, s in enumerate(self._shards) if any(i.name == name for i in s))
        if shard != self._shard:
            self._close_file()
            self._shard = shard
            head = self.header(self._shards[shard])
            path = self.folder / self.file_names[shard]
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            self._file_hash = hashlib.sha256()
            self._write(struct.pack("<Q", len(head)) + head)
        self._left = self.infos[name].nbytes
        self._tensor_hash = hashlib.sha256()
        self._current = name
        if self._left == 0:
            self._end_tensor()

    def write(self, data: np.ndarray | bytes) -> None:
        view = memoryview(np.ascontiguousarray(data) if isinstance(data, np.ndarray) else data).cast("B")
        if not len(view):
            return
        if len(view) > self._left:
            raise RuntimeError(f"tensor {self._current!r}: {len(view) - self._left} bytes too many")
        self._tensor_hash.update(view)
        self._write(view)
        self._left -= len(view)
        if self._left == 0:
            self._end_tensor()

    def _end_tensor(self) -> None:
        self.tensor_sha256[self._current] = self._tensor_hash.hexdigest()
        self._next += 1

    def _write(self, view: bytes | memoryview) -> None:
        self._file_hash.update(view)
        mv = memoryview(view).cast("B")
        while mv:
            n = os.write(self._fd, mv)
            mv = mv[n:]
        self.bytes_written += len(view)

    def _close_file(self) -> None:
        if self._fd >= 0:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = -1
            self.file_sha256[self.file_names[self._shard]] = self._file_hash.hexdigest()

    def close(self) -> None:
        """Finish the last file; every tensor must have been written in full."""
        if self._next != len(self._order) or self._left:
            missing = self._order[self._next] if self._next < len(self._order) else self._current
            self.abort()
            raise RuntimeError(f"model incomplete: tensor {missing!r} not written")
        self._close_file()

    def abort(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def copy_model_files(src: dict[str, Path], dst: Path, skip: Iterable[str] = ()) -> list[str]:
    """Copy a release's non-weight files (config, tokenizer...) into the rebuilt model."""
    skip = set(skip) | NOT_MODEL_FILES
    done = []
    for rel, path in sorted(src.items()):
        if rel in skip or rel.startswith("."):
            continue
        shutil.copyfile(path, dst / rel)
        done.append(rel)
    return done


def verify_written(folder: Path, writer: SafetensorsWriter) -> list[str]:
    """Re-read every written shard from disk and compare its sha256 with the one computed while
    writing (catches a bad disk or a file changed under us). Returns one report line."""
    for rel, sha in writer.file_sha256.items():
        if file_sha256(folder / rel) != sha:
            raise VerificationError(f"{folder / rel}: reads back differently from what was written; "
                                    "check the disk and run the command again")
    return [f"{len(writer.file_sha256)} safetensors files read back with the sha256 computed while writing"]


def model_fingerprint(infos: dict[str, TensorInfo], tensor_sha: dict[str, str]) -> str:
    from ..fingerprint import base_fingerprint

    return base_fingerprint({n: (i.dtype, i.shape, tensor_sha[n]) for n, i in infos.items()})


