"""Specification: training a user can trust for a 160-hour run (issues 24 and 20.4/20.7/20.9).

Checked before step 1: the config (a schema at every level), every stage's data, the folders.
Nothing of a run folder is unpickled. A run continues from a finished stage with later stages
changed, refuses changed data, and a finished run rerun checks its outputs and exits 0. Every
bad input is one line and an exit code. Tiny models, few steps: the whole file runs in about a
minute on one CPU thread.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from click.testing import CliRunner  # noqa: E402

from orca_diff.cli.main import cli  # noqa: E402
from orca_diff.errors import FormatError, OutputError, UsageError  # noqa: E402
from orca_diff.train import Stage, load_config, train  # noqa: E402
from orca_diff.train import data as orca_data  # noqa: E402
from orca_diff.train.readers import read_rows  # noqa: E402
from test_train import SAMPLE, quick_config, records  # noqa: E402
from test_train import base_dir, one_torch_thread, rows, tokenizer  # noqa: E402,F401  (fixtures)


def run_cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["train", *args])
    return result.exit_code, result.output


def one_line_error(code: int, output: str) -> str:
    """The CLI's answer to a bad input: one `orca-diff: error:` line and no traceback."""
    assert "Traceback" not in output, output
    lines = [line for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("orca-diff: error:")]
    assert len(errors) == 1 and code not in (0, 1), (code, output)
    return errors[0]


def jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


SAMPLE_ROWS = [json.loads(line) for line in SAMPLE.read_text().splitlines()]


# ---------------------------------------------------------------------------------------------
# 20.4: no code from a run folder
# ---------------------------------------------------------------------------------------------

class Planted:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['PLANTED_MARKER']}",))


def test_a_planted_pickle_in_a_run_folder_runs_no_code_on_resume(base_dir, tmp_path, monkeypatch):
    """A copied run folder whose checkpoint is torch.distributed.checkpoint's format (a pickled
    .metadata): the same command refuses it in one line, and the pickle never runs."""
    marker = tmp_path / "code-ran"
    monkeypatch.setenv("PLANTED_MARKER", str(marker))
    out = tmp_path / "run"
    stages = [Stage(data=[str(SAMPLE)], max_steps=2)]
    ckpt = train(quick_config(base_dir, out, stages=stages, stop_after_steps=1))
    for f in list(ckpt.iterdir()):
        if f.name != "state.json":
            f.unlink()
    (ckpt / ".metadata").write_bytes(pickle.dumps(Planted()))
    (ckpt / "__0_0.distcp").write_bytes(pickle.dumps(Planted()))
    with pytest.raises(FormatError, match=r"unpickling.*--trust-pickled-checkpoint"):
        train(quick_config(base_dir, out, stages=stages))
    # Planted beside a checkpoint of the current format too: never read.
    out2 = tmp_path / "run2"
    ckpt2 = train(quick_config(base_dir, out2, stages=stages, stop_after_steps=1))
    (ckpt2 / ".metadata").write_bytes(pickle.dumps(Planted()))
    train(quick_config(base_dir, out2, stages=stages))
    assert not marker.exists()


def test_a_damaged_checkpoint_tensor_file_is_one_line(base_dir, tmp_path):
    out = tmp_path / "run"
    stages = [Stage(data=[str(SAMPLE)], max_steps=2)]
    ckpt = train(quick_config(base_dir, out, stages=stages, stop_after_steps=1))
    (ckpt / "rank-00000-of-00001.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(FormatError, match="rank-00000-of-00001.safetensors: not a readable safetensors file"):
        train(quick_config(base_dir, out, stages=stages))


# ---------------------------------------------------------------------------------------------
# 20.9 + 24.1: the config schema, every problem named with file, line and key
# ---------------------------------------------------------------------------------------------

CONFIG_CASES = {
    "yaml syntax": ("c.yaml", "model: m\nout: [o\n", r"c.yaml:3: not valid YAML"),
    "tabs": ("c.yaml", "model: m\nstages:\n\t- data: x.jsonl\n", r"c.yaml:3: not valid YAML.*tabs"),
    "python tag": ("c.yaml", "model: !!python/object/apply:os.system ['touch {marker}']\nout: o\n",
                   r"c.yaml:1: not valid YAML.*python/object/apply"),
    "json syntax": ("c.json", '{"model": "m", "out": ', r"c.json:1:\d+: not valid JSON"),
    "not utf-8": ("c.yaml", b"model: m\nout: \xff\xfe\n", r"c.yaml:2: the config is not UTF-8"),
    "unknown stage key": ("c.yaml", "model: m\nout: o\nstages:\n  - data: x.jsonl\n    learning_rate: 1\n",
                          r"c.yaml:5: stages\[0\]: unknown setting 'learning_rate' \(did you mean lr\?\)"),
    "max_seq_len: long": ("c.yaml", "max_seq_len: long\n", r"c.yaml:1: max_seq_len: expected a number, got 'long'"),
    "lr: fast": ("c.yaml", "stages:\n  - data: x.jsonl\n    lr: fast\n", r"c.yaml:3: stages\[0\].lr: expected a number"),
    "epochs: [1, 2]": ("c.yaml", "stages:\n  - data: x.jsonl\n    epochs: [1, 2]\n", r"c.yaml:3: stages\[0\].epochs"),
    "max_steps: 1.5": ("c.yaml", "stages:\n  - data: x.jsonl\n    max_steps: 1.5\n", r"max_steps: expected a whole number"),
    "data: 5": ("c.yaml", "stages:\n  - data: 5\n", r"c.yaml:2: stages\[0\].data: expected a file path"),
    "betas: 0.9": ("c.yaml", "betas: 0.9\n", r"c.yaml:1: betas: expected two numbers"),
    "seed: abc": ("c.yaml", "seed: abc\n", r"c.yaml:1: seed: expected a number, got 'abc'"),
    "lr: -1.0": ("c.yaml", "stages:\n  - data: x.jsonl\n    lr: -1.0\n", r"stages\[0\].lr: must be > 0"),
    "lr: .nan": ("c.yaml", "stages:\n  - data: x.jsonl\n    lr: .nan\n", r"stages\[0\].lr: expected a finite number"),
    "attn_implementation: warp": ("c.yaml", "attn_implementation: warp\n", r"attn_implementation: must be one of"),
    "micro_batch_size: 1e11": ("c.yaml", "micro_batch_size: 100000000000\n", r"micro_batch_size: must be between"),
    "batch too big": ("c.yaml", "micro_batch_size: 4096\nmax_seq_len: 1000000\n", r"tokens in one forward pass"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_a_bad_config_is_one_line_naming_file_line_and_key(tmp_path, case):
    name, text, expected = CONFIG_CASES[case]
    marker = tmp_path / "code-ran"
    config = tmp_path / name
    config.write_bytes(text if isinstance(text, bytes) else text.replace("{marker}", str(marker)).encode())
    code, output = run_cli("--config", str(config), "--model", str(tmp_path), "--out", str(tmp_path / "o"))
    import re

    assert re.search(expected, one_line_error(code, output)), output
    assert not marker.exists() and not (tmp_path / "o").exists()


def test_every_problem_of_every_stage_is_reported_at_once(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("model: m\nout: o\nstages:\n  - data: a.jsonl\n    lr: 1e-3\n"
                      "  - data: b.jsonl\n    lr: fast\n    warmup: 3\n")
    with pytest.raises(UsageError) as info:
        load_config(config)
    message = str(info.value)
    assert message.startswith("2 problems in the config")
    assert "c.yaml:7: stages[1].lr" in message and "c.yaml:8: stages[1]: unknown setting 'warmup'" in message


def test_yaml_number_strings_are_numbers(tmp_path):
    """PyYAML reads 5e-5 (an exponent without a dot) as a string: the schema takes it as the number."""
    config = tmp_path / "c.yaml"
    config.write_text("model: m\nout: o\nweight_decay: 1e-2\nstages:\n  - data: a.jsonl\n    lr: 5e-5\n")
    cfg = load_config(config)
    assert cfg.stages[0].lr == 5e-5 and cfg.weight_decay == 0.01


# ---------------------------------------------------------------------------------------------
# 20.9 + 20.7 + 24.1: data files checked before step 1, bounded rows
# ---------------------------------------------------------------------------------------------

DATA_CASES = {
    "not utf-8": (b'{"question": "q", "response": "\xff"}\n', r"bad.jsonl:1: not UTF-8"),
    "5000-digit number": (b'{"question": "q", "response": "r", "n": ' + b"9" * 5000 + b"}\n",
                          r"bad.jsonl:1: not a usable JSON row"),
    "deep nesting": (b'{"question": "q", "response": "r", "n": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n",
                     r"bad.jsonl:1: JSON nested too deeply"),
    "lone surrogate": (b'{"question": "q", "response": "a \\ud800 b"}\n', r"bad.jsonl:1: response holds a lone surrogate"),
    "not json": (b'{"question": "q", "response": \n', r"bad.jsonl:1: not valid JSON"),
    "other columns": (b'{"prompt": "q", "completion": "r"}\n', r"bad.jsonl:1: missing column\(s\) question, response.*--columns"),
}


@pytest.mark.parametrize("case", sorted(DATA_CASES))
def test_a_bad_data_file_is_one_line_naming_file_and_line(base_dir, tmp_path, case):
    content, expected = DATA_CASES[case]
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(jsonl(tmp_path / "ok.jsonl", SAMPLE_ROWS[:2]).read_bytes() + content)
    expected = expected.replace("bad.jsonl:1", "bad.jsonl:3")
    code, output = run_cli("--model", str(base_dir), "--data", str(bad), "--out", str(tmp_path / "o"), "-q")
    import re

    assert re.search(expected, one_line_error(code, output)), output


@pytest.mark.parametrize("damage", ["truncated", "random"])
def test_a_damaged_parquet_file_is_one_line(base_dir, tmp_path, damage):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(SAMPLE_ROWS), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncated" else os.urandom(len(data)))
    code, output = run_cli("--model", str(base_dir), "--data", str(path), "--out", str(tmp_path / "o"), "-q")
    assert "d.parquet: not a readable parquet file" in one_line_error(code, output)


def test_a_row_bigger_than_the_bound_is_refused_before_it_is_parsed(tmp_path):
    path = tmp_path / "big.jsonl"
    with open(path, "w") as f:
        f.write(json.dumps(SAMPLE_ROWS[0]) + "\n")
        f.write('{"question": "q", "response": "' + "x" * (3 << 20) + '"}\n')
    with pytest.raises(FormatError, match=r"big.jsonl:2: a row of more than 1,048,576 bytes \(max_row_bytes\)"):
        read_rows(path, max_row_bytes=1 << 20)


def test_a_bad_stage_2_file_is_found_before_stage_1_trains(base_dir, tmp_path):
    """The 160-hour case: stage 2's misspelled path and stage 2's bad row, both in one report, before step 1."""
    bad = tmp_path / "gpt4.jsonl"
    bad.write_text(json.dumps(SAMPLE_ROWS[0]) + "\n" + '{"question": 1, "response": "r"}\n')
    stages = [Stage(data=[str(SAMPLE)], max_steps=2), Stage(data=[str(bad), str(tmp_path / "typo.jsonl")], max_steps=1)]
    with pytest.raises(FormatError) as info:
        train(quick_config(base_dir, tmp_path / "run", stages=stages))
    message = str(info.value)
    assert message.startswith("2 problems in the training data, found before step 1")
    assert "stage 2: " + str(bad) + ":2: question must be a string" in message
    assert "typo.jsonl does not exist" in message
    assert not (tmp_path / "run" / "train_log.jsonl").exists()


# ---------------------------------------------------------------------------------------------
# 24.3 + 24.4: the datasets that exist; empty responses
# ---------------------------------------------------------------------------------------------

def test_sharegpt_alpaca_messages_json_arrays_and_mapped_columns_read_as_the_same_rows(tmp_path):
    q, a = "What is 2 + 3?", "2 + 3 = 5."
    expected = {"system_prompt": "Be brief.", "question": q, "response": a}
    sharegpt = jsonl(tmp_path / "slim.jsonl", [{"conversations": [
        {"from": "system", "value": "Be brief."}, {"from": "human", "value": q}, {"from": "gpt", "value": a}]}])
    messages = jsonl(tmp_path / "openai.jsonl", [{"messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": q},
        {"role": "assistant", "content": [{"type": "text", "text": a}]}]}])
    array = tmp_path / "array.json"
    array.write_text(json.dumps([{"system_prompt": "Be brief.", "question": q, "response": a}]))
    mapped = jsonl(tmp_path / "mapped.jsonl", [{"sys": "Be brief.", "prompt": q, "completion": a}])
    for path, columns in ((sharegpt, None), (messages, None), (array, None),
                          (mapped, {"system_prompt": "sys", "question": "prompt", "response": "completion"})):
        assert read_rows(path, columns=columns)[0] == [expected], path.name
    with pytest.raises(FormatError, match=r"unknown.jsonl:1: cannot tell the data format.*sharegpt.*--columns"):
        read_rows(jsonl(tmp_path / "unknown.jsonl", [{"prompt": q, "completion": a}]))
    alpaca = jsonl(tmp_path / "alpaca.jsonl", [{"instruction": "Add.", "input": "2 + 3", "output": "5"}])
    (row,), report = read_rows(alpaca)
    assert report.format == "alpaca" and row == {"system_prompt": "", "question": "Add.\n\n2 + 3", "response": "5"}


@pytest.fixture(scope="module")
def byte_tokenizer(tmp_path_factory):
    """synth's byte-level BPE: every text round-trips, so masks can be read back as text."""
    from orca_diff.synth import tokenizer_json

    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    path.write_text(tokenizer_json(924))
    return transformers.PreTrainedTokenizerFast(tokenizer_file=str(path), bos_token="<s>", eos_token="</s>",
                                                unk_token="<unk>")


def test_a_multi_turn_conversation_trains_on_every_assistant_turn(byte_tokenizer):
    tokenizer = byte_tokenizer
    conv = {"system_prompt": "", "question": "two plus two", "response": "four",
            "more_turns": [["and three plus three", "six"]]}
    (ex,), dropped = orca_data.encode_examples([conv], tokenizer, 512)
    targets = [int(t) for t, label in zip(ex.input_ids, ex.labels) if label != -100]
    eos = tokenizer.eos_token_id
    assert targets == tokenizer("four", add_special_tokens=False)["input_ids"] + [eos] \
        + tokenizer("six", add_special_tokens=False)["input_ids"] + [eos]
    text = tokenizer.decode(ex.input_ids[ex.labels == -100].tolist())
    assert "two plus two" in text and "and three plus three" in text and "four" not in text and "six" not in text
    assert ex.n_targets == len(targets)


def test_the_orca_layout_of_a_conversation_is_what_the_shipped_chat_template_renders(tokenizer):
    conv = {"system_prompt": "Be brief.", "question": "q1", "response": "a1", "more_turns": [["q2", "a2"]]}
    text = "".join(t + ("</s>" if target else "") for t, target in orca_data.orca_segments("Be brief.", orca_data.turns_of(conv)))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "q1"},
                {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"},
                {"role": "assistant", "content": "a2"}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, chat_template=orca_data.ORCA_CHAT_TEMPLATE)
    assert rendered == "<s>" + text


def test_empty_and_null_responses_are_dropped_and_counted_per_file_or_refused(tmp_path):
    path = jsonl(tmp_path / "holes.jsonl", [SAMPLE_ROWS[0], {**SAMPLE_ROWS[1], "response": ""},
                                            {**SAMPLE_ROWS[2], "response": None}, {**SAMPLE_ROWS[3], "response": "  \n"},
                                            {"conversations": [{"from": "human", "value": "q"}]}][:4])
    rows_, report = read_rows(path)
    assert len(rows_) == 1 and report.rows == 1 and report.dropped_empty == 3
    with pytest.raises(FormatError, match=r"holes.jsonl:2: an empty or null response"):
        read_rows(path, empty_responses="refuse")


# ---------------------------------------------------------------------------------------------
# 24.1 + 24.5: continuing with later stages changed; changed data
# ---------------------------------------------------------------------------------------------

def test_a_run_continues_from_a_finished_stage_with_later_stages_changed(base_dir, tmp_path):
    out = tmp_path / "run"
    first = Stage(data=[str(SAMPLE)], max_steps=2, lr=1e-3)
    train(quick_config(base_dir, out, stages=[first, Stage(data=[str(SAMPLE)], max_steps=3, lr=1e-3)],
                       stop_after_steps=2))
    seen = []
    model_dir = train(quick_config(base_dir, out, stages=[first, Stage(data=[str(SAMPLE)], max_steps=1, lr=5e-4)]),
                      on_step=seen.append)
    assert [r["global_step"] for r in records(out)] == [1, 2, 3]
    (continued,) = [r for r in seen if r["kind"] == "continued"]
    assert "stages 2.. differ" in continued["notes"][0]
    state = json.loads(sorted((out / "checkpoints").glob("step-*"))[-1].joinpath("state.json").read_text())
    assert state["history"][0]["event"] == "later stages changed" and state["history"][0]["from_stage"] == 2
    assert (model_dir / "model.safetensors").is_file()


def test_a_data_file_changed_since_the_checkpoint_is_refused_or_explicitly_accepted(base_dir, tmp_path):
    data = jsonl(tmp_path / "d.jsonl", SAMPLE_ROWS)
    out = tmp_path / "run"
    stages = [Stage(data=[str(data)], max_steps=3)]
    train(quick_config(base_dir, out, stages=stages, stop_after_steps=1))
    jsonl(data, SAMPLE_ROWS[::-1][:20])  # reshuffled and cut between the stop and the rerun
    with pytest.raises(UsageError, match=r"d.jsonl changed since .*step-00000001.*--accept-changed-data"):
        train(quick_config(base_dir, out, stages=stages))
    train(quick_config(base_dir, out, stages=stages, accept_changed_data=True))
    state = json.loads(sorted((out / "checkpoints").glob("step-*"))[-1].joinpath("state.json").read_text())
    assert state["history"][-1]["event"] == "data changed, accepted"


# ---------------------------------------------------------------------------------------------
# 24.6: reruns, --force, wrong folders
# ---------------------------------------------------------------------------------------------

def test_a_finished_run_rerun_checks_its_outputs_and_exits_0_also_with_a_diff(base_dir, tmp_path):
    args = ["--model", str(base_dir), "--data", str(SAMPLE), "--max-steps", "1", "--max-seq-len", "128",
            "--out", str(tmp_path / "run"), "--make-diff-against", str(base_dir), "--threads", "1"]
    assert run_cli(*args, "-q")[0] == 0
    model = tmp_path / "run" / "model" / "model.safetensors"
    before = model.stat().st_mtime_ns
    code, output = run_cli(*args)
    assert code == 0, output
    assert "checked: " in output and "diff checked" in output.replace("/diff checked", "diff checked") \
        and "nothing to train" in output
    assert model.stat().st_mtime_ns == before
    data = bytearray(model.read_bytes())
    data[-1] ^= 1
    model.write_bytes(bytes(data))
    assert "model.safetensors changed since this run wrote it" in one_line_error(*run_cli(*args, "-q"))
    code, output = run_cli(*args, "--force", "-q")
    assert code == 0, output
    assert (tmp_path / "run" / "diff" / "orca-diff.json").is_file()


def test_wrong_folders_are_one_line(base_dir, tmp_path):
    (tmp_path / "afile").write_text("x")
    diff = tmp_path / "diffdir"
    diff.mkdir()
    (diff / "orca-diff.json").write_text("{}")
    broken = tmp_path / "broken-tok"
    shutil.copytree(base_dir, broken)
    (broken / "tokenizer.json").write_text("random bytes, not a tokenizer")
    common = ["--data", str(SAMPLE), "--max-steps", "1", "-q"]
    assert "is an orca-diff diff, not a model" in one_line_error(*run_cli("--model", str(diff), "--out",
                                                                          str(tmp_path / "o"), *common))
    assert "--out " + str(tmp_path / "afile") + " is a file" in one_line_error(
        *run_cli("--model", str(base_dir), "--out", str(tmp_path / "afile"), *common))
    assert "cannot load a tokenizer from " + str(broken) in one_line_error(
        *run_cli("--model", str(broken), "--out", str(tmp_path / "o2"), *common))


def test_the_demo_model_can_be_tokenised_and_trained(tmp_path):
    """synth's models (the demo's) carry a real tokenizer: `orca-diff train --model` on one works end to end."""
    from orca_diff.synth import LlamaShape, write_llama

    base = write_llama(tmp_path / "demo-base", LlamaShape(), "BF16")
    tok = transformers.AutoTokenizer.from_pretrained(base)
    text = "### User:\nWhat is 12 + 7? Ünïcödé 🙂\n"
    assert tok.decode(tok(text)["input_ids"]) == text
    code, output = run_cli("--model", str(base), "--data", str(SAMPLE), "--max-steps", "2", "--max-seq-len", "128",
                           "--out", str(tmp_path / "run"), "--threads", "1", "-q")
    assert code == 0, output
    reloaded = transformers.AutoTokenizer.from_pretrained(tmp_path / "run" / "model")
    assert reloaded.pad_token == "[PAD]" and len(reloaded) == len(tok) + 1


def test_the_shipped_synth_tokenizer_is_what_its_script_builds():
    import subprocess
    import sys

    from test_train import ROOT

    proc = subprocess.run([sys.executable, "scripts/build_synth_tokenizer.py", "--check"], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


# ---------------------------------------------------------------------------------------------
# 24.2 + 24.7: the loss of what ships; eval sets by name; eval-only with the run's settings
# ---------------------------------------------------------------------------------------------

def test_the_saved_model_is_evaluated_and_the_master_weights_loss_is_reported_beside_it(base_dir, tmp_path):
    out = tmp_path / "run"
    heldout = jsonl(tmp_path / "heldout.jsonl", SAMPLE_ROWS[:8])
    other = jsonl(tmp_path / "other.jsonl", SAMPLE_ROWS[8:12])
    train(quick_config(base_dir, out, stages=[Stage(data=[str(SAMPLE)], max_steps=2, lr=3e-3)],
                       eval_data=[str(heldout), str(other)]))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["eval_loss_master_weights"] == metrics["eval_loss_last"]
    assert metrics["eval_loss_saved_model"] != metrics["eval_loss_master_weights"]  # bf16 rounding changes it
    code, output = run_cli("--eval-only", "--model", str(out / "model"), "--eval", str(heldout), "--eval", str(other),
                           "--out", str(tmp_path / "eo"))
    assert code == 0, output
    assert "with its run's settings" in output and "heldout: loss" in output and "other: loss" in output
    eval_only = json.loads((tmp_path / "eo" / "metrics.json").read_text())["eval_only"]
    assert eval_only["loss"] == pytest.approx(metrics["eval_loss_saved_model"], rel=1e-6)
    sets = {r["set"] for r in metrics["eval_sets"]}
    assert sets == {"heldout", "other"}


# ---------------------------------------------------------------------------------------------
# 24.8: the recipe's parts
# ---------------------------------------------------------------------------------------------

def test_prompt_erasure_hides_the_system_message_from_the_student(tokenizer):
    row = next(r for r in SAMPLE_ROWS if r["system_prompt"])
    (shown_,), _ = orca_data.encode_examples([row], tokenizer, 512)
    (erased,), _ = orca_data.encode_examples([row], tokenizer, 512, prompt_erasure=True)
    assert "System" in tokenizer.decode(shown_.input_ids.tolist()) and "System" not in tokenizer.decode(erased.input_ids.tolist())
    assert shown_.labels[shown_.labels != -100].tolist() == erased.labels[erased.labels != -100].tolist()


@pytest.mark.parametrize("preset", ["chatml", "llama2"])
def test_chat_template_presets_train_and_ship_the_same_layout(base_dir, tmp_path, preset):
    model_dir = train(quick_config(base_dir, tmp_path / "run", template=preset,
                                   stages=[Stage(data=[str(SAMPLE)], max_steps=1)]))
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    assert tok.chat_template == orca_data.PRESET_TEMPLATES[preset]
    row = next(r for r in SAMPLE_ROWS if r["system_prompt"])
    (ex,), _ = orca_data.encode_examples([row], tok, 512, template=preset)
    messages = [{"role": "system", "content": row["system_prompt"]}, {"role": "user", "content": row["question"]}]
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ex.input_ids[:ex.prompt_len].tolist() == tok(prompt, add_special_tokens=False)["input_ids"]
    if preset == "chatml":
        assert tok.convert_tokens_to_ids("<|im_end|>") != tok.unk_token_id  # one token, as Orca 2 has it


def test_log_records_carry_timestamps_and_tensorboard_gets_scalars_when_installed(base_dir, tmp_path, monkeypatch):
    import sys
    import types

    written = []

    class FakeWriter:
        def __init__(self, log_dir):
            written.append(("dir", log_dir))

        def add_scalar(self, tag, value, step):
            written.append((tag, step))

        def flush(self):
            pass

        def close(self):
            pass

    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = FakeWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    from orca_diff.train import board

    monkeypatch.setattr(board, "tensorboard_available", lambda: True)
    out = tmp_path / "run"
    train(quick_config(base_dir, out, stages=[Stage(data=[str(SAMPLE)], max_steps=2)]))
    assert all("time" in r for r in records(out))
    assert ("train/loss", 1) in written and ("train/loss", 2) in written
    assert written[0] == ("dir", str(out / "tensorboard"))


def test_save_stage_models_writes_the_model_each_stage_ended_with(base_dir, tmp_path):
    out = tmp_path / "run"
    stages = [Stage(data=[str(SAMPLE)], max_steps=1, lr=3e-3), Stage(data=[str(SAMPLE)], max_steps=1, lr=3e-3)]
    final = train(quick_config(base_dir, out, stages=stages, save_stage_models=True))
    from safetensors.torch import load_file

    after_1 = load_file(out / "stage-1-model" / "model.safetensors")
    after_2 = load_file(final / "model.safetensors")
    assert after_1.keys() == after_2.keys()
    assert any(not torch.equal(after_1[k], after_2[k]) for k in after_1)
    assert not (out / "stage-2-model").exists()
    assert transformers.AutoModelForCausalLM.from_pretrained(out / "stage-1-model").config.use_cache is True


def test_tokenization_is_cached_once_per_stage_and_memory_mapped_on_the_next_start(base_dir, tmp_path, capsys):
    from orca_diff.train import tokcache

    out = tmp_path / "run"
    stages = [Stage(data=[str(SAMPLE)], max_steps=3, lr=1e-3)]
    train(quick_config(base_dir, out, stages=stages, stop_after_steps=1, quiet=False))
    assert "tokens read from" not in capsys.readouterr().out
    (entry,) = (out / tokcache.CACHE_DIRNAME).iterdir()
    train(quick_config(base_dir, out, stages=stages, quiet=False))
    assert "tokens read from" in capsys.readouterr().out
    straight = tmp_path / "straight"
    train(quick_config(base_dir, straight, stages=stages))
    assert [r["loss"] for r in records(out)] == [r["loss"] for r in records(straight)]
    # Another template (or tokenizer, data, max_seq_len...) is another entry, never the same one.
    train(quick_config(base_dir, tmp_path / "other", stages=stages, template="llama2"))
    train(quick_config(base_dir, out, stages=stages, force=True, template="llama2"))
    assert len(list((out / tokcache.CACHE_DIRNAME).iterdir())) == 2
    ids = __import__("numpy").load(entry / "ids.npy", mmap_mode="r")
    assert type(ids).__name__ == "memmap" and ids.dtype.name == "uint16"


# ---------------------------------------------------------------------------------------------
# Fuzz: whatever bytes a config or data file holds, the answer is an OrcaDiffError or rows
# ---------------------------------------------------------------------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from orca_diff.errors import OrcaDiffError  # noqa: E402

_FRAGMENTS = st.sampled_from([b"{", b"}", b"[", b"]", b'"question"', b'"response"', b'"conversations"', b":", b",",
                              b'"from": "gpt"', b'"value"', b"null", b"1e999", b"-", b"\n", b"\\ud800", b'"', b"\xff",
                              b"true", b"!!python/object:os.system", b"- ", b"\t", b"stages:", b"lr: ", b"data: x"])
_BYTES = st.one_of(st.binary(max_size=200), st.lists(_FRAGMENTS, max_size=40).map(b"".join))


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(content=_BYTES, suffix=st.sampled_from([".jsonl", ".json"]))
def test_fuzzed_data_files_give_rows_or_one_error(content, suffix):
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"d{suffix}"
        path.write_bytes(content)
        try:
            rows_, report = read_rows(path)
        except OrcaDiffError as exc:
            assert "\n" not in str(exc)
        else:
            assert all(isinstance(r["question"], str) and r["response"].strip() for r in rows_)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(content=_BYTES, suffix=st.sampled_from([".yaml", ".json"]))
def test_fuzzed_config_files_give_a_config_or_one_error(content, suffix):
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"c{suffix}"
        path.write_bytes(content)
        try:
            load_config(path, model="m", out=str(Path(tmp) / "o"))
        except OrcaDiffError as exc:
            assert "\n" not in str(exc).strip()
