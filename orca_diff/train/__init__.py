"""Orca-style progressive explanation tuning (``orca-diff train``; needs the ``train`` extra).

The public face: a :class:`TrainConfig` of plain values with its :class:`Stage` s
(:func:`load_config` reads one from YAML/JSON), :func:`train` to run it, and
:func:`evaluate_folder` / :func:`response_loss` to measure a saved model on held-out rows. The
modules behind it, one job each: ``config`` and ``schema`` (settings and their check), ``readers``
(data files in the orca/sharegpt/alpaca/messages layouts), ``preflight`` (everything checked before
step 1), ``data`` (templates, loss mask, packing), ``tokcache``, ``system_messages`` (Orca's 16
system messages as data), ``loop`` (the training loop), ``checkpoints`` (no pickle), ``export``
(the saved HF folder), ``outputs`` (reruns), ``eval``, ``mcq``, ``plot`` and ``board``. Importing this package
does not import torch.
"""

from .config import (CHECKPOINTS_DIRNAME, LOG_NAME, METRICS_NAME, MODEL_DIRNAME, PLOT_NAME, Stage, TrainConfig,
                     load_config)
from .data import ORCA_CHAT_TEMPLATE, read_orca_rows, render_prompt
from .readers import read_rows
from .eval import evaluate_folder, response_loss
from .loop import lr_at, read_log, train
from .system_messages import assign_system_messages, orca_system_messages

__all__ = [
    "CHECKPOINTS_DIRNAME", "LOG_NAME", "METRICS_NAME", "MODEL_DIRNAME", "ORCA_CHAT_TEMPLATE", "PLOT_NAME", "Stage",
    "TrainConfig", "assign_system_messages", "evaluate_folder", "load_config", "lr_at", "orca_system_messages",
    "read_log", "read_orca_rows", "read_rows", "render_prompt", "response_loss", "train",
]
