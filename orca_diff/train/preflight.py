"""Everything a run needs, checked before step 1: the folders, every stage's data, the digests.

Orca's stage 1 was 160 hours on 20 A100s: a misspelled stage-2 path or one bad row must be found
before it, not after. :func:`check_folders` refuses a model that is a diff folder, a missing model,
and an ``--out`` that is a file, each in one line. :func:`check_data` reads every data file of every
stage and every eval file once (rows parsed and dropped, not kept), and reports *all* problems in
one error, each naming the file and line; it returns per file the rows, the rows dropped for an
empty response and the sha256 that the run's checkpoints record (:mod:`.checkpoints` refuses to
continue on data that changed).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..errors import FormatError, InputNotFoundError, OrcaDiffError, OutputError, UsageError
from .config import TrainConfig
from .readers import FileReport, file_sha256, read_rows


def check_folders(cfg: TrainConfig) -> None:
    """One-line refusals for the wrong kind of folder, before anything is loaded or written."""
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} is a file; give a folder for the run (model, checkpoints, log)")
    model = Path(cfg.model)
    if model.is_dir():
        if (model / "orca-diff.json").is_file() and not (model / "config.json").is_file():
            raise UsageError(f"--model {model} is an orca-diff diff, not a model: rebuild the model first"
                             f" (orca-diff apply --base BASE --diff {model} --out MODEL) and train MODEL")
        if not (model / "config.json").is_file():
            raise InputNotFoundError(f"--model {model} has no config.json: not a Hugging Face model folder")
    elif model.exists():
        raise UsageError(f"--model {model} is a file; give the model's folder (config.json, safetensors, tokenizer)")
    elif model.is_absolute() or cfg.model.startswith((".", "~")):
        raise InputNotFoundError(f"base model {cfg.model} does not exist (expected an HF folder with config.json)")


def _reader_settings(cfg: TrainConfig) -> dict[str, Any]:
    return {"data_format": cfg.data_format, "columns": cfg.columns, "empty_responses": cfg.empty_responses,
            "max_row_bytes": cfg.max_row_bytes}


def check_data(cfg: TrainConfig) -> dict[str, FileReport]:
    """{path: report} of every stage and eval file; one error listing every unusable one."""
    reports: dict[str, FileReport] = {}
    problems: list[str] = []
    kinds: set[type] = set()
    places: list[tuple[str, str]] = [(f"stage {i + 1}", p) for i, s in enumerate(cfg.stages) for p in s.data]
    places += [("eval", p) for p in cfg.eval_data]
    for label, path in places:
        if path in reports:
            continue
        try:
            _, report = read_rows(path, keep_rows=False, **_reader_settings(cfg))
            report.sha256 = file_sha256(path)
        except OrcaDiffError as exc:
            problems.append(f"{label}: {exc}")
            kinds.add(type(exc))
            continue
        if report.rows == 0:
            problems.append(f"{label}: {path}: no usable row ({report.dropped_empty} with an empty response)")
            kinds.add(FormatError)
        reports[path] = report
    if problems:
        head = f"{len(problems)} problems in the training data, found before step 1: " if len(problems) > 1 \
            else "found before step 1: "
        error = kinds.pop() if len(kinds) == 1 else FormatError  # e.g. only missing files: exit 3
        raise error(head + "; ".join(problems))
    return reports


def data_digests(cfg: TrainConfig, reports: dict[str, FileReport]) -> dict[str, str]:
    """{path: sha256} of every stage's data file (what a checkpoint records)."""
    return {p: reports[p].sha256 for s in cfg.stages for p in s.data if p in reports}


def describe(cfg: TrainConfig, reports: dict[str, FileReport]) -> list[str]:
    """One line per stage: its files, rows, formats and the rows dropped for an empty response."""
    lines = []
    for i, stage in enumerate(cfg.stages):
        parts = [f"{Path(p).name}: {reports[p].rows} rows ({reports[p].format}"
                 f"{', ' + str(reports[p].turns) + ' assistant turns' if reports[p].turns != reports[p].rows else ''})"
                 f"{f', {reports[p].dropped_empty} dropped for an empty response' if reports[p].dropped_empty else ''}"
                 for p in stage.data]
        lines.append(f"checked stage {i + 1} ({stage.name or Path(stage.data[0]).name}): {'; '.join(parts)}")
    return lines


def record(reports: dict[str, FileReport]) -> list[dict[str, Any]]:
    """The reports as JSON records for the log (kind ``data``)."""
    return [json.loads(json.dumps(asdict(r))) for r in reports.values()]
