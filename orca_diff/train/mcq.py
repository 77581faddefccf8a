"""Multiple-choice evaluation that scores: log-likelihood of each choice, accuracy per task.

Orca is judged on BBH and AGIEval. Here every question is put to the model in its training layout
(the run's template; the question as the user turn) and each choice is scored by the summed
log-probability of its tokens as the response (no eos); the highest wins. That is the
log-likelihood protocol of lm-evaluation-harness, not the papers' generate-and-parse protocol:
the numbers compare checkpoints of one run with each other, not with the papers' tables.

Files read (``--eval-mc FILE``, repeatable; ``builtin`` is a 12-question sample shipped with the
package: written for orca-diff, three tasks of four questions, not from either benchmark):

* **BBH** (``bbh/<task>.json``: ``{"examples": [{"input", "target"}]}``): choices are the
  ``(A)``, ``(B)`` … options listed in the input when it has them, else the task's distinct
  targets (``True``/``False``, ``valid``/``invalid`` …) when there are at most 16; free-form tasks
  (word_sorting, dyck_languages …) are skipped and named.
* **AGIEval** (``<task>.jsonl``: ``passage``, ``question``, ``options`` ``["(A)…", …]``,
  ``label`` ``"A"``): choices are the options; the passage precedes the question.
* **this project's layout** (JSON array or JSONL: ``task``, ``question``, ``choices``, ``answer``
  index).

The task is the file's stem for BBH and AGIEval, ``task`` for the last.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ..errors import FormatError, InputNotFoundError, require_extra
from . import data as orca_data
from .eval import _reshard

BUILTIN_NAME = "builtin"
BUILTIN_FILE = Path(__file__).with_name("mc_sample.json")
MAX_DISTINCT_TARGETS = 16
_OPTION = re.compile(r"^\(([A-Z])\)\s", re.MULTILINE)


@dataclass(frozen=True)
class Question:
    task: str
    prompt: str
    choices: tuple[str, ...]
    answer: int


def _load_json_or_jsonl(path: Path) -> Any:
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    try:
        if stripped.startswith(("[", "{")) and not path.suffix.lower() == ".jsonl":
            return json.loads(text)
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    except (ValueError, RecursionError) as exc:
        raise FormatError(f"{path}: not valid JSON/JSONL ({str(exc)[:120]})") from None


def read_questions(source: str) -> tuple[list[Question], list[str]]:
    """(questions, notes) of one ``--eval-mc`` source: a file, or ``builtin``."""
    path = BUILTIN_FILE if source == BUILTIN_NAME else Path(source)
    if not path.is_file():
        raise InputNotFoundError(f"--eval-mc {source}: no such file (a BBH task .json, an AGIEval .jsonl, or builtin)")
    doc = _load_json_or_jsonl(path)
    task = path.stem if source != BUILTIN_NAME else None
    try:
        if isinstance(doc, dict) and "examples" in doc:
            return _bbh(doc["examples"], task or path.stem, path)
        if isinstance(doc, list) and doc and isinstance(doc[0], dict) and "options" in doc[0]:
            return _agieval(doc, task or path.stem), []
        if isinstance(doc, list) and doc and isinstance(doc[0], dict) and "choices" in doc[0]:
            return [Question(str(r.get("task", task or path.stem)), str(r["question"]), tuple(map(str, r["choices"])),
                             int(r["answer"])) for r in doc], []
    except (KeyError, TypeError, ValueError) as exc:
        raise FormatError(f"{path}: a multiple-choice row lacks a field or has the wrong type ({exc})") from None
    raise FormatError(f"{path}: not a BBH task file ({{\"examples\": [...]}}), an AGIEval file (rows with options and"
                      f" label) or rows with task, question, choices, answer")


def _bbh(examples: list[dict[str, Any]], task: str, path: Path) -> tuple[list[Question], list[str]]:
    questions = []
    targets = sorted({str(e["target"]).strip() for e in examples})
    for e in examples:
        text, target = str(e["input"]), str(e["target"]).strip()
        letters = _OPTION.findall(text)
        if letters and re.fullmatch(r"\([A-Z]\)", target):
            choices = tuple(f"({c})" for c in letters)
        elif len(targets) <= MAX_DISTINCT_TARGETS:
            choices = tuple(targets)
        else:
            return [], [f"{task}: free-form answers ({len(targets)} distinct targets), not scored by log-likelihood"]
        if target not in choices:
            raise FormatError(f"{path}: target {target!r} is not among the choices {list(choices)}")
        questions.append(Question(task, text + "\nA:", choices, choices.index(target)))
    return questions, []


def _agieval(rows: list[dict[str, Any]], task: str) -> list[Question]:
    out = []
    for r in rows:
        options = [str(o) for o in r["options"]]
        label = r["label"][0] if isinstance(r["label"], list) else r["label"]
        letters = [re.match(r"\(?([A-Z])\)?", o).group(1) if re.match(r"\(?([A-Z])\)?", o) else "" for o in options]
        passage = f"{r['passage']}\n\n" if r.get("passage") else ""
        prompt = f"{passage}Q: {r['question']}\nAnswer Choices: {' '.join(options)}\nA: Among A through" \
                 f" {letters[-1] if letters else 'E'}, the answer is"
        out.append(Question(task, prompt, tuple(f" ({c})" for c in letters), letters.index(str(label).strip())))
    return out


def score(model: Any, tokenizer: Any, questions: Sequence[Question], device: Any, template: str = "orca",
          max_seq_len: int = 2048, autocast_bf16: bool = False) -> dict[str, Any]:
    """Accuracy per task (and the mean over tasks) of ``model``; every rank must call it under FSDP."""
    torch = require_extra("torch", "train", "Scoring multiple-choice questions")
    was_training = model.training
    model.eval()
    per_task: dict[str, list[int]] = {}
    picks: list[int] = []
    try:
        with torch.no_grad():
            for q in questions:
                rows = [{"system_prompt": "", "question": q.prompt, "response": c} for c in q.choices]
                examples, _ = orca_data.encode_examples(rows, tokenizer, max_seq_len + 1, template=template)
                if len(examples) != len(q.choices):
                    raise FormatError(f"{q.task}: a question does not fit max_seq_len={max_seq_len}")
                # The choice's tokens are the targets; the eos the encoder appends is not part of the choice.
                trimmed = [orca_data.Example(e.input_ids[:-1], e.prompt_len) for e in examples]
                batch = orca_data.collate(trimmed, [[i] for i in range(len(trimmed))], tokenizer.pad_token_id or 0)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast_bf16):
                    logits = model(input_ids=batch["input_ids"].to(device),
                                   position_ids=batch["position_ids"].to(device), use_cache=False).logits
                labels = batch["labels"][:, 1:].to(device)
                logp = torch.log_softmax(logits[:, :-1, :].float(), dim=-1)
                picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
                totals = (picked * (labels != orca_data.IGNORE_INDEX)).sum(dim=1)
                picks.append(int(totals.argmax()))
                per_task.setdefault(q.task, []).append(int(picks[-1] == q.answer))
    finally:
        model.train(was_training)
        _reshard(model)
    tasks = {t: {"accuracy": sum(v) / len(v), "questions": len(v)} for t, v in sorted(per_task.items())}
    mean = sum(t["accuracy"] for t in tasks.values()) / len(tasks) if tasks else None
    return {"tasks": tasks, "mean_accuracy": mean, "picked": picks}


def read_all(sources: Sequence[str]) -> tuple[list[Question], list[str]]:
    questions: list[Question] = []
    notes: list[str] = []
    for source in sources:
        q, n = read_questions(source)
        questions += q
        notes += n
    return questions, notes


def score_folder(model_dir: str | Path, sources: Sequence[str], template: str = "orca", max_seq_len: int = 2048,
                 device: str = "cpu", tokenizer: str | None = None) -> dict[str, Any]:
    """:func:`score` of a saved HF folder (fp32) on ``--eval-mc`` sources."""
    torch = require_extra("torch", "train", "Scoring multiple-choice questions")
    transformers = require_extra("transformers", "train", "Scoring multiple-choice questions")
    from .loop import from_pretrained_dtype_kwarg, load_pretrained_model, load_pretrained_tokenizer

    questions, notes = read_all(sources)
    tok = load_pretrained_tokenizer(transformers, str(tokenizer or model_dir))
    model = load_pretrained_model(transformers, str(model_dir),
                                  {from_pretrained_dtype_kwarg(transformers): torch.float32}).to(device)
    return {**score(model, tok, questions, torch.device(device), template, max_seq_len), "notes": notes,
            "sources": list(sources)}
