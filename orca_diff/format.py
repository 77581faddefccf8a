"""The diff manifest (``orca-diff.json``): dataclasses, strict parsing, canonical serialisation.

docs/format.md is the normative description; this module is its executable form. Parsing treats
the manifest as hostile input: every field is type- and range-checked, every path must be a safe
relative path, and the whole document carries a sha256 of its canonical form so that a flipped
bit is reported as a corrupt manifest rather than as a mysterious payload mismatch.
"""

from __future__ import annotations

import base64
import binascii
import functools
import gc
import hashlib
import json
import os
import re
import struct
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .digests import TENSOR_DIGEST_OF_VERSION
from .errors import CorruptDiffError, FormatError, InputNotFoundError
from .containers import DTYPE_SIZES, MAX_HEADER_BYTES, FLOAT_DTYPES, DuplicateKeyError, TensorInfo, parse_safetensors_header, unique_keys

MANIFEST_NAME = "orca-diff.json"
FORMAT_NAME = "orca-diff"
FORMAT_VERSION = 3
#: The version of a diff holding low-rank frames (§3e); make writes FORMAT_VERSION otherwise, so
#: that 0.3 readers keep applying every diff that does not need the newer reader.
LOW_RANK_VERSION = 4
#: Versions this reader understands (version 1 and 2 diffs keep applying). Version 3 added the
#: sparse and no-base frames, the sampled base digests and inline signature files; version 4 the
#: low-rank frames: an older reader would call such a diff corrupt, so it is told to upgrade.
READABLE_VERSIONS = (1, 2, 3, 4)
#: Manifests larger than this are refused before parsing (a 405B model's is a few MB).
MAX_MANIFEST_BYTES = 256 * 1024 * 1024
MAX_INT = 2**62
#: Tensors a diff may rebuild, and base tensors it may list: 2^18. A 70B dense model has ~800, a
#: 671B mixture of experts with 256 experts per layer and FP8 scales ~92,000, one of 384 experts
#: ~140,000. Parsing costs ~4.3 KB of memory per tensor (measured: `info` on 20,000 one-element
#: tensors peaks at 119 MiB, 34 MiB of it the interpreter), so this also bounds what a hostile
#: manifest of tiny tensors can make `info` and `apply` hold (~1.1 GiB).
MAX_TENSORS = 1 << 18
#: Files of the rebuilt model, payload files and base files: 2^16 each.
MAX_FILES = 1 << 16
#: The largest chunk a reader accepts (make writes 16 MiB ones): bounds apply's memory per chunk.
MAX_CHUNK_BYTES = 1 << 30

TRANSFORMS = ("ulp", "xor", "raw")
#: How a tensor's delta-chunk symbols are laid out before zstd (docs/format.md, "Layouts").
LAYOUTS = ("planes", "escape", "bytes")
#: How delta chunks are entropy-coded (docs/format.md §3a/§3b): "zstd" frames, or "ans" frames
#: (context-modelled rANS, ulp deltas of floats only) with zstd frames where those are smaller.
CODECS = ("zstd", "ans")
CHUNK_MODES = ("delta", "raw")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
#: Path rule (docs/format.md §2): at most this many components, each at most 255 UTF-8 bytes.
MAX_PATH_DEPTH = 32
MAX_COMPONENT_BYTES = 243  # 255 (NAME_MAX) less the 12 bytes of apply's partial name ".<name>.incomplete"
#: The whole relative path, in UTF-8 bytes: Linux opens at most PATH_MAX (4096) bytes and macOS
#: 1024, --out and the staging folder's name included, so a model's own paths keep to 512 (the
#: longest in real repositories are under 100).
MAX_PATH_BYTES = 512
#: Characters no path may hold: control characters (C0, DEL, C1), line/paragraph separators,
#: invisible format characters that bidirectional text or HFS+ treat specially (LRM/RLM, the
#: overrides and isolates, the deprecated U+206A-F, the BOM: they make `info` and terminals show
#: another name, or macOS ignore them), backslash, and the characters Windows cannot store in a
#: name (< > : " | ? *; ':' would also name an NTFS stream).
_BAD_CHARS = re.compile('[\x00-\x1f\x7f-\x9f\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u206f\ufeff\\\\<>:"|?*]')
#: Zero-width (non-)joiners: legitimate in Persian or Devanagari names, but HFS+ ignores them when it
#: compares names, so they are dropped from a path's collision key and from the reserved-name check.
_HFS_IGNORED = dict.fromkeys(map(ord, "\u200c\u200d"))
#: Names orca-diff itself uses inside an output or staging folder (apply's partial files
#: ``.<name>.incomplete`` or ``.<prefix>~<hash>.incomplete``, its state file ``.orca-diff-state.*``,
#: the hidden siblings ``.<out>.orca-diff-partial|old|lock|output``) and git's folder, which no Hub
#: repo can hold (with its NTFS short name ``git~1``, which git refuses too). Matched against the
#: component's :func:`name_key`, like the file systems that would confuse them.
_RESERVED_COMPONENT = re.compile(r"^(\..*\.incomplete|\.orca-diff.*|\..*\.orca-diff-.*|\.git|git~1)$")
#: Windows device names: a component whose part before the first dot is one of these, in any
#: ASCII case, opens the device instead of a file there (``NUL.txt`` is ``NUL``).
_WINDOWS_DEVICES = frozenset({"con", "prn", "aux", "nul", "conin$", "conout$",
                              *(f"{d}{n}" for d in ("com", "lpt") for n in "0123456789\u00b9\u00b2\u00b3")})


def _simple_fold(ch: str) -> str:
    """One character's case-insensitive form the way NTFS (its upcase table) and APFS compare
    names: Unicode's *simple* one-to-one mappings only, so 'ß' stays 'ß' (not 'ss') and 'İ' stays
    'İ' (not 'i' + a combining dot). Upper then lower, so every name one of them equates maps together."""
    up = ch.upper()
    if len(up) != 1:
        up = ch
    low = up.lower()
    return low if len(low) == 1 else up


_FOLD_CACHE: dict[str, str] = {}


def name_key(name: str) -> str:
    """The form under which two names are one file on some file system: NFC (macOS normalises),
    without the joiners HFS+ ignores, simple-case-folded (NTFS, APFS and HFS+ ignore case)."""
    out = []
    for ch in unicodedata.normalize("NFC", name).translate(_HFS_IGNORED):
        f = _FOLD_CACHE.get(ch)
        if f is None:
            f = _FOLD_CACHE.setdefault(ch, _simple_fold(ch))
        out.append(f)
    return "".join(out)


def path_key(p: str) -> str:
    """The form under which two paths collide on some file system (see :func:`name_key`). Paths
    of one model must have distinct keys."""
    return name_key(p)


def path_problem(p: object) -> str | None:
    """Why ``p`` is not a safe relative path for a file of a diff or of a rebuilt model, or None.

    Safe (docs/format.md §2): at most MAX_PATH_BYTES UTF-8 bytes; 1 to MAX_PATH_DEPTH
    '/'-separated components, none empty, '.' or '..', none longer than MAX_COMPONENT_BYTES, none
    ending in a space or a dot (Windows drops them), none a Windows device name (CON, nul.txt...),
    no control character, backslash or invisible format character, not starting with a drive
    letter, and none of the names orca-diff reserves for its own staging or git's folder (see
    _RESERVED_COMPONENT). Any other Unicode (spaces, parentheses, '~', non-ASCII, leading dots)
    is allowed, as on the Hub."""
    if not isinstance(p, str) or not p:
        return "a path must be a non-empty string"
    try:
        size = len(p.encode("utf-8"))
    except UnicodeEncodeError:
        return "the path is not valid Unicode (a lone surrogate)"
    if size > MAX_PATH_BYTES:
        return f"{size} bytes in all, more than the {MAX_PATH_BYTES} a path may have (PATH_MAX, with the output folder's)"
    parts = p.split("/")
    if len(parts) > MAX_PATH_DEPTH:
        return f"more than {MAX_PATH_DEPTH} folder levels"
    if re.match(r"^[A-Za-z]:", parts[0]):
        return "a drive letter"
    for c in parts:
        if c in ("", ".", ".."):
            return "an empty, '.' or '..' component (absolute paths and escapes are not allowed)"
        if len(c.encode("utf-8")) > MAX_COMPONENT_BYTES:
            return f"a name longer than {MAX_COMPONENT_BYTES} bytes"
        if _BAD_CHARS.search(c):
            return 'a control character, an invisible format character, a backslash or one of < > : " | ? *'
        if c[-1] in " .":
            return f"the name {c!r}, which ends in a space or a dot (Windows cannot store it)"
        if c.split(".", 1)[0].rstrip(" ").lower() in _WINDOWS_DEVICES:
            return f"the name {c!r}, a Windows device name (CON, PRN, AUX, NUL, COM0-9, LPT0-9, with any extension)"
        if _RESERVED_COMPONENT.match(name_key(c)):
            return f"the name {c!r}, which orca-diff reserves for its own staging files (or git's)"
    return None


#: Every chunk names its payload file: the few payload names are checked once, not per chunk.
_cached_path_problem = functools.lru_cache(maxsize=1024)(lambda p: path_problem(p))


def safe_relpath(p: object, what: str) -> str:
    """Accept only safe relative POSIX paths (:func:`path_problem`), so no manifest can point
    outside the folder it is applied into, nor onto apply's own staging names."""
    problem = _cached_path_problem(p) if type(p) is str else path_problem(p)
    if problem is not None:
        raise FormatError(f"manifest: {what}: unsafe path {ascii(p)[:300]} ({problem})")
    return p  # type: ignore[return-value]


def _int(v: object, what: str, lo: int = 0, hi: int = MAX_INT) -> int:
    if type(v) is not int or not lo <= v <= hi:
        raise FormatError(f"manifest: {what}: expected an integer in [{lo}, {hi}], found {v!r}")
    return v


def _str(v: object, what: str, optional: bool = False, max_len: int = 4096) -> str | None:
    if v is None and optional:
        return None
    if not isinstance(v, str):
        raise FormatError(f"manifest: {what}: expected a string, found {type(v).__name__}")
    if len(v) > max_len:
        raise FormatError(f"manifest: {what}: string of {len(v)} characters is longer than the {max_len} allowed")
    return v


def _hex(v: object, what: str) -> str:
    if not isinstance(v, str) or not _HEX64.fullmatch(v):
        raise FormatError(f"manifest: {what}: expected a sha256 hex digest")
    return v


def _dict(v: object, what: str) -> dict:
    if not isinstance(v, dict):
        raise FormatError(f"manifest: {what}: expected an object")
    return v


def _list(v: object, what: str) -> list:
    if not isinstance(v, list):
        raise FormatError(f"manifest: {what}: expected a list")
    return v


def _dtype(v: object, what: str) -> str:
    if v not in DTYPE_SIZES:
        raise FormatError(f"manifest: {what}: unsupported dtype {v!r}")
    return v  # type: ignore[return-value]


def _shape(v: object, what: str) -> tuple[int, ...]:
    items = _list(v, what)
    if len(items) > 16:
        raise FormatError(f"manifest: {what}: too many dimensions")
    return tuple(_int(d, what) for d in items)


@dataclass(frozen=True)
class Chunk:
    """A run of ``size`` bytes of an object starting at ``start``, stored as ``length`` compressed
    bytes at ``offset`` in payload file ``payload``; ``digest`` is of those compressed bytes
    (sha256 in format version 1, BLAKE3 from version 2: see :mod:`orca_diff.digests`)."""

    start: int
    size: int
    mode: str  # "delta" (needs the base) or "raw"
    payload: str
    offset: int
    length: int
    digest: str

    def to_json(self, key: str) -> dict:
        return {"start": self.start, "size": self.size, "mode": self.mode, "payload": self.payload,
                "offset": self.offset, "length": self.length, key: self.digest}

    @classmethod
    def from_json(cls, d: object, what: str, key: str) -> "Chunk":
        d = _dict(d, what)
        mode = d.get("mode")
        if mode not in CHUNK_MODES:
            raise FormatError(f"manifest: {what}: unknown chunk mode {mode!r}")
        return cls(_int(d.get("start"), what), _int(d.get("size"), what), mode,
                   safe_relpath(d.get("payload"), what), _int(d.get("offset"), what),
                   _int(d.get("length"), what), _hex(d.get(key), what))


def _chunks(v: object, what: str, total: int, key: str) -> list[Chunk]:
    chunks = [Chunk.from_json(c, f"{what} chunk {i}", key) for i, c in enumerate(_list(v, what))]
    cursor = 0
    for i, c in enumerate(chunks):
        if c.start != cursor or c.size == 0:
            raise FormatError(f"manifest: {what} chunk {i}: chunks must tile the object (expected start {cursor})")
        cursor += c.size
    if cursor != total:
        raise FormatError(f"manifest: {what}: chunks cover {cursor} bytes, object has {total}")
    return chunks


@dataclass(frozen=True)
class Encoding:
    """How a target tensor is rebuilt. ``transform`` is applied to the first ``shared_bytes``
    bytes against ``base_tensor`` cast to the target dtype; the remaining bytes are stored raw."""

    transform: str  # "ulp", "xor" or "raw"
    base_tensor: str | None = None
    base_dtype: str | None = None
    shared_bytes: int = 0
    layout: str = "planes"  # of the delta chunks' zstd frames; raw chunks always use byte planes
    codec: str = "zstd"  # of the delta chunks: "zstd" or "ans" (whose zstd fallback frames use ``layout``)

    def to_json(self) -> dict:
        return {"transform": self.transform, "base_tensor": self.base_tensor, "base_dtype": self.base_dtype,
                "shared_bytes": self.shared_bytes, "layout": self.layout, "codec": self.codec}

    @classmethod
    def from_json(cls, d: object, what: str) -> "Encoding":
        d = _dict(d, what)
        t = d.get("transform")
        if t not in TRANSFORMS:
            raise FormatError(f"manifest: {what}: unknown transform {t!r} (made by a newer orca-diff?)")
        codec = d.get("codec")
        if codec not in CODECS:
            raise FormatError(f"manifest: {what}: unknown codec {codec!r} (made by a newer orca-diff?)")
        layout = d.get("layout")
        if layout not in LAYOUTS:
            raise FormatError(f"manifest: {what}: unknown layout {layout!r} (made by a newer orca-diff?)")
        if layout == "escape" and t == "raw":
            raise FormatError(f"manifest: {what}: the escape layout is only for delta transforms")
        if codec == "ans" and (t != "ulp" or layout == "bytes"):
            raise FormatError(f"manifest: {what}: the ans codec is only for ulp deltas (found transform {t!r}, "
                              f"layout {layout!r})")
        base_tensor = _str(d.get("base_tensor"), what, optional=True)
        base_dtype = None if d.get("base_dtype") is None else _dtype(d.get("base_dtype"), what)
        shared = _int(d.get("shared_bytes"), what)
        if t != "raw" and (base_tensor is None or base_dtype is None):
            raise FormatError(f"manifest: {what}: a {t} encoding needs base_tensor and base_dtype")
        return cls(t, base_tensor, base_dtype, shared, layout, codec)


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    digest: str  # of the tensor's bytes; the algorithm is the manifest's ``digest_algo``
    encoding: Encoding
    chunks: tuple[Chunk, ...]

    @property
    def info(self) -> TensorInfo:
        return TensorInfo(self.name, self.dtype, self.shape)

    def to_json(self, key: str) -> dict:
        return {"dtype": self.dtype, "shape": list(self.shape), key: self.digest,
                "encoding": self.encoding.to_json(), "chunks": [c.to_json(key) for c in self.chunks]}


@dataclass(frozen=True)
class FileEntry:
    """A file of the rebuilt model. ``kind`` is "safetensors" (``header`` verbatim, data from
    tensors), "segments" (``segments`` tile the file: tensors, verbatim bytes held inline or in
    payload chunks; how a torch ``.bin`` is carried) or "blob" (``source`` "diff": bytes in
    ``chunks``; "base": copied from the base)."""

    path: str
    size: int
    sha256: str
    kind: str
    header: str | None = None
    source: str | None = None
    chunks: tuple[Chunk, ...] = ()
    segments: tuple["Segment", ...] = ()

    def to_json(self, key: str) -> dict:
        d: dict[str, Any] = {"path": self.path, "size": self.size, "sha256": self.sha256, "kind": self.kind}
        if self.kind == "safetensors":
            d["header"] = self.header
        elif self.kind == "segments":
            d["segments"] = [s.to_json(key) for s in self.segments]
        else:
            d["source"] = self.source
            d["chunks"] = [c.to_json(key) for c in self.chunks]
        return d


@dataclass(frozen=True)
class Segment:
    """One run of a rebuilt file's bytes, in file order: the one view apply, verify and resume
    take of every file kind. Exactly one source is set: ``tensor`` (that tensor's bytes, rebuilt
    from its chunks), ``data`` (verbatim bytes held in the manifest, e.g. a safetensors header),
    ``chunks`` (verbatim bytes stored in payloads) or ``from_base`` (the whole file, copied)."""

    offset: int
    size: int
    tensor: str | None = None
    data: bytes | None = None
    chunks: tuple[Chunk, ...] = ()
    from_base: bool = False

    def to_json(self, key: str) -> dict:
        """A segment of a "segments" file (its offset is implied by the ones before it)."""
        if self.tensor is not None:
            return {"size": self.size, "tensor": self.tensor}
        if self.data is not None:
            return {"size": self.size, "data": base64.b64encode(self.data).decode("ascii")}
        return {"size": self.size, "chunks": [c.to_json(key) for c in self.chunks]}


#: Verbatim bytes of a "segments" file up to this size may be held in the manifest (base64)
#: rather than in payload chunks: zip local headers and the like, ~100 bytes each.
MAX_INLINE_BYTES = 4096
#: Segments per file: bounds the work on hostile manifests (a .bin shard has ~3 per tensor).
MAX_SEGMENTS = 1 << 20


def file_segments(f: FileEntry) -> list[Segment]:
    """The segments of file ``f``, tiling it from byte 0 to ``f.size`` (validated manifests only)."""
    if f.kind == "segments":
        return list(f.segments)
    if f.kind == "safetensors":
        head = (f.header or "").encode("utf-8")
        prefix = struct.pack("<Q", len(head)) + head
        segs = [Segment(0, len(prefix), data=prefix)]
        for e in parse_safetensors_header(head, f.path, f.size).entries:
            segs.append(Segment(len(prefix) + e.begin, e.end - e.begin, tensor=e.info.name))
        return segs
    if f.source == "base":
        return [Segment(0, f.size, from_base=True)]
    return [Segment(0, f.size, chunks=f.chunks)]


@dataclass(frozen=True)
class BaseTensor:
    dtype: str
    shape: tuple[int, ...]
    digest: str  # of the tensor's bytes; the algorithm is the manifest's ``digest_algo``
    needed: bool
    #: optional: digest of the blocks ``basecheck.sample_spans`` picks (format §2), the check apply
    #: runs before writing so that it reads the base once
    sampled: str | None = None

    def to_json(self, key: str) -> dict:
        d = {"dtype": self.dtype, "shape": list(self.shape), key: self.digest, "needed": self.needed}
        return d if self.sampled is None else {**d, "sampled": self.sampled}


@dataclass(frozen=True)
class BaseFile:
    size: int
    sha256: str


@dataclass
class BaseIdentity:
    name: str | None
    repo: str | None
    revision: str | None
    fingerprint: str
    tensors: dict[str, BaseTensor]
    files: dict[str, BaseFile] = field(default_factory=dict)  # base files the diff copies
    #: The base's weight files as made from (path -> size, sha256 = the Hub's LFS oid): lets a
    #: Hub repo named as --base be refused from its file listing, before any download. Optional.
    weight_files: dict[str, BaseFile] = field(default_factory=dict)


@dataclass(frozen=True)
class PayloadFile:
    path: str
    size: int
    sha256: str


@dataclass
class Manifest:
    tool: str
    chunk_bytes: int
    base: BaseIdentity
    target_fingerprint: str
    files: list[FileEntry]
    tensors: dict[str, TensorEntry]
    dropped: list[str]
    payloads: list[PayloadFile]
    format_version: int = FORMAT_VERSION
    #: the checksum a parsed manifest carried and was checked against (None: built in memory)
    checked_sha256: str | None = field(default=None, compare=False, repr=False)

    # ---------------------------------------------------------------- derived views
    @property
    def target_bytes(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def payload_bytes(self) -> int:
        return sum(p.size for p in self.payloads)

    @property
    def digest_algo(self) -> str:
        """The algorithm of tensor digests, chunk digests and fingerprints ("sha256" or "blake3")."""
        return TENSOR_DIGEST_OF_VERSION[self.format_version]

    def needed_base_tensors(self) -> dict[str, BaseTensor]:
        return {n: t for n, t in self.base.tensors.items() if t.needed}

    # ---------------------------------------------------------------- serialisation
    def body(self) -> dict:
        key = self.digest_algo
        return {
            "format": FORMAT_NAME,
            "format_version": self.format_version,
            "tool": self.tool,
            "chunk_bytes": self.chunk_bytes,
            "base": {
                "name": self.base.name, "repo": self.base.repo, "revision": self.base.revision,
                "fingerprint": self.base.fingerprint,
                "tensors": {n: t.to_json(key) for n, t in self.base.tensors.items()},
                "files": {n: {"size": f.size, "sha256": f.sha256} for n, f in self.base.files.items()},
                **({"weight_files": {n: {"size": f.size, "sha256": f.sha256} for n, f in self.base.weight_files.items()}}
                   if self.format_version >= 2 else {}),
            },
            "target": {"fingerprint": self.target_fingerprint, "files": [f.to_json(key) for f in self.files]},
            "tensors": {n: t.to_json(key) for n, t in self.tensors.items()},
            "dropped": list(self.dropped),
            "payloads": [{"path": p.path, "size": p.size, "sha256": p.sha256} for p in self.payloads],
        }

    def identity(self) -> str:
        """The manifest's checksum (canonical sha256 of its body): what the file carried, already
        checked when it was parsed, or computed."""
        return self.checked_sha256 or canonical_sha256(self.body())

    def to_bytes(self) -> bytes:
        body = self.body()
        body["manifest_sha256"] = canonical_sha256(body)
        return (_dumps_lines(body, ()) + "\n").encode()


#: Containers of the manifest written one item per line; every item inside is written compactly.
#: A tensor or file is one line (readable, greppable, diffable) without the 15 % that indenting
#: every nested key costs, which is the diff's fixed overhead on near-identical checkpoints.
_EXPANDED = frozenset({(), ("base",), ("target",), ("tensors",), ("payloads",), ("base", "tensors"),
                       ("base", "files"), ("base", "weight_files"), ("target", "files")})


def _dumps_lines(v: object, path: tuple[str, ...]) -> str:
    """JSON text of ``v`` (ASCII), containers at ``_EXPANDED`` paths one item per line."""
    if path not in _EXPANDED or not isinstance(v, (dict, list)) or not v:
        return json.dumps(v, ensure_ascii=True, separators=(",", ":"))
    pad = " " * (len(path) + 1)
    if isinstance(v, dict):
        items = [f"{pad}{json.dumps(k, ensure_ascii=True)}: {_dumps_lines(x, path + (k,))}" for k, x in v.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad[1:] + "}"
    items = [pad + _dumps_lines(x, path + ("[]",)) for x in v]
    return "[\n" + ",\n".join(items) + "\n" + pad[1:] + "]"


def canonical_sha256(body: dict) -> str:
    """sha256 of the canonical JSON form (sorted keys, no whitespace, ASCII) of ``body``.

    Fed to the hash piece by piece (:func:`_feed_canonical`): the same bytes as one
    ``json.dumps(body, sort_keys=True, ...)``, without holding the whole text and its millions
    of fragments at once (a manifest of 400,000 tensors would need ~10x its size for that)."""
    h = hashlib.sha256()
    _feed_canonical(body, h.update, 0)
    return h.hexdigest()


_CANON = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=True)
#: Containers with more items than this are encoded item by item; smaller ones in one call.
_CANON_SPLIT = 64


def _feed_canonical(obj: object, feed, depth: int) -> None:
    split = depth < 2 or len(obj) > _CANON_SPLIT if isinstance(obj, (dict, list)) else False
    if isinstance(obj, dict) and split:
        feed(b"{")
        for i, k in enumerate(sorted(obj)):
            feed(((b"," if i else b"") + _CANON.encode(k).encode() + b":"))
            _feed_canonical(obj[k], feed, depth + 1)
        feed(b"}")
    elif isinstance(obj, list) and split:
        feed(b"[")
        for i, v in enumerate(obj):
            if i:
                feed(b",")
            _feed_canonical(v, feed, depth + 1)
        feed(b"]")
    else:
        feed(_CANON.encode(obj).encode())


def parse_manifest(data: bytes, where: str = MANIFEST_NAME) -> Manifest:
    """Parse and fully validate manifest bytes. Raises FormatError / CorruptDiffError.

    The cyclic garbage collector is paused meanwhile: parsing creates millions of small
    containers and no cycle, and each of the collector's full passes walks all of them, which
    made parsing a manifest of many tensors superlinear (a quarter to 40% of the time at 20,000)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        return _parse_manifest(data, where)
    finally:
        if enabled:
            gc.enable()


def _parse_manifest(data: bytes, where: str) -> Manifest:
    if len(data) > MAX_MANIFEST_BYTES:
        raise FormatError(f"{where}: manifest is {len(data)} bytes, larger than any real diff needs")
    # Before parsing (which costs ~10x the bytes): every tensor and base tensor record has one
    # "dtype" key, and a name can add at most three more occurrences, so a valid manifest has
    # fewer than 4 * 2 * MAX_TENSORS of them. The exact counts are checked after parsing.
    if data.count(b'"dtype"') > 8 * MAX_TENSORS:
        raise FormatError(f"{where}: manifest lists more than {MAX_TENSORS} tensors, more than any real model has "
                          "(the parser's memory bound); refusing it")
    try:
        doc = json.loads(data.decode("utf-8"), object_pairs_hook=unique_keys)
    except DuplicateKeyError as exc:
        raise FormatError(f"{where}: the key {exc.args[0]!r} is written twice in one object (ambiguous); "
                          "refusing this manifest") from None
    except (ValueError, RecursionError) as exc:  # bad UTF-8 or JSON, or an integer of > 4300 digits
        raise CorruptDiffError(f"{where}: manifest is not valid JSON ({str(exc)[:200]}); download the diff again") from None
    if not isinstance(doc, dict):
        raise FormatError(f"{where}: not an orca-diff manifest (not a JSON object)")
    if doc.get("format") != FORMAT_NAME:
        raise FormatError(f"{where}: not an orca-diff manifest (format={doc.get('format')!r})")
    version = doc.get("format_version")
    if type(version) is not int or version not in READABLE_VERSIONS:
        raise FormatError(
            f"{where}: diff format version {version!r}; this orca-diff reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))} (upgrade orca-diff: pip install -U orca-diff)"
        )
    claimed = doc.pop("manifest_sha256", None)
    if claimed != canonical_sha256(doc):
        raise CorruptDiffError(
            f"{where}: manifest checksum mismatch (the file was modified or damaged); download the diff again"
        )
    try:
        m = _manifest_from_doc(doc, version)
        m.checked_sha256 = claimed
        return m
    except (KeyError, TypeError, AttributeError) as exc:  # shapes we did not foresee: still a format error
        raise FormatError(f"{where}: malformed manifest ({type(exc).__name__}: {exc})") from None


def _count(v: object, what: str, cap: int) -> None:
    if isinstance(v, (dict, list)) and len(v) > cap:
        raise FormatError(f"manifest: {what}: {len(v)} entries, more than the {cap} any real model needs (the "
                          "parser's memory bound); refusing this manifest")


def _drain(d: dict):
    """(key, value) of ``d`` in order, each removed as it is handed out: the parsed JSON is let go
    while the dataclasses are built, so the two are not held whole at once."""
    for k in list(d):
        yield k, d.pop(k)


def _manifest_from_doc(doc: dict, version: int) -> Manifest:
    key = TENSOR_DIGEST_OF_VERSION[version]  # the JSON key of tensor and chunk digests
    base_d = _dict(doc.get("base"), "base")
    target_d = _dict(doc.get("target"), "target")
    for v, what, cap in ((base_d.get("tensors"), "base.tensors", MAX_TENSORS), (doc.get("tensors"), "tensors", MAX_TENSORS),
                         (base_d.get("files"), "base.files", MAX_FILES), (base_d.get("weight_files"), "base.weight_files", MAX_FILES),
                         (target_d.get("files"), "target.files", MAX_FILES), (doc.get("payloads"), "payloads", MAX_FILES)):
        _count(v, what, cap)
    base_tensors = {}
    for name, t in _drain(_dict(base_d.get("tensors"), "base.tensors")):
        w = f"base tensor {name!r}"
        t = _dict(t, w)
        needed = t.get("needed")
        if not isinstance(needed, bool):
            raise FormatError(f"manifest: {w}: needed must be true or false")
        sampled = _hex(t["sampled"], f"{w} sampled") if "sampled" in t else None
        base_tensors[name] = BaseTensor(_dtype(t.get("dtype"), w), _shape(t.get("shape"), w), _hex(t.get(key), w), needed,
                                        sampled)
    base_files = {}
    for name, f in _dict(base_d.get("files", {}), "base.files").items():
        safe_relpath(name, "base file")
        f = _dict(f, f"base file {name!r}")
        base_files[name] = BaseFile(_int(f.get("size"), name), _hex(f.get("sha256"), name))
    weight_files = {}
    for name, f in _dict(base_d.get("weight_files", {}), "base.weight_files").items():
        safe_relpath(name, "base weight file")
        f = _dict(f, f"base weight file {name!r}")
        weight_files[name] = BaseFile(_int(f.get("size"), name), _hex(f.get("sha256"), name))
    base = BaseIdentity(_str(base_d.get("name"), "base.name", True), _str(base_d.get("repo"), "base.repo", True),
                        _str(base_d.get("revision"), "base.revision", True), _str(base_d.get("fingerprint"), "base.fingerprint") or "",
                        base_tensors, base_files, weight_files)

    tensors: dict[str, TensorEntry] = {}
    for name, t in _drain(_dict(doc.get("tensors"), "tensors")):
        w = f"tensor {name!r}"
        t = _dict(t, w)
        info = TensorInfo(name, _dtype(t.get("dtype"), w), _shape(t.get("shape"), w))
        if info.nbytes > MAX_INT:
            raise FormatError(f"manifest: {w}: impossible size")
        enc = Encoding.from_json(t.get("encoding"), w)
        if enc.layout == "escape" and info.itemsize < 2:
            raise FormatError(f"manifest: {w}: the escape layout needs elements of 2 bytes or more")
        if enc.transform != "raw":
            bt = base_tensors.get(enc.base_tensor or "")
            if bt is None or not bt.needed or bt.dtype != enc.base_dtype:
                raise FormatError(f"manifest: {w}: refers to base tensor {enc.base_tensor!r} not listed as needed")
            if enc.transform == "ulp" and not (info.dtype in FLOAT_DTYPES and enc.base_dtype in FLOAT_DTYPES):
                raise FormatError(f"manifest: {w}: ulp transform needs float dtypes")
            if enc.transform == "xor" and enc.base_dtype != info.dtype:
                raise FormatError(f"manifest: {w}: xor transform needs equal dtypes")
            base_elems = TensorInfo("", bt.dtype, bt.shape).numel
            if enc.shared_bytes > info.nbytes or enc.shared_bytes % info.itemsize or enc.shared_bytes // info.itemsize > base_elems:
                raise FormatError(f"manifest: {w}: shared_bytes {enc.shared_bytes} is inconsistent with the shapes")
        elif enc.shared_bytes:
            raise FormatError(f"manifest: {w}: a raw tensor cannot share bytes with the base")
        chunks = _chunks(t.get("chunks"), w, info.nbytes, key)
        for c in chunks:
            if c.mode == "delta" and (c.start + c.size > enc.shared_bytes or enc.transform == "raw"):
                raise FormatError(f"manifest: {w}: delta chunk outside the shared region")
            if c.mode == "raw" and c.start < enc.shared_bytes:
                raise FormatError(f"manifest: {w}: raw chunk inside the shared region")
            if (c.start % info.itemsize) or (c.size % info.itemsize):
                raise FormatError(f"manifest: {w}: chunk not aligned to elements")
        tensors[name] = TensorEntry(name, info.dtype, info.shape, _hex(t.get(key), w), enc, tuple(chunks))

    files: list[FileEntry] = []
    seen_paths: set[str] = set()
    placed: set[str] = set()
    for i, f in enumerate(_list(target_d.get("files"), "target.files")):
        f = _dict(f, f"target file {i}")
        path = safe_relpath(f.get("path"), f"target file {i}")
        if path_key(path) in seen_paths:
            raise FormatError(f"manifest: target file {path!r} is listed twice (names that differ only in case or "
                              "Unicode normalisation are the same file on some systems)")
        if path_key(path) == path_key(MANIFEST_NAME):
            raise FormatError(f"manifest: a target file may not be called {MANIFEST_NAME}")
        seen_paths.add(path_key(path))
        size, sha = _int(f.get("size"), path), _hex(f.get("sha256"), path)
        kind = f.get("kind")
        if kind == "safetensors":
            header = _str(f.get("header"), f"{path} header", max_len=MAX_HEADER_BYTES)
            try:
                raw = header.encode("utf-8")  # type: ignore[union-attr]
            except UnicodeEncodeError:  # a lone surrogate, written as an escape in the JSON
                raise FormatError(f"manifest: {path}: header is not valid Unicode text") from None
            parsed = parse_safetensors_header(raw, f"manifest header of {path}", size)
            for e in parsed.entries:
                t = tensors.get(e.info.name)
                if t is None or t.info != e.info:
                    raise FormatError(f"manifest: {path}: header tensor {e.info.name!r} does not match the tensor table")
                if e.info.name in placed:
                    raise FormatError(f"manifest: tensor {e.info.name!r} is placed in two files")
                placed.add(e.info.name)
            files.append(FileEntry(path, size, sha, "safetensors", header=header))
        elif kind == "segments":
            segs = _segments(f.get("segments"), path, size, key, tensors, placed)
            files.append(FileEntry(path, size, sha, "segments", segments=segs))
        elif kind == "blob":
            source = f.get("source")
            if source == "diff":
                files.append(FileEntry(path, size, sha, "blob", source="diff", chunks=tuple(_chunks(f.get("chunks"), path, size, key))))
                if any(c.mode != "raw" for c in files[-1].chunks):
                    raise FormatError(f"manifest: {path}: blob chunks must be raw")
            elif source == "base":
                bf = base_files.get(path)
                if bf is None or bf.size != size or bf.sha256 != sha:
                    raise FormatError(f"manifest: {path}: copied from the base but not listed in base.files")
                files.append(FileEntry(path, size, sha, "blob", source="base"))
            else:
                raise FormatError(f"manifest: {path}: unknown blob source {source!r}")
        else:
            raise FormatError(f"manifest: {path}: unknown file kind {kind!r}")
    folders = {"/".join(p.split("/")[:k]) for p in seen_paths for k in range(1, p.count("/") + 1)}  # keys
    if folders & seen_paths:
        raise FormatError(f"manifest: {sorted(folders & seen_paths)[0]!r} is both a file and a folder of the model")
    unplaced = set(tensors) - placed
    if unplaced:
        raise FormatError(f"manifest: tensor {sorted(unplaced)[0]!r} is in no target file")

    payloads = []
    for i, p in enumerate(_list(doc.get("payloads"), "payloads")):
        p = _dict(p, f"payload {i}")
        payloads.append(PayloadFile(safe_relpath(p.get("path"), f"payload {i}"), _int(p.get("size"), f"payload {i}"),
                                    _hex(p.get("sha256"), f"payload {i}")))
    sizes = {p.path: p.size for p in payloads}
    if len(sizes) != len(payloads) or MANIFEST_NAME in sizes:
        raise FormatError("manifest: a payload file is listed twice")
    chunk_bytes = _int(doc.get("chunk_bytes"), "chunk_bytes", 1, MAX_CHUNK_BYTES)
    for obj in [*(t.chunks for t in tensors.values()), *(f.chunks for f in files),
                *(s.chunks for f in files for s in f.segments)]:
        for c in obj:
            if c.payload not in sizes or c.offset + c.length > sizes[c.payload]:
                raise FormatError(f"manifest: a chunk points outside payload {c.payload!r}")
            # bounds the memory apply spends per chunk; no layout's frame is over twice its data
            if c.size > chunk_bytes or c.length > 2 * c.size + 1024:
                raise FormatError(f"manifest: chunk at offset {c.offset} of {c.payload!r} is {c.size} bytes "
                                  f"({c.length} compressed), over the diff's chunk size {chunk_bytes}")
    dropped = [_str(d, "dropped") for d in _list(doc.get("dropped", []), "dropped")]
    base_fp = base.fingerprint
    target_fp = _str(target_d.get("fingerprint"), "target.fingerprint") or ""
    _check_fingerprint("base.fingerprint", base_fp, {n: (t.dtype, t.shape, t.digest) for n, t in base_tensors.items()})
    _check_fingerprint("target.fingerprint", target_fp, {n: (t.dtype, t.shape, t.digest) for n, t in tensors.items()})
    return Manifest(
        tool=_str(doc.get("tool"), "tool") or "",
        chunk_bytes=chunk_bytes,
        base=base, target_fingerprint=target_fp,
        files=files, tensors=tensors, dropped=dropped, payloads=payloads,  # type: ignore[arg-type]
        format_version=version,
    )


def _segments(v: object, path: str, size: int, key: str, tensors: dict[str, TensorEntry],
              placed: set[str]) -> tuple[Segment, ...]:
    """Parse the segments of a "segments" file: each exactly one of a tensor (placed nowhere else,
    of exactly ``size`` bytes), inline base64 ``data`` (at most MAX_INLINE_BYTES) or raw payload
    ``chunks`` tiling it; together they tile the file."""
    items = _list(v, f"{path} segments")
    if len(items) > MAX_SEGMENTS:
        raise FormatError(f"manifest: {path}: {len(items)} segments, more than the {MAX_SEGMENTS} allowed")
    out: list[Segment] = []
    cursor = 0
    for i, d in enumerate(items):
        w = f"{path} segment {i}"
        d = _dict(d, w)
        n = _int(d.get("size"), w, 1)
        sources = [k for k in ("tensor", "data", "chunks") if k in d]
        if len(sources) != 1:
            raise FormatError(f"manifest: {w}: needs exactly one of tensor, data, chunks (found {sources or 'none'})")
        if "tensor" in d:
            name = _str(d["tensor"], w)
            t = tensors.get(name or "")
            if t is None:
                raise FormatError(f"manifest: {w}: tensor {name!r} is not in the tensor table")
            if t.info.nbytes != n:
                raise FormatError(f"manifest: {w}: tensor {name!r} has {t.info.nbytes} bytes, the segment {n}")
            if name in placed:
                raise FormatError(f"manifest: tensor {name!r} is placed twice")
            placed.add(name)  # type: ignore[arg-type]
            out.append(Segment(cursor, n, tensor=name))
        elif "data" in d:
            text = _str(d["data"], w, max_len=4 * MAX_INLINE_BYTES // 3 + 4)
            try:
                data = base64.b64decode(text or "", validate=True)
            except (binascii.Error, ValueError):
                raise FormatError(f"manifest: {w}: data is not valid base64") from None
            if len(data) != n:
                raise FormatError(f"manifest: {w}: data holds {len(data)} bytes, the segment {n}")
            if n > MAX_INLINE_BYTES:
                raise FormatError(f"manifest: {w}: {n} bytes of inline data, more than the {MAX_INLINE_BYTES} allowed")
            out.append(Segment(cursor, n, data=data))
        else:
            chunks = tuple(_chunks(d["chunks"], w, n, key))
            if any(c.mode != "raw" for c in chunks):
                raise FormatError(f"manifest: {w}: verbatim chunks must be raw")
            out.append(Segment(cursor, n, chunks=chunks))
        cursor += n
        if cursor > size:
            break
    if cursor != size:
        raise FormatError(f"manifest: {path}: segments cover {cursor} bytes, the file has {size}")
    return tuple(out)


def _check_fingerprint(what: str, claimed: str, records: dict[str, tuple[str, tuple[int, ...], str]]) -> None:
    """A fingerprint is derived from the tensor records next to it, never taken on trust: a
    manifest whose fingerprint is not the one its own records give is malformed (it would make
    `info` show one model's fingerprint for another model's tensors)."""
    from .fingerprint import base_fingerprint

    if claimed != base_fingerprint(records):
        raise FormatError(f"manifest: {what} {claimed[:40]!r} is not the fingerprint of the tensors it lists "
                          f"({base_fingerprint(records)}); refusing a manifest that contradicts itself")


def load_manifest(diff_dir: str | Path) -> Manifest:
    """Read and validate ``<diff_dir>/orca-diff.json``. A model folder given by mistake gets a
    message that says so."""
    d = Path(diff_dir)
    path = d / MANIFEST_NAME if d.is_dir() else d
    if not path.is_file():
        hint = ""
        if d.is_dir() and (any(d.glob("*.safetensors")) or any(d.glob("*.bin")) or any(d.glob("*.pth"))):
            hint = (" (this folder holds model weights: if it is a model, give it as --base; if it is a legacy delta"
                    " (FastChat/Vicuna, Alpaca/WizardLM weight diff, OpenAssistant XOR), rebuild it with"
                    " `orca-diff apply --format fastchat|alpaca|oa-xor --base BASE --diff DIR --out OUT`, see"
                    " docs/legacy.md)")
        raise InputNotFoundError(f"{d}: no {MANIFEST_NAME} found; not an orca-diff diff{hint}")
    size = path.stat().st_size
    if size > MAX_MANIFEST_BYTES:  # refused before reading: a hostile file costs no memory
        raise FormatError(f"{path}: manifest is {size} bytes, larger than any real diff needs")
    with open(path, "rb") as f:
        # the size as opened (read() reserves what it is asked for: never the 256 MiB bound itself);
        # one byte more shows a file grown past it, which parse_manifest refuses
        data = f.read(min(os.fstat(f.fileno()).st_size, MAX_MANIFEST_BYTES) + 1)
    return parse_manifest(data, str(path))
