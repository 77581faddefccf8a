"""Shared helpers of the fault-injection suite (tests/test_faults_*.py, tests/test_fuzz.py).

* One tiny base / fine-tune / diff is built once per test session (``kit`` fixture) and copied
  per test (``Kit.copy_diff``), so every fault is injected into a fresh, known-good diff.
* Byte-level faults: :func:`flip_bit`, :func:`truncate`; manifest-level faults:
  :func:`rewrite_manifest` (edits the parsed JSON and RECOMPUTES the self-checksum, as an
  attacker can).
* The :class:`Ledger` counts every injected fault and how it ended, so that docs/reliability.md
  quotes real figures: ``detected`` (an OrcaDiffError, nothing wrong written), ``recovered``
  (the fault was survived and the output proved byte-identical), ``silent`` (wrong output with
  no error: a bug, and a failed test) and ``unhandled`` (another exception escaped: a bug).
  At the end of the session the counts are written to ``<basetemp>/reliability/*.json``;
  ``scripts/reliability_counts.py`` adds them up.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

from orca_diff.errors import OrcaDiffError
from orca_diff.format import MANIFEST_NAME, canonical_sha256
from orca_diff.make import make_diff
from orca_diff.outdir import staging_dir, write_marker
from orca_diff.synth import FineTune, LlamaShape, write_finetune, write_llama

REPO = Path(__file__).resolve().parent.parent
OUTCOMES = ("detected", "recovered", "silent", "unhandled")

#: The tiny model of most tests: 2 layers, hidden 32, vocab 128, F16, sharded so that several
#: safetensors files exist; small chunks and payload files so every file kind has several.
TINY = LlamaShape(vocab_size=128, hidden_size=32, intermediate_size=88, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=4)
TINY_SHARD_BYTES = 24 * 1024
TINY_CHUNK_BYTES = 4096
TINY_PAYLOAD_BYTES = 16 * 1024


# --------------------------------------------------------------------------- the ledger


class Ledger:
    """Counts of injected faults by (suite, outcome). Tests call :meth:`record` once per case."""

    def __init__(self) -> None:
        self.counts: dict[str, Counter] = {}
        self.silent_cases: list[str] = []

    def record(self, suite: str, case: str, outcome: str) -> None:
        assert outcome in OUTCOMES, outcome
        self.counts.setdefault(suite, Counter())[outcome] += 1
        if outcome in ("silent", "unhandled"):
            self.silent_cases.append(f"{suite}: {case}: {outcome}")

    def write(self, folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"ledger-{os.getpid()}.json"
        path.write_text(json.dumps({"suites": {s: dict(c) for s, c in sorted(self.counts.items())},
                                    "bad_cases": self.silent_cases}, indent=1) + "\n")
        return path


_LEDGER = Ledger()


@pytest.fixture(scope="session")
def ledger(tmp_path_factory: pytest.TempPathFactory):
    """The session's fault ledger; written to <basetemp>/reliability/ when the session ends."""
    yield _LEDGER
    if _LEDGER.counts:
        _LEDGER.write(tmp_path_factory.getbasetemp() / "reliability")


def _run_fault(ledger: Ledger, suite: str, case: str, fn: Callable[[], object],
               must_name: tuple[str, ...]) -> OrcaDiffError | None:
    """Run ``fn``: an OrcaDiffError naming every ``must_name`` is recorded as detected and
    returned; any other exception is recorded as unhandled and fails the test; no exception
    returns None (the caller decides whether that is silent or a recovery)."""
    try:
        fn()
    except OrcaDiffError as exc:
        missing = [n for n in must_name if n not in str(exc)]
        assert not missing, f"{case}: error does not name {missing}: {exc}"
        ledger.record(suite, case, "detected")
        return exc
    except Exception as exc:  # noqa: BLE001 - the point is to catch what should not escape
        ledger.record(suite, case, "unhandled")
        raise AssertionError(f"{case}: {type(exc).__name__} escaped instead of an OrcaDiffError: {exc}") from exc
    return None


def expect_refusal(ledger: Ledger, suite: str, case: str, fn: Callable[[], object],
                   must_name: tuple[str, ...] = ()) -> OrcaDiffError:
    """Run ``fn``, which must raise an OrcaDiffError whose message contains every ``must_name``
    (the file, chunk or tensor at fault). Any other ending is recorded, then fails the test."""
    exc = _run_fault(ledger, suite, case, fn, must_name)
    if exc is not None:
        return exc
    ledger.record(suite, case, "silent")
    raise AssertionError(f"{case}: the fault was not detected")


def expect_safe(ledger: Ledger, suite: str, case: str, fn: Callable[[], object], out: Path,
                matches: Callable[[Path], bool], must_name: tuple[str, ...] = ()) -> OrcaDiffError | None:
    """Like :func:`expect_refusal`, but a fault that changes nothing that matters (trailing
    whitespace of the manifest, the model card) may also end in a success, provided that the
    published output ``out`` passes ``matches`` (byte-identical to the fine-tune)."""
    exc = _run_fault(ledger, suite, case, fn, must_name)
    if exc is not None:
        return exc
    if matches(out):
        ledger.record(suite, case, "recovered")
        return None
    ledger.record(suite, case, "silent")
    raise AssertionError(f"{case}: SILENT CORRUPTION: {out} was published and differs from the fine-tune")


# --------------------------------------------------------------------------- the session's diff


@dataclass
class Kit:
    """A base, its fine-tune, and the diff between them (all read-only: copy before damaging)."""

    root: Path
    base: Path
    target: Path
    diff: Path
    target_files: dict[str, bytes] = field(default_factory=dict)

    def copy_diff(self, dest: Path) -> Path:
        shutil.copytree(self.diff, dest)
        return dest

    def copy_base(self, dest: Path) -> Path:
        shutil.copytree(self.base, dest)
        return dest

    def manifest_doc(self, diff: Path | None = None) -> dict:
        return json.loads((diff or self.diff).joinpath(MANIFEST_NAME).read_bytes())

    def assert_identical(self, out: Path) -> None:
        """``out`` holds exactly the target's files, byte for byte."""
        found = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}
        assert sorted(found) == sorted(self.target_files)
        for name, data in self.target_files.items():
            assert found[name] == data, f"{name} differs from the fine-tune"

    def matches_target(self, out: Path) -> bool:
        try:
            self.assert_identical(out)
        except AssertionError:
            return False
        return True


def build_kit(root: Path, shape: LlamaShape = TINY, shard_bytes: int = TINY_SHARD_BYTES,
              chunk_bytes: int = TINY_CHUNK_BYTES, payload_bytes: int = TINY_PAYLOAD_BYTES) -> Kit:
    """Write a base, a fine-tune with a pad row (so raw chunks and diff-carried files exist),
    and the diff between them."""
    base, target, diff = root / "base", root / "target", root / "diff"
    write_llama(base, shape, "F16", seed=0, max_shard_bytes=shard_bytes)
    write_finetune(target, shape, base_seed=0, dtype="F16", ft=FineTune(add_pad_row=True), max_shard_bytes=shard_bytes)
    make_diff(base, target, diff, base_name="tiny", chunk_bytes=chunk_bytes, threads=1, progress=False,
              payload_file_bytes=payload_bytes)
    files = {p.relative_to(target).as_posix(): p.read_bytes() for p in target.rglob("*") if p.is_file()}
    return Kit(root, base, target, diff, files)


@pytest.fixture(scope="session")
def kit(tmp_path_factory: pytest.TempPathFactory) -> Kit:
    return build_kit(tmp_path_factory.mktemp("kit"))


# --------------------------------------------------------------------------- byte faults


def flip_bit(path: Path, bit: int) -> None:
    """Invert bit number ``bit`` (0 = lowest bit of the first byte) of a file in place."""
    with open(path, "r+b") as f:
        f.seek(bit // 8)
        b = f.read(1)[0]
        f.seek(bit // 8)
        f.write(bytes([b ^ (1 << (bit % 8))]))


def truncate(path: Path, size: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)


def write_manifest_doc(diff: Path, doc: dict, recompute: bool = True) -> None:
    """Write a manifest document; with ``recompute`` its self-checksum is made valid again
    (what an attacker who edits a manifest does)."""
    doc = dict(doc)
    doc.pop("manifest_sha256", None)
    if recompute:
        doc["manifest_sha256"] = canonical_sha256(doc)
    (diff / MANIFEST_NAME).write_text(json.dumps(doc, indent=1) + "\n")


def rewrite_manifest(diff: Path, edit: Callable[[dict], None]) -> dict:
    """Apply ``edit`` to the diff's manifest document in place and re-sign it."""
    doc = json.loads((diff / MANIFEST_NAME).read_bytes())
    edit(doc)
    write_manifest_doc(diff, doc)
    return doc


def assert_no_output(out: Path) -> None:
    """Neither the output folder nor its hidden staging sibling exists."""
    assert not out.exists(), f"{out} was created"
    assert not staging_dir(out).exists(), f"{staging_dir(out)} was created"


def previous_output(out: Path, files: dict[str, bytes | str]) -> Path:
    """A folder as a previous orca-diff run left it: ``files`` in ``out`` and the marker beside
    it that lists them (what ``--force`` may replace)."""
    out.mkdir(parents=True, exist_ok=True)
    for rel, data in files.items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_bytes(data.encode() if isinstance(data, str) else data)
    write_marker(out, files)
    return out


def tree_snapshot(folder: Path) -> dict[str, tuple[int, bytes]]:
    """Every entry under ``folder`` (symlinks not followed): relative name -> (mode, content)."""
    snap = {}
    for p in sorted(folder.rglob("*")):
        st = p.lstat()
        rel = p.relative_to(folder).as_posix()
        if p.is_symlink():
            snap[rel] = (st.st_mode, os.readlink(p).encode())
        elif p.is_file():
            snap[rel] = (st.st_mode, p.read_bytes())
        else:
            snap[rel] = (st.st_mode, b"")
    return snap


# --------------------------------------------------------------------------- the CLI in a subprocess


def cli_env(threads: int = 1) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"ORCA_DIFF_THREADS": str(threads), "ORCA_DIFF_DISABLE_PROGRESS_BARS": "1",
                "PYTHONPATH": str(REPO) + os.pathsep + env.get("PYTHONPATH", ""), "HF_HUB_OFFLINE": "1",
                "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"})
    return env


def cli_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "orca_diff.cli", *args]


def run_cli(*args: str, threads: int = 1, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cli_cmd(*args), env=cli_env(threads), capture_output=True, text=True, timeout=timeout, **kw)
