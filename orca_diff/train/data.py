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

from ..errors import UsageError, require_extra
from .readers import read_rows
from .schema import MAX_ROW_BYTES

IGNORE_INDEX = -100


# ---------------------------------------------------------------------------------------------
# Reading rows (the formats and bounds live in readers.py)
# ---------------------------------------------------------------------------------------------

def read_orca_rows(path: str | Path, data_format: str = "auto", columns: dict[str, str] | None = None,
                   empty_responses: str = "drop", max_row_bytes: int = MAX_ROW_BYTES) -> list[dict[str, Any]]:
    """The conversation rows of a ``.jsonl``, ``.json`` or ``.parquet`` file (see :mod:`.readers`).

    Each row has ``system_prompt``, ``question`` and ``response`` (and ``more_turns`` for a longer
    conversation; ``id`` and ``sub_collection`` when present). Rows with an empty response are
    dropped (``empty_responses="drop"``; :func:`.readers.read_rows` also returns the count).
    """
    return read_rows(path, data_format, columns, empty_responses, max_row_bytes)[0]


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


def _chat_text(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool,
               chat_template: str | None = None) -> str:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                         **({"chat_template": chat_template} if chat_template else {}))
    return text if isinstance(text, str) else text[0]


# Chat-template presets (``--template chatml|llama2``). ChatML is the layout Orca 2 shipped
# (``<|im_start|>role\n...<|im_end|>``); the Llama-2 chat layout wraps each user turn in
# ``[INST] ... [/INST]`` with the system message in ``<<SYS>>`` inside the first. An empty system
# message is left out, as in the orca layout.
CHATML_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] != 'system' or message['content'].strip() %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA2_CHAT_TEMPLATE = (
    "{%- set ns = namespace(system='') %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}{%- set ns.system = message['content'] %}"
    "{%- elif message['role'] == 'user' %}{{ bos_token + '[INST] ' }}"
    "{%- if ns.system.strip() %}{{ '<<SYS>>\\n' + ns.system + '\\n<</SYS>>\\n\\n' }}{%- set ns.system = '' %}"
    "{%- endif %}{{ message['content'] + ' [/INST]' }}"
    "{%- elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + ' ' + eos_token }}"
    "{%- endif %}"
    "{%- endfor %}"
)
PRESET_TEMPLATES = {"chatml": CHATML_CHAT_TEMPLATE, "llama2": LLAMA2_CHAT_TEMPLATE}
#: Tokens that end an assistant turn in a preset, besides eos (ChatML: <|im_end|>, when the tokenizer has it).
END_OF_TURN_TOKENS = {"chatml": ("<|im_end|>",)}
TEMPLATES = ("orca", "chatml", "llama2", "base")


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
    """One tokenized example: ``input_ids[:prompt_len]`` is the prompt, the rest the response.

    A multi-turn conversation also has ``target_mask``: True on the tokens of every assistant turn
    (the loss is on all of them), False on the system message and the user turns.
    """

    input_ids: np.ndarray
    prompt_len: int
    target_mask: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def labels(self) -> np.ndarray:
        labels = self.input_ids.astype(np.int64)
        if self.target_mask is not None:
            labels[~self.target_mask] = IGNORE_INDEX
            labels[0] = IGNORE_INDEX
            return labels
        labels[: max(self.prompt_len, 1)] = IGNORE_INDEX  # the first token is never a target
        return labels

    @property
    def n_targets(self) -> int:
        if self.target_mask is not None:
            return int(self.target_mask[1:].sum())
        return len(self.input_ids) - max(self.prompt_len, 1)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Example) and self.prompt_len == other.prompt_len \
            and np.array_equal(self.input_ids, other.input_ids) \
            and (self.target_mask is None) == (other.target_mask is None) \
            and (self.target_mask is None or np.array_equal(self.target_mask, other.target_mask))


def _id_dtype(tokenizer: Any) -> type:
    return np.uint16 if len(tokenizer) <= np.iinfo(np.uint16).max + 1 else np.int32


def turns_of(row: dict[str, Any]) -> list[tuple[str, str]]:
    """[(user, assistant), ...] of a row: the first turn, then ``more_turns``."""
    return [(row["question"], row["response"])] + [(u, a) for u, a in row.get("more_turns", [])]


def orca_segments(system_prompt: str, turns: list[tuple[str, str]]) -> list[tuple[str, bool]]:
    """(text, is_target) pieces of a conversation under the orca layout (bos and eos are added as ids)."""
    pieces: list[tuple[str, bool]] = []
    for k, (user, answer) in enumerate(turns):
        prompt = render_prompt(system_prompt, user) if k == 0 else f"### User:\n{user}\n\n### Response:\n"
        pieces += [(prompt, False), (answer, True)]
    return pieces


def template_segments(tokenizer: Any, chat_template: str | None, system_prompt: str,
                      turns: list[tuple[str, str]]) -> list[tuple[str, bool]]:
    """(text, is_target) pieces of a conversation rendered by a chat template, turn by turn.

    Each prompt piece is what rendering up to the k-th user turn with ``add_generation_prompt``
    adds to the rendering up to the previous answer; each target piece is what the k-th answer
    adds after that. A template that renders a conversation differently from its own prefixes has
    no exact prompt/response boundary and is refused.
    """
    messages = [{"role": "system", "content": system_prompt}] if system_prompt.strip() else []
    pieces: list[tuple[str, bool]] = []
    done = ""
    for user, answer in turns:
        messages.append({"role": "user", "content": user})
        prompt = _chat_text(tokenizer, messages, True, chat_template)
        messages.append({"role": "assistant", "content": answer})
        full = _chat_text(tokenizer, messages, False, chat_template)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise UsageError("the chat template renders the conversation with the answer differently from the prompt"
                             " alone, so the prompt/response boundary is not exact; use --template orca")
        pieces += [(prompt[len(done):], False), (full[len(prompt):], True)]
        done = full
    return pieces


def template_source(tokenizer: Any, template: str) -> str | None:
    """The Jinja chat template a ``template`` choice trains with (None: the orca layout, built from ids)."""
    if template == "orca":
        return None
    if template == "base":
        if not getattr(tokenizer, "chat_template", None):
            raise UsageError("--template base: the base tokenizer has no chat template; use --template orca")
        return tokenizer.chat_template
    return PRESET_TEMPLATES[template]


def encode_examples(rows: Sequence[dict[str, Any]], tokenizer: Any, max_seq_len: int,
                    batch_size: int = 1024, template: str = "orca",
                    prompt_erasure: bool = False) -> tuple[list[Example], int]:
    """Tokenize rows with the template; return (examples, number dropped).

    ``template="orca"``: ``<bos>`` + the ``### System/User/Response`` prompt, then the response
    and ``<eos>`` (each further turn: ``### User/Response`` and its answer + ``<eos>``).
    ``base``/``chatml``/``llama2``: a chat template renders every piece (it places bos itself);
    ``<eos>`` is appended to an answer only when its rendering has no end-of-turn token.
    ``prompt_erasure`` (Orca 2): the system message is left out of what the student sees.
    An example longer than ``max_seq_len`` is truncated from the end; one with no target token
    left is dropped and counted.
    """
    if tokenizer.eos_token_id is None:
        raise UsageError("the tokenizer has no eos token; the response must end with one so the model learns to stop")
    if template not in TEMPLATES:
        raise UsageError(f"unknown template {template!r}; use one of {', '.join(TEMPLATES)}")
    source = template_source(tokenizer, template)
    bos = [tokenizer.bos_token_id] if (tokenizer.bos_token_id is not None and source is None) else []
    eos = tokenizer.eos_token_id
    ends = {eos} | {i for i in (tokenizer.convert_tokens_to_ids(t) for t in END_OF_TURN_TOKENS.get(template, ()))
                    if isinstance(i, int) and i != tokenizer.unk_token_id}
    dtype = _id_dtype(tokenizer)
    examples: list[Example] = []
    dropped = 0
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        pieces_per_row = []
        for r in chunk:
            system = "" if prompt_erasure else r["system_prompt"]
            pieces_per_row.append(orca_segments(system, turns_of(r)) if source is None
                                  else template_segments(tokenizer, source, system, turns_of(r)))
        flat = [text for pieces in pieces_per_row for text, _ in pieces]
        ids_flat = iter(tokenizer(flat, add_special_tokens=False)["input_ids"]) if flat else iter(())
        for pieces in pieces_per_row:
            ids: list[int] = list(bos)
            mask: list[bool] = [False] * len(bos)
            for _, is_target in pieces:
                piece = list(next(ids_flat))
                if is_target and (source is None or not ends.intersection(piece)):
                    piece.append(eos)
                ids += piece
                mask += [is_target] * len(piece)
            ids, mask = ids[:max_seq_len], mask[:max_seq_len]
            if not any(mask[1:]):
                dropped += 1
                continue
            if len(pieces) == 2:  # one turn: the boundary alone says what is a target
                examples.append(Example(np.asarray(ids, dtype=dtype), mask.index(True)))
            else:
                examples.append(Example(np.asarray(ids, dtype=dtype), mask.index(True), np.asarray(mask, dtype=bool)))
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
