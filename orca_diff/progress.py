"""tqdm bars that switch themselves off: ``--quiet``, a non-TTY stderr, or an environment variable
(``ORCA_DIFF_DISABLE_PROGRESS_BARS=1``, or huggingface_hub's ``HF_HUB_DISABLE_PROGRESS_BARS=1``)."""

from __future__ import annotations

import os
import sys

from tqdm.auto import tqdm


def bars_enabled(progress: bool | None) -> bool:
    if progress is not None:
        return progress
    for var in ("ORCA_DIFF_DISABLE_PROGRESS_BARS", "HF_HUB_DISABLE_PROGRESS_BARS"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return False
    return sys.stderr.isatty()


def byte_bar(total: int, desc: str, progress: bool | None) -> tqdm:
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                disable=not bars_enabled(progress), dynamic_ncols=True, leave=False)
