"""The manifest: canonical serialisation round-trips; versions, checksums and paths are enforced."""

from __future__ import annotations

import json

import pytest

from orca_diff.errors import CorruptDiffError, FormatError
from orca_diff.format import MANIFEST_NAME, READABLE_VERSIONS, canonical_sha256, load_manifest, parse_manifest, safe_relpath
from orca_diff.make import make_diff


@pytest.fixture
def diff(make_pair, tmp_path):
    base, target = make_pair("BF16", add_pad_row=True, shard=40_000)
    out = tmp_path / "diff"
    make_diff(base, target, out, chunk_bytes=4096)
    return out


def rewrite(diff, edit):
    doc = json.loads((diff / MANIFEST_NAME).read_text())
    doc.pop("manifest_sha256")
    edit(doc)
    doc["manifest_sha256"] = canonical_sha256(doc)
    return json.dumps(doc).encode()


def test_manifest_round_trips_exactly(diff):
    data = (diff / MANIFEST_NAME).read_bytes()
    assert parse_manifest(data).to_bytes() == data


def test_newer_format_version_asks_to_upgrade(diff):
    with pytest.raises(FormatError, match="upgrade orca-diff"):
        parse_manifest(rewrite(diff, lambda d: d.update(format_version=max(READABLE_VERSIONS) + 1)))


def test_a_flipped_byte_is_reported_as_a_damaged_manifest(diff):
    data = bytearray((diff / MANIFEST_NAME).read_bytes())
    i = data.index(b'"sha256":"') + 14  # a digest's first hex digit
    data[i] = ord("0") if data[i] != ord("0") else ord("1")
    with pytest.raises(CorruptDiffError, match="checksum mismatch"):
        parse_manifest(bytes(data))


@pytest.mark.parametrize("bad", ["../x", "/etc/passwd", "C:\\x", "C:x", "a\\b", "a/../b", "", "a//b", "./a",
                                 "a\x00b", "a\nb", "a\u202eb", "x\ud800", "a" * 244, "/".join("a" * 33),
                                 ".x.incomplete", ".orca-diff-state.log", ".out.orca-diff-partial", ".git/config",
                                 "sub/.GIT"])
def test_unsafe_paths_are_refused(bad):
    with pytest.raises(FormatError, match="path"):
        safe_relpath(bad, "test")


@pytest.mark.parametrize("good", [".hidden", ".gitattributes", "a b (1).json", "~x", "\u00e9t\u00e9/\u65e5\u672c.txt",
                                  "original/params.json", "training_args.bin", "x.incomplete", "a" * 243])
def test_paths_the_hub_accepts_are_safe(good):
    assert safe_relpath(good, "test") == good


def test_paths_colliding_by_case_or_normalisation_are_refused(diff):
    def edit(d):
        files = d["target"]["files"]
        blob = next(f for f in files if f["path"] == "config.json")
        files.append({**blob, "path": "CONFIG.json"})
    with pytest.raises(FormatError, match="listed twice"):
        parse_manifest(rewrite(diff, edit))


def test_base_weight_files_are_recorded_and_validated(diff):
    m = load_manifest(diff)
    assert m.base.weight_files and all(len(f.sha256) == 64 for f in m.base.weight_files.values())

    def edit(d):
        d["base"]["weight_files"] = {"../x.safetensors": {"size": 1, "sha256": "0" * 64}}
    with pytest.raises(FormatError, match="unsafe path"):
        parse_manifest(rewrite(diff, edit))


def test_unknown_transform_is_refused_by_name(diff):
    def edit(d):
        next(iter(d["tensors"].values()))["encoding"]["transform"] = "magic"
    with pytest.raises(FormatError, match="magic"):
        parse_manifest(rewrite(diff, edit))


def test_chunks_that_do_not_tile_the_tensor_are_refused(diff):
    def edit(d):
        t = d["tensors"]["model.embed_tokens.weight"]
        t["chunks"][1]["start"] += 2
    with pytest.raises(FormatError, match="tile"):
        parse_manifest(rewrite(diff, edit))


def test_not_a_diff_folder(tmp_path):
    from orca_diff.errors import InputNotFoundError
    with pytest.raises(InputNotFoundError, match="not an orca-diff diff"):
        load_manifest(tmp_path)


def test_a_manifest_has_one_identity_parsed_or_built(diff):
    """The identity apply keys its resume state to: the checksum the file carried (checked when
    parsed), equal to the checksum of the same manifest built in memory."""
    from dataclasses import replace

    from orca_diff.format import canonical_sha256

    m = load_manifest(diff)
    built = replace(m, checked_sha256=None)
    assert m.identity() == built.identity() == canonical_sha256(m.body())
    assert parse_manifest(built.to_bytes()).identity() == m.identity()
    changed = replace(built, dropped=[*built.dropped, "x"])
    assert changed.identity() != m.identity()
