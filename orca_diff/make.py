"""base + fine-tuned target -> a diff folder (manifest + payload files + model card).

The data path reads in one direction: target/base chunk reader -> codec (worker threads) ->
payload writer, with sha256 of every target tensor and file computed on the way. Memory is
bounded by ``threads + 2`` chunks in flight (``chunk_bytes`` each, 16 MiB by default, times a
small constant for the codec's temporaries), whatever the model size.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

import numpy as np

from . import __version__
from .codec import DEFAULT_LEVEL, base_prediction, choose_layout, encode_chunk
from .digests import TENSOR_DIGEST_OF_VERSION, Hasher, digest_bytes, new_hasher
from .errors import UsageError
from .fingerprint import base_fingerprint
from .format import (
    FORMAT_VERSION, MANIFEST_NAME, MAX_CHUNK_BYTES, BaseFile, BaseIdentity, BaseTensor, Chunk, Encoding, FileEntry, Manifest, PayloadFile,
    TensorEntry,
)
from .outdir import check_output, describe_os_error, fsync_path, publish, staging_dir
from .pipeline import default_threads, ordered_map
from .progress import byte_bar
from .containers import FLOAT_DTYPES, ModelReader, SafetensorsModel, TensorInfo, file_sha256, hash_tensor_range, open_model, read_range

CHUNK_BYTES = 16 << 20
#: Non-weight files taken from the base (when byte-identical there) instead of shipped in the
#: diff: the tokenizer model is part of the base release, and every base form (HF folder or
#: Meta's original) carries it. Everything else (config and tokenizer JSON, a few KB) travels
#: in the diff, so a base in any form can rebuild it.
BASE_COPIED_FILES = frozenset({"tokenizer.model"})
#: Payload files are cut at about this size so uploads/downloads retry per file, not per model.
PAYLOAD_FILE_BYTES = 1 << 30


def plan_encoding(t: TensorInfo, b: TensorInfo | None) -> Encoding:
    """Choose how a target tensor is encoded given the base tensor of the same name (pure).

    Same shape, or the same trailing dims with rows added or removed along dim 0 (a pad token):
    a delta over the shared rows (ulp for floats, after casting the base to the target dtype;
    xor for equal non-float dtypes), the rest raw. Anything else is stored raw: it is target data.
    """
    if b is None:
        return Encoding("raw")
    same_rows_layout = len(t.shape) == len(b.shape) and (len(t.shape) == 0 or t.shape[1:] == b.shape[1:])
    if not same_rows_layout:
        return Encoding("raw")
    shared_elems = min(t.numel, b.numel)
    if t.dtype in FLOAT_DTYPES and b.dtype in FLOAT_DTYPES:
        transform = "ulp"
    elif t.dtype == b.dtype:
        transform = "xor"
    else:
        return Encoding("raw")
    if shared_elems == 0:
        return Encoding("raw")
    return Encoding(transform, base_tensor=b.name, base_dtype=b.dtype, shared_bytes=shared_elems * t.itemsize)


#: Bytes of a tensor's shared region that make compresses both ways to choose its layout.
LAYOUT_SAMPLE_BYTES = 256 << 10


def _with_layout(name: str, enc: Encoding, target: ModelReader, base: ModelReader, level: int) -> Encoding:
    """``enc`` with the layout that compresses a sample of the tensor smallest: the per-tensor
    choice stored in the manifest (only 16-bit ulp deltas have one, see codec.choose_layout)."""
    info = target.tensors[name]
    if enc.transform == "raw" or enc.base_tensor is None:
        return enc
    if enc.transform != "ulp" or info.itemsize != 2:
        return replace(enc, layout="planes")
    b_info = base.tensors[enc.base_tensor]
    size = min(enc.shared_bytes, LAYOUT_SAMPLE_BYTES)
    raw = read_range(target, name, 0, size)
    b_raw = read_range(base, b_info.name, 0, size // info.itemsize * b_info.itemsize)
    pred = base_prediction(b_raw, b_info.dtype, info.dtype)
    return replace(enc, layout=choose_layout(raw, pred, info.itemsize, enc.transform, level))


@dataclass(frozen=True)
class _Job:
    kind: str  # "tensor" or "blob"
    name: str  # tensor name or blob path
    start: int
    size: int
    mode: str  # "delta" | "raw"


def _chunk_ranges(begin: int, end: int, chunk_bytes: int) -> Iterator[tuple[int, int]]:
    for s in range(begin, end, chunk_bytes):
        yield s, min(chunk_bytes, end - s)


class _PayloadWriter:
    """Appends compressed chunks to payload-NNNNN.odz files, cutting at PAYLOAD_FILE_BYTES."""

    def __init__(self, folder: Path, limit: int):
        self.folder, self.limit = folder, limit
        self.done: list[PayloadFile] = []
        self._f = None
        self._name = ""
        self._size = 0
        self._hash = hashlib.sha256()

    def append(self, data: bytes) -> tuple[str, int]:
        if self._f is None or self._size >= self.limit:
            self._close()
            self._name = f"payload-{len(self.done) + 1:05d}.odz"
            self._f = open(self.folder / self._name, "xb")
            self._size, self._hash = 0, hashlib.sha256()
        offset = self._size
        self._f.write(data)
        self._hash.update(data)
        self._size += len(data)
        return self._name, offset

    def _close(self) -> None:
        if self._f is not None:
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()
            self.done.append(PayloadFile(self._name, self._size, self._hash.hexdigest()))
            self._f = None

    def close(self) -> list[PayloadFile]:
        self._close()
        return self.done


def make_diff(base: str | os.PathLike, target: str | os.PathLike, out: str | os.PathLike, *,
              base_name: str | None = None, base_repo: str | None = None, base_revision: str | None = None,
              level: int = DEFAULT_LEVEL, chunk_bytes: int = CHUNK_BYTES, threads: int | None = None,
              progress: bool | None = None, force: bool = False,
              payload_file_bytes: int = PAYLOAD_FILE_BYTES) -> Manifest:
    """Write the diff that turns ``base`` into ``target`` to the folder ``out`` and return its manifest.

    ``target`` must be safetensors (its files are rebuilt byte for byte); ``base`` may be any form
    :func:`orca_diff.tensors.open_model` reads. ``out`` appears only when complete.
    """
    out = Path(out)
    if chunk_bytes <= 0 or chunk_bytes % 8 or chunk_bytes > MAX_CHUNK_BYTES:
        raise UsageError(f"chunk size must be a positive multiple of 8 bytes, at most {MAX_CHUNK_BYTES}")
    check_output(out, force, (base, target))
    threads = threads or default_threads()
    base_model = open_model(base)
    try:
        target_model = open_model(target)
    except BaseException:
        base_model.close()
        raise
    staging = staging_dir(out)
    try:
        if not isinstance(target_model, SafetensorsModel):
            raise UsageError(f"{target}: the fine-tuned model must be in safetensors form "
                             "(save it with save_pretrained(..., safe_serialization=True))")
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir()
        manifest = _make_into(base_model, target_model, staging, base_name or Path(base).name, base_repo,
                              base_revision, level, chunk_bytes, threads, progress, payload_file_bytes)
        from .hub.card import render_card

        (staging / "README.md").write_text(render_card(manifest), encoding="utf-8")
        (staging / MANIFEST_NAME).write_bytes(manifest.to_bytes())
        for p in staging.iterdir():
            fsync_path(p)
        publish(staging, out, force)
        return manifest
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise describe_os_error(exc, out, "run make again") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        base_model.close()
        target_model.close()


def _make_into(base: ModelReader, target: SafetensorsModel, folder: Path, base_name: str, base_repo: str | None,
               base_revision: str | None, level: int, chunk_bytes: int, threads: int, progress: bool | None,
               payload_file_bytes: int) -> Manifest:
    algo = TENSOR_DIGEST_OF_VERSION[FORMAT_VERSION]  # tensor, chunk and base digests
    plans = {n: plan_encoding(info, base.tensors.get(n)) for n, info in target.tensors.items()}
    plans = dict(zip(plans, ordered_map(lambda n: _with_layout(n, plans[n], target, base, level), list(plans), threads)))
    needed = {p.base_tensor for p in plans.values() if p.base_tensor}

    # The files of the target: safetensors shards (headers verbatim), then other files.
    shard_names = sorted(target.headers)
    jobs: list[_Job] = []
    for rel in shard_names:
        for e in target.headers[rel].entries:
            info, enc = e.info, plans[e.info.name]
            for s, n in _chunk_ranges(0, enc.shared_bytes, chunk_bytes):
                jobs.append(_Job("tensor", info.name, s, n, "delta"))
            for s, n in _chunk_ranges(enc.shared_bytes, info.nbytes, chunk_bytes):
                jobs.append(_Job("tensor", info.name, s, n, "raw"))
    base_files: dict[str, BaseFile] = {}
    blob_sources: dict[str, str] = {}
    blob_meta: dict[str, tuple[int, str]] = {}
    for rel, path in target.extra_files.items():
        size, sha = path.stat().st_size, file_sha256(path)
        blob_meta[rel] = (size, sha)
        bpath = base.extra_files.get(rel)
        if (rel in BASE_COPIED_FILES and bpath is not None and bpath.stat().st_size == size
                and file_sha256(bpath) == sha):
            blob_sources[rel] = "base"
            base_files[rel] = BaseFile(size, sha)
        else:
            blob_sources[rel] = "diff"
            jobs.extend(_Job("blob", rel, s, n, "raw") for s, n in _chunk_ranges(0, size, chunk_bytes))

    def encode(job: _Job) -> tuple[_Job, bytes, str, np.ndarray, np.ndarray | None]:
        """One chunk -> (job, payload, payload sha256, target bytes, base bytes used or None)."""
        if job.kind == "blob":
            with open(target.extra_files[job.name], "rb") as f:
                f.seek(job.start)
                raw = np.frombuffer(f.read(job.size), dtype=np.uint8)
            payload = encode_chunk(raw, None, 1, "raw", "bytes", level=level)
            return job, payload, digest_bytes(payload, algo), raw, None
        info, enc = target.tensors[job.name], plans[job.name]
        raw = read_range(target, job.name, job.start, job.size)
        b_raw = None
        if job.mode == "delta":
            b_info = base.tensors[enc.base_tensor]  # type: ignore[index]
            b_start = job.start // info.itemsize * b_info.itemsize
            b_raw = read_range(base, b_info.name, b_start, job.size // info.itemsize * b_info.itemsize)
            pred = base_prediction(b_raw, b_info.dtype, info.dtype)
            payload = encode_chunk(raw, pred, info.itemsize, enc.transform, enc.layout, level)
        else:
            payload = encode_chunk(raw, None, info.itemsize, "raw", "planes", level)
        return job, payload, digest_bytes(payload, algo), raw, b_raw

    writer = _PayloadWriter(folder, payload_file_bytes)
    chunks: dict[str, list[Chunk]] = {}
    tensor_hash: dict[str, Hasher] = {n: new_hasher(algo) for n in target.tensors}
    file_hash: dict[str, "hashlib._Hash"] = {}
    for rel in shard_names:
        h = file_hash[rel] = hashlib.sha256()
        h.update(struct.pack("<Q", len(target.headers[rel].raw)) + target.headers[rel].raw)
    shard_of = {e.info.name: rel for rel in shard_names for e in target.headers[rel].entries}
    total = sum(j.size for j in jobs)
    # Base tensors are hashed on the way: the bytes each delta chunk read (in order, since a base
    # tensor serves one target tensor), then whatever no chunk read. So the base is read once.
    base_hash: dict[str, Hasher] = {n: new_hasher(algo) for n in base.tensors}
    base_hashed: dict[str, int] = {n: 0 for n in base.tensors}
    with byte_bar(total, "encoding", progress) as bar:
        for job, payload, sha, raw, b_raw in ordered_map(encode, jobs, threads):
            name, offset = writer.append(payload)
            chunks.setdefault(f"{job.kind}:{job.name}", []).append(
                Chunk(job.start, job.size, job.mode, name, offset, len(payload), sha))
            if job.kind == "tensor":
                tensor_hash[job.name].update(raw)
                file_hash[shard_of[job.name]].update(raw)
            if b_raw is not None:
                b_name = plans[job.name].base_tensor
                base_hash[b_name].update(b_raw)  # type: ignore[index]
                base_hashed[b_name] += len(b_raw)  # type: ignore[index]
            bar.update(job.size)
    payloads = writer.close()
    rest = [n for n in base.tensors if base_hashed[n] < base.tensors[n].nbytes]
    with byte_bar(sum(base.tensors[n].nbytes - base_hashed[n] for n in rest), "hashing base", progress) as bar:
        def finish_hash(n: str) -> None:
            hash_tensor_range(base, n, base_hash[n], base_hashed[n])
            bar.update(base.tensors[n].nbytes - base_hashed[n])
        for _ in ordered_map(finish_hash, rest, threads):
            pass
    base_tensors = {n: BaseTensor(i.dtype, i.shape, base_hash[n].hexdigest(), n in needed)
                    for n, i in base.tensors.items()}

    tensors = {}
    for n, info in target.tensors.items():
        tensors[n] = TensorEntry(n, info.dtype, info.shape, tensor_hash[n].hexdigest(), plans[n],
                                 tuple(chunks.get(f"tensor:{n}", ())))
    files = []
    for rel in shard_names:
        header = target.headers[rel]
        size = header.data_start + header.data_size
        files.append(FileEntry(rel, size, file_hash[rel].hexdigest(), "safetensors", header=header.raw.decode("utf-8")))
    for rel in sorted(blob_meta):
        size, sha = blob_meta[rel]
        files.append(FileEntry(rel, size, sha, "blob", source=blob_sources[rel],
                               chunks=tuple(chunks.get(f"blob:{rel}", ())) if blob_sources[rel] == "diff" else ()))

    base_id = BaseIdentity(base_name, base_repo, base_revision,
                           base_fingerprint({n: (t.dtype, t.shape, t.digest) for n, t in base_tensors.items()}),
                           base_tensors, base_files)
    target_fp = base_fingerprint({n: (t.dtype, t.shape, t.digest) for n, t in tensors.items()})
    dropped = sorted(set(base.tensors) - set(target.tensors))
    return Manifest(tool=f"orca-diff {__version__}", chunk_bytes=chunk_bytes, base=base_id,
                    target_fingerprint=target_fp, files=files, tensors=tensors, dropped=dropped, payloads=payloads)


__all__ = ["make_diff", "plan_encoding", "CHUNK_BYTES"]
