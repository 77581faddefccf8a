"""tqdm bars that switch themselves off: ``--quiet``, a non-TTY stderr, or an environment variable
(``ORCA_DIFF_DISABLE_PROGRESS_BARS=1``, or huggingface_hub's ``HF_HUB_DISABLE_PROGRESS_BARS=1``)."""

from __future__ import annotations

import os
import sys
from typing import Any


def bars_enabled(progress: bool | None) -> bool:
    if progress is not None:
        return progress
    for var in ("ORCA_DIFF_DISABLE_PROGRESS_BARS", "HF_HUB_DISABLE_PROGRESS_BARS"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return False
    return sys.stderr.isatty()


class _NoBar:
    """What ``byte_bar`` returns when bars are off: tqdm (and the asyncio it imports, 30-60 ms
    of a small apply's start-up) is imported only when a bar is shown."""

    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> "_NoBar":
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def byte_bar(total: int, desc: str, progress: bool | None) -> Any:
    """A bytes progress bar (a tqdm, or a no-op stand-in when bars are off)."""
    if not bars_enabled(progress):
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, dynamic_ncols=True,
                leave=False)


def human_bytes(n: float) -> str:
    """``1536`` -> ``"1.5 KiB"``: sizes in messages and summaries."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)
