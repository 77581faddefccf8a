"""Training data files -> conversation rows, whatever layout the dataset was published in.

Every row becomes ``{"system_prompt", "question", "response"}`` (the OpenOrca column names: the
first user turn and the first assistant turn) plus, for a longer conversation, ``more_turns``: a
list of ``[user, assistant]`` pairs, each of whose assistant turns is trained on too. Formats
(``data_format``, ``--format``; ``auto`` tells them apart from the first row's keys):

======== ================================================================ ======================
format   a row                                                            published as
======== ================================================================ ======================
orca     ``system_prompt`` (optional), ``question``, ``response``        OpenOrca
sharegpt ``conversations``: ``[{"from": "system"|"human"|"gpt", "value"}]`` SlimOrca, ShareGPT
alpaca   ``instruction``, ``input`` (optional), ``output``                Alpaca, Dolly-style
messages ``messages``: ``[{"role": "system"|"user"|"assistant", "content"}]`` OpenAI fine-tuning
======== ================================================================ ======================

Files: ``.jsonl`` (one object per line), ``.json`` (a JSON array of objects, or JSON Lines),
``.parquet``. ``columns`` maps other column names onto the orca ones (``{question: prompt,
response: completion}``).

Bounds (issue 20.7): a row (a JSONL line, the text of a parquet or JSON-array row) may be at most
``max_row_bytes`` (16 MiB by default; Orca's rows are a few KB), checked *before* it is parsed,
so a 200 MB line is refused naming the file and line instead of costing gigabytes. A JSON array
file is parsed whole, so it is bounded too (:data:`MAX_JSON_ARRAY_BYTES`; use JSONL beyond).
Text that is not UTF-8, numbers of thousands of digits, deep nesting and lone surrogates are
refused with the file and line. A row whose response (any assistant turn) is empty or null is
dropped and counted per file (``empty_responses: drop``), or refused (``refuse``): an empty
target teaches the model to stop at once.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from ..errors import FormatError, InputNotFoundError, UsageError, require_extra, shown
from .schema import DATA_FORMATS, MAX_ROW_BYTES

MAX_JSON_ARRAY_BYTES = 1 << 30
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "model": "assistant"}
ROUTING_COLUMNS = ("id", "sub_collection")  # kept for --system-messages orca


@dataclass
class FileReport:
    """What one data file held: its layout, usable rows, rows dropped for an empty response, digest."""

    path: str
    format: str = ""
    rows: int = 0
    dropped_empty: int = 0
    turns: int = 0                      # assistant turns trained on (rows + extra turns)
    sha256: str = ""
    problems: list[str] = field(default_factory=list)


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Raw records, with a bounded cost each
# ---------------------------------------------------------------------------------------------

def _decode_json(data: bytes, where: str) -> Any:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FormatError(f"{where}: not UTF-8 text (byte {exc.start} of the row); save the file as UTF-8") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise FormatError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    except RecursionError:
        raise FormatError(f"{where}: JSON nested too deeply to be a training row") from None
    except ValueError as exc:  # e.g. an integer of more than 4,300 digits
        raise FormatError(f"{where}: not a usable JSON row ({str(exc)[:100]})") from None


def _jsonl_records(path: Path, max_row_bytes: int) -> Iterator[tuple[str, Any]]:
    with open(path, "rb") as f:
        lineno = 0
        while True:
            line = f.readline(max_row_bytes + 1)
            if not line:
                return
            lineno += 1
            where = f"{path}:{lineno}"
            if len(line) > max_row_bytes and not line.endswith(b"\n"):
                raise FormatError(f"{where}: a row of more than {max_row_bytes:,} bytes (max_row_bytes); split it"
                                  f" or raise max_row_bytes")
            if line.strip():
                yield where, _decode_json(line, where)


def _json_array_records(path: Path) -> Iterator[tuple[str, Any]]:
    size = path.stat().st_size
    if size > MAX_JSON_ARRAY_BYTES:
        raise FormatError(f"{path}: a JSON array of {size:,} bytes is parsed whole; above {MAX_JSON_ARRAY_BYTES:,}"
                          f" write it as JSON Lines (.jsonl, one row per line)")
    doc = _decode_json(path.read_bytes(), str(path))
    if not isinstance(doc, list):
        raise FormatError(f"{path}: expected a JSON array of rows (or one JSON object per line), found"
                          f" {type(doc).__name__}")
    for i, obj in enumerate(doc):
        yield f"{path} row {i + 1}", obj


def _parquet_records(path: Path) -> Iterator[tuple[str, Any]]:
    pq = require_extra("pyarrow.parquet", "train", f"Reading parquet training data {path}")
    import pyarrow

    try:
        pf = pq.ParquetFile(path)
        n = 0
        for batch in pf.iter_batches(batch_size=1024):
            for obj in batch.to_pylist():
                n += 1
                yield f"{path} row {n}", obj
    except (pyarrow.ArrowException, OSError) as exc:
        raise FormatError(f"{path}: not a readable parquet file ({' '.join(str(exc).split())[:160]})") from None


def _records(path: Path, max_row_bytes: int) -> Iterator[tuple[str, Any]]:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        yield from _parquet_records(path)
    elif suffix == ".jsonl":
        yield from _jsonl_records(path, max_row_bytes)
    elif suffix == ".json":
        with open(path, "rb") as f:
            head = f.read(4096).lstrip()
        yield from (_json_array_records(path) if head.startswith(b"[") else _jsonl_records(path, max_row_bytes))
    else:
        raise UsageError(f"training data {path}: unknown extension {suffix!r}; use .jsonl, .json or .parquet")


# ---------------------------------------------------------------------------------------------
# One record -> one conversation row
# ---------------------------------------------------------------------------------------------

def detect_format(obj: Any, where: str, columns: dict[str, str] | None) -> str:
    if columns:
        return "orca"
    if isinstance(obj, dict):
        keys = set(obj)
        if "messages" in keys:
            return "messages"
        if "conversations" in keys:
            return "sharegpt"
        if {"instruction", "output"} <= keys:
            return "alpaca"
        if keys & {"question", "response"}:
            return "orca"
        found = ", ".join(sorted(map(str, keys))[:12])
    else:
        found = type(obj).__name__
    raise FormatError(f"{where}: cannot tell the data format from the columns ({found}); known: orca"
                      f" (question, response, system_prompt), sharegpt (conversations), alpaca (instruction, input,"
                      f" output), messages; name yours with --format or map columns with --columns"
                      f" question=COL,response=COL")


def _text(value: Any, where: str, column: str, optional: bool = False) -> str | None:
    """A text field: a string that is valid Unicode, or None (absent / null)."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise FormatError(f"{where}: {column} must be a string, found {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise FormatError(f"{where}: {column} holds a lone surrogate ({shown(value[exc.start])}) at character"
                          f" {exc.start}; the text is not valid Unicode") from None
    return value


def _turns_from_roles(messages: list[tuple[str, Any]], where: str) -> tuple[str, list[list[Any]]]:
    """(system prompt, [[user, assistant], ...]) from (role, content) pairs."""
    system = ""
    turns: list[list[Any]] = []
    pending: Any = None
    for i, (role, content) in enumerate(messages):
        spot = f"{where} turn {i + 1}"
        if role == "system":
            if turns or pending is not None:
                raise FormatError(f"{spot}: a system message after the conversation started is not supported")
            system = _text(content, spot, "system message") or ""
        elif role == "user":
            if pending is not None:
                raise FormatError(f"{spot}: two user turns in a row; turns must alternate user, assistant")
            pending = _text(content, spot, "user turn") or ""
        elif role == "assistant":
            if pending is None:
                raise FormatError(f"{spot}: an assistant turn with no user turn before it")
            turns.append([pending, _text(content, spot, "assistant turn")])
            pending = None
        else:
            raise FormatError(f"{spot}: role {shown(repr(role))[:40]} is not supported (system, user, assistant)")
    return system, turns  # a trailing user turn has no answer to learn: left out


def _content(value: Any, where: str) -> Any:
    """OpenAI content: a string, or a list of {"type": "text", "text": ...} parts."""
    if isinstance(value, list):
        parts = []
        for part in value:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise FormatError(f"{where}: only text content parts are supported")
            parts.append(part["text"])
        return "".join(parts)
    return value


def to_row(obj: Any, fmt: str, where: str, columns: dict[str, str] | None) -> dict[str, Any]:
    """One conversation row (response None/empty when the record has an empty answer)."""
    if not isinstance(obj, dict):
        raise FormatError(f"{where}: expected a JSON object, found {type(obj).__name__}")
    if fmt == "orca":
        names = {"system_prompt": "system_prompt", "question": "question", "response": "response", **(columns or {})}
        missing = [names[c] for c in ("question", "response") if names[c] not in obj]
        if missing:
            raise FormatError(f"{where}: missing column(s) {', '.join(missing)} of the orca format (system_prompt,"
                              f" question, response); found {', '.join(sorted(map(str, obj))[:12])}; use --format or"
                              f" --columns question=COL,response=COL")
        system = _text(obj.get(names["system_prompt"]), where, names["system_prompt"]) or ""
        turns = [[_text(obj[names["question"]], where, names["question"]) or "",
                  _text(obj[names["response"]], where, names["response"])]]
    elif fmt == "alpaca":
        if "instruction" not in obj or "output" not in obj:
            raise FormatError(f"{where}: the alpaca format needs instruction and output (input optional)")
        instruction = _text(obj["instruction"], where, "instruction") or ""
        extra = _text(obj.get("input"), where, "input") or ""
        system = ""
        turns = [[instruction + (f"\n\n{extra}" if extra.strip() else ""), _text(obj["output"], where, "output")]]
    elif fmt in ("sharegpt", "messages"):
        key, role_key, content_key = ("conversations", "from", "value") if fmt == "sharegpt" \
            else ("messages", "role", "content")
        msgs = obj.get(key)
        if not isinstance(msgs, list):
            raise FormatError(f"{where}: {key} must be a list of turns")
        pairs = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or role_key not in m:
                raise FormatError(f"{where} turn {i + 1}: expected an object with {role_key} and {content_key}")
            role = SHAREGPT_ROLES.get(m[role_key], m[role_key]) if fmt == "sharegpt" else m[role_key]
            content = _content(m.get(content_key), f"{where} turn {i + 1}") if fmt == "messages" else m.get(content_key)
            pairs.append((role, content))
        system, turns = _turns_from_roles(pairs, where)
        if not turns:
            turns = [["", None]]  # no answered turn: counted as an empty response
    else:
        raise UsageError(f"unknown data format {fmt!r}; use one of {', '.join(DATA_FORMATS)}")
    row: dict[str, Any] = {"system_prompt": system, "question": turns[0][0], "response": turns[0][1]}
    if len(turns) > 1:
        row["more_turns"] = turns[1:]
    for col in ROUTING_COLUMNS:
        if obj.get(col) not in (None, "") and isinstance(obj.get(col), (str, int)):
            row[col] = str(obj[col])
    return row


def _is_empty(text: Any) -> bool:
    return text is None or not str(text).strip()


def read_rows(path: str | Path, data_format: str = "auto", columns: dict[str, str] | None = None,
              empty_responses: str = "drop", max_row_bytes: int = MAX_ROW_BYTES,
              keep_rows: bool = True) -> tuple[list[dict[str, Any]], FileReport]:
    """The conversation rows of one file and what it held; the first malformed row raises FormatError."""
    path = Path(path)
    if not path.exists():
        raise InputNotFoundError(f"training data {path} does not exist (expected a .jsonl, .json or .parquet file)")
    if not path.is_file():
        raise InputNotFoundError(f"training data {path} is not a file")
    report = FileReport(str(path), data_format)
    rows: list[dict[str, Any]] = []
    fmt = None if data_format == "auto" else data_format
    try:
        for where, obj in _records(path, max_row_bytes):
            if fmt is None:
                fmt = report.format = detect_format(obj, where, columns)
            if not isinstance(obj, dict):
                raise FormatError(f"{where}: expected a JSON object, found {type(obj).__name__}")
            if path.suffix.lower() != ".jsonl":  # JSONL lines were bounded before parsing
                size = sum(len(v.encode("utf-8", "surrogatepass")) for v in _strings(obj))
                if size > max_row_bytes:
                    raise FormatError(f"{where}: a row of more than {max_row_bytes:,} bytes of text (max_row_bytes)")
            row = to_row(obj, fmt, where, columns)
            answers = [row["response"]] + [t[1] for t in row.get("more_turns", [])]
            if any(_is_empty(a) for a in answers):
                if empty_responses == "refuse":
                    raise FormatError(f"{where}: an empty or null response; fix the row, or drop such rows with"
                                      f" empty_responses: drop")
                report.dropped_empty += 1
                continue
            report.rows += 1
            report.turns += len(answers)
            if keep_rows:
                rows.append(row)
    except OSError as exc:
        raise InputNotFoundError(f"training data {path}: cannot be read ({exc.strerror or exc})") from None
    return rows, report


def _strings(obj: Any, depth: int = 0) -> Iterator[str]:
    if depth > 20:
        return
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _strings(v, depth + 1)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v, depth + 1)
