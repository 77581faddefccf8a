"""Orca-format rows -> token rows for training: prompt template, loss mask, packing.

An Orca example is a triplet ``system_prompt`` / ``question`` / ``response`` (the column names of
the OpenOrca data). It becomes one token sequence::

    <bos>### System:
    {system_prompt}

    ### User:
    {question}

    ### Response:
    {response}<eos>

The ``### System:`` block is left out when the system prompt is empty. The Orca paper does not
publish its exact template; this one is the orca_mini-style layout most open replications use.
The prompt and the response are tokenized *separately* and concatenated, so the boundary between
them is exact (no token straddles it) and the label mask is exact too.

The trained model ships this layout as its chat template (:data:`ORCA_CHAT_TEMPLATE`), so that
``tokenizer.apply_chat_template(messages, add_generation_prompt=True)`` on the saved folder gives
exactly the training prompt. ``template="base"`` trains with the base tokenizer's own chat
template instead (prompt = the rendering with ``add_generation_prompt``, response = what the
rendering of the full conversation adds to it).

Guarantees (tested in tests/test_train.py):

* **Loss only on the response.** ``labels`` are ``-100`` on every prompt token and on padding;
  the response tokens and the closing ``<eos>`` are the targets. The first token of every example
  is never a target, so the last token of one packed example is never trained to predict the
  first token of the next.
* **No attention across packed examples.** Several examples share one row of at most
  ``max_seq_len`` tokens; ``position_ids`` restart at 0 at every example and at the padding tail,
  and no ``attention_mask`` is passed. transformers (>= 4.53, ``masking_utils``) turns restarting
  position ids into a block-diagonal causal mask for the ``sdpa``/``eager``/``flex`` kernels, and
  ``flash_attention_2`` turns them into variable-length sequences, so a token attends only to
  earlier tokens of its own example, and RoPE sees the same positions as if each example were
  alone. ``flash_attention_2`` only reads boundaries from ``position_ids`` when the batch size is
  1, so with that kernel the trainer flattens each micro-batch into one row (``collate(...,
  flatten=True)``, like transformers' ``DataCollatorWithFlattening``). The packed loss equals the
  unpacked loss up to float rounding (the test checks sdpa and eager, packed and flattened, and
  that *not* restarting positions would change it; flash-attention is not tested: no GPU in CI).

Memory: token ids are kept as one small numpy array per example (uint16 when the vocabulary fits,
as LLaMA's 32,001 does), not Python lists, so millions of examples fit in host memory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from ..errors import FormatError, InputNotFoundError, UsageError, require_extra

IGNORE_INDEX = -100
REQUIRED_COLUMNS = ("question", "response")
OPTIONAL_COLUMNS = ("system_prompt",)
# Kept when present: OpenOrca's ``id`` (its prefix niv/t0/cot/flan names the FLAN sub-collection)
# or an explicit ``sub_collection``; used by --system-messages orca, never by the template.
ROUTING_COLUMNS = ("id", "sub_collection")


# ---------------------------------------------------------------------------------------------
# Reading rows
# ---------------------------------------------------------------------------------------------

def _check_row(row: Any, where: str) -> dict[str, str]:
    if not isinstance(row, dict):
        raise FormatError(f"{where}: expected a JSON object with question/response, found {type(row).__name__}")
    missing = [c for c in REQUIRED_COLUMNS if c not in row]
    if missing:
        raise FormatError(
            f"{where}: missing column(s) {', '.join(missing)}; Orca rows need system_prompt (optional),"
            f" question and response (the OpenOrca column names)"
        )
    out = {}
    for col in REQUIRED_COLUMNS + OPTIONAL_COLUMNS:
        value = row.get(col) or ""
        if not isinstance(value, str):
            raise FormatError(f"{where}: column {col} must be a string, found {type(value).__name__}")
        out[col] = value
    for col in ROUTING_COLUMNS:
        if row.get(col) not in (None, ""):
            out[col] = str(row[col])
    return out


def read_orca_rows(path: str | Path) -> list[dict[str, str]]:
    """Read Orca rows from a ``.jsonl`` (one JSON object per line) or ``.parquet`` file.

    Parquet needs pyarrow (part of the ``train`` extra). ``id`` and ``sub_collection`` are kept
    when present (as strings); other columns are ignored.
    """
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"training data {path} does not exist (expected a .jsonl or .parquet file)")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        pq = require_extra("pyarrow.parquet", "train", f"Reading parquet training data {path}")
        table = pq.read_table(path)
        missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
        if missing:
            raise FormatError(
                f"{path}: missing column(s) {', '.join(missing)}; found {', '.join(table.column_names)}"
            )
        keep = [c for c in REQUIRED_COLUMNS + OPTIONAL_COLUMNS + ROUTING_COLUMNS if c in table.column_names]
        return [_check_row(r, f"{path} row {i}") for i, r in enumerate(table.select(keep).to_pylist())]
    if suffix in (".jsonl", ".json"):
        rows = []
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise FormatError(f"{path}:{lineno}: not valid JSON ({exc.msg}); expected one object per line") from None
                rows.append(_check_row(obj, f"{path}:{lineno}"))
        return rows
    raise UsageError(f"training data {path}: unknown extension {suffix!r}; use .jsonl or .parquet")


# ---------------------------------------------------------------------------------------------
# Template and tokenization
# ---------------------------------------------------------------------------------------------

def render_prompt(system_prompt: str, question: str) -> str:
    """The prompt part of the template: everything the model conditions on, nothing it learns."""
    system = f"### System:\n{system_prompt}\n\n" if system_prompt.strip() else ""
    return f"{system}### User:\n{question}\n\n### Response:\n"


# The same layout as a Jinja chat template, written into the trained model's tokenizer files
# (transformers 5 saves it as chat_template.jinja). With one system and one user message and
# add_generation_prompt=True it renders exactly ``bos_token + render_prompt(system, question)``
# (tested); an assistant message renders as ``### Response:\n{content}{eos_token}``. Training
# only ever saw single-turn conversations, so later turns follow the same pattern untrained.
ORCA_CHAT_TEMPLATE = (
    "{%- if bos_token %}{{ bos_token }}{% endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}"
    "{%- if message['content'].strip() %}{{ '### System:\\n' + message['content'] + '\\n\\n' }}{% endif %}"
    "{%- elif message['role'] == 'user' %}{{ '### User:\\n' + message['content'] + '\\n\\n' }}"
    "{%- elif message['role'] == 'assistant' %}{{ '### Response:\\n' + message['content'] }}"
    "{%- if eos_token %}{{ eos_token }}{% endif %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}"
)


def _chat_text(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    return text if isinstance(text, str) else text[0]


def render_with_base_template(tokenizer: Any, system_prompt: str, question: str, response: str) -> tuple[str, str]:
    """(prompt, response) texts under the base tokenizer's own chat template.

    The prompt is the rendering of [system?, user] with ``add_generation_prompt=True``; the
    response is what rendering [system?, user, assistant] adds after it (for most templates the
    content and an end-of-turn token). An empty system prompt sends no system message, so a
    template's own default system prompt applies.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise UsageError("--template base: the base tokenizer has no chat template; use --template orca")
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt.strip() else []) \
        + [{"role": "user", "content": question}]
    prompt = _chat_text(tokenizer, messages, True)
    full = _chat_text(tokenizer, messages + [{"role": "assistant", "content": response}], False)
    if not full.startswith(prompt):
        raise UsageError("--template base: the base chat template renders the conversation with the answer"
                         " differently from the prompt alone, so the prompt/response boundary is not exact;"
                         " use --template orca")
    return prompt, full[len(prompt):]


@dataclass(frozen=True)
class Example:
    """One tokenized example: ``input_ids[:prompt_len]`` is the prompt, the rest the response."""

    input_ids: np.ndarray
    prompt_len: int

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def labels(self) -> np.ndarray:
        labels = self.input_ids.astype(np.int64)
        labels[: max(self.prompt_len, 1)] = IGNORE_INDEX  # the first token is never a target
        return labels

    @property
    def n_targets(self) -> int:
        return len(self.input_ids) - max(self.prompt_len, 1)


def _id_dtype(tokenizer: Any) -> type:
    return np.uint16 if len(tokenizer) <= np.iinfo(np.uint16).max + 1 else np.int32


def encode_examples(rows: Sequence[dict[str, str]], tokenizer: Any, max_seq_len: int,
                    batch_size: int = 1024, template: str = "orca") -> tuple[list[Example], int]:
    """Tokenize rows with the template; return (examples, number dropped).

    ``template="orca"``: ``<bos>`` + the ``### System/User/Response`` prompt, then the response
    and ``<eos>``. ``template="base"``: the base tokenizer's chat template renders both parts
    (it places bos itself); ``<eos>`` is appended only when the rendered response has none.
    An example longer than ``max_seq_len`` is truncated from the end of its response; one whose
    prompt alone fills the window (no target left) is dropped and counted.
    """
    if tokenizer.eos_token_id is None:
        raise UsageError("the tokenizer has no eos token; the response must end with one so the model learns to stop")
    if template not in ("orca", "base"):
        raise UsageError(f"unknown template {template!r}; use orca or base")
    bos = [tokenizer.bos_token_id] if (tokenizer.bos_token_id is not None and template == "orca") else []
    eos = tokenizer.eos_token_id
    dtype = _id_dtype(tokenizer)
    examples: list[Example] = []
    dropped = 0
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        if template == "orca":
            prompt_texts = [render_prompt(r["system_prompt"], r["question"]) for r in chunk]
            response_texts = [r["response"] for r in chunk]
        else:
            pairs = [render_with_base_template(tokenizer, r["system_prompt"], r["question"], r["response"])
                     for r in chunk]
            prompt_texts, response_texts = [p for p, _ in pairs], [r for _, r in pairs]
        prompts = tokenizer(prompt_texts, add_special_tokens=False)["input_ids"]
        responses = tokenizer(response_texts, add_special_tokens=False)["input_ids"]
        for p, r in zip(prompts, responses):
            prompt = bos + list(p)
            response = list(r) if (template == "base" and eos in r) else list(r) + [eos]
            ids = (prompt + response)[:max_seq_len]
            if len(ids) <= len(prompt):
                dropped += 1
                continue
            examples.append(Example(np.asarray(ids, dtype=dtype), len(prompt)))
    return examples, dropped


# ---------------------------------------------------------------------------------------------
# Packing and collation
# ---------------------------------------------------------------------------------------------

def pack_greedy(lengths: Sequence[int], max_seq_len: int) -> list[list[int]]:
    """Group example indices, in the given order, into rows of at most ``max_seq_len`` tokens.

    Orca shuffles the examples and then partitions them into groups whose concatenation fits
    ``max_len``; shuffling is the caller's job, this keeps the order it is given.
    """
    rows: list[list[int]] = []
    current: list[int] = []
    used = 0
    for i, n in enumerate(lengths):
        if n > max_seq_len:
            raise UsageError(f"example {i} has {n} tokens, more than max_seq_len={max_seq_len}; encode with the same max_seq_len")
        if current and used + n > max_seq_len:
            rows.append(current)
            current, used = [], 0
        current.append(i)
        used += n
    if current:
        rows.append(current)
    return rows


def one_per_row(n: int) -> list[list[int]]:
    """The unpacked layout: every example alone in its row (padding fills the rest)."""
    return [[i] for i in range(n)]


def collate(examples: Sequence[Example], rows: Iterable[Sequence[int]], pad_token_id: int,
            restart_positions: bool = True, flatten: bool = False) -> dict[str, Any]:
    """Build a batch of rows: ``input_ids``, ``labels``, ``position_ids`` (torch int64 tensors).

    Rows are right-padded to the longest row of the batch with ``pad_token_id`` (label -100); the
    padding tail gets its own restarting positions, so it is a separate segment that no real token
    attends to. ``restart_positions=False`` numbers positions straight through a row; it exists only
    so the tests can show that the restart is what stops leakage.
    ``flatten=True`` concatenates all rows into a single unpadded row (batch size 1), the layout
    transformers' ``flash_attention_2`` needs to see example boundaries in ``position_ids`` (it
    only looks for them when the batch size is 1).
    Also returns ``n_tokens`` (real tokens) and ``n_targets`` (response tokens) as ints.
    """
    torch = require_extra("torch", "train", "Collating training batches")
    rows = [list(r) for r in rows]
    if flatten:
        rows = [[i for r in rows for i in r]]
    lengths = [sum(len(examples[i]) for i in r) for r in rows]
    width = max(lengths)
    ids = np.full((len(rows), width), pad_token_id, dtype=np.int64)
    labels = np.full((len(rows), width), IGNORE_INDEX, dtype=np.int64)
    positions = np.zeros((len(rows), width), dtype=np.int64)
    n_targets = 0
    for b, row in enumerate(rows):
        at = 0
        for i in row:
            ex = examples[i]
            n = len(ex)
            ids[b, at:at + n] = ex.input_ids
            labels[b, at:at + n] = ex.labels
            positions[b, at:at + n] = np.arange(n) if restart_positions else np.arange(at, at + n)
            n_targets += ex.n_targets
            at += n
        pad = width - at
        positions[b, at:] = np.arange(pad) if restart_positions else np.arange(at, width)
    return {
        "input_ids": torch.from_numpy(ids),
        "labels": torch.from_numpy(labels),
        "position_ids": torch.from_numpy(positions),
        "n_tokens": int(sum(lengths)),
        "n_targets": n_targets,
    }


def response_loss_sum(logits: Any, labels: Any) -> Any:
    """Summed next-token cross-entropy over the target (label != -100) positions, in float32.

    A sum rather than a mean so that gradient accumulation and data parallelism can divide by the
    number of targets of the whole optimizer step, which makes the step independent of how the
    examples were split into rows, micro-batches and ranks.
    """
    torch = require_extra("torch", "train", "Computing the training loss")
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:].to(shift_logits.device)
    return torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX, reduction="sum",
    )
