"""Fingerprints of a base: per-tensor sha256 and one short digest over all of them.

A base is identified by its tensors in HF canonical form (HF names, row-major little-endian
bytes, dtype and shape as stored), never by file names or container bytes: the same weights held
as safetensors, HF ``.bin`` or Meta ``.pth`` get the same fingerprint, while a different
conversion (dtype, q/k permutation, vocab) gets a different one.

Definition (normative, docs/bases.md repeats it)::

    lines  = sorted("{name}\\t{dtype}\\t{shape}\\t{sha256}\\n" for every tensor)
    digest = sha256("".join(lines).encode("utf-8")).hexdigest()
    short  = digest[:16]

where ``dtype`` is the safetensors dtype string ("F16", "BF16", "F32", ...), ``shape`` is the
dimensions joined by "x" ("4096x4096"; "" for a 0-d tensor), ``sha256`` is the lowercase hex
digest of the tensor's bytes (sha256 for format version 1 diffs, BLAKE3 from version 2: the
fingerprint of a base is therefore given with its algorithm, :mod:`orca_diff.digests`), and ``sorted`` is Python's default order on the complete lines
(which, names being unique, is the order of names by code point).
"""

from __future__ import annotations

import hashlib
from typing import Iterable, Mapping

from .containers import ModelReader
from .containers import tensor_digest, tensor_sha256  # re-exported: the per-tensor hashes fingerprints are made of
from .digests import BLAKE3

#: How many hex characters of the full digest are shown as "the" fingerprint.
SHORT_DIGEST_CHARS = 16

def shape_text(shape: Iterable[int]) -> str:
    """The shape as written in a fingerprint line: dimensions joined by "x"."""
    return "x".join(str(int(d)) for d in shape)


def fingerprint_lines(hashes: Mapping[str, tuple[str, tuple[int, ...] | list[int], str]]) -> list[str]:
    """The sorted lines the digest is taken over (exposed so tools can show what differs)."""
    return sorted(f"{name}\t{dtype}\t{shape_text(shape)}\t{sha}\n" for name, (dtype, shape, sha) in hashes.items())


def base_fingerprint_full(hashes: Mapping[str, tuple[str, tuple[int, ...] | list[int], str]]) -> str:
    """The full 64-hex digest over ``{name: (dtype, shape, sha256)}``."""
    # surrogatepass: a lone-surrogate name (valid JSON, not UTF-8) gets a fingerprint instead of a traceback
    return hashlib.sha256("".join(fingerprint_lines(hashes)).encode("utf-8", "surrogatepass")).hexdigest()


def base_fingerprint(hashes: Mapping[str, tuple[str, tuple[int, ...] | list[int], str]]) -> str:
    """The short fingerprint of a base: the first 16 hex of :func:`base_fingerprint_full`."""
    return base_fingerprint_full(hashes)[:SHORT_DIGEST_CHARS]


def hash_model(reader: ModelReader, threads: int = 1, progress: bool | None = False, algo: str = BLAKE3
               ) -> dict[str, tuple[str, tuple[int, ...], str]]:
    """``{name: (dtype, shape, digest)}`` for every tensor, in the reader's order (``algo``:
    "blake3", the current format's tensor digest, or "sha256" for format version 1 diffs).

    Tensors are hashed in bounded blocks by ``threads`` workers (each holds one block), so memory
    does not grow with the model. ``progress`` as in :func:`orca_diff.progress.byte_bar`.
    """
    from .pipeline import ordered_map
    from .progress import byte_bar

    names = list(reader.tensors)
    with byte_bar(sum(i.nbytes for i in reader.tensors.values()), "hashing base", progress) as bar:
        def one(name: str) -> str:
            sha = tensor_digest(reader, name, algo)
            bar.update(reader.tensors[name].nbytes)
            return sha

        shas = list(ordered_map(one, names, max(1, threads)))
    return {n: (reader.tensors[n].dtype, tuple(reader.tensors[n].shape), sha) for n, sha in zip(names, shas)}


__all__ = ["tensor_digest", "tensor_sha256", "base_fingerprint", "base_fingerprint_full", "fingerprint_lines",
           "hash_model", "shape_text", "SHORT_DIGEST_CHARS"]
