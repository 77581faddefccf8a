"""The ``orca-diff`` command line: a thin layer over the library (one module per topic)."""

import os
import sys

# Before numpy loads: make/apply/verify make no BLAS call, and numpy's OpenBLAS worker threads
# spin for ~50 ms of CPU after start-up, a core taken from the coder threads of a small apply.
# Not for `train` (torch may use OpenBLAS for its matmuls on some platforms), nor over a user's
# own setting.
if "train" not in sys.argv[1:]:
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from .main import cli, main  # noqa: E402

__all__ = ["cli", "main"]
