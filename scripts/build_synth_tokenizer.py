"""Build orca_diff/synth_tokenizer.json: the small real tokenizer the synthetic models carry.

A byte-level BPE (any text can be tokenised: no unknown token is ever needed) of 1,024 ids,
trained with the ``tokenizers`` library on text shipped with the project (the synthetic Orca
sample and Orca's 16 system messages), with ``<unk>`` = 0, ``<s>`` = 1, ``</s>`` = 2 as LLaMA has
them. Merges are listed in the order the trainer made them, so merge k produces id 259 + k and a
prefix of the merges is itself a valid tokenizer: :func:`orca_diff.synth.tokenizer_json` cuts it
to a model's vocabulary without the ``tokenizers`` library. Deterministic: the same inputs give
the same file (tests/test_train_demo_model.py rebuilds it and compares).

    python scripts/build_synth_tokenizer.py [--check]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "orca_diff" / "synth_tokenizer.json"
VOCAB = 1024


def corpus() -> list[str]:
    rows = [json.loads(line) for line in (ROOT / "examples" / "orca_sample.jsonl").read_text("utf-8").splitlines()
            if line.strip()]
    texts = [f"### System:\n{r['system_prompt']}\n\n### User:\n{r['question']}\n\n### Response:\n{r['response']}"
             for r in rows]
    messages = json.loads((ROOT / "orca_diff" / "train" / "orca_system_messages.json").read_text("utf-8"))
    texts += [text for _, text in sorted(messages["messages"].items(), key=lambda kv: int(kv[0])) if text]
    return texts


def build() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=1)
    tok.train_from_iterator(corpus(), trainer)
    return json.dumps(json.loads(tok.to_str()), indent=1, ensure_ascii=False, sort_keys=True) + "\n"


if __name__ == "__main__":
    text = build()
    if "--check" in sys.argv[1:]:
        sys.exit(0 if OUT.read_text("utf-8") == text else "orca_diff/synth_tokenizer.json is not what this builds")
    OUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUT} ({len(text):,} bytes)")
