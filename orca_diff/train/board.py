"""TensorBoard scalars of the run's log records, when the ``tensorboard`` package is installed.

Written to ``OUT/tensorboard/`` (``tensorboard --logdir OUT/tensorboard``): train loss, learning
rate, grad norm and throughput per global step, and every eval loss by its ``when`` and set.
Without tensorboard nothing is written and nothing fails; the JSONL log stays the record.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

BOARD_DIRNAME = "tensorboard"


def tensorboard_available() -> bool:
    return importlib.util.find_spec("tensorboard") is not None


class TensorBoard:
    """A SummaryWriter on the main process when tensorboard is installed, else nothing at all."""

    def __init__(self, out: Path, main: bool) -> None:
        self.writer: Any = None
        if main and tensorboard_available():
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(out / BOARD_DIRNAME))

    def write(self, record: dict[str, Any]) -> None:
        if self.writer is None:
            return
        step = int(record.get("global_step", 0))
        kind = record.get("kind")
        if kind == "train":
            for key in ("loss", "lr", "grad_norm", "tokens_per_s"):
                if isinstance(record.get(key), (int, float)):
                    self.writer.add_scalar(f"train/{key}", record[key], step)
        elif kind in ("eval", "eval_saved", "eval_set", "eval_saved_set") and "loss" in record:
            name = record.get("set", "all")
            self.writer.add_scalar(f"{kind.replace('_set', '')}/{name}/loss", record["loss"], step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
