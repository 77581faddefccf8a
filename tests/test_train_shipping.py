"""Issue 15, "training that ships exactly what it trained": the saved folder, the schedule, resuming.

Each test names the defect it pins down; all run on the CPU in seconds with the tiny generated
models of tests/test_train.py.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from click.testing import CliRunner  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from test_train import (SAMPLE, STAGES_YAML, base_dir, losses, make_tokenizer, one_torch_thread,  # noqa: E402,F401
                        quick_config, records, rows, tiny_llama, tokenizer)

from orca_diff.errors import InterruptedError_  # noqa: E402
from orca_diff.train import MODEL_DIRNAME, Stage, lr_at, train  # noqa: E402
from orca_diff.train import data as orca_data  # noqa: E402


def _header_len(path: Path) -> int:
    return struct.unpack("<Q", path.read_bytes()[:8])[0]


def _cli():
    from orca_diff.cli.train import COMMANDS

    (command,) = COMMANDS
    return command


# ---------------------------------------------------------------------------------------------
# 1. Tied embeddings stay tied
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tied_base(tmp_path_factory, tokenizer) -> Path:
    """A BF16 base with tie_word_embeddings, like SmolLM2 or Llama-3.2-1B: no lm_head.weight on disk."""
    folder = tmp_path_factory.mktemp("tied-base")
    model = tiny_llama(len(tokenizer), tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model.to(torch.bfloat16).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_a_tied_model_is_saved_tied_one_matrix_on_disk_and_tied_on_reload(tied_base, tmp_path, tokenizer):
    (base_file,) = tied_base.glob("*.safetensors")
    with safe_open(base_file, "pt") as f:
        assert "lm_head.weight" not in f.keys()
    model_dir = train(quick_config(tied_base, tmp_path / "run", stages=[Stage(data=[str(SAMPLE)], max_steps=2)]))
    (shard,) = model_dir.glob("*.safetensors")
    with safe_open(shard, "pt") as f:
        assert "lm_head.weight" not in f.keys()
        assert f.get_tensor("model.embed_tokens.weight").shape[0] == len(tokenizer) + 1  # the added [PAD] row
    config = json.loads((model_dir / "config.json").read_text())
    assert config["tie_word_embeddings"] is True
    # Same size as the base plus one bf16 row of the embedding (and whatever the JSON header grew by).
    hidden = config["hidden_size"]
    grown = shard.stat().st_size - base_file.stat().st_size
    assert grown == hidden * 2 + (_header_len(shard) - _header_len(base_file))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight


def test_a_tied_model_checkpoints_the_shared_matrix_once_and_resumes_to_the_same_weights(tied_base, tmp_path):
    small = dict(stages=[Stage(data=[str(SAMPLE)], max_steps=3, lr=2e-3)], save_dtype="F32", micro_batch_size=1)
    straight = train(quick_config(tied_base, tmp_path / "straight", **small))
    out = tmp_path / "stopped"
    ckpt = train(quick_config(tied_base, out, stop_after_steps=2, **small))
    tree = json.loads((ckpt / "tree.json").read_text())
    keys = [k for k, _ in dict(tree["dict"])["model"]["dict"]]
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys
    embed = dict(dict(tree["dict"])["model"]["dict"])["model.embed_tokens.weight"]["tensor"]
    with safe_open(ckpt / "rank-00000-of-00001.safetensors", "pt") as f:  # the shared matrix: one tensor, once
        same_shape = [k for k in f.keys() if f.get_slice(k).get_shape() == f.get_slice(embed).get_shape()]
    assert len(same_shape) == 3  # the weight and AdamW's two moments of it, nothing under lm_head
    resumed = train(quick_config(tied_base, out, **small))
    a, b = load_file(next(straight.glob("*.safetensors"))), load_file(next(resumed.glob("*.safetensors")))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_an_untied_model_keeps_its_separate_lm_head(base_dir, tmp_path):
    model_dir = train(quick_config(base_dir, tmp_path / "run", stages=[Stage(data=[str(SAMPLE)], max_steps=1)]))
    with safe_open(next(model_dir.glob("*.safetensors")), "pt") as f:
        assert "lm_head.weight" in f.keys()
    assert not json.loads((model_dir / "config.json").read_text()).get("tie_word_embeddings", False)


# ---------------------------------------------------------------------------------------------
# 2. The chat template shipped is the one trained on
# ---------------------------------------------------------------------------------------------

def test_the_saved_chat_template_reproduces_the_training_prompt_exactly(base_dir, tmp_path, rows):
    model_dir = train(quick_config(base_dir, tmp_path / "run", stages=[Stage(data=[str(SAMPLE)], max_steps=1)]))
    assert (model_dir / "chat_template.jinja").is_file() or \
        "chat_template" in json.loads((model_dir / "tokenizer_config.json").read_text())
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    with_system = next(r for r in rows if r["system_prompt"])
    without_system = next(r for r in rows if not r["system_prompt"])
    for row in (with_system, without_system):
        messages = [{"role": "system", "content": row["system_prompt"]}, {"role": "user", "content": row["question"]}]
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert text == tok.bos_token + orca_data.render_prompt(row["system_prompt"], row["question"])
        (example,), _ = orca_data.encode_examples([row], tok, 512)
        ids = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        assert list(ids) == example.input_ids[:example.prompt_len].tolist()
        full = tok.apply_chat_template(messages + [{"role": "assistant", "content": row["response"]}], tokenize=False)
        assert full == text + row["response"] + tok.eos_token
    user_only = tok.apply_chat_template([{"role": "user", "content": "Why?"}], tokenize=False, add_generation_prompt=True)
    assert user_only == tok.bos_token + "### User:\nWhy?\n\n### Response:\n"


CHATML = ("{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
          "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}")


def test_template_base_trains_with_and_ships_the_bases_own_chat_template(tmp_path, rows):
    tok = make_tokenizer(rows)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML
    base = tmp_path / "chatml-base"
    tiny_llama(len(tok)).save_pretrained(base)
    tok.save_pretrained(base)
    row = next(r for r in rows if r["system_prompt"])
    (example,), _ = orca_data.encode_examples([row], tok, 512, template="base")
    messages = [{"role": "system", "content": row["system_prompt"]}, {"role": "user", "content": row["question"]}]
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert example.input_ids[:example.prompt_len].tolist() == tok(prompt, add_special_tokens=False)["input_ids"]
    assert example.input_ids[-1] == tok.eos_token_id  # the rendered turn had no eos: it is appended
    model_dir = train(quick_config(base, tmp_path / "run", template="base",
                                   stages=[Stage(data=[str(SAMPLE)], max_steps=1)]))
    assert transformers.AutoTokenizer.from_pretrained(model_dir).chat_template == CHATML


def test_template_base_refuses_a_tokenizer_without_chat_template(rows, tokenizer):
    from orca_diff.errors import UsageError

    with pytest.raises(UsageError, match="no chat template"):
        orca_data.encode_examples(rows[:1], tokenizer, 512, template="base")


# ---------------------------------------------------------------------------------------------
# 3. Every step trains at a non-zero learning rate
# ---------------------------------------------------------------------------------------------

def test_no_step_has_a_zero_learning_rate_even_the_last_with_min_lr_ratio_0():
    for total in range(1, 12):
        for warmup in (0, 1, total):
            assert all(lr_at(s, total, 1e-3, min(warmup, total), 0.0) > 0 for s in range(total)), (total, warmup)
    assert [lr_at(s, 2, 1.0, 0, 0.0) for s in range(2)] == [1.0, pytest.approx(0.5)]


def test_with_max_steps_2_both_steps_move_the_weights(base_dir, tmp_path):
    stages = [Stage(data=[str(SAMPLE)], max_steps=2, lr=1e-3)]
    out = tmp_path / "run"
    after_one = train(quick_config(base_dir, out, stages=stages, save_dtype="F32", stop_after_steps=1))
    assert after_one.name == "step-00000001"
    from orca_diff.train.checkpoints import load_checkpoint

    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model.resize_token_embeddings(model.get_input_embeddings().weight.shape[0] + 1)
    load_checkpoint(after_one, model, None)
    one_step = {k: v.clone() for k, v in model.state_dict().items()}
    model_dir = train(quick_config(base_dir, out, stages=stages, save_dtype="F32"))
    two_steps = load_file(next(model_dir.glob("*.safetensors")))
    assert [r["lr"] > 0 for r in records(out)] == [True, True]
    moved = max(float((two_steps[k] - one_step[k]).abs().max()) for k in two_steps)
    assert moved > 1e-5


# ---------------------------------------------------------------------------------------------
# 4. Resuming: paths resolved, and the interrupted message is true
# ---------------------------------------------------------------------------------------------

def test_a_run_continues_from_another_directory_with_the_config_given_by_absolute_path(tmp_path, base_dir, monkeypatch):
    """Started as `--config stages.yaml` from the config's folder and stopped; the same run given
    as `/abs/path/stages.yaml` from elsewhere, without --resume, continues it."""
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(SAMPLE, project / "orca_sample.jsonl")
    shutil.copy(STAGES_YAML, project / "stages.yaml")
    out = tmp_path / "runs" / "demo"
    args = ["--model", str(base_dir), "--out", str(out), "--max-seq-len", "128", "--save-every", "0", "-q"]
    monkeypatch.chdir(project)
    first = CliRunner().invoke(_cli(), ["--config", "stages.yaml", *args, "--stop-after-steps", "3"])
    assert first.exit_code == 0, first.output
    state = json.loads(next((out / "checkpoints").glob("step-*/state.json")).read_text())
    assert all(Path(d).is_absolute() for s in state["config"]["stages"] for d in s["data"])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    second = CliRunner().invoke(_cli(), ["--config", str(project / "stages.yaml"), *args])
    assert second.exit_code == 0, second.output
    steps = [r["global_step"] for r in records(out)]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) > 3
    assert (out / MODEL_DIRNAME / "config.json").is_file()


def test_ctrl_c_checkpoints_and_the_same_command_then_continues_to_the_same_weights(base_dir, tmp_path):
    small = dict(stages=[Stage(data=[str(SAMPLE)], max_steps=4, lr=2e-3)], save_dtype="F32", micro_batch_size=1)
    straight = train(quick_config(base_dir, tmp_path / "straight", **small))
    out = tmp_path / "interrupted"

    def press_ctrl_c(record):
        if record["kind"] == "train" and record["global_step"] == 2:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(InterruptedError_, match="Run the same command again") as info:
        train(quick_config(base_dir, out, **small), on_step=press_ctrl_c)
    assert "step-00000002" in str(info.value) and (out / "checkpoints" / "step-00000002").is_dir()
    resumed = train(quick_config(base_dir, out, **small))  # the same call, no resume=True
    assert losses(out) == losses(tmp_path / "straight")
    a, b = load_file(next(straight.glob("*.safetensors"))), load_file(next(resumed.glob("*.safetensors")))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_cli_says_what_to_run_after_ctrl_c_and_that_command_works(base_dir, tmp_path, monkeypatch):
    from orca_diff.cli import cli
    import orca_diff.train.loop as loop

    real_lr_at = loop.lr_at

    def ctrl_c_during_the_first_step(step, *a):
        if step == 0:
            os.kill(os.getpid(), signal.SIGINT)
        return real_lr_at(step, *a)

    monkeypatch.setattr(loop, "lr_at", ctrl_c_during_the_first_step)
    args = ["train", "--model", str(base_dir), "--out", str(tmp_path / "run"), "--data", str(SAMPLE),
            "--max-steps", "2", "--max-seq-len", "128", "-q"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 130, result.output
    assert "interrupted after global step 1" in result.output and "Run the same command again" in result.output
    monkeypatch.setattr(loop, "lr_at", real_lr_at)
    again = CliRunner().invoke(cli, args)  # literally the same command
    assert again.exit_code == 0, again.output
    assert [r["global_step"] for r in records(tmp_path / "run")] == [1, 2]


def test_an_out_holding_a_finished_model_without_checkpoints_is_refused(base_dir, tmp_path):
    from orca_diff.errors import OutputError

    out = tmp_path / "run"
    train(quick_config(base_dir, out, stages=[Stage(data=[str(SAMPLE)], max_steps=1)]))
    shutil.rmtree(out / "checkpoints")
    with pytest.raises(OutputError, match="no checkpoint to continue from; choose a new --out"):
        train(quick_config(base_dir, out, stages=[Stage(data=[str(SAMPLE)], max_steps=1)]))


def test_a_checkpoint_of_other_settings_is_refused_naming_them(base_dir, tmp_path):
    from orca_diff.errors import UsageError

    out = tmp_path / "run"
    stages = [Stage(data=[str(SAMPLE)], max_steps=2)]
    train(quick_config(base_dir, out, stages=stages, stop_after_steps=1))
    named = r"different stages\[0\]\.lr \(stages\[0\]\.lr: checkpoint 1e-05, now 1.0\).*or choose a new --out"
    with pytest.raises(UsageError, match=named):
        train(quick_config(base_dir, out, stages=[Stage(data=[str(SAMPLE)], max_steps=2, lr=1.0)]))
    with pytest.raises(UsageError, match=r"different template"):
        train(quick_config(base_dir, out, stages=stages, template="base"))


# ---------------------------------------------------------------------------------------------
# 5. pad_token_id in generation_config.json; --threads
# ---------------------------------------------------------------------------------------------

def test_generation_config_records_the_added_pad_token(base_dir, tmp_path, tokenizer):
    model_dir = train(quick_config(base_dir, tmp_path / "run", stages=[Stage(data=[str(SAMPLE)], max_steps=1)]))
    generation = json.loads((model_dir / "generation_config.json").read_text())
    assert generation["pad_token_id"] == len(tokenizer) == json.loads((model_dir / "config.json").read_text())["pad_token_id"]
    assert transformers.GenerationConfig.from_pretrained(model_dir).pad_token_id == len(tokenizer)


def test_threads_sets_torchs_cpu_threads(base_dir, tmp_path):
    seen = []
    try:
        train(quick_config(base_dir, tmp_path / "run", threads=2, stages=[Stage(data=[str(SAMPLE)], max_steps=1)]),
              on_step=lambda r: seen.append(torch.get_num_threads()))
    finally:
        torch.set_num_threads(1)
    assert seen and set(seen) == {2}
    assert "--threads" in CliRunner().invoke(_cli(), ["--help"]).output


def test_a_tied_fine_tune_goes_through_make_apply_verify_byte_for_byte(tied_base, tmp_path):
    from orca_diff.apply import apply_diff
    from orca_diff.verify import verify_model

    out = tmp_path / "run"
    model_dir = train(quick_config(tied_base, out, stages=[Stage(data=[str(SAMPLE)], max_steps=2, lr=1e-3)],
                                   make_diff_against=str(tied_base)))
    rebuilt = tmp_path / "rebuilt"
    apply_diff(tied_base, out / "diff", rebuilt, progress=False)
    verify_model(rebuilt, out / "diff", progress=False)
    for path in sorted(p for p in model_dir.rglob("*") if p.is_file()):
        assert (rebuilt / path.relative_to(model_dir)).read_bytes() == path.read_bytes(), path.name


@pytest.mark.slow
def test_two_process_fsdp_keeps_a_tied_model_tied_and_resumes_it_bit_for_bit(tied_base, tmp_path):
    """torchrun + FSDP2 (gloo on CPU) on a tied base, stopped after 2 steps and rerun with the same
    command: the shared matrix is saved once, and the weights match one process to float32 rounding."""
    import subprocess
    import sys

    from test_train import ROOT

    args = ["--model", str(tied_base), "--data", str(SAMPLE), "--max-steps", "3", "--lr", "1e-3", "--max-seq-len", "128",
            "--micro-batch-size", "1", "--save-dtype", "F32", "--grad-accum", "2", "--out", str(tmp_path / "fsdp"),
            "--save-every", "1", "--stop-after-steps", "2", "-q"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "orca_diff.cli",
           "train", *args]
    for _ in range(2):  # the second run is literally the same command
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr[-3000:]
    single = train(quick_config(tied_base, tmp_path / "one", micro_batch_size=1, grad_accum=4, save_dtype="F32",
                                stages=[Stage(data=[str(SAMPLE)], max_steps=3, lr=1e-3, name="orca_sample")]))
    a, b = load_file(tmp_path / "fsdp" / "model" / "model.safetensors"), load_file(next(single.glob("*.safetensors")))
    assert a.keys() == b.keys() and "lm_head.weight" not in a
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-5)
    assert [r["global_step"] for r in records(tmp_path / "fsdp")] == [1, 2, 3]
