"""Orca's 16 system messages as data, and a seeded sampler that gives rows without one a message.

The messages (verbatim from the paper's Table 2, typos included) and which FLAN-v2
sub-collection uses which (the paper's Fig. 6) ship in ``orca_system_messages.json`` beside this
file. A row's sub-collection is its ``sub_collection`` field, else the prefix of its OpenOrca
``id`` (``niv.242684`` -> niv; also ``t0``, ``cot``, ``flan``). Flan2021 queries that look like
multiple choice (an ``Options:``/``Choose from`` list or lettered choices) get messages 8 or 10,
other Flan2021 queries 3, 4 or 7, as in the paper.

Only rows whose system prompt is empty are touched; a row whose sub-collection cannot be told is
left as it is and counted, so a run on data without ids shows ``unknown`` in its summary rather
than silently mixing messages.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import numpy as np

DATA_FILE = Path(__file__).with_name("orca_system_messages.json")
SUB_COLLECTIONS = ("cot", "niv", "t0", "flan")
_ALIASES = {"niv2": "niv", "niv": "niv", "t0": "t0", "cot": "cot", "flan": "flan", "flan2021": "flan"}
_PREFIX = re.compile(r"(niv2|niv|t0|cot|flan2021|flan)(?![a-z])")  # niv.1, t0_2, flan2021-3, cot, T0
_MULTIPLE_CHOICE = re.compile(
    r"(\b(options|choices|answer choices)\s*:|\bchoose (from|between|one)\b|\bpick (one|from)\b"
    r"|^\s*\(?[A-Ha-h][).:]\s+\S|^\s*-\s*\(?[A-Ha-h][).]\s)", re.IGNORECASE | re.MULTILINE)


@lru_cache(maxsize=1)
def orca_system_messages() -> dict[str, Any]:
    """The shipped table: ``messages`` (number -> text), ``sub_collections``, ``variants``, ``source``."""
    return json.loads(DATA_FILE.read_text(encoding="utf-8"))


def message(number: int) -> str:
    """System message ``number`` (1..16) of the paper; 1 is the empty message."""
    return orca_system_messages()["messages"][str(number)]


def sub_collection_of(row: dict[str, str]) -> str | None:
    """cot / niv / t0 / flan from the row's ``sub_collection`` field or its ``id`` prefix, else None."""
    for value in (row.get("sub_collection"), row.get("id")):
        if value:
            match = _PREFIX.match(value.strip().lower())
            if match:
                return _ALIASES[match.group(1)]
    return None


def is_multiple_choice(question: str) -> bool:
    """Heuristic: the query lists options (``Options:``, ``Choose from``, ``(A) ...`` lines)."""
    return bool(_MULTIPLE_CHOICE.search(question))


def candidates(sub_collection: str, question: str) -> list[int]:
    """The message numbers the paper uses for this sub-collection (and query, for Flan2021)."""
    entry = orca_system_messages()["sub_collections"][sub_collection]
    if sub_collection == "flan" and is_multiple_choice(question):
        return list(entry["multiple_choice_messages"])
    return list(entry["messages"])


def assign_system_messages(rows: Sequence[dict[str, str]], seed: int,
                           stream: int) -> tuple[list[dict[str, str]], dict[str, Any]]:
    """Give every row with an empty system prompt one of the messages of its sub-collection.

    Deterministic in (``seed``, ``stream``, row order): the trainer uses the stage index as the
    stream (and a separate one for eval data). Returns new rows and a summary for the run's log:
    how many rows were given a message, kept their own, or could not be routed, and the counts
    per sub-collection and per message number.
    """
    rng = np.random.default_rng([seed, stream, 0x0C4A])
    out: list[dict[str, str]] = []
    per_collection: Counter[str] = Counter()
    per_message: Counter[str] = Counter()
    kept = unknown = 0
    for row in rows:
        if row["system_prompt"].strip():
            kept += 1
            out.append(row)
            continue
        sub = sub_collection_of(row)
        if sub is None:
            unknown += 1
            out.append(row)
            continue
        choices = candidates(sub, row["question"])
        number = choices[int(rng.integers(len(choices)))]
        per_collection[sub] += 1
        per_message[str(number)] += 1
        out.append({**row, "system_prompt": message(number)})
    summary = {"seed": seed, "stream": stream, "assigned": sum(per_collection.values()), "kept_own": kept,
               "unknown_sub_collection": unknown, "per_sub_collection": dict(sorted(per_collection.items())),
               "per_message": dict(sorted(per_message.items(), key=lambda kv: int(kv[0])))}
    return out, summary
