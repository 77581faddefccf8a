"""The base read once: a sampled check before writing, the full digests measured while rebuilding.

``apply`` used to hash every needed base tensor (``verify.check_base``) and then read the same
bytes again for the predictions. With a manifest that records sampled digests (format §2,
``base.tensors[].sampled``, written by ``make`` since 0.3) it instead

1. checks names, dtypes and shapes, and the digest of a few sampled blocks of every needed
   tensor (:func:`sample_spans`: at most 1 % of any tensor over 400 KB), **before anything is
   written**: every base that is another checkpoint, another conversion, another cast or a
   fine-tune differs in essentially every block, and is refused here;
2. measures each needed tensor's full digest from the very bytes the predictions read
   (:class:`StreamedBaseDigests`), reading only what no chunk reads, and refuses the first one
   that differs **before anything is published** (the caller removes its staging folder).

What slips through 1 and is caught by 2 is a base that differs only between the sampled blocks:
a damaged or locally edited file of the right checkpoint. Bounded memory holding no base copy
rules out a single read that also precedes every write: the last bytes of the last tensor
are needed only at the end of the rebuild.
"""

from __future__ import annotations

import numpy as np

from .digests import Hasher, new_hasher
from .errors import BaseMismatchError, InputNotFoundError
from .format import Manifest
from .pipeline import SerialWorker, ordered_map
from .containers import ModelReader, SafetensorsModel, read_range

#: Blocks sampled per tensor, and the tensor size up to which the whole tensor is the sample.
SAMPLE_BLOCKS = 8
SAMPLE_WHOLE_BYTES = 4096
#: Block size bounds: at least 512 bytes, at most 16 KiB, otherwise 1/800 of the tensor (so 8
#: blocks are ≤ 1 % of it) rounded down to a multiple of 512.
SAMPLE_MIN_BLOCK = 512
SAMPLE_MAX_BLOCK = 16 << 10


def sample_spans(nbytes: int) -> list[tuple[int, int]]:
    """The (offset, size) byte spans of a tensor of ``nbytes`` that its sampled digest covers
    (format §2, rule "spread-8"): the whole tensor up to 4096 bytes, else 8 blocks of
    ``clamp(nbytes // 800 rounded down to 512, 512, 16384)`` bytes, the first at 0, the last
    ending at the tensor's end, the others at ``i * (nbytes - block) // 7``. Pure."""
    if nbytes <= SAMPLE_WHOLE_BYTES:
        return [(0, nbytes)]
    block = min(SAMPLE_MAX_BLOCK, max(SAMPLE_MIN_BLOCK, nbytes // 800 // 512 * 512))
    last = SAMPLE_BLOCKS - 1
    return [(i * (nbytes - block) // last, block) for i in range(SAMPLE_BLOCKS)]


def sampled_digest(reader: ModelReader, name: str, algo: str) -> str:
    """The digest (``algo``) of the concatenated sampled spans of tensor ``name``."""
    h = new_hasher(algo)
    for start, size in sample_spans(reader.tensors[name].nbytes):
        h.update(read_range(reader, name, start, size))
    return h.hexdigest()


class SampledHasher:
    """A tensor's full digest and its sampled digest from one in-order pass over its bytes (what
    ``make`` feeds while it encodes): the sampled spans are picked out of the stream, so
    recording them reads nothing more."""

    def __init__(self, nbytes: int, algo: str):
        self._full, self._sample = new_hasher(algo), new_hasher(algo)
        self._spans = sample_spans(nbytes)
        self._pos = 0

    def update(self, data: object) -> None:
        view = memoryview(data).cast("B")  # type: ignore[arg-type]
        self._full.update(view)
        lo, hi = self._pos, self._pos + len(view)
        for start, size in self._spans:
            a, b = max(start, lo), min(start + size, hi)
            if a < b:
                self._sample.update(view[a - lo:b - lo])
        self._pos = hi

    def hexdigest(self) -> str:
        return self._full.hexdigest()

    def sampled_hexdigest(self) -> str:
        return self._sample.hexdigest()


def samples_usable(manifest: Manifest, base: ModelReader) -> bool:
    """Whether apply may check ``base`` by samples and stream the full digests: the manifest
    records a sampled digest for every needed tensor, and the base reads ranges without
    building whole tensors (safetensors; a pickled base is checked in full first, as before)."""
    needed = manifest.needed_base_tensors()
    return isinstance(base, SafetensorsModel) and all(t.sampled for t in needed.values())


def check_base_samples(base: ModelReader, manifest: Manifest, threads: int) -> None:
    """Refuse ``base`` when a needed tensor's sampled digest is not the manifest's (names,
    dtypes and shapes are checked before: ``verify.check_base_layout``). Reads ≤ 1 % of the
    base's needed bytes (plus ≤ 4 KiB per tensor under 400 KB)."""
    from .verify import _hint, _short

    needed = manifest.needed_base_tensors()
    names = list(needed)
    algo = manifest.digest_algo
    for name, found in ordered_map(lambda n: (n, sampled_digest(base, n, algo)), names, threads):
        if found != needed[name].sampled:
            raise BaseMismatchError(
                f"base {base.path}: tensor {name!r} differs from the diff's base (its sampled blocks hash to "
                f"{algo} {_short(found)}…, the diff records {_short(needed[name].sampled)}…); nothing was written."
                f"{_hint(manifest, base, name, None)}")


class StreamedBaseDigests:
    """The full digest of every needed base tensor, fed in order by the bytes apply's
    predictions read (``feed``), completed by reading only what no chunk read (``complete``).

    Each base tensor is fed by one target tensor, the first in rebuild order whose delta chunks
    read it (``users``); its chunks come in order, so the bytes arrive in order. A gap (a chunk
    stored raw) is read when the next chunk comes; what lies past the last chunk is read by
    ``complete``. Hashing runs on one helper thread, at most one buffer pending (memory: one
    chunk's base bytes more than the decode window)."""

    def __init__(self, base: ModelReader, manifest: Manifest, users: dict[str, str]):
        self.base, self.manifest = base, manifest
        self.algo = manifest.digest_algo
        self.needed = manifest.needed_base_tensors()
        self.users = users  # base tensor -> the target tensor whose chunks feed it
        self._fed_by = {t: b for b, t in users.items()}
        self._hashers: dict[str, Hasher] = {n: new_hasher(self.algo) for n in self.needed}
        self._pos: dict[str, int] = {n: 0 for n in self.needed}
        self._worker = SerialWorker("orca-diff-base-digest")
        self.measured: dict[str, str] = {}

    def feed(self, tensor: str | None, start: int, data: np.ndarray | None) -> None:
        """Bytes ``[start, start+len(data))`` of the base tensor that target ``tensor``'s chunk read."""
        b = self._fed_by.get(tensor) if tensor is not None else None
        if b is None or data is None or b in self.measured:
            return
        pos, end = self._pos[b], start + len(data)
        if end <= pos:
            return
        if start > pos:  # bytes no chunk reads (a raw chunk): read them now, once
            self._hash_range(b, pos, start)
        self._worker.submit(self._hashers[b].update, data[pos - start:] if start < pos else data)
        self._pos[b] = end

    def users_tensor_done(self, tensor: str | None) -> None:
        """Called once target ``tensor`` is complete: the base tensor it fed is completed and checked."""
        b = self._fed_by.get(tensor) if tensor is not None else None
        if b is not None:
            self.complete(b)

    def complete(self, b: str) -> str:
        """Finish base tensor ``b`` (reading what no chunk read) and raise BaseMismatchError unless
        its digest is the manifest's."""
        if b in self.measured:
            return self.measured[b]
        self._worker.wait()
        self._hash_range(b, self._pos[b], self.base.tensors[b].nbytes)
        self._pos[b] = self.base.tensors[b].nbytes
        found = self._hashers.pop(b).hexdigest()
        if found != self.needed[b].digest:
            from .diagnose import explain_damaged_tensor
            from .verify import _short

            streamed = getattr(self.base, "streamed", False)  # a base downloading now: its listing matched, not samples
            err = BaseMismatchError(
                f"base {self.base.path}: tensor {b!r} differs from the diff's base (expected {self.algo} "
                f"{_short(self.needed[b].digest)}…, found {_short(found)}…); nothing was published."
                + ("" if streamed else f" {explain_damaged_tensor(self.base, b)}"))
            err.tensor = b  # type: ignore[attr-defined]
            raise err
        self.measured[b] = found
        return found

    def complete_all(self, threads: int) -> dict[str, str]:
        """Complete every needed tensor not yet measured (those no chunk of this run reads, e.g.
        on resume), several at once; returns every measured digest."""
        self._worker.wait()
        rest = [b for b in self.needed if b not in self.measured]
        for _ in ordered_map(self.complete_alone, rest, threads):
            pass
        return dict(self.measured)

    def complete_alone(self, b: str) -> str:
        """``complete`` for a tensor nothing else feeds (safe on any thread)."""
        h = self._hashers[b]
        for s in range(self._pos[b], self.base.tensors[b].nbytes, _READ_BLOCK):
            h.update(self._read(b, s, min(_READ_BLOCK, self.base.tensors[b].nbytes - s)))
        self._pos[b] = self.base.tensors[b].nbytes
        return self.complete(b)

    def _hash_range(self, b: str, start: int, end: int) -> None:
        for s in range(start, end, _READ_BLOCK):
            data = self._read(b, s, min(_READ_BLOCK, end - s))
            self._worker.submit(self._hashers[b].update, data)
        self._worker.wait()

    def _read(self, b: str, start: int, size: int) -> np.ndarray:
        try:
            return read_range(self.base, b, start, size)
        except OSError as exc:  # an input that broke while applying, never blamed on the output
            raise InputNotFoundError(f"base {self.base.path}: tensor {b!r} cannot be read ({exc.strerror}); was the "
                                     "base changed or removed while applying? Restore it and rerun") from None

    def close(self) -> None:
        self._worker.close()


#: Bytes of a base tensor read per step when completing it (bounded memory).
_READ_BLOCK = 16 << 20


def stream_users(manifest: Manifest, files: list) -> dict[str, str]:
    """base tensor -> the first target tensor (in rebuild order over ``files``) whose delta
    chunks read it: that tensor's chunks feed the base tensor's digest."""
    from .format import file_segments

    users: dict[str, str] = {}
    needed = manifest.needed_base_tensors()
    for f in files:
        for seg in file_segments(f):
            t = manifest.tensors.get(seg.tensor) if seg.tensor is not None else None
            b = t.encoding.base_tensor if t is not None else None
            if b in needed and b not in users and any(c.mode == "delta" for c in t.chunks):  # type: ignore[union-attr]
                users[b] = t.name  # type: ignore[union-attr,index]
    return users


__all__ = ["sample_spans", "sampled_digest", "samples_usable", "check_base_samples", "StreamedBaseDigests",
           "stream_users"]
