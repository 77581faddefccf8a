"""Fault injection, part 5: hostile manifests and files.

The attacker here controls the whole diff (and can recompute every checksum in it), or a base
file, or plants symbolic links where apply writes. Whatever they do: nothing is written outside
the output folder, no pickled code runs, memory stays bounded (a 2 GB-declared header is refused
without allocating it, a decompression bomb without expanding it), and the answer is an
OrcaDiffError, not a traceback.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import zstandard

from faultkit import (  # noqa: F401 - fixtures
    REPO, Kit, cli_env, expect_refusal, expect_safe, kit, ledger, previous_output, rewrite_manifest, tree_snapshot,
)
from orca_diff.apply import STATE_NAME, apply_diff
from orca_diff.errors import CorruptDiffError, FormatError, OutputError
from orca_diff.format import MANIFEST_NAME, canonical_sha256, load_manifest, parse_manifest
from orca_diff.outdir import staging_dir, write_marker
from orca_diff.containers import read_safetensors_header
from orca_diff.verify import verify_model

SUITE = "hostile"

# Not evil since the path rule follows the Hub (issue 12 item 3): ".evil", "\u00e9vil", "~/evil", 9 levels.
EVIL_PATHS = ["../evil", "../../evil", "/tmp/orca-evil", "C:\\evil", "C:evil", "a\\..\\..\\evil", "sub/../../evil",
              "./evil", "", "a//evil", "evil/", "e\x00vil", "x" * 600, "/".join("d" * 33),
              "..", "evil\n", "evil:stream", ".evil.incomplete", ".git/config", "e\u202evil"]


def _file_index(doc: dict, path: str) -> int:
    return next(i for i, f in enumerate(doc["target"]["files"]) if f["path"] == path)


def _set_payload_name(doc: dict, old: str, new: str) -> None:
    for p in doc["payloads"]:
        if p["path"] == old:
            p["path"] = new
    for c in [c for t in doc["tensors"].values() for c in t["chunks"]] + \
             [c for f in doc["target"]["files"] for c in f.get("chunks", [])]:
        if c["payload"] == old:
            c["payload"] = new


NAME_FIELDS: dict[str, Callable[[dict, str], None]] = {
    "target safetensors file": lambda d, p: d["target"]["files"][0].update(path=p),
    "target blob from the diff": lambda d, p: d["target"]["files"][_file_index(d, "config.json")].update(path=p),
    "target blob from the base": lambda d, p: (
        d["target"]["files"][_file_index(d, "tokenizer.model")].update(path=p),
        d["base"]["files"].update({p: d["base"]["files"].pop("tokenizer.model")})),
    "base file": lambda d, p: d["base"]["files"].update({p: d["base"]["files"]["tokenizer.model"]}),
    "payload file": lambda d, p: _set_payload_name(d, "payload-00001.odz", p),
    "one chunk's payload": lambda d, p: next(iter(d["tensors"].values()))["chunks"][0].update(payload=p),
}


@pytest.mark.parametrize("field", sorted(NAME_FIELDS))
def test_path_traversal_in_any_file_name_is_refused_and_nothing_is_written(
        kit: Kit, ledger, tmp_path: Path, field: str) -> None:
    work = tmp_path / "work"
    work.mkdir()
    diff = kit.copy_diff(work / "diff")
    before = tree_snapshot(tmp_path)
    original = (diff / MANIFEST_NAME).read_bytes()
    for evil in EVIL_PATHS:
        (diff / MANIFEST_NAME).write_bytes(original)
        rewrite_manifest(diff, lambda d: NAME_FIELDS[field](d, evil))
        out = work / "sub" / "out"
        out.parent.mkdir(exist_ok=True)
        exc = expect_refusal(ledger, SUITE, f"{field} named {evil!r}",
                             lambda: apply_diff(kit.base, diff, out, threads=1, progress=False),
                             must_name=("path",))
        assert isinstance(exc, FormatError)
        assert not out.exists() and not staging_dir(out).exists()
        out.parent.rmdir()
    (diff / MANIFEST_NAME).write_bytes(original)
    assert tree_snapshot(tmp_path) == before
    assert not Path("/tmp/orca-evil").exists()


def test_a_file_and_a_folder_of_the_same_name_are_refused(kit: Kit, ledger, tmp_path: Path) -> None:
    for order in ("file first", "folder first"):
        diff = kit.copy_diff(tmp_path / order.replace(" ", "-"))

        def change(d: dict) -> None:
            fs = d["target"]["files"]
            f = fs.pop(_file_index(d, "special_tokens_map.json"))
            f["path"] = "config.json/special_tokens_map.json"
            fs.insert(0 if order == "folder first" else len(fs), f)

        rewrite_manifest(diff, change)
        out = tmp_path / f"out-{order.replace(' ', '-')}"
        exc = expect_refusal(ledger, SUITE, f"file and folder named alike ({order})",
                             lambda: apply_diff(kit.base, diff, out, threads=1, progress=False),
                             must_name=("config.json",))
        assert isinstance(exc, FormatError)
        assert not out.exists() and not staging_dir(out).exists()


def test_a_target_file_named_like_a_temporary_file_is_not_lost(kit: Kit, ledger, tmp_path: Path) -> None:
    """A file called 'config.json.incomplete' listed before 'config.json' must survive the
    writing of 'config.json' (apply's temporary names must never collide with target names)."""
    diff = kit.copy_diff(tmp_path / "diff")

    def change(d: dict) -> None:
        fs = d["target"]["files"]
        f = fs.pop(_file_index(d, "special_tokens_map.json"))
        f["path"] = "config.json.incomplete"
        fs.insert(_file_index(d, "config.json"), f)

    rewrite_manifest(diff, change)
    out = tmp_path / "out"

    def complete(o: Path) -> bool:
        try:
            verify_model(o, diff, progress=False)
        except Exception:  # noqa: BLE001
            return False
        return True

    expect_safe(ledger, SUITE, "target file named like apply's temporary file",
                lambda: apply_diff(kit.base, diff, out, threads=1, progress=False), out, complete)


# --------------------------------------------------------------------------- symbolic links


@pytest.fixture
def victims(tmp_path: Path) -> Path:
    """A folder outside the output with files that must never change."""
    v = tmp_path / "victims"
    v.mkdir()
    for i in range(4):
        (v / f"victim{i}").write_text(f"precious {i}")
    return v


def test_an_output_that_is_a_symlink_is_refused(kit: Kit, ledger, tmp_path: Path, victims: Path) -> None:
    out = tmp_path / "out"
    out.symlink_to(victims, target_is_directory=True)
    before = tree_snapshot(victims)
    for force in (False, True):
        exc = expect_refusal(ledger, SUITE, f"output is a symlink (force={force})",
                             lambda: apply_diff(kit.base, kit.diff, out, force=force, threads=1, progress=False),
                             must_name=(str(out), "symbolic link"))
        assert isinstance(exc, OutputError)
    assert tree_snapshot(victims) == before


def test_symlinks_inside_an_existing_output_are_replaced_not_followed(kit: Kit, ledger, tmp_path: Path, victims: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    for i, name in enumerate(sorted(kit.target_files)[:4]):
        (out / name).symlink_to(victims / f"victim{i}")
    (out / "linkdir").symlink_to(victims, target_is_directory=True)
    before = tree_snapshot(victims)
    # not a previous orca-diff output (nothing lists these entries): --force refuses, naming one
    expect_refusal(ledger, SUITE, "symlinks in a foreign output with --force",
                   lambda: apply_diff(kit.base, kit.diff, out, force=True, threads=1, progress=False),
                   must_name=(sorted(kit.target_files)[0], "--force"))
    assert tree_snapshot(victims) == before and (out / "linkdir").is_symlink()
    write_marker(out, [*sorted(kit.target_files)[:4], "linkdir"])  # now it is one (links planted in it)
    expect_safe(ledger, SUITE, "symlinks in the output replaced with --force",
                lambda: apply_diff(kit.base, kit.diff, out, force=True, threads=1, progress=False), out, kit.matches_target)
    kit.assert_identical(out)
    assert not any(p.is_symlink() for p in out.rglob("*"))
    assert tree_snapshot(victims) == before


def _plant_staging(kit: Kit, out: Path, victims: Path, diff: Path | None = None) -> None:
    """A staging folder whose state is valid for this diff, with a symbolic link to a victim at
    every name apply may write: temporary and final file names, the state file's temporary."""
    manifest = load_manifest(diff or kit.diff)
    staging = staging_dir(out)
    staging.mkdir()
    state = {"manifest": manifest.identity()}
    (staging / STATE_NAME).write_text(json.dumps(state) + "\n")
    names = [".orca-diff-state.tmp", STATE_NAME + ".tmp", ".orca-diff-state.json"]
    for f in manifest.files:
        names += [f.path, f.path + ".incomplete", f".{f.path}.incomplete", f".{f.path}.tmp"]
    for i, name in enumerate(n for n in names if "/" not in n):
        link = staging / name
        if not link.exists() and not link.is_symlink():
            link.symlink_to(victims / f"victim{i % 4}")


def test_symlinks_planted_in_the_staging_folder_are_never_followed(kit: Kit, ledger, tmp_path: Path, victims: Path) -> None:
    out = tmp_path / "out"
    _plant_staging(kit, out, victims)
    before = tree_snapshot(victims)
    expect_safe(ledger, SUITE, "symlinks planted in the staging folder",
                lambda: apply_diff(kit.base, kit.diff, out, threads=1, progress=False), out, kit.matches_target)
    assert tree_snapshot(victims) == before
    kit.assert_identical(out)


def test_a_staging_folder_that_is_a_symlink_is_refused(kit: Kit, ledger, tmp_path: Path, victims: Path) -> None:
    out = tmp_path / "out"
    staging_dir(out).symlink_to(victims, target_is_directory=True)
    before = tree_snapshot(victims)
    exc = expect_refusal(ledger, SUITE, "staging folder is a symlink",
                         lambda: apply_diff(kit.base, kit.diff, out, threads=1, progress=False),
                         must_name=(staging_dir(out).name, "symbolic link"))
    assert isinstance(exc, OutputError)
    assert tree_snapshot(victims) == before and not out.exists()


def test_a_symlinked_subfolder_in_the_staging_folder_is_refused(kit: Kit, ledger, tmp_path: Path, victims: Path) -> None:
    diff = kit.copy_diff(tmp_path / "diff")
    rewrite_manifest(diff, lambda d: d["target"]["files"][_file_index(d, "config.json")].update(path="sub/config.json"))
    out = tmp_path / "out"
    _plant_staging(kit, out, victims, diff)
    (staging_dir(out) / "sub").symlink_to(victims, target_is_directory=True)
    before = tree_snapshot(victims)
    exc = expect_refusal(ledger, SUITE, "symlinked subfolder in the staging folder",
                         lambda: apply_diff(kit.base, diff, out, threads=1, progress=False), must_name=("sub",))
    assert isinstance(exc, OutputError)
    assert tree_snapshot(victims) == before and not out.exists()


def test_a_symlink_at_the_old_output_name_is_not_followed_by_force(kit: Kit, ledger, tmp_path: Path, victims: Path) -> None:
    out = previous_output(tmp_path / "out", {"previous.txt": "old model"})
    (tmp_path / ".out.orca-diff-old").symlink_to(victims, target_is_directory=True)
    before = tree_snapshot(victims)
    expect_safe(ledger, SUITE, "symlink at the .orca-diff-old name",
                lambda: apply_diff(kit.base, kit.diff, out, force=True, threads=1, progress=False), out, kit.matches_target)
    assert tree_snapshot(victims) == before
    kit.assert_identical(out)


# --------------------------------------------------------------------------- bombs and bounds


def _replace_chunk(diff: Path, payload_bytes: bytes) -> str:
    """Make the first chunk of the first tensor point to ``payload_bytes`` (appended to a new
    payload file) with every checksum recomputed; return the tensor's name."""
    import hashlib

    name = "payload-bomb.odz"
    (diff / name).write_bytes(payload_bytes)
    tensor = ""

    def change(d: dict) -> None:
        nonlocal tensor
        tensor = next(iter(d["tensors"]))
        d["tensors"][tensor]["chunks"][0].update(payload=name, offset=0, length=len(payload_bytes),
                                                 sha256=hashlib.sha256(payload_bytes).hexdigest())
        d["payloads"].append({"path": name, "size": len(payload_bytes), "sha256": hashlib.sha256(payload_bytes).hexdigest()})

    rewrite_manifest(diff, change)
    return tensor


def _bombs(big: int) -> dict[str, bytes]:
    """zstd frames that expand to ``big`` bytes, far beyond the 4096 bytes a chunk declares."""
    lying = zstandard.ZstdCompressor(write_content_size=True).compress(bytes(4096))
    block = bytes(1 << 20)
    streamed = zstandard.ZstdCompressor().compressobj()
    unsized = b"".join(streamed.compress(block) for _ in range(big >> 20)) + streamed.flush()
    sized = zstandard.ZstdCompressor(write_content_size=True).compressobj(size=big)
    declared_big = b"".join(sized.compress(block) for _ in range(big >> 20)) + sized.flush()
    return {"frame without a content size": unsized, "frame that says so": declared_big,
            "valid frame + big second frame": lying + declared_big,
            "4 KiB header on big blocks": _splice_header(lying, unsized)}


def _splice_header(small: bytes, big_unsized: bytes) -> bytes:
    """Frame header of ``small`` (content size 4096) + the blocks of ``big_unsized``."""
    def header_len(frame: bytes) -> int:
        fhd = frame[4]
        fcs_flag, single, did_flag = fhd >> 6, (fhd >> 5) & 1, fhd & 3
        fcs = {0: 1 if single else 0, 1: 2, 2: 4, 3: 8}[fcs_flag]
        return 4 + 1 + (0 if single else 1) + {0: 0, 1: 1, 2: 2, 3: 4}[did_flag] + fcs
    return small[:header_len(small)] + big_unsized[header_len(big_unsized):]


BOMB_NAMES = ["frame without a content size", "frame that says so", "valid frame + big second frame",
              "4 KiB header on big blocks"]
_BOMBS: dict[int, dict[str, bytes]] = {}


def _bomb(name: str, big: int) -> bytes:
    if big not in _BOMBS:
        _BOMBS[big] = _bombs(big)
    return _BOMBS[big][name]


def _peak_rss_mib(code: str) -> float:
    """Run ``code`` in a fresh interpreter; return its peak resident set in MiB.

    Read from the child's own /proc/self/status VmHWM (its address space's high-water mark):
    ru_maxrss would carry over the peak of the process that forked it (Linux keeps it across
    exec), so under a big pytest process it reports the parent's size."""
    prog = code + ("\nprint(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM:')))")
    r = subprocess.run([sys.executable, "-c", prog], env=cli_env(), capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 0, r.stderr
    return int(r.stdout.strip().splitlines()[-1]) / 1024


@pytest.mark.parametrize("bomb", BOMB_NAMES)
@pytest.mark.parametrize("big", [128 << 20, 1 << 30])
def test_a_decompression_bomb_in_a_diff_is_refused(kit: Kit, ledger, tmp_path: Path, bomb: str, big: int) -> None:
    """128 MiB bombs are small enough to pass the manifest's size bounds and reach the decoder;
    1 GiB ones are already refused by the bound on a chunk's compressed length."""
    diff = kit.copy_diff(tmp_path / "diff")
    tensor = _replace_chunk(diff, _bomb(bomb, big))
    out = tmp_path / "out"
    exc = expect_safe(ledger, SUITE, f"bomb {big >> 20} MiB: {bomb}",
                      lambda: apply_diff(kit.base, diff, out, threads=1, progress=False), out, kit.matches_target)
    if exc is not None:
        assert tensor in str(exc) or "payload-bomb.odz" in str(exc), exc
        assert not out.exists()


@pytest.mark.parametrize("bomb", BOMB_NAMES)
def test_the_chunk_decoder_refuses_a_1gib_bomb_without_expanding_it(ledger, tmp_path: Path, bomb: str) -> None:
    path = tmp_path / "bomb.zst"
    path.write_bytes(_bomb(bomb, 1 << 30))
    code = textwrap.dedent(f"""
        from pathlib import Path
        from orca_diff.codec import decode_chunk
        from orca_diff.errors import OrcaDiffError
        data = Path({str(path)!r}).read_bytes()
        try:
            decode_chunk(data, None, 2, "raw", 4096, "planes", where="bomb")
            print("decoded")
        except OrcaDiffError as exc:
            print("refused", exc)
    """)
    from orca_diff.codec import decode_chunk
    from orca_diff.errors import OrcaDiffError

    try:
        out = decode_chunk(path.read_bytes(), None, 2, "raw", 4096, "planes", where="bomb")
        assert bytes(out) == bytes(4096), "a bomb decoded to something else than its first frame"
        ledger.record(SUITE, f"decoder bomb 1 GiB: {bomb}", "recovered")
    except OrcaDiffError:
        ledger.record(SUITE, f"decoder bomb 1 GiB: {bomb}", "detected")
    baseline = _peak_rss_mib("import orca_diff.codec, numpy, zstandard\nb = bytes(" + str(path.stat().st_size) + ")")
    assert _peak_rss_mib(code) < baseline + 64, "the bomb was expanded in memory"


def _sparse_file(path: Path, size: int, prefix: bytes) -> Path:
    with open(path, "wb") as f:
        f.write(prefix)
        f.truncate(size)
    return path


def test_a_2gb_declared_safetensors_header_is_refused_without_allocating_it(kit: Kit, ledger, tmp_path: Path) -> None:
    cases = {
        "2 GB header in a 100-byte file": _sparse_file(tmp_path / "a.safetensors", 100, (2 << 30).to_bytes(8, "little")),
        "2 GB header in a 2 GB sparse file": _sparse_file(tmp_path / "b.safetensors", (2 << 30) + 64,
                                                         (2 << 30).to_bytes(8, "little") + b"{"),
        "2**64-1 header length": _sparse_file(tmp_path / "c.safetensors", 100, b"\xff" * 8),
    }
    for case, path in cases.items():
        expect_refusal(ledger, SUITE, case, lambda: read_safetensors_header(path), must_name=(str(path),))
        rss = _peak_rss_mib(f"""
from pathlib import Path
from orca_diff.containers import read_safetensors_header
from orca_diff.errors import OrcaDiffError
try:
    read_safetensors_header(Path({str(path)!r}))
except OrcaDiffError:
    pass""")
        assert rss < 200, f"{case}: peak RSS {rss:.0f} MiB"


def test_a_huge_manifest_is_refused_without_reading_it(kit: Kit, ledger, tmp_path: Path) -> None:
    diff = tmp_path / "diff"
    diff.mkdir()
    _sparse_file(diff / MANIFEST_NAME, 300 << 20, b'{"format": "orca-diff", ')
    expect_refusal(ledger, SUITE, "300 MB manifest", lambda: load_manifest(diff), must_name=(MANIFEST_NAME,))
    rss = _peak_rss_mib(f"""
from orca_diff.format import load_manifest
from orca_diff.errors import OrcaDiffError
try:
    load_manifest({str(diff)!r})
except OrcaDiffError:
    pass""")
    assert rss < 200, f"peak RSS {rss:.0f} MiB: the manifest was read whole"


MALFORMED_MANIFESTS: dict[str, bytes] = {
    "deeply nested": b"[" * 200_000 + b"]" * 200_000,
    "5000-digit integer": b'{"format": "orca-diff", "format_version": ' + b"1" * 5000 + b"}",
    "NaN and Infinity": b'{"format": "orca-diff", "format_version": NaN, "chunk_bytes": Infinity}',
    "not an object": b'["orca-diff"]',
    "UTF-16": '{"format": "orca-diff"}'.encode("utf-16"),
    "empty": b"",
    "a lone surrogate": b'{"format": "orca-diff\\ud800"}',
}


@pytest.mark.parametrize("case", sorted(MALFORMED_MANIFESTS))
def test_malformed_manifest_json_is_a_format_error(ledger, case: str) -> None:
    exc = expect_refusal(ledger, SUITE, f"manifest: {case}", lambda: parse_manifest(MALFORMED_MANIFESTS[case], "m.json"),
                         must_name=("m.json",))
    assert isinstance(exc, FormatError)


def _resign(doc: dict) -> bytes:
    doc = dict(doc)
    doc.pop("manifest_sha256", None)
    doc["manifest_sha256"] = canonical_sha256(doc)
    return json.dumps(doc).encode()


def _first_chunk(d: dict) -> dict:
    return next(iter(d["tensors"].values()))["chunks"][0]


HOSTILE_NUMBERS: dict[str, Callable[[dict], None]] = {
    "negative chunk offset": lambda d: _first_chunk(d).update(offset=-1),
    "chunk offset 2**63": lambda d: _first_chunk(d).update(offset=2**63),
    "chunk offset 2**64 + 5": lambda d: _first_chunk(d).update(offset=2**64 + 5),
    "negative chunk length": lambda d: _first_chunk(d).update(length=-5),
    "chunk length past the payload": lambda d: _first_chunk(d).update(length=2**40),
    "float offset": lambda d: _first_chunk(d).update(offset=1.0),
    "bool offset": lambda d: _first_chunk(d).update(offset=True),
    "string size": lambda d: _first_chunk(d).update(size="4096"),
    "negative chunk size": lambda d: _first_chunk(d).update(size=-4096),
    "negative shape": lambda d: next(iter(d["tensors"].values())).update(shape=[-1, 32]),
    "2**70 shape": lambda d: next(iter(d["tensors"].values())).update(shape=[2**70]),
    "file size 2**70": lambda d: d["target"]["files"][-1].update(size=2**70),
    "payload size -1": lambda d: d["payloads"][0].update(size=-1),
    "chunk_bytes 0": lambda d: d.update(chunk_bytes=0),
    "a chunk larger than chunk_bytes": lambda d: d.update(chunk_bytes=8),
    "shared_bytes past the tensor": lambda d: next(iter(d["tensors"].values()))["encoding"].update(shared_bytes=2**40),
    "17 dimensions": lambda d: next(iter(d["tensors"].values())).update(shape=[1] * 17),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_NUMBERS))
def test_negative_or_overflowing_numbers_in_a_re_signed_manifest_are_refused(kit: Kit, ledger, case: str) -> None:
    doc = kit.manifest_doc()
    HOSTILE_NUMBERS[case](doc)
    exc = expect_refusal(ledger, SUITE, f"re-signed manifest: {case}", lambda: parse_manifest(_resign(doc), "m.json"))
    assert isinstance(exc, FormatError)


def test_a_safetensors_header_in_the_manifest_that_cannot_be_encoded_is_refused(kit: Kit, ledger) -> None:
    doc = kit.manifest_doc()
    header = json.loads(doc["target"]["files"][0]["header"])
    header["__metadata__"]["format"] = "pt\ud800"
    doc["target"]["files"][0]["header"] = json.dumps(header, ensure_ascii=False)
    exc = expect_refusal(ledger, SUITE, "lone surrogate in an embedded header", lambda: parse_manifest(_resign(doc), "m.json"),
                         must_name=(doc["target"]["files"][0]["path"],))
    assert isinstance(exc, FormatError)


def _header_file(path: Path, header: bytes, data: int = 0) -> Path:
    path.write_bytes(len(header).to_bytes(8, "little") + header + bytes(data))
    return path


MALFORMED_HEADERS: dict[str, tuple[bytes, int]] = {
    "not JSON": (b"{not json", 0),
    "a list": (b"[]", 0),
    "duplicate tensor name": (b'{"a": {"dtype": "F16", "shape": [2], "data_offsets": [0, 4]},'
                              b' "a": {"dtype": "F16", "shape": [2], "data_offsets": [0, 4]}}', 4),
    "negative offset": (b'{"a": {"dtype": "F16", "shape": [2], "data_offsets": [-4, 0]}}', 4),
    "offsets past the file": (b'{"a": {"dtype": "F16", "shape": [2], "data_offsets": [0, 4]}}', 2),
    "overflowing offsets": (b'{"a": {"dtype": "U8", "shape": [18446744073709551616], '
                            b'"data_offsets": [0, 18446744073709551616]}}', 4),
    "overlapping tensors": (b'{"a": {"dtype": "F16", "shape": [2], "data_offsets": [0, 4]},'
                            b' "b": {"dtype": "F16", "shape": [2], "data_offsets": [2, 6]}}', 6),
    "unknown dtype": (b'{"a": {"dtype": "F12", "shape": [2], "data_offsets": [0, 4]}}', 4),
    "5000-digit shape": (b'{"a": {"dtype": "U8", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 4]}}', 4),
    "deeply nested metadata": (b'{"__metadata__": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 0),
    "invalid UTF-8": (b'{"\xff": {}}', 0),
}


@pytest.mark.parametrize("case", sorted(MALFORMED_HEADERS))
def test_a_malformed_safetensors_header_in_a_base_is_refused_naming_the_file(
        kit: Kit, ledger, tmp_path: Path, case: str) -> None:
    base = kit.copy_base(tmp_path / "base")
    shard = base / "model-00002-of-00004.safetensors"
    header, data = MALFORMED_HEADERS[case]
    _header_file(shard, header, data)
    out = tmp_path / "out"
    exc = expect_refusal(ledger, SUITE, f"base header: {case}",
                         lambda: apply_diff(base, kit.diff, out, threads=1, progress=False), must_name=(shard.name,))
    assert isinstance(exc, FormatError)
    assert not out.exists() and not staging_dir(out).exists()


# --------------------------------------------------------------------------- pickles


class _Evil:
    """Unpickling this runs a shell command that creates a sentinel file."""

    def __init__(self, sentinel: Path):
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


@pytest.mark.parametrize("zipped", [True, False])
def test_a_bin_base_carrying_a_pickle_payload_is_refused_and_the_code_never_runs(
        kit: Kit, ledger, tmp_path: Path, zipped: bool) -> None:
    torch = pytest.importorskip("torch")  # the torch extra; installed in CI
    from safetensors.numpy import load_file

    sentinel = tmp_path / "PWNED"
    base = tmp_path / "base"
    base.mkdir()
    state: dict[str, object] = {}
    for shard in sorted(kit.base.glob("*.safetensors")):
        state.update({k: torch.from_numpy(v.copy()) for k, v in load_file(str(shard)).items()})
    for p in kit.base.iterdir():
        if not p.name.endswith(".safetensors") and p.name != "model.safetensors.index.json":
            (base / p.name).write_bytes(p.read_bytes())
    # control: the honest .bin base rebuilds the fine-tune
    torch.save(state, base / "pytorch_model.bin", _use_new_zipfile_serialization=zipped)
    honest = tmp_path / "honest"
    apply_diff(base, kit.diff, honest, threads=1, progress=False)
    kit.assert_identical(honest)
    # the same base with one hostile object in its pickle
    state["model.norm.weight.evil"] = _Evil(sentinel)
    torch.save(state, base / "pytorch_model.bin", _use_new_zipfile_serialization=zipped)
    out = tmp_path / "out"
    exc = expect_refusal(ledger, SUITE, f"pickle payload in a .bin base (zip={zipped})",
                         lambda: apply_diff(base, kit.diff, out, threads=1, progress=False),
                         must_name=("pytorch_model.bin", "weights_only"))
    assert isinstance(exc, FormatError)
    assert not sentinel.exists(), "the pickled code ran"
    assert not out.exists() and not staging_dir(out).exists()
