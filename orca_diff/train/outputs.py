"""What a finished run leaves, proven: the model's files recorded, a rerun that checks instead of redoing.

After the model is written, ``OUT/outputs.json`` records the size and sha256 of every file of
``OUT/model``. The same command run again on a finished run checks those files (and the diff, when
``--make-diff-against`` asks for one: the diff's own checksums, that it rebuilds exactly this model,
and that it was made from this base) and exits 0 without training or writing anything, making the
diff only when it is missing. A model file edited since is named and refused; ``--force`` starts
the run again in OUT, removing only what a run writes there.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

from ..errors import OrcaDiffError, OutputError
from .config import CHECKPOINTS_DIRNAME, LOG_NAME, METRICS_NAME, MODEL_DIRNAME, PLOT_NAME, TrainConfig

OUTPUTS_NAME = "outputs.json"
RUN_FILES = (MODEL_DIRNAME, MODEL_DIRNAME + ".tmp", CHECKPOINTS_DIRNAME, LOG_NAME, LOG_NAME + ".tmp", METRICS_NAME,
             PLOT_NAME, "train_config.json", OUTPUTS_NAME)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def model_files(model_dir: Path) -> dict[str, dict[str, Any]]:
    return {str(p.relative_to(model_dir)): {"size": p.stat().st_size, "sha256": _sha256(p)}
            for p in sorted(model_dir.rglob("*")) if p.is_file()}


def record_model(out: Path, model_dir: Path) -> None:
    """Write OUT/outputs.json: every file of the model as written (temporary name, then rename)."""
    path = out / OUTPUTS_NAME
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"model": model_files(model_dir)}, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def check_model(out: Path, model_dir: Path) -> str:
    """Refuse (naming the file) a model folder that is not what this run wrote; a line saying what was checked."""
    try:
        recorded = json.loads((out / OUTPUTS_NAME).read_text(encoding="utf-8"))["model"]
    except FileNotFoundError:
        return f"{model_dir} is there (no {OUTPUTS_NAME}: written by an older orca-diff, its files not checked)"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise OutputError(f"{out / OUTPUTS_NAME}: unreadable ({exc}); rerun with --force to train again") from None
    found = {str(p.relative_to(model_dir)) for p in model_dir.rglob("*") if p.is_file()}
    for name in sorted(set(recorded) | found):
        entry = recorded.get(name)
        path = model_dir / name
        if entry is None:
            raise OutputError(f"{path} was not written by this run; move it away, or rerun with --force to train again")
        if name not in found:
            raise OutputError(f"{path} is missing from the finished run; rerun with --force to train again")
        if path.stat().st_size != entry["size"] or _sha256(path) != entry["sha256"]:
            raise OutputError(f"{path} changed since this run wrote it; restore it, or rerun with --force to train"
                              f" again (which replaces it)")
    return f"{model_dir} checked: {len(recorded)} files as this run wrote them"


def make_or_check_diff(out: Path, cfg: TrainConfig, model_dir: Path, say: Callable[[str], None]) -> Path:
    """``--make-diff-against``: make the diff, or, when it is there, prove it is this model's from this base."""
    from ..make import make_diff
    from ..verify import verify_base, verify_diff, verify_model

    diff_out = Path(cfg.diff_out) if cfg.diff_out else out / "diff"
    if (diff_out / "orca-diff.json").is_file() and not cfg.force:
        try:
            verify_diff(diff_out, progress=False)
            verify_model(model_dir, diff_out, progress=False)
            verify_base(cfg.make_diff_against, diff_out, progress=False)
        except OrcaDiffError as exc:
            raise OutputError(f"{diff_out} is there but is not the diff of {model_dir} against"
                              f" {cfg.make_diff_against} ({exc}); move it away or rerun with --force") from None
        say(f"{diff_out} checked: the diff of {model_dir} against {cfg.make_diff_against}, intact")
        return diff_out
    make_diff(cfg.make_diff_against, model_dir, diff_out, force=cfg.force, progress=False if cfg.quiet else None)
    say(f"wrote the diff against {cfg.make_diff_against} to {diff_out}")
    return diff_out


def finish_finished_run(out: Path, cfg: TrainConfig, ckpt: Path, say: Callable[[str], None], main: bool,
                        world: int) -> Path:
    """A rerun of a finished run: check what it wrote (make a missing diff), train nothing, return OUT/model."""
    model_dir = out / MODEL_DIRNAME
    if main:
        say(check_model(out, model_dir))
        if cfg.make_diff_against:
            make_or_check_diff(out, cfg, model_dir, say)
        say(f"this run is finished (checkpoint {ckpt.name}); nothing to train. --force trains it again")
    if world > 1:
        import torch

        torch.distributed.barrier()
    return model_dir


def remove_previous_run(out: Path, cfg: TrainConfig) -> list[str]:
    """``--force``: remove what a run writes in OUT (model, checkpoints, log, metrics), nothing else."""
    if not out.is_dir() or not any((out / n).exists() for n in (CHECKPOINTS_DIRNAME, LOG_NAME, "train_config.json")):
        return []  # not a run folder: nothing of ours to remove (an existing OUT/model is refused later)
    removed = []
    for name in RUN_FILES + tuple(sorted(p.name for p in out.glob("stage-*-model"))):
        path = out / name
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.is_dir():
            shutil.rmtree(path)
        else:
            continue
        removed.append(name)
    return removed
