"""apply reads the base once (issue 21, part 3), and still refuses every wrong base.

The promise (docs/reliability.md, promise 2): with a manifest that records sampled digests, a
base whose names, dtypes, shapes or sampled blocks differ is refused before anything is written;
one that differs only between the sampled blocks is caught by the full digests measured from the
very bytes the rebuild reads, before anything is published: the staging folder is removed, the
tensor named, exit code 6. A manifest without sampled digests is checked in full first, as before.
"""

from __future__ import annotations

import tracemalloc
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, strategies as st

import orca_diff.apply as apply_mod
from faultkit import Kit, assert_no_output, expect_refusal, kit, ledger, rewrite_manifest, run_cli  # noqa: F401
from orca_diff.apply import apply_diff
from orca_diff.basecheck import sample_spans
from orca_diff.containers import SafetensorsModel, read_safetensors_header
from orca_diff.errors import BaseMismatchError, InterruptedError_
from orca_diff.format import load_manifest
from orca_diff.make import make_diff
from orca_diff.outdir import staging_dir
from orca_diff.synth import FineTune, LlamaShape, write_finetune, write_llama

SUITE = "wrong-base"
LAST = "lm_head.weight"  # needed, 8 KiB in the tiny model, in the last shard: sampled in 8 blocks of 512


def _shard_of(base: Path, tensor: str) -> tuple[Path, int, int]:
    for shard in sorted(base.glob("*.safetensors")):
        h = read_safetensors_header(shard)
        for e in h.entries:
            if e.info.name == tensor:
                return shard, h.data_start + e.begin, e.info.nbytes
    raise KeyError(tensor)


def _outside_samples(nbytes: int) -> int:
    """A byte offset (of an even, 2-byte element) that no sampled span covers."""
    covered = np.zeros(nbytes, dtype=bool)
    for s, n in sample_spans(nbytes):
        covered[s:s + n] = True
    free = np.flatnonzero(~covered[::2]) * 2
    assert free.size, "every element is sampled"
    return int(free[free.size // 2])


def _ulp_at(base: Path, tensor: str, offset: int) -> None:
    """Move the F16 element at byte ``offset`` of ``tensor`` by one ulp, in place."""
    shard, begin, _ = _shard_of(base, tensor)
    with open(shard, "r+b") as f:
        f.seek(begin + offset)
        v = np.frombuffer(f.read(2), dtype=np.uint16)[0]
        f.seek(begin + offset)
        f.write(np.uint16(v + 1 if v & 0x7FFF != 0x7BFF else v - 1).tobytes())


def _damage_between_samples(base: Path, tensor: str = LAST) -> None:
    _ulp_at(base, tensor, _outside_samples(_shard_of(base, tensor)[2]))


def _strip_samples(diff: Path) -> None:
    """Make the diff look like one written before sampled digests existed (re-signed)."""
    def edit(doc: dict) -> None:
        for t in doc["base"]["tensors"].values():
            t.pop("sampled", None)
    rewrite_manifest(diff, edit)


# --------------------------------------------------------------------------- the sampling rule


@given(st.integers(0, 1 << 36))
def test_sampled_spans_lie_inside_the_tensor_in_order_and_cover_both_ends(nbytes: int) -> None:
    spans = sample_spans(nbytes)
    assert spans[0][0] == 0 and spans[-1][0] + spans[-1][1] == nbytes
    for (a, n), (b, _) in zip(spans, spans[1:]):
        assert a + n <= b
    assert all(0 <= s and n >= 0 and s + n <= nbytes for s, n in spans)


@given(st.integers(400 * 1024, 1 << 36))
def test_sampled_spans_read_at_most_one_percent_of_a_tensor_over_400_kb(nbytes: int) -> None:
    assert sum(n for _, n in sample_spans(nbytes)) <= nbytes / 100


def test_a_7b_base_is_sampled_in_well_under_one_percent() -> None:
    shape = LlamaShape(32000, 4096, 11008, 32, 32, 32)
    sizes = [int(np.prod(s)) * 2 for s in shape.tensor_shapes().values()]
    sampled = sum(n for size in sizes for _, n in sample_spans(size))
    assert sampled / sum(sizes) < 0.003  # 0.17 %: 23 MB of 13.5 GB


def test_make_records_a_sampled_digest_for_every_needed_base_tensor(kit: Kit) -> None:
    m = load_manifest(kit.diff)
    needed = m.needed_base_tensors()
    assert needed and all(t.sampled and len(t.sampled) == 64 for t in needed.values())
    assert all(t.sampled is None for t in m.base.tensors.values() if not t.needed)
    assert m.body()["base"]["tensors"][LAST]["sampled"] == needed[LAST].sampled


# --------------------------------------------------------------------------- one read


def _count_base_reads(monkeypatch) -> Counter:
    counts: Counter = Counter()
    real = SafetensorsModel.read

    def counting(self, name, start=0, length=None):
        data = real(self, name, start, length)
        if "base" in self.path.name:
            counts[name] += data.nbytes
        return data

    monkeypatch.setattr(SafetensorsModel, "read", counting)
    return counts


@pytest.mark.parametrize("threads", [1, 2])
def test_apply_reads_each_needed_base_byte_once_plus_the_samples(kit: Kit, tmp_path: Path, monkeypatch,
                                                                 threads: int) -> None:
    m = load_manifest(kit.diff)
    counts = _count_base_reads(monkeypatch)
    report = apply_diff(kit.base, kit.diff, tmp_path / "out", threads=threads, progress=False)
    kit.assert_identical(tmp_path / "out")
    for name, t in m.needed_base_tensors().items():
        nbytes = int(np.prod(t.shape)) * 2
        assert counts[name] == nbytes + sum(n for _, n in sample_spans(nbytes)), name
    assert report.base_tensors_checked == len(m.needed_base_tensors())
    assert report.base_fingerprint == m.base.fingerprint  # measured in the one read, all tensors needed


# --------------------------------------------------------------------------- refusals


def test_another_checkpoint_is_refused_by_its_samples_before_anything_is_written(kit: Kit, ledger, tmp_path: Path,
                                                                                monkeypatch) -> None:
    other = write_llama(tmp_path / "other", LlamaShape(128, 32, 88, 2, 4, 4), "F16", seed=1, max_shard_bytes=24 * 1024)
    (other / "tokenizer.model").write_bytes((kit.base / "tokenizer.model").read_bytes())

    def no_rebuild(*a, **k):
        raise AssertionError("the rebuild started with a wrong base")

    monkeypatch.setattr(apply_mod, "_rebuild", no_rebuild)
    out = tmp_path / "out"
    exc = expect_refusal(ledger, SUITE, "another checkpoint (sampled check)",
                         lambda: apply_diff(other, kit.diff, out, threads=1, progress=False), must_name=("sampled",))
    assert isinstance(exc, BaseMismatchError) and "nothing was written" in str(exc)
    assert_no_output(out)


def test_a_base_differing_only_between_samples_is_caught_in_the_one_read_and_nothing_is_published(
        kit: Kit, ledger, tmp_path: Path, monkeypatch) -> None:
    base = kit.copy_base(tmp_path / "base")
    _damage_between_samples(base)
    shard = _shard_of(base, LAST)[0].name
    staged: list[str] = []
    real = apply_mod._write_all

    def watching(sf, data):  # files were being written when the damage was found: the single-read path
        staged.append(str(sf))
        real(sf, data)

    monkeypatch.setattr(apply_mod, "_write_all", watching)
    out = tmp_path / "out"
    exc = expect_refusal(ledger, SUITE, "one ulp off between the sampled blocks",
                         lambda: apply_diff(base, kit.diff, out, threads=2, progress=False), must_name=(LAST, shard))
    assert isinstance(exc, BaseMismatchError) and "nothing was published" in str(exc)
    assert staged, "the damage should be found while rebuilding (it is outside every sampled block)"
    assert_no_output(out)


def test_the_cli_says_it_in_one_line_with_exit_code_6(kit: Kit, ledger, tmp_path: Path) -> None:
    base = kit.copy_base(tmp_path / "base")
    _damage_between_samples(base)
    out = tmp_path / "out"
    r = run_cli("apply", "--base", str(base), "--diff", str(kit.diff), "--out", str(out), "-q", threads=2)
    assert r.returncode == BaseMismatchError.exit_code == 6, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and LAST in lines[0] and "Traceback" not in r.stderr, r.stderr
    ledger.record(SUITE, "cli: damage between the sampled blocks", "detected")
    assert_no_output(out)


# --------------------------------------------------------------------------- resume


def _interrupt_after(monkeypatch, n: int):
    real = apply_mod._write_all
    calls = {"n": 0}

    def dying(sf, data):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        real(sf, data)

    monkeypatch.setattr(apply_mod, "_write_all", dying)
    return real


def test_resume_still_works_and_measures_the_bases_of_files_it_keeps(kit: Kit, tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "out"
    real = _interrupt_after(monkeypatch, 12)
    with pytest.raises(InterruptedError_):
        apply_diff(kit.base, kit.diff, out, threads=2, progress=False)
    assert staging_dir(out).exists() and not out.exists()
    monkeypatch.setattr(apply_mod, "_write_all", real)
    m = load_manifest(kit.diff)
    report = apply_diff(kit.base, kit.diff, out, threads=2, progress=False)
    assert report.resumed_files >= 1
    kit.assert_identical(out)
    assert report.base_tensors_checked == len(m.needed_base_tensors())
    assert report.base_fingerprint == m.base.fingerprint


def test_a_resumed_run_catches_damage_in_a_base_tensor_only_finished_files_used(kit: Kit, ledger, tmp_path: Path,
                                                                                monkeypatch) -> None:
    """The tensors of files finished before the interruption are not read for any prediction;
    their digests are still measured (read once) and checked before publishing."""
    base = kit.copy_base(tmp_path / "base")
    out = tmp_path / "out"
    real = _interrupt_after(monkeypatch, 12)
    with pytest.raises(InterruptedError_):
        apply_diff(base, kit.diff, out, threads=1, progress=False)
    monkeypatch.setattr(apply_mod, "_write_all", real)
    first = "model.embed_tokens.weight"  # in the first shard, finished before the interruption
    assert any(p.name.startswith("model-00001") for p in staging_dir(out).glob("*.safetensors"))
    _damage_between_samples(base, first)
    exc = expect_refusal(ledger, SUITE, "resumed run, damage in a finished file's base tensor",
                         lambda: apply_diff(base, kit.diff, out, threads=2, progress=False), must_name=(first,))
    assert isinstance(exc, BaseMismatchError)
    assert_no_output(out)


# --------------------------------------------------------------------------- older manifests


def test_a_manifest_without_samples_still_applies(kit: Kit, tmp_path: Path) -> None:
    diff = kit.copy_diff(tmp_path / "diff")
    _strip_samples(diff)
    assert all(t.sampled is None for t in load_manifest(diff).base.tensors.values())
    report = apply_diff(kit.base, diff, tmp_path / "out", threads=2, progress=False)
    kit.assert_identical(tmp_path / "out")
    assert report.base_fingerprint == load_manifest(diff).base.fingerprint


def test_a_manifest_without_samples_is_checked_in_full_before_writing(kit: Kit, ledger, tmp_path: Path,
                                                                     monkeypatch) -> None:
    diff = kit.copy_diff(tmp_path / "diff")
    _strip_samples(diff)
    base = kit.copy_base(tmp_path / "base")
    _damage_between_samples(base)

    def no_rebuild(*a, **k):
        raise AssertionError("the rebuild started with a wrong base")

    monkeypatch.setattr(apply_mod, "_rebuild", no_rebuild)
    out = tmp_path / "out"
    exc = expect_refusal(ledger, SUITE, "manifest without samples, damage anywhere (full check first)",
                         lambda: apply_diff(base, diff, out, threads=1, progress=False), must_name=(LAST,))
    assert isinstance(exc, BaseMismatchError) and "nothing was written" in str(exc)
    assert_no_output(out)


# --------------------------------------------------------------------------- memory


def _traced_apply_peak(tmp_path: Path, layers: int, chunk: int, monkeypatch) -> tuple[int, int]:
    shape = LlamaShape(2048, 512, 1376, layers, 8, 8)
    base, target, diff = tmp_path / f"b{layers}", tmp_path / f"t{layers}", tmp_path / f"d{layers}"
    write_llama(base, shape, "F16", seed=0, max_shard_bytes=8 << 20)
    write_finetune(target, shape, base_seed=0, dtype="F16", ft=FineTune(), max_shard_bytes=8 << 20)
    make_diff(base, target, diff, chunk_bytes=chunk, threads=2, progress=False)
    real = apply_mod.samples_usable

    def after_the_manifest(*a):  # load_manifest's f.read(cap + 1) reserves 256 MiB (untouched): not apply's
        tracemalloc.reset_peak()
        return real(*a)

    monkeypatch.setattr(apply_mod, "samples_usable", after_the_manifest)
    tracemalloc.start()
    try:
        assert apply_diff(base, diff, tmp_path / f"out{layers}", threads=2, progress=False).base_fingerprint
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return peak, sum(p.stat().st_size for p in target.glob("*.safetensors"))


def test_apply_memory_stays_flat_as_the_model_grows(tmp_path: Path, monkeypatch) -> None:
    """Traced allocations (numpy buffers included) are a few chunks in flight plus fixed 16 MiB
    blocks, whatever the model size: measuring the base digests on the way adds at most one
    chunk's base bytes pending."""
    chunk = 256 << 10
    small, small_size = _traced_apply_peak(tmp_path, 1, chunk, monkeypatch)
    large, large_size = _traced_apply_peak(tmp_path, 6, chunk, monkeypatch)
    assert large_size > 3 * small_size
    assert large <= small + 4 * chunk, f"peak {small / 2**20:.1f} MiB at {small_size >> 20} MiB, {large / 2**20:.1f} MiB at {large_size >> 20} MiB"
