"""Historic diff releases: FastChat/Vicuna deltas, Alpaca/WizardLM weight diffs, OpenAssistant XOR.

Each format has its own module (:mod:`.fastchat`, :mod:`.alpaca`, :mod:`.oa_xor`) that rebuilds
exactly the tensors (FastChat, Alpaca) or the files (OpenAssistant) the original script produced
from the same base, streaming one tensor (or one block) at a time. This module holds what they
share: picking and resolving the format, the streaming safetensors writer, the final
verification, and :func:`convert_legacy`, which re-publishes a release as an orca-diff diff.
See docs/legacy.md for each format, its pitfalls and the source files it follows.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from ..errors import FormatError, InputNotFoundError, InterruptedError_, OrcaDiffError, UsageError, VerificationError
from ..outdir import (OutputSession, check_output, create_staging, describe_os_error, hidden_sibling_name, name_max,
                      output_session, remove_path)
from ..containers import FLOAT_DTYPES, TensorInfo, file_sha256
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

    def summary(self) -> str:
        fp = f" (model fingerprint {self.target_fingerprint})" if self.target_fingerprint else ""
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

    @property
    def ratio(self) -> float:
        return self.diff_bytes / max(1, self.legacy_bytes)

    def summary(self) -> str:
        lines = [f"wrote {self.out}: orca-diff payload {_human(self.diff_bytes)} vs the {self.format} release's "
                 f"{_human(self.legacy_bytes)} ({100 * self.ratio:.1f}%, {1 / max(self.ratio, 1e-12):.2f}x smaller); "
                 f"model {_human(self.target_bytes)}; base fingerprint {self.base_fingerprint}, "
                 f"model fingerprint {self.target_fingerprint} ({self.seconds:.1f}s)"]
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


# --------------------------------------------------------------------------- catalog


def catalog_legacy(name: str) -> dict[str, Any] | None:
    """The raw catalog entry of a legacy release called ``name`` (``diffs`` entries that carry a
    ``format`` other than orca-diff), later catalog files overriding earlier ones; else None.

    Read from the catalog files directly: the ``format`` and ``legacy`` keys are specific to
    these releases (docs/legacy.md), and the shared CatalogEntry does not carry them.
    """
    from ..hub.catalog import catalog_files

    found: dict[str, Any] | None = None
    for path in catalog_files():
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # the catalog module reports unreadable files itself
        diffs = doc.get("diffs") if isinstance(doc, dict) else None
        if not isinstance(diffs, dict):
            continue
        for key, entry in diffs.items():
            if key.lower() == name.lower() and isinstance(entry, dict):
                found = entry if entry.get("format") in FORMATS else None
    return found


def detect_format(spec: str) -> str | None:
    """The legacy format ``spec`` stands for, where that is unambiguous: a catalog entry with a
    legacy ``format``, or a local folder holding an OpenAssistant XOR payload (its config.json
    is not JSON but XOR noise). FastChat and Alpaca folders look alike (both are HF model
    folders of differences), so they need ``--format``. None: not a legacy release we know."""
    path = Path(spec).expanduser()
    if path.exists():
        if (path / "orca-diff.json").is_file():
            return None
        from .oa_xor import looks_like_xor_payload

        return "oa-xor" if looks_like_xor_payload(path) else None
    entry = catalog_legacy(spec)
    return entry["format"] if entry else None


# --------------------------------------------------------------------------- resolution


def resolve_legacy_diff(spec: str, fmt: str, *, progress: bool | None) -> tuple[Path, dict[str, Any] | None]:
    """The local folder of a legacy release (a path, a catalog name or a Hub repo id) and its
    catalog entry when it has one. Hub downloads go through :mod:`orca_diff.hub` (cached)."""
    path = Path(spec).expanduser()
    if path.exists():
        if fmt == "oa-xor":
            from .oa_xor import payload_folder

            path = payload_folder(path)  # a clone of the Hub repo keeps the files in a subfolder
        return path, None
    entry = catalog_legacy(spec)
    if entry is not None and entry.get("format") != fmt:
        raise UsageError(f"catalog diff {spec!r} is a {entry['format']} release, not {fmt}; "
                         f"use --format {entry['format']} (or leave --format out)")
    from ..hub.catalog import is_repo_id
    from ..hub import RepoRef, parse_repo_spec

    if entry is not None:
        ref = RepoRef(entry["repo"], entry.get("revision") or None)
    else:
        ref = parse_repo_spec(spec)
        if not is_repo_id(ref.repo_id):
            raise InputNotFoundError(f"{spec}: not a local folder, a catalog name or a Hub repo id org/name")
    return _download_release(ref, fmt, progress), entry


def _download_release(ref: Any, fmt: str, progress: bool | None) -> Path:
    from ..hub.transfer import _progress, download_base, hub_errors

    if fmt in ("fastchat", "alpaca"):
        return download_base(ref, progress=progress)  # an HF model folder: weights, config, tokenizer
    import huggingface_hub

    with _progress(progress), hub_errors(ref, "XOR release"):
        root = Path(huggingface_hub.snapshot_download(ref.repo_id, revision=ref.revision))
    from .oa_xor import payload_folder

    return payload_folder(root)


def resolve_base_for(base: str | None, entry: dict[str, Any] | None, *, progress: bool | None) -> Path:
    """``--base`` as given, or the base the catalog entry names."""
    from ..hub.resolve import resolve_base_spec

    if base is None:
        if entry is None or not entry.get("base"):
            raise UsageError("pass --base: the legacy release does not name its base")
        base = entry["base"]
    return resolve_base_spec(base, progress=progress)


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


# --------------------------------------------------------------------------- dispatch


def _module(fmt: str):
    if fmt == "fastchat":
        from . import fastchat as m
    elif fmt == "alpaca":
        from . import alpaca as m
    elif fmt == "oa-xor":
        from . import oa_xor as m
    else:
        raise UsageError(f"unknown legacy format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return m


def _settle_format(fmt: str | None, spec: str) -> tuple[str, Any]:
    if fmt in ("auto", None):
        fmt = detect_format(spec) or ""
        if not fmt:
            raise UsageError(f"{spec}: cannot tell which legacy format this is; pass --format fastchat|alpaca|oa-xor")
    return fmt, _module(fmt)


def _resolve_inputs(session: OutputSession, fmt: str, spec: str, base: str | None,
                    progress: bool | None) -> tuple[Path, dict[str, Any] | None, Path]:
    """Resolve (and download) the release and its base, then check the output against the
    resolved folders too (a catalog name or repo id only becomes a path here)."""
    diff_dir, entry = resolve_legacy_diff(spec, fmt, progress=progress)
    base_dir = resolve_base_for(base, entry, progress=progress)
    check_output(session.out, session.force, (diff_dir, base_dir))
    return diff_dir, entry, base_dir


def _os_error(exc: OSError, out: Path, work: Path, hint: str) -> OrcaDiffError:
    """An OSError of a legacy rebuild as one line: a file of the output side (the staging or
    work folder, ``out``) is an output problem; any other named file is an input that cannot be
    read; an error with no file name comes from a write."""
    name = Path(str(exc.filename)) if exc.filename else None
    if name is not None:
        resolved = name.resolve() if name.is_absolute() else (Path.cwd() / name).resolve()
        ours = [p.resolve() for p in (work, out)]
        if not any(resolved == p or resolved.is_relative_to(p) for p in ours) and resolved.parent != out.parent.resolve():
            return InputNotFoundError(f"{name}: cannot read ({exc.strerror}); check the release and base folders")
    return describe_os_error(exc, name or work, hint)


def apply_legacy(fmt: str, base: str | None, diff: str, out: str | os.PathLike, *, force: bool = False,
                 threads: int | None = None, progress: bool | None = None,
                 check_integrity: bool = True) -> LegacyReport:
    """Rebuild the model of a legacy release from ``base`` into ``out``, exactly as the release's
    own script would have (see docs/legacy.md), then verify it. ``out`` appears only when done.

    ``fmt`` is "fastchat", "alpaca" or "oa-xor" (``auto`` uses the catalog or detection).
    ``base`` and ``diff`` are local folders, catalog names or Hub repo ids. The output discipline
    is the main path's (:func:`orca_diff.outdir.output_session`): checked before anything is
    read, locked against a concurrent run, staged, published whole; an OSError is one line.
    """
    t0 = time.perf_counter()
    fmt, module = _settle_format(fmt, diff)
    out = Path(out)
    with output_session(out, force, (diff, base)) as session:
        diff_dir, entry, base_dir = _resolve_inputs(session, fmt, diff, base, progress)
        staging = session.staging
        hint = "free space or fix the output, and run the command again"
        try:
            staging = create_staging(out)
            report = module.rebuild(base_dir, diff_dir, staging, entry=entry or {}, threads=threads,
                                    progress=progress, check_integrity=check_integrity)
            files = [p.relative_to(staging).as_posix() for p in sorted(staging.rglob("*")) if not p.is_dir()]
            session.publish(files)
        except OSError as exc:
            _discard(staging)
            raise _os_error(exc, out, staging, hint) from None
        except KeyboardInterrupt:
            _discard(staging)
            raise InterruptedError_("interrupted; nothing was kept (a legacy rebuild does not resume): run the "
                                    "command again") from None
        except BaseException:
            _discard(staging)
            raise
    report.out = out
    report.format = fmt
    report.seconds = time.perf_counter() - t0
    report.notes += session.notes
    return report


def _discard(folder: Path) -> None:
    try:
        remove_path(folder)
    except OSError:
        pass


def legacy_payload_bytes(diff_dir: Path) -> int:
    """Size of a legacy release as downloaded: every file of its folder (weights, config,
    tokenizer), excluding the model card and git metadata."""
    return sum(p.stat().st_size for p in diff_dir.iterdir()
               if p.is_file() and p.name not in ("README.md", ".gitattributes"))


def convert_legacy(fmt: str, legacy: str, base: str | None, out: str | os.PathLike, *, force: bool = False,
                   threads: int | None = None, progress: bool | None = None, level: int | None = None,
                   base_name: str | None = None, base_repo: str | None = None,
                   base_revision: str | None = None) -> ConvertReport:
    """Re-publish a legacy release as an orca-diff diff against ``base``.

    The legacy target is rebuilt (streaming, as ``apply --format`` does) into a hidden staging
    folder beside ``out`` as safetensors, ``make_diff(base, staging, out)`` encodes it, the
    staging files are checked against the new manifest (so the diff provably rebuilds these
    bytes), and the staging folder is deleted. Disk: one copy of the model, temporarily. The
    output lock is held throughout (make, called inside, takes the same lock re-entrantly).
    """
    t0 = time.perf_counter()
    fmt, module = _settle_format(fmt, legacy)
    out = Path(out)
    with output_session(out, force, (legacy, base)) as session:
        diff_dir, entry, base_dir = _resolve_inputs(session, fmt, legacy, base, progress)
        target = out.parent / hidden_sibling_name(out.name, ".legacy-target", name_max(out.parent))
        try:
            return _convert(fmt, module, out, diff_dir, entry, base_dir, base, target, force=force, threads=threads,
                            progress=progress, level=level, base_name=base_name, base_repo=base_repo,
                            base_revision=base_revision, t0=t0, notes=list(session.notes))
        except OSError as exc:
            raise _os_error(exc, out, target, "free space or fix the output, and run the command again") from None
        except KeyboardInterrupt:
            raise InterruptedError_("interrupted; nothing was kept (convert does not resume): run the command "
                                    "again") from None
        finally:
            _discard(target)


def _convert(fmt: str, module: Any, out: Path, diff_dir: Path, entry: dict[str, Any] | None, base_dir: Path,
             base: str | None, target: Path, *, force: bool, threads: int | None, progress: bool | None,
             level: int | None, base_name: str | None, base_repo: str | None, base_revision: str | None,
             t0: float, notes: list[str]) -> ConvertReport:
    from ..codec import DEFAULT_LEVEL
    from ..make import make_diff
    from ..verify import verify_model

    if entry:
        from ..hub.catalog import lookup

        b = lookup(entry.get("base") or "", "base") if entry.get("base") else None
        base_name = base_name or entry.get("base")
        if b is not None and base is None:
            base_repo, base_revision = base_repo or b.repo, base_revision or b.revision
    remove_path(target)  # our own work folder (we hold the output's lock), links not followed
    target.mkdir()
    report = module.rebuild(base_dir, diff_dir, target, entry=entry or {}, threads=threads,
                            progress=progress, check_integrity=True)
    notes += report.notes
    if fmt == "oa-xor":
        notes.append(module.resave_as_safetensors(target))
    manifest = make_diff(base_dir, target, out, base_name=base_name or Path(base_dir).name, base_repo=base_repo,
                         base_revision=base_revision, level=level or DEFAULT_LEVEL, threads=threads,
                         progress=progress, force=force)
    verify_model(target, manifest, progress=progress)
    return ConvertReport(out, fmt, legacy_payload_bytes(diff_dir), manifest.payload_bytes, manifest.target_bytes,
                         time.perf_counter() - t0, manifest.base.fingerprint, manifest.target_fingerprint, notes)


__all__ = ["FORMATS", "apply_legacy", "convert_legacy", "detect_format", "catalog_legacy", "LegacyReport",
           "ConvertReport", "SafetensorsWriter", "state_dict_order", "resolve_legacy_diff"]
