"""Fault injection, part 1: a damaged diff is refused with an error that names the damage.

Every file of a diff is truncated at several points, bits are flipped in the manifest and in
chunk payloads, chunk offsets/lengths are moved (with the manifest checksum recomputed, as an
attacker would), payload files are deleted and names duplicated. Each case must end in an
OrcaDiffError naming the file or chunk, and never in a published output that differs from the
fine-tune. Counts go to the session ledger (see tests/faultkit.py, docs/reliability.md).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from faultkit import (  # noqa: F401 - fixtures
    Kit, assert_no_output, expect_refusal, expect_safe, flip_bit, kit, ledger, rewrite_manifest, truncate, write_manifest_doc,
)
from orca_diff.apply import apply_diff
from orca_diff.errors import CorruptDiffError, FormatError, InputNotFoundError, VerificationError
from orca_diff.format import MANIFEST_NAME, canonical_sha256, load_manifest
from orca_diff.outdir import staging_dir
from orca_diff.verify import verify_diff

SUITE = "corruption"


def _apply(kit: Kit, diff: Path, out: Path):
    return lambda: apply_diff(kit.base, diff, out, threads=1, progress=False)


def _all_chunks(doc: dict) -> list[dict]:
    chunks = [c for t in doc["tensors"].values() for c in t["chunks"]]
    chunks += [c for f in doc["target"]["files"] if f["kind"] == "blob" for c in f.get("chunks", [])]
    return chunks


def _assert_not_published_wrong(kit: Kit, out: Path) -> None:
    """Whatever happened, a folder at ``out`` is the fine-tune exactly (or there is none)."""
    if out.exists():
        kit.assert_identical(out)


@pytest.mark.parametrize("points", [(0, 1, 7, 1 / 3, 1 / 2, -1)])
def test_truncating_any_diff_file_is_refused_naming_the_file(kit: Kit, ledger, tmp_path: Path, points) -> None:
    names = sorted(p.name for p in kit.diff.iterdir())
    assert MANIFEST_NAME in names and sum(n.endswith(".odz") for n in names) >= 2
    for name in names:
        size = (kit.diff / name).stat().st_size
        for p in points:
            cut = int(size * p) if isinstance(p, float) else (size + p if p < 0 else p)
            diff = kit.copy_diff(tmp_path / f"{name}-{cut}")
            truncate(diff / name, cut)
            out = tmp_path / f"out-{name}-{cut}"
            case = f"truncate {name} to {cut} of {size} bytes"
            # the model card is documentation and the manifest's last byte is a newline: losing
            # them may succeed, but then the output must be the fine-tune exactly
            exc = expect_safe(ledger, SUITE, case, _apply(kit, diff, out), out, kit.matches_target, must_name=(name,))
            if exc is None:
                assert name == "README.md" or cut == size - 1, f"{case}: accepted"
                continue
            assert_no_output(out)
            expect_refusal(ledger, SUITE, case + " (verify)", lambda: verify_diff(diff, progress=False),
                           must_name=(name,))


def test_bit_flips_in_the_manifest_are_refused_before_any_output(kit: Kit, ledger, tmp_path: Path) -> None:
    rng = random.Random(7)
    size_bits = (kit.diff / MANIFEST_NAME).stat().st_size * 8
    template = kit.copy_diff(tmp_path / "template")
    for i in range(64):
        bit = rng.randrange(size_bits)
        flip_bit(template / MANIFEST_NAME, bit)
        out = tmp_path / f"out{i}"
        exc = expect_refusal(ledger, SUITE, f"manifest bit {bit}", _apply(kit, template, out), must_name=(MANIFEST_NAME,))
        assert isinstance(exc, FormatError)
        assert_no_output(out)
        flip_bit(template / MANIFEST_NAME, bit)  # undo for the next case
    apply_diff(kit.base, template, tmp_path / "intact", threads=1, progress=False)  # the undo really restored it
    kit.assert_identical(tmp_path / "intact")


def test_bit_flips_in_chunk_payloads_are_refused_naming_the_chunk(kit: Kit, ledger, tmp_path: Path) -> None:
    doc = kit.manifest_doc()
    chunks = _all_chunks(doc)
    rng = random.Random(11)
    picked = rng.sample(chunks, 24)
    for i, c in enumerate(picked):
        diff = kit.copy_diff(tmp_path / f"d{i}")
        bit = (c["offset"] + rng.randrange(c["length"])) * 8 + rng.randrange(8)
        flip_bit(diff / c["payload"], bit)
        out = tmp_path / f"out{i}"
        case = f"payload {c['payload']} bit {bit}"
        exc = expect_refusal(ledger, SUITE, case, _apply(kit, diff, out),
                             must_name=(c["payload"], f"offset {c['offset']}"))
        assert isinstance(exc, CorruptDiffError)
        assert not out.exists()
        # verify names the same chunk, with the tensor or file it belongs to
        exc = expect_refusal(ledger, SUITE, case + " (verify)", lambda: verify_diff(diff, progress=False),
                             must_name=(c["payload"], f"chunk at offset {c['offset']}"))
        # once the diff is repaired (downloaded again), the same command resumes and completes
        (diff / c["payload"]).write_bytes((kit.diff / c["payload"]).read_bytes())
        apply_diff(kit.base, diff, out, threads=1, progress=False)
        kit.assert_identical(out)


def test_an_unsigned_edit_of_a_chunk_offset_or_length_is_refused_as_corrupt(kit: Kit, ledger, tmp_path: Path) -> None:
    for field, delta in (("offset", 1), ("length", -1), ("size", 2), ("start", 2)):
        diff = kit.copy_diff(tmp_path / f"{field}")
        doc = kit.manifest_doc()
        _all_chunks(doc)[3][field] += delta
        (diff / MANIFEST_NAME).write_text(json.dumps(doc, indent=1))  # the old checksum stays
        exc = expect_refusal(ledger, SUITE, f"chunk {field} {delta:+d} unsigned", _apply(kit, diff, tmp_path / f"o-{field}"),
                             must_name=(MANIFEST_NAME, "checksum"))
        assert isinstance(exc, CorruptDiffError)
        assert_no_output(tmp_path / f"o-{field}")


HOSTILE_CHUNK_EDITS = {
    "offset+1": lambda c, o: c.update(offset=c["offset"] + 1),
    "offset-1": lambda c, o: c.update(offset=c["offset"] - 1),  # -1 for the first chunk
    "length+1": lambda c, o: c.update(length=c["length"] + 1),
    "length-1": lambda c, o: c.update(length=c["length"] - 1),
    "other payload": lambda c, o: c.update(payload=o["payload"]),
    "swap with another chunk": lambda c, o: c.update(offset=o["offset"], length=o["length"]),
    "offset beyond payload": lambda c, o: c.update(offset=10**9),
}


@pytest.mark.parametrize("edit", sorted(HOSTILE_CHUNK_EDITS))
def test_a_re_signed_manifest_with_moved_chunks_never_yields_wrong_output(kit: Kit, ledger, tmp_path: Path, edit: str) -> None:
    """An attacker can recompute the manifest checksum; the per-chunk sha256 still catches it."""
    for i in (0, 5, 17, -1):
        diff = kit.copy_diff(tmp_path / f"d{i}")
        payloads = [p["path"] for p in kit.manifest_doc()["payloads"]]

        def change(doc: dict) -> None:
            chunks = _all_chunks(doc)
            c = chunks[i]
            other = next(o for o in chunks if o["payload"] != c["payload"]) if edit == "other payload" else chunks[i - 1]
            HOSTILE_CHUNK_EDITS[edit](c, other)

        rewrite_manifest(diff, change)
        out = tmp_path / f"out{i}"
        exc = expect_refusal(ledger, SUITE, f"re-signed chunk {i} {edit}", _apply(kit, diff, out))
        named = [n for n in payloads if n in str(exc)]
        assert named or "manifest" in str(exc), f"the error names neither a payload nor the manifest: {exc}"
        _assert_not_published_wrong(kit, out)
        assert not out.exists()


def test_a_chunk_replaced_by_a_valid_chunk_of_another_place_fails_the_file_checksum(kit: Kit, ledger, tmp_path: Path) -> None:
    """Even with every chunk checksum re-computed, the rebuilt file's sha256 stops it being published."""
    diff = kit.copy_diff(tmp_path / "d")

    def change(doc: dict) -> None:
        t = doc["tensors"]["model.layers.0.mlp.up_proj.weight"]
        donor = doc["tensors"]["model.layers.1.mlp.up_proj.weight"]
        t["chunks"][0].update({k: donor["chunks"][0][k] for k in ("payload", "offset", "length", "blake3")})

    rewrite_manifest(diff, change)
    out = tmp_path / "out"
    exc = expect_refusal(ledger, SUITE, "chunk swapped, chunk sha re-signed", _apply(kit, diff, out),
                         must_name=("model.layers.0.mlp.up_proj.weight",))
    # the tensor's measured digest (or, for an entropy-coded chunk, its decoder) stops it
    assert isinstance(exc, (VerificationError, CorruptDiffError))
    assert not out.exists()


def test_a_deleted_payload_file_is_refused_before_any_output(kit: Kit, ledger, tmp_path: Path) -> None:
    for p in kit.manifest_doc()["payloads"]:
        diff = kit.copy_diff(tmp_path / p["path"])
        (diff / p["path"]).unlink()
        out = tmp_path / f"out-{p['path']}"
        exc = expect_refusal(ledger, SUITE, f"delete {p['path']}", _apply(kit, diff, out), must_name=(p["path"], "missing"))
        assert isinstance(exc, CorruptDiffError)
        assert_no_output(out)
    diff = kit.copy_diff(tmp_path / "nomanifest")
    (diff / MANIFEST_NAME).unlink()
    exc = expect_refusal(ledger, SUITE, "delete manifest", _apply(kit, diff, tmp_path / "o"), must_name=(MANIFEST_NAME,))
    assert isinstance(exc, InputNotFoundError)
    assert_no_output(tmp_path / "o")


def _with_duplicate_key(text: str, obj_path: list[str]) -> str:
    """The manifest with the first member of the object at ``obj_path`` written twice, same
    value. What json.loads sees is unchanged, so the old self-checksum stays valid."""
    doc = json.loads(text)
    obj = doc
    for k in obj_path:
        obj = obj[k]
    first = next(iter(obj))
    whole, inner = json.dumps(doc), json.dumps(obj)
    assert whole.count(inner) == 1
    dup = "{" + json.dumps(first) + ": " + json.dumps(obj[first]) + ", " + inner[1:]
    out = whole.replace(inner, dup)
    assert json.loads(out) == doc
    return out


@pytest.mark.parametrize("obj_path", [["tensors"], ["base", "tensors"], ["base", "files"]])
def test_a_name_written_twice_in_the_manifest_is_refused(kit: Kit, ledger, tmp_path: Path, obj_path: list[str]) -> None:
    """JSON parsers disagree on duplicate keys (most keep the last): refuse them outright, even
    when the checksum is valid, so two tools can never read one manifest two ways."""
    diff = kit.copy_diff(tmp_path / "d")
    text = _with_duplicate_key((diff / MANIFEST_NAME).read_text(), obj_path)
    (diff / MANIFEST_NAME).write_text(text)
    out = tmp_path / "out"
    exc = expect_refusal(ledger, SUITE, f"duplicate key in {'.'.join(obj_path)}", _apply(kit, diff, out),
                         must_name=(MANIFEST_NAME, "twice"))
    assert isinstance(exc, FormatError)
    assert_no_output(out)


def test_a_tensor_placed_in_two_files_or_a_file_listed_twice_is_refused(kit: Kit, ledger, tmp_path: Path) -> None:
    cases = {
        "target file listed twice": lambda d: d["target"]["files"].append(dict(d["target"]["files"][0])),
        "target file listed twice with other case": lambda d: d["target"]["files"].append(
            dict(d["target"]["files"][0], path=d["target"]["files"][0]["path"].upper())),
        "payload listed twice": lambda d: d["payloads"].append(dict(d["payloads"][0])),
        "tensor placed in two files": lambda d: d["target"]["files"].append(
            dict(d["target"]["files"][0], path="copy-" + d["target"]["files"][0]["path"])),
    }
    for name, change in cases.items():
        diff = kit.copy_diff(tmp_path / name.replace(" ", "-"))
        rewrite_manifest(diff, change)
        out = tmp_path / ("o-" + name.replace(" ", "-"))
        exc = expect_refusal(ledger, SUITE, name, _apply(kit, diff, out), must_name=("twice" if "twice" in name else "two",))
        assert isinstance(exc, FormatError)
        assert_no_output(out)


def test_an_intact_diff_still_applies_and_loads(kit: Kit, tmp_path: Path) -> None:
    """The control case: without faults the same helpers give the fine-tune byte for byte."""
    diff = kit.copy_diff(tmp_path / "d")
    rewrite_manifest(diff, lambda d: None)  # re-signing an unchanged document changes nothing
    assert load_manifest(diff).files
    apply_diff(kit.base, diff, tmp_path / "out", threads=1, progress=False)
    kit.assert_identical(tmp_path / "out")
    assert not staging_dir(tmp_path / "out").exists()
