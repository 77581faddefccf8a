"""Specification of the Orca training entrypoint (orca_diff.train and orca_diff.cli.train).

Everything runs on the CPU in seconds: a word-level tokenizer built in the test from the
project's synthetic sample (examples/orca_sample.jsonl), and a 2-layer LLaMA with random weights.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")  # the `train` extra; CI installs it (see .ci/run)
transformers = pytest.importorskip("transformers")
from click.testing import CliRunner  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers, trainers  # noqa: E402

from orca_diff.errors import FormatError, MissingExtraError, UsageError  # noqa: E402
from orca_diff.train import (MODEL_DIRNAME, Stage, TrainConfig, load_config, lr_at,  # noqa: E402
                             response_loss, train)
from orca_diff.train import data as orca_data  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "examples" / "orca_sample.jsonl"
STAGES_YAML = ROOT / "examples" / "train_stages.yaml"


# ---------------------------------------------------------------------------------------------
# Fixtures: a tokenizer and a base model made here, no download
# ---------------------------------------------------------------------------------------------

def make_tokenizer(rows: list[dict[str, str]]) -> "transformers.PreTrainedTokenizerFast":
    """A word-level tokenizer over the sample's words, with bos/eos/unk but (like LLaMA) no pad."""
    texts = [orca_data.render_prompt(r["system_prompt"], r["question"]) + r["response"] for r in rows]
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=["<unk>", "<s>", "</s>"]))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                unk_token="<unk>")


def tiny_llama(vocab_size: int, seed: int = 0, **config) -> "transformers.LlamaForCausalLM":
    cfg = transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=48, intermediate_size=96,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=512, bos_token_id=1, eos_token_id=2, **config)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core CI box they lose a lot."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def rows() -> list[dict[str, str]]:
    return orca_data.read_orca_rows(SAMPLE)


@pytest.fixture(scope="module")
def tokenizer(rows):
    return make_tokenizer(rows)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, tokenizer) -> Path:
    """A BF16 base folder (safetensors + tokenizer), as a LLaMA release converted to HF would be."""
    folder = tmp_path_factory.mktemp("base")
    tiny_llama(len(tokenizer)).to(torch.bfloat16).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def quick_config(base_dir: Path, out: Path, **kw) -> TrainConfig:
    values = dict(model=str(base_dir), out=str(out), stages=[Stage(data=[str(SAMPLE)], max_steps=6, lr=3e-3)],
                  max_seq_len=128, micro_batch_size=2, grad_accum=2, quiet=True)
    values.update(kw)
    return TrainConfig(**values)


def records(out: Path, kind: str = "train") -> list[dict]:
    return [r for r in map(json.loads, (out / "train_log.jsonl").read_text().splitlines()) if r["kind"] == kind]


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in records(out)]


# ---------------------------------------------------------------------------------------------
# Data: template, mask, packing
# ---------------------------------------------------------------------------------------------

def test_sample_file_has_orca_columns(rows):
    assert len(rows) >= 30
    assert all(set(r) == {"system_prompt", "question", "response"} for r in rows)
    assert any(r["system_prompt"] == "" for r in rows) and any(r["system_prompt"] for r in rows)


def test_template_puts_system_message_first_and_omits_an_empty_one():
    assert orca_data.render_prompt("Be brief.", "Why?") == "### System:\nBe brief.\n\n### User:\nWhy?\n\n### Response:\n"
    assert orca_data.render_prompt("", "Why?") == "### User:\nWhy?\n\n### Response:\n"


def test_labels_are_minus_100_on_prompt_and_response_tokens_elsewhere(rows, tokenizer):
    (ex,), dropped = orca_data.encode_examples(rows[:1], tokenizer, 512)
    assert dropped == 0
    response = tokenizer(rows[0]["response"], add_special_tokens=False)["input_ids"]
    assert ex.input_ids[0] == tokenizer.bos_token_id and ex.input_ids[-1] == tokenizer.eos_token_id
    assert (ex.labels[: ex.prompt_len] == -100).all()
    assert ex.labels[ex.prompt_len:].tolist() == response + [tokenizer.eos_token_id]
    assert ex.n_targets == len(response) + 1


def test_too_long_examples_are_truncated_and_prompt_only_ones_dropped(rows, tokenizer):
    (ex,), _ = orca_data.encode_examples(rows[:1], tokenizer, 512)
    kept, dropped = orca_data.encode_examples(rows[:1], tokenizer, ex.prompt_len + 3)
    assert dropped == 0 and len(kept[0]) == ex.prompt_len + 3 and kept[0].n_targets == 3
    assert orca_data.encode_examples(rows[:1], tokenizer, ex.prompt_len) == ([], 1)


def test_pack_greedy_keeps_order_and_never_exceeds_max_len():
    packed = orca_data.pack_greedy([5, 4, 3, 9, 1, 10], 10)
    assert packed == [[0, 1], [2], [3, 4], [5]]
    with pytest.raises(UsageError, match="max_seq_len"):
        orca_data.pack_greedy([11], 10)


def test_collate_restarts_positions_per_example_and_for_padding(rows, tokenizer):
    examples, _ = orca_data.encode_examples(rows[:3], tokenizer, 512)
    a, b, c = (len(e) for e in examples)
    batch = orca_data.collate(examples, [[0, 1], [2]], pad_token_id=99)
    width = a + b
    assert batch["input_ids"].shape == (2, width)
    pos = batch["position_ids"]
    assert pos[0].tolist() == list(range(a)) + list(range(b))
    assert pos[1].tolist() == list(range(c)) + list(range(width - c))
    assert (batch["input_ids"][1, c:] == 99).all() and (batch["labels"][1, c:] == -100).all()
    assert batch["labels"][0, a] == -100  # the next example's first token is never a target
    assert batch["n_targets"] == sum(e.n_targets for e in examples)
    assert int((batch["labels"] != -100).sum()) == batch["n_targets"]


def test_reading_rejects_rows_without_response(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"system_prompt": "", "question": "q"}) + "\n")
    with pytest.raises(FormatError, match=r"bad.jsonl:1: missing column\(s\) response"):
        orca_data.read_orca_rows(bad)


def test_parquet_rows_read_like_jsonl(tmp_path, rows):
    pa = pytest.importorskip("pyarrow")  # optional: parquet input needs pyarrow (the train extra)
    import pyarrow.parquet as pq

    path = tmp_path / "sample.parquet"
    pq.write_table(pa.Table.from_pylist([{**r, "id": f"niv.{i}", "other": 1} for i, r in enumerate(rows)]), path)
    assert orca_data.read_orca_rows(path) == [{**r, "id": f"niv.{i}"} for i, r in enumerate(rows)]


def test_parquet_without_pyarrow_names_the_extra(tmp_path, monkeypatch):
    path = tmp_path / "x.parquet"
    path.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(MissingExtraError, match=r"orca-diff\[train\]"):
        orca_data.read_orca_rows(path)


# ---------------------------------------------------------------------------------------------
# Loss: masking, packing equivalence
# ---------------------------------------------------------------------------------------------

def test_prompt_tokens_are_never_targets_so_changing_them_leaves_the_loss_unchanged(rows, tokenizer):
    """With the model's outputs fixed, rewriting every prompt token does not move the loss, and no
    gradient reaches the logits that predict prompt tokens. (Through attention the prompt is of
    course still context for the response; that is the point of conditioning on it.)"""
    examples, _ = orca_data.encode_examples(rows[:4], tokenizer, 512)
    batch = orca_data.collate(examples, [[0], [1], [2], [3]], pad_token_id=0)
    model = tiny_llama(len(tokenizer))
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits.detach().requires_grad_()
    loss = orca_data.response_loss_sum(logits, batch["labels"])

    rng = np.random.default_rng(0)
    changed = [orca_data.Example(np.concatenate([rng.integers(3, len(tokenizer), e.prompt_len).astype(e.input_ids.dtype),
                                                 e.input_ids[e.prompt_len:]]), e.prompt_len) for e in examples]
    changed_batch = orca_data.collate(changed, [[0], [1], [2], [3]], pad_token_id=0)
    assert not torch.equal(changed_batch["input_ids"], batch["input_ids"])
    assert torch.equal(orca_data.response_loss_sum(logits, changed_batch["labels"]), loss)

    loss.backward()
    predicts_target = torch.zeros_like(batch["labels"], dtype=torch.bool)
    predicts_target[:, :-1] = batch["labels"][:, 1:] != -100
    grad_rows = logits.grad.abs().sum(-1)
    assert (grad_rows[~predicts_target] == 0).all()
    assert (grad_rows[predicts_target] > 0).all()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_and_unpacked_batches_give_the_same_loss(rows, tokenizer, attn):
    """Packing must not let an example see another: same summed loss as one example per row
    (float32, relative tolerance 1e-5), and numbering positions straight through would differ."""
    examples, _ = orca_data.encode_examples(rows[:8], tokenizer, 512)
    model = tiny_llama(len(tokenizer))
    model.config._attn_implementation = attn

    def loss_of(layout, restart=True, flatten=False):
        batch = orca_data.collate(examples, layout, pad_token_id=0, restart_positions=restart, flatten=flatten)
        assert batch["input_ids"].shape[0] == (1 if flatten else len(layout))
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        return orca_data.response_loss_sum(logits, batch["labels"]), batch["n_targets"]

    packed_rows = orca_data.pack_greedy([len(e) for e in examples], 4 * max(len(e) for e in examples))
    assert any(len(r) > 1 for r in packed_rows)
    unpacked, n1 = loss_of(orca_data.one_per_row(len(examples)))
    packed, n2 = loss_of(packed_rows)
    assert n1 == n2
    torch.testing.assert_close(packed, unpacked, rtol=1e-5, atol=1e-4)
    flattened, n3 = loss_of(packed_rows, flatten=True)  # one unpadded row: the flash-attention layout
    assert n3 == n1
    torch.testing.assert_close(flattened, unpacked, rtol=1e-5, atol=1e-4)
    leaky, _ = loss_of(packed_rows, restart=False)
    agreement, leak = abs(float(packed) - float(unpacked)), abs(float(leaky) - float(unpacked))
    agreement = max(agreement, abs(float(flattened) - float(unpacked)))
    print(f"{attn}: |packed or flattened - unpacked| = {agreement:.2e}, without position restart {leak:.2e} (sum {float(unpacked):.2f})")
    assert leak > 1e-2 and leak > 100 * agreement


def test_lr_schedule_warms_up_linearly_then_decays_by_cosine_towards_the_floor():
    lrs = [lr_at(s, 10, 1.0, 2, 0.1) for s in range(10)]
    assert lrs[:2] == [0.5, 1.0]
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))
    assert lrs[-1] > 0.1 and lr_at(10, 10, 1.0, 2, 0.1) == pytest.approx(0.1)  # the floor comes after the last step


# ---------------------------------------------------------------------------------------------
# The training loop
# ---------------------------------------------------------------------------------------------

def test_training_lowers_the_response_loss(base_dir, tmp_path):
    cfg = quick_config(base_dir, tmp_path / "run", stages=[Stage(data=[str(SAMPLE)], max_steps=24, lr=1e-2)],
                       warmup_steps=3, grad_accum=1)
    before = response_loss(base_dir, [str(SAMPLE)], max_seq_len=128)
    model_dir = train(cfg)
    after = response_loss(model_dir, [str(SAMPLE)], max_seq_len=128)
    log = losses(tmp_path / "run")
    print(f"response loss before {before:.4f} after {after:.4f}; first step {log[0]:.4f} last step {log[-1]:.4f}")
    assert len(log) == 24
    assert after < 0.7 * before
    assert np.mean(log[-5:]) < 0.8 * np.mean(log[:5])


def test_missing_pad_token_is_added_and_embeddings_grow_by_one_row(base_dir, tmp_path, tokenizer):
    model_dir = train(quick_config(base_dir, tmp_path / "run", stages=[Stage(data=[str(SAMPLE)], max_steps=1)]))
    config = json.loads((model_dir / "config.json").read_text())
    assert config["vocab_size"] == len(tokenizer) + 1
    assert config["pad_token_id"] == len(tokenizer)
    saved_tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    assert saved_tok.pad_token == "[PAD]" and saved_tok.pad_token_id == len(tokenizer)
    from safetensors import safe_open

    (shard,) = model_dir.glob("*.safetensors")
    with safe_open(shard, "pt") as f:
        embed = f.get_tensor("model.embed_tokens.weight")
        assert embed.shape[0] == len(tokenizer) + 1 and f.get_tensor("lm_head.weight").shape[0] == len(tokenizer) + 1
        assert embed.dtype == torch.bfloat16  # the base's dtype
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"


def test_progressive_stages_run_in_order_with_their_own_learning_rates(base_dir, tmp_path):
    cfg = quick_config(base_dir, tmp_path / "run", stages=[Stage(data=[str(SAMPLE)], max_steps=3, lr=1e-3),
                                                           Stage(data=[str(SAMPLE)], max_steps=2, lr=5e-4)])
    train(cfg)
    log = records(tmp_path / "run")
    assert [(r["stage"], r["step"]) for r in log] == [(1, 1), (1, 2), (1, 3), (2, 1), (2, 2)]
    assert log[0]["lr"] == 1e-3 and log[3]["lr"] == 5e-4
    assert all(r["tokens_per_s"] > 0 and r["tokens"] >= r["targets"] > 0 for r in log)


def test_gradient_accumulation_matches_one_big_batch(base_dir, tmp_path):
    """4 rows as 1 micro-batch of 4, or 4 micro-batches of 1: the same step (token-mean loss).

    Same logged loss to float32 rounding; same weights to 1e-5 absolute, i.e. 1% of what one
    lr=1e-3 Adam step moves an element (Adam divides by sqrt(v), which magnifies the rounding
    differences of near-zero gradients)."""
    one = train(quick_config(base_dir, tmp_path / "a", micro_batch_size=4, grad_accum=1,
                             stages=[Stage(data=[str(SAMPLE)], max_steps=2, lr=1e-3)], save_dtype="F32"))
    acc = train(quick_config(base_dir, tmp_path / "b", micro_batch_size=1, grad_accum=4,
                             stages=[Stage(data=[str(SAMPLE)], max_steps=2, lr=1e-3)], save_dtype="F32"))
    from safetensors.torch import load_file

    a, b = load_file(next(one.glob("*.safetensors"))), load_file(next(acc.glob("*.safetensors")))
    np.testing.assert_allclose(losses(tmp_path / "a"), losses(tmp_path / "b"), rtol=1e-6)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-5)


def test_gradient_checkpointing_gives_the_same_losses(base_dir, tmp_path):
    stages = [Stage(data=[str(SAMPLE)], max_steps=2, lr=1e-3)]
    train(quick_config(base_dir, tmp_path / "a", stages=stages))
    train(quick_config(base_dir, tmp_path / "b", stages=stages, gradient_checkpointing=True))
    np.testing.assert_allclose(losses(tmp_path / "a"), losses(tmp_path / "b"), rtol=1e-5)


def test_an_interrupted_run_resumes_to_the_same_weights(base_dir, tmp_path):
    """Stopped twice mid-stage (AdamW state restored each time) and resumed: the same losses and
    bit-identical weights as the uninterrupted run."""
    stages = [Stage(data=[str(SAMPLE)], max_steps=3, lr=2e-3), Stage(data=[str(SAMPLE)], max_steps=2, lr=1e-3)]
    small = dict(stages=stages, save_dtype="F32", micro_batch_size=1, grad_accum=2)
    straight = train(quick_config(base_dir, tmp_path / "straight", **small))
    out = tmp_path / "interrupted"
    ckpt = train(quick_config(base_dir, out, save_every=2, stop_after_steps=2, **small))
    assert ckpt.name == "step-00000002" and not (out / MODEL_DIRNAME).exists()
    in_progress_changed = [Stage(data=[str(SAMPLE)], max_steps=4, lr=2e-3), stages[1]]
    with pytest.raises(UsageError, match=r"different stages\[0\]\.max_steps"):
        train(quick_config(base_dir, out, resume=True, **{**small, "stages": in_progress_changed}))
    again = train(quick_config(base_dir, out, save_every=2, stop_after_steps=2, resume=True, **small))
    assert again.name == "step-00000004"  # 2 more steps: stage 1 done, stopped inside stage 2
    resumed = train(quick_config(base_dir, out, save_every=2, resume=True, **small))
    assert losses(out) == losses(tmp_path / "straight")
    from safetensors.torch import load_file

    a, b = load_file(next(straight.glob("*.safetensors"))), load_file(next(resumed.glob("*.safetensors")))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert len(list((out / "checkpoints").glob("step-*"))) <= 2


@pytest.mark.slow
def test_two_process_fsdp_run_matches_one_process_with_the_same_global_batch(base_dir, tmp_path):
    """torchrun + FSDP2 (gloo on CPU): the same rows per step split over 2 ranks give the same
    losses and, to float32 rounding of the reduction, the same weights as one process; the
    held-out evaluation, split over the ranks, gives the same numbers too."""
    import subprocess

    args = ["--model", str(base_dir), "--data", str(SAMPLE), "--max-steps", "3", "--lr", "1e-3",
            "--max-seq-len", "128", "--micro-batch-size", "1", "--save-dtype", "F32", "--eval", str(SAMPLE), "-q"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "orca_diff.cli", "train", *args, "--grad-accum", "2", "--out", str(tmp_path / "fsdp")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = train(quick_config(base_dir, tmp_path / "one", micro_batch_size=1, grad_accum=4, save_dtype="F32",
                                stages=[Stage(data=[str(SAMPLE)], max_steps=3, lr=1e-3, name="orca_sample")],
                                eval_data=[str(SAMPLE)]))
    np.testing.assert_allclose(losses(tmp_path / "fsdp"), losses(tmp_path / "one"), rtol=1e-6)
    evals = [[(r["global_step"], r["targets"], r["loss"]) for r in records(tmp_path / run, "eval")] for run in ("fsdp", "one")]
    assert [e[:2] for e in evals[0]] == [e[:2] for e in evals[1]] == [(0, evals[1][0][1]), (3, evals[1][0][1])]
    np.testing.assert_allclose([e[2] for e in evals[0]], [e[2] for e in evals[1]], rtol=1e-5)
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "fsdp" / "model" / "model.safetensors"), load_file(next(single.glob("*.safetensors")))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-5)


@pytest.mark.slow
def test_ctrl_c_under_torchrun_checkpoints_every_rank_and_the_same_command_resumes(base_dir, tmp_path):
    """Ctrl-C in a terminal signals torchrun's process group; its agent forwards one SIGINT to
    each worker (they run in their own groups) and SIGKILLs them 30 s later. Every rank finishes
    its step, they agree on it, write one checkpoint and exit; the same command then resumes and
    logs every step exactly once."""
    import os
    import signal
    import subprocess

    out = tmp_path / "run"
    args = ["--model", str(base_dir), "--data", str(SAMPLE), "--max-steps", "60", "--lr", "1e-3",
            "--max-seq-len", "128", "--micro-batch-size", "1", "--grad-accum", "2", "--save-dtype", "F32", "-q",
            "--out", str(out)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "orca_diff.cli", "train", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                            start_new_session=True)  # its own process group, as a terminal's foreground job
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if (out / "train_log.jsonl").exists() and len(records(out)) >= 3:
                break
            time.sleep(0.1)
        assert proc.poll() is None, "the run ended before it could be interrupted"
        os.killpg(proc.pid, signal.SIGINT)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0
    assert output.count("interrupted after global step") == 2, output[-3000:]  # both ranks, the same step
    steps = sorted(int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("step-*") if p.is_dir())
    assert steps and 3 <= steps[-1] < 60, steps
    assert f"global step {steps[-1]};" in output
    assert not (out / "model").exists()  # nothing presented as a trained model
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["global_step"] for r in records(out)] == list(range(1, 61))
    assert (out / "model" / "model.safetensors").exists()


# ---------------------------------------------------------------------------------------------
# Config file and CLI
# ---------------------------------------------------------------------------------------------

def test_example_stage_file_loads_with_paths_relative_to_it(tmp_path):
    cfg = load_config(STAGES_YAML, model="m", out=str(tmp_path))
    assert [s.name for s in cfg.stages] == ["chatgpt", "gpt4"]
    assert all(Path(d) == SAMPLE for s in cfg.stages for d in s.data)
    assert cfg.stages[0].lr > cfg.stages[1].lr


def test_config_rejects_unknown_settings(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"model": "m", "out": "o", "stages": [{"data": "x.jsonl"}], "learning_rate": 1}))
    with pytest.raises(UsageError, match="unknown setting.*learning_rate"):
        load_config(path)


def _cli():
    from orca_diff.cli.train import COMMANDS

    (command,) = COMMANDS
    return command


def test_cli_help_documents_a_progressive_run():
    result = CliRunner().invoke(_cli(), ["--help"])
    assert result.exit_code == 0
    assert "--data flan5m-chatgpt.parquet --data flan1m-gpt4.parquet" in result.output
    assert "torchrun --nproc_per_node 8" in result.output and "--resume" in result.output


def test_cli_runs_the_example_stage_file(base_dir, tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(_cli(), ["--config", str(STAGES_YAML), "--model", str(base_dir), "--out", str(out),
                                         "--save-every", "0", "-q"])
    assert result.exit_code == 0, result.output
    assert (out / "model" / "config.json").is_file()
    assert {r["stage"] for r in records(out)} == {1, 2}


def test_cli_refuses_stage_flags_without_data_with_a_usage_error(tmp_path):
    from orca_diff.cli import cli

    result = CliRunner().invoke(cli, ["train", "--config", str(STAGES_YAML), "--model", "m", "--out", str(tmp_path),
                                      "--lr", "1e-5"])
    assert result.exit_code == UsageError.exit_code
    assert "set them per stage" in result.output


# ---------------------------------------------------------------------------------------------
# End to end: train -> make -> apply -> verify
# ---------------------------------------------------------------------------------------------

def test_train_then_make_apply_verify_rebuilds_the_trained_folder_byte_for_byte(base_dir, tmp_path):
    from orca_diff.apply import apply_diff
    from orca_diff.verify import verify_model

    out = tmp_path / "run"
    model_dir = train(quick_config(base_dir, out, stages=[Stage(data=[str(SAMPLE)], max_steps=3, lr=1e-3)],
                                   make_diff_against=str(base_dir)))
    diff = out / "diff"
    assert (diff / "orca-diff.json").is_file()
    rebuilt = tmp_path / "rebuilt"
    apply_diff(base_dir, diff, rebuilt, progress=False)
    verify_model(rebuilt, diff, progress=False)
    trained = sorted(p.relative_to(model_dir) for p in model_dir.rglob("*") if p.is_file())
    for rel in trained:
        assert (rebuilt / rel).read_bytes() == (model_dir / rel).read_bytes(), rel
