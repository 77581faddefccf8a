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


def human_bytes(n: float) -> str:
    """``1536`` -> ``"1.5 KiB"``: sizes in messages and summaries."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)
