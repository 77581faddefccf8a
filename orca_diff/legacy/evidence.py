"""What the bytes of a legacy delta say about the base it is applied to, when the release records
nothing about that base (FastChat deltas; Alpaca-format diffs without an integrity constant).

The evidence is exactness. A FastChat delta is ``target - base`` computed in fp16 from fp16
values (make_delta.py loads both models with ``torch_dtype=float16``); Alpaca's is the same in
fp32. Where the change is small against the weight (``|d| <= |b| / 4``), ``target`` lies within a
factor 2 of ``base``, so the subtraction was exact (Sterbenz) and ``base + d`` gives ``target``
back with no rounding at all. Applied to its own base, a delta therefore adds exactly at every
such element; applied to an unrelated base of the same shape, the delta's low bits do not fit
the other weights' exponents and about a third of those additions round (29 % measured on the
test models, 0 % on the right base). The test is exact for the right base, so a small threshold
separates the two with a wide margin. It is a statistic, not a proof: a base that differs from
the release's in a few tensors only may pass (its rebuilt model differs from the publisher's
there), which is why the check is reported as evidence and the release's own integrity data,
where there is any, is checked too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..containers import ModelReader, read_range

#: Elements read per sampled tensor (from its start): 64 Ki elements, 128-256 KiB per tensor.
SAMPLE_ELEMENTS = 1 << 16
#: Tensors sampled, spread evenly over the model's state-dict order.
SAMPLE_TENSORS = 24
#: Fewer elements than this in the test region: too little evidence to refuse anything.
MIN_EVIDENCE = 2000
#: Above this fraction of inexact additions the base is refused (right base: 0; unrelated: ~0.3).
REFUSE_FRACTION = 0.01


@dataclass(frozen=True)
class Exactness:
    """How many sampled elements were in the test region, and how many of them added inexactly."""

    tested: int
    inexact: int

    @property
    def fraction(self) -> float:
        return self.inexact / self.tested if self.tested else 0.0

    @property
    def conclusive(self) -> bool:
        return self.tested >= MIN_EVIDENCE

    @property
    def refutes(self) -> bool:
        """Clear evidence that the delta was not made from this base."""
        return self.conclusive and self.fraction > REFUSE_FRACTION

    def describe(self) -> str:
        return (f"the delta adds to this base with no rounding at {self.tested - self.inexact} of {self.tested} sampled "
                f"elements where it is small against the weight ({100 * self.fraction:.1f}% inexact; the delta's own "
                f"base gives 0%, an unrelated one about 30%)")


def count_inexact(base: np.ndarray, delta: np.ndarray) -> tuple[int, int]:
    """(elements tested, elements whose ``base + delta`` rounds), both arrays of one float dtype.
    Tested: ``delta != 0`` and ``|delta| <= |base| / 4``, both finite. There ``|base| >= |delta|``,
    so Fast2Sum applies: the sum ``s`` is exact iff ``s - base == delta`` in the same precision."""
    with np.errstate(over="ignore", invalid="ignore"):
        region = (delta != 0) & np.isfinite(base) & np.isfinite(delta) & (np.abs(delta) <= np.abs(base) / 4)
        b, d = base[region], delta[region]
        s = b + d
        inexact = int(np.count_nonzero((s - b) != d))
    return int(region.sum()), inexact


def sample_exactness(base: ModelReader, delta: ModelReader, names: list[str],
                     as_compute: Callable[[np.ndarray, str], np.ndarray]) -> Exactness:
    """Read the first elements of up to SAMPLE_TENSORS tensors of both models (those shared with
    the same element count in the base; a v0 pad row lies past the base's end and is never read)
    and count the exactness of ``base + delta`` in the compute dtype ``as_compute`` casts to."""
    shared = [n for n in names if n in base.tensors and n in delta.tensors and base.tensors[n].numel > 0]
    step = max(1, len(shared) // SAMPLE_TENSORS)
    tested = inexact = 0
    for name in shared[::step][:SAMPLE_TENSORS]:
        b, d = base.tensors[name], delta.tensors[name]
        n = min(SAMPLE_ELEMENTS, b.numel, d.numel)
        bv = as_compute(read_range(base, name, 0, n * b.itemsize), b.dtype)
        dv = as_compute(read_range(delta, name, 0, n * d.itemsize), d.dtype)
        t, i = count_inexact(bv, dv)
        tested += t
        inexact += i
    return Exactness(tested, inexact)


__all__ = ["Exactness", "count_inexact", "sample_exactness", "SAMPLE_ELEMENTS", "SAMPLE_TENSORS", "MIN_EVIDENCE",
           "REFUSE_FRACTION"]
