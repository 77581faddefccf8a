"""The schema of a training config: the type, range and place of every key, checked before anything runs.

A 160-hour run must not fail in hour 161 on ``lr: fast`` in stage 2. :func:`parse_config_text`
reads YAML (safe loader: no ``!!python`` tags) or JSON and remembers the line of every key;
:func:`check_settings` checks every top-level key and every key of every stage against
:data:`TOP_LEVEL` and :data:`STAGE_KEYS` and returns plain values, or raises one
:class:`~orca_diff.errors.UsageError` listing *every* problem, each as ``FILE:LINE: key: what is
wrong (got value)``. YAML number strings such as ``5e-5`` (PyYAML reads an exponent without a
dot as a string) are accepted as numbers; ``.nan``, ``.inf``, booleans for numbers and fractions
for counts are not.
"""

from __future__ import annotations

import difflib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..errors import FormatError, UsageError, require_extra, shown

CONFIG_MAX_BYTES = 4 << 20         # a config is a few KB; a bigger file is not one
# What one optimizer step may ask for (20.7): past these the loop would build index lists or
# tensors of that size before the first forward pass (micro_batch_size 1e11 reached 13 GB).
MAX_SEQ_LEN = 1 << 20              # 1M tokens per row: beyond every LLaMA-family context
MAX_MICRO_BATCH_TOKENS = 1 << 24   # micro_batch_size * max_seq_len: 16M tokens in one forward
MAX_ROWS_PER_STEP = 1 << 20        # micro_batch_size * grad_accum (* processes) rows per optimizer step
MAX_ROW_BYTES = 16 << 20           # one data row (a JSONL line); Orca's rows are a few KB
ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")
TEMPLATE_CHOICES = ("orca", "chatml", "llama2", "base")
DATA_FORMATS = ("auto", "orca", "sharegpt", "alpaca", "messages")
EMPTY_RESPONSES = ("drop", "refuse")


class Problem(Exception):
    """One value that does not fit its key (collected, then reported together)."""


@dataclass(frozen=True)
class Key:
    check: Callable[[Any], Any]
    what: str


def _number(value: Any) -> float:
    if isinstance(value, bool):
        raise Problem("expected a number, got a boolean")
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise Problem(f"expected a number, got {shown(repr(value))[:80]}") from None
    if not isinstance(value, (int, float)):
        raise Problem(f"expected a number, got {type(value).__name__} {shown(repr(value))[:80]}")
    value = float(value)
    if not math.isfinite(value):
        raise Problem(f"expected a finite number, got {value}")
    return value


def _whole(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    number = _number(value)
    if not number.is_integer():
        raise Problem(f"expected a whole number, got {shown(repr(value))[:80]}")
    return int(number)


def integer(lo: int, hi: int | None = None, optional: bool = False) -> Key:
    def check(value: Any) -> int | None:
        if value is None and optional:
            return None
        n = _whole(value)
        if n < lo or (hi is not None and n > hi):
            raise Problem(f"must be {'>= ' + str(lo) if hi is None else f'between {lo} and {hi}'}, got {n}")
        return n
    return Key(check, f"a whole number >= {lo}" + (" or null" if optional else ""))


def real(lo: float, hi: float | None = None, lo_open: bool = False, optional: bool = False) -> Key:
    def check(value: Any) -> float | None:
        if value is None and optional:
            return None
        x = _number(value)
        if x < lo or (lo_open and x == lo) or (hi is not None and x > hi):
            bound = f"{'>' if lo_open else '>='} {lo:g}" + (f" and <= {hi:g}" if hi is not None else "")
            raise Problem(f"must be {bound}, got {x:g}")
        return x
    return Key(check, "a number")


def boolean(optional: bool = False) -> Key:
    def check(value: Any) -> bool | None:
        if value is None and optional:
            return None
        if not isinstance(value, bool):
            raise Problem(f"expected true or false, got {shown(repr(value))[:80]}")
        return value
    return Key(check, "true or false")


def text(optional: bool = False, nonempty: bool = False) -> Key:
    def check(value: Any) -> str | None:
        if value is None and optional:
            return None
        if not isinstance(value, str):
            raise Problem(f"expected a string, got {type(value).__name__} {shown(repr(value))[:80]}")
        if nonempty and not value:
            raise Problem("must not be empty")
        return value
    return Key(check, "a string")


def choice(options: tuple[str, ...], optional: bool = False, prefix_ok: tuple[str, ...] = ()) -> Key:
    def check(value: Any) -> str | None:
        if value is None and optional:
            return None
        if not isinstance(value, str) or (value not in options and not value.startswith(prefix_ok or ("\0",))):
            raise Problem(f"must be one of {', '.join(options)}, got {shown(repr(value))[:80]}")
        return value
    return Key(check, "one of " + ", ".join(options))


def paths(nonempty: bool) -> Key:
    def check(value: Any) -> list[str]:
        items = value if isinstance(value, list) else [value]
        if value is None or not all(isinstance(p, str) and p for p in items):
            raise Problem(f"expected a file path or a list of file paths, got {shown(repr(value))[:80]}")
        if nonempty and not items:
            raise Problem("needs at least one data file")
        return list(items)
    return Key(check, "a file path or a list of them")


def betas() -> Key:
    def check(value: Any) -> tuple[float, float]:
        if not isinstance(value, (list, tuple)) or len(value) != 2:
            raise Problem(f"expected two numbers [beta1, beta2], got {shown(repr(value))[:80]}")
        pair = tuple(_number(v) for v in value)
        if not all(0.0 <= b < 1.0 for b in pair):
            raise Problem(f"each beta must be in [0, 1), got {list(pair)}")
        return pair  # type: ignore[return-value]
    return Key(check, "[beta1, beta2]")


def columns() -> Key:
    names = ("system_prompt", "question", "response")

    def check(value: Any) -> dict[str, str] | None:
        if value is None:
            return None
        if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
            raise Problem(f"expected a mapping like {{question: prompt, response: completion}}, got"
                          f" {shown(repr(value))[:80]}")
        unknown = sorted(set(value) - set(names))
        if unknown:
            raise Problem(f"maps {', '.join(unknown)}; the columns that can be mapped are {', '.join(names)}")
        return dict(value)
    return Key(check, "a column mapping")


STAGE_KEYS: dict[str, Key] = {
    "data": paths(nonempty=True),
    "epochs": real(0.0, lo_open=True),
    "max_steps": integer(1, optional=True),
    "lr": real(0.0, 1.0, lo_open=True),
    "warmup_steps": integer(0, optional=True),
    "name": text(),
}

TOP_LEVEL: dict[str, Key] = {
    "model": text(nonempty=True), "out": text(nonempty=True), "tokenizer": text(optional=True),
    "template": choice(TEMPLATE_CHOICES), "system_messages": choice(("keep", "orca")),
    "prompt_erasure": boolean(),
    "data_format": choice(DATA_FORMATS), "columns": columns(), "empty_responses": choice(EMPTY_RESPONSES),
    "max_row_bytes": integer(1, 1 << 30),
    "max_seq_len": integer(8, MAX_SEQ_LEN), "packing": boolean(),
    "micro_batch_size": integer(1, MAX_ROWS_PER_STEP), "grad_accum": integer(1, MAX_ROWS_PER_STEP),
    "weight_decay": real(0.0), "betas": betas(), "eps": real(0.0, lo_open=True), "grad_clip": real(0.0),
    "warmup_steps": integer(0), "min_lr_ratio": real(0.0, 1.0), "gradient_checkpointing": boolean(),
    "bf16": boolean(optional=True), "attn_implementation": choice(ATTN_IMPLEMENTATIONS, optional=True),
    "device": choice(("auto", "cpu", "cuda"), prefix_ok=("cuda:",)), "threads": integer(1, 4096, optional=True),
    "save_dtype": choice(("auto", "F16", "BF16", "F32")), "pad_token": text(nonempty=True),
    "seed": integer(0, 2**63 - 1), "save_every": integer(0), "keep_checkpoints": integer(1), "save_stage_models": boolean(),
    "resume": boolean(), "trust_pickled_checkpoint": boolean(), "accept_changed_data": boolean(),
    "stop_after_steps": integer(1, optional=True), "eval_data": paths(nonempty=False), "eval_mc": paths(nonempty=False), "eval_every": integer(0),
    "log_every": integer(1), "quiet": boolean(), "make_diff_against": text(optional=True),
    "diff_out": text(optional=True), "stages": Key(lambda v: v, "a list of stages"),
}


ALIASES = {"learning_rate": "lr", "num_epochs": "epochs", "num_train_epochs": "epochs", "batch_size": "micro_batch_size",
           "per_device_train_batch_size": "micro_batch_size", "gradient_accumulation_steps": "grad_accum",
           "seq_len": "max_seq_len", "max_length": "max_seq_len", "path": "data", "dataset": "data"}


def _unknown(key: str, known: dict[str, Key]) -> str:
    close = [ALIASES[key]] if ALIASES.get(key) in known else difflib.get_close_matches(key, list(known), n=1)
    hint = f" (did you mean {close[0]}?)" if close else f"; known: {', '.join(sorted(known))}"
    return f"unknown setting {shown(repr(key))}{hint}"


def check_settings(raw: dict[str, Any], where: str, lines: dict[tuple, int] | None = None) -> dict[str, Any]:
    """Checked, typed values of a config mapping (stages as lists of checked dicts).

    Every problem is collected; if there is any, one UsageError names them all as
    ``WHERE:LINE: key: problem``.
    """
    lines = lines or {}
    problems: list[str] = []

    def at(path: tuple) -> str:
        line = next((lines[path[:n]] for n in range(len(path), 0, -1) if path[:n] in lines), None)
        return f"{where}:{line}" if line else where

    def name(path: tuple) -> str:
        out = ""
        for part in path:
            out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
        return out

    def run(keys: dict[str, Key], mapping: dict[str, Any], path: tuple) -> dict[str, Any]:
        clean: dict[str, Any] = {}
        for key, value in mapping.items():
            if not isinstance(key, str) or key not in keys:
                problems.append(f"{at(path + (key,))}: {name(path) + ': ' if path else ''}{_unknown(str(key), keys)}")
                continue
            try:
                clean[key] = keys[key].check(value)
            except Problem as exc:
                problems.append(f"{at(path + (key,))}: {name(path + (key,))}: {exc}")
        return clean

    clean = run(TOP_LEVEL, raw, ())
    stages = raw.get("stages")
    if stages is not None:
        if not isinstance(stages, list):
            problems.append(f"{at(('stages',))}: stages: expected a list of stages (each a mapping with data:),"
                            f" got {type(stages).__name__}")
            clean.pop("stages", None)
        else:
            checked = []
            for i, stage in enumerate(stages):
                path = ("stages", i)
                if not isinstance(stage, dict):
                    problems.append(f"{at(path)}: {name(path)}: expected a mapping with at least data:, got"
                                    f" {type(stage).__name__}")
                    continue
                if "data" not in stage:
                    problems.append(f"{at(path)}: {name(path)}: has no data: (the stage's training file or files)")
                checked.append(run(STAGE_KEYS, stage, path))
            clean["stages"] = checked
    for problem in _combined_bounds(clean, raw):
        problems.append(f"{where}: {problem}")
    if problems:
        head = f"{len(problems)} problems in the config: " if len(problems) > 1 else ""
        raise UsageError(head + "; ".join(problems))
    return clean


def _combined_bounds(clean: dict[str, Any], raw: dict[str, Any]) -> list[str]:
    """Limits on products of keys: what one forward pass and one optimizer step may cost."""
    out = []
    seq, micro, accum = clean.get("max_seq_len", 2048), clean.get("micro_batch_size", 1), clean.get("grad_accum", 1)
    if isinstance(seq, int) and isinstance(micro, int) and micro * seq > MAX_MICRO_BATCH_TOKENS:
        out.append(f"micro_batch_size x max_seq_len = {micro} x {seq} tokens in one forward pass, more than"
                   f" {MAX_MICRO_BATCH_TOKENS:,}; use a smaller micro_batch_size and more grad_accum")
    if isinstance(micro, int) and isinstance(accum, int) and micro * accum > MAX_ROWS_PER_STEP:
        out.append(f"micro_batch_size x grad_accum = {micro * accum:,} rows per optimizer step, more than"
                   f" {MAX_ROWS_PER_STEP:,}")
    return out


# ---------------------------------------------------------------------------------------------
# Reading the file
# ---------------------------------------------------------------------------------------------

def parse_config_text(path: Path) -> tuple[Any, dict[tuple, int]]:
    """(the parsed document, {key path: line}) of a YAML or JSON config, or a one-line FormatError."""
    try:
        size = path.stat().st_size
        if size > CONFIG_MAX_BYTES:
            raise UsageError(f"{path}: {size:,} bytes is not a training config (at most {CONFIG_MAX_BYTES:,})")
        data = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"config file {path}: cannot be read ({exc.strerror or exc})") from None
    try:
        text_ = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise FormatError(f"{path}:{line}: the config is not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    if path.suffix.lower() in (".yaml", ".yml"):
        return _parse_yaml(path, text_)
    try:
        return json.loads(text_), {}
    except json.JSONDecodeError as exc:
        raise FormatError(f"{path}:{exc.lineno}:{exc.colno}: not valid JSON ({exc.msg})") from None
    except (RecursionError, ValueError) as exc:
        raise FormatError(f"{path}: not a usable JSON config ({str(exc)[:120]})") from None


def _parse_yaml(path: Path, text_: str) -> tuple[Any, dict[tuple, int]]:
    yaml = require_extra("yaml", "train", f"Reading the YAML config {path}")
    try:
        node = yaml.compose(text_, Loader=yaml.SafeLoader)
        doc = yaml.safe_load(text_)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        what = " ".join(str(exc.problem or exc.context or "syntax error").split())
        if "\t" in text_ and "tab" in str(exc).lower() or "found character '\\t'" in str(exc):
            what += " (YAML indents with spaces, not tabs)"
        raise FormatError(f"{where}: not valid YAML: {what}") from None
    except yaml.YAMLError as exc:
        raise FormatError(f"{path}: not valid YAML: {' '.join(str(exc).split())[:200]}") from None
    except RecursionError:
        raise FormatError(f"{path}: nested too deeply to be a training config") from None
    lines: dict[tuple, int] = {}

    def walk(n: Any, prefix: tuple, depth: int = 0) -> None:
        if depth > 8:
            return
        if isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                key = k.value if isinstance(k, yaml.ScalarNode) else None
                lines[prefix + (key,)] = k.start_mark.line + 1
                walk(v, prefix + (key,), depth + 1)
        elif isinstance(n, yaml.SequenceNode):
            for i, v in enumerate(n.value):
                lines[prefix + (i,)] = v.start_mark.line + 1
                walk(v, prefix + (i,), depth + 1)

    walk(node, ())
    return doc, lines
