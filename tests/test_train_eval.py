"""Evaluation in the loop, --eval-only, the loss plot, Orca's system messages as data, and the docs.

CPU, seconds, with the tiny generated models of tests/test_train.py.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from click.testing import CliRunner  # noqa: E402
from test_train import (ROOT, SAMPLE, base_dir, one_torch_thread, quick_config, records, rows,  # noqa: E402,F401
                        tokenizer)

from orca_diff.train import Stage, evaluate_folder, orca_system_messages, train  # noqa: E402
from orca_diff.train import system_messages as sm  # noqa: E402


def _cli():
    from orca_diff.cli.train import COMMANDS

    (command,) = COMMANDS
    return command


@pytest.fixture(scope="module")
def heldout(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("eval") / "heldout.jsonl"
    path.write_text("\n".join(SAMPLE.read_text().splitlines()[-6:]) + "\n")
    return path


# ---------------------------------------------------------------------------------------------
# Evaluation in the loop
# ---------------------------------------------------------------------------------------------

def test_eval_runs_before_training_every_n_steps_and_at_each_stage_end(base_dir, tmp_path, heldout):
    out = tmp_path / "run"
    stages = [Stage(data=[str(SAMPLE)], max_steps=3, lr=3e-3), Stage(data=[str(SAMPLE)], max_steps=3, lr=1e-3)]
    model_dir = train(quick_config(base_dir, out, stages=stages, eval_data=[str(heldout)], eval_every=2,
                                   save_dtype="F32"))
    evals = records(out, "eval")
    assert [(r["stage"], r["global_step"]) for r in evals] == [(0, 0), (1, 2), (1, 3), (2, 4), (2, 6)]
    assert all(r["ppl"] == pytest.approx(math.exp(r["loss"])) and r["targets"] > 0 for r in evals)
    assert evals[-1]["loss"] < evals[0]["loss"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert [e["loss"] for e in metrics["eval"]] == [r["loss"] for r in evals]
    assert metrics["eval_loss_before"] == evals[0]["loss"] and metrics["eval_loss_last"] == evals[-1]["loss"]
    assert metrics["model"] == str(model_dir) and metrics["train_steps"] == 6
    # The in-loop number is the loss of the weights that were then saved (F32: nothing rounded).
    saved = evaluate_folder(model_dir, [str(heldout)], max_seq_len=128, micro_batch_size=2)
    assert saved["loss"] == pytest.approx(evals[-1]["loss"], rel=1e-5)
    assert saved["targets"] == evals[-1]["targets"]


def test_eval_and_checkpoint_settings_do_not_block_continuing_a_run(base_dir, tmp_path, heldout):
    out = tmp_path / "run"
    stages = [Stage(data=[str(SAMPLE)], max_steps=3, lr=1e-3)]
    train(quick_config(base_dir, out, stages=stages, stop_after_steps=1))
    train(quick_config(base_dir, out, stages=stages, eval_data=[str(heldout)], threads=1))
    assert [r["global_step"] for r in records(out)] == [1, 2, 3]
    assert [r["global_step"] for r in records(out, "eval")] == [3]  # no "before" eval on a continued run


def test_the_console_shows_eval_loss_and_perplexity(base_dir, tmp_path, heldout):
    result = CliRunner().invoke(_cli(), ["--model", str(base_dir), "--out", str(tmp_path / "run"), "--data",
                                         str(SAMPLE), "--max-steps", "2", "--max-seq-len", "128", "--eval",
                                         str(heldout)])
    assert result.exit_code == 0, result.output
    assert re.search(r"eval before training \(global step 0\): loss \d+\.\d{4}, perplexity \d", result.output)
    assert "eval end of stage 1 (global step 2)" in result.output


def test_eval_only_measures_a_saved_model_and_writes_metrics(base_dir, tmp_path, heldout):
    result = CliRunner().invoke(_cli(), ["--eval-only", "--model", str(base_dir), "--eval", str(heldout),
                                         "--max-seq-len", "128", "--out", str(tmp_path / "m")])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "m" / "metrics.json").read_text())["eval_only"]
    assert re.search(rf"loss {metrics['loss']:.4f}, perplexity", result.output)
    assert metrics["examples"] == 6 and metrics["loss"] == pytest.approx(
        evaluate_folder(base_dir, [str(heldout)], max_seq_len=128)["loss"])
    from orca_diff.cli import cli

    refused = CliRunner().invoke(cli, ["train", "--eval-only", "--model", str(base_dir)])
    assert refused.exit_code == 2 and "--eval FILE" in refused.output


def test_the_loss_plot_is_written_next_to_the_model(base_dir, tmp_path, heldout):
    pytest.importorskip("matplotlib")
    out = tmp_path / "run"
    train(quick_config(base_dir, out, stages=[Stage(data=[str(SAMPLE)], max_steps=2)], eval_data=[str(heldout)]))
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "model").is_dir()


def test_without_matplotlib_the_plot_is_skipped_with_a_one_line_note(base_dir, tmp_path, monkeypatch, capsys):
    import orca_diff.train.loop as loop

    monkeypatch.setattr(loop, "plot_available", lambda: False)
    out = tmp_path / "run"
    train(quick_config(base_dir, out, stages=[Stage(data=[str(SAMPLE)], max_steps=1)], quiet=False))
    notes = [line for line in capsys.readouterr().out.splitlines() if "matplotlib" in line]
    assert len(notes) == 1 and "orca-diff[plot]" in notes[0]
    assert not (out / "loss.png").exists() and (out / "metrics.json").is_file()


# ---------------------------------------------------------------------------------------------
# Orca's system messages as data
# ---------------------------------------------------------------------------------------------

def test_the_16_orca_system_messages_ship_verbatim_with_their_sub_collections():
    table = orca_system_messages()
    messages = table["messages"]
    assert sorted(map(int, messages)) == list(range(1, 17)) and messages["1"] == ""
    assert messages["7"].startswith("You are an AI assistant. User will you give you a task.")  # the paper's typo
    assert messages["16"] == "You are an AI assistant that helps people find information."
    assert "Part #: a key part of the definition." in messages["15"]
    subs = table["sub_collections"]
    assert subs["cot"]["messages"] == [6, 11, 16]
    assert subs["niv"]["messages"] == [1, 2, 5, 7, 9, 12, 13, 14, 15]
    assert subs["t0"]["messages"] == [1, 2, 3, 5, 7]
    assert subs["flan"]["messages"] == [3, 4, 7] and subs["flan"]["multiple_choice_messages"] == [8, 10]
    assert sm.DATA_FILE.parent == Path(sm.__file__).parent  # inside the package (package-data)


def test_research_notes_and_shipped_messages_agree():
    notes = ROOT.parent / "shared" / "research" / "codecs-and-orca-recipe.md"
    if not notes.is_file():
        pytest.skip("the research notes are not beside this checkout")
    text = notes.read_text(encoding="utf-8")
    table = text[text.index("Table 2: the 16 system messages"):text.index("**Which messages go")]
    listed = dict(re.findall(r"^(\d+)\. (.*)$", table, re.M))
    shipped = orca_system_messages()["messages"]
    assert {k: ("" if v.startswith("`<empty") else v) for k, v in listed.items()} == shipped


def test_rows_without_a_system_prompt_get_one_of_their_sub_collection_seeded():
    rows = [{"system_prompt": "", "question": "Add 2 and 3.", "response": "5", "id": "cot.1"},
            {"system_prompt": "", "question": "Which is red? Options: - apple - sky", "response": "apple", "id": "flan.7"},
            {"system_prompt": "", "question": "Summarise.", "response": "ok", "id": "flan.8"},
            {"system_prompt": "", "question": "Q", "response": "A", "id": "niv.3"},
            {"system_prompt": "", "question": "Q", "response": "A", "sub_collection": "T0"},
            {"system_prompt": "Mine.", "question": "Q", "response": "A", "id": "t0.1"},
            {"system_prompt": "", "question": "Q", "response": "A"}] * 20
    out, summary = sm.assign_system_messages(rows, seed=3, stream=0)
    again, _ = sm.assign_system_messages(rows, seed=3, stream=0)
    other, _ = sm.assign_system_messages(rows, seed=4, stream=0)
    assert out == again and out != other
    number = {text: int(k) for k, text in orca_system_messages()["messages"].items()}
    for row, new in zip(rows, out):
        if row["system_prompt"]:
            assert new == row
            continue
        sub = sm.sub_collection_of(row)
        if sub is None:
            assert new == row
            continue
        assert number[new["system_prompt"]] in sm.candidates(sub, row["question"])
    assert sm.candidates("flan", "Which is red? Options: - apple - sky") == [8, 10]
    assert [sm.sub_collection_of({"id": i}) for i in ("t0.12", "niv.242684", "flan2021_3", "cot.9", "x.1")] == \
        ["t0", "niv", "flan", "cot", None]
    assert summary["assigned"] == 100 and summary["kept_own"] == 20 and summary["unknown_sub_collection"] == 20
    assert summary["per_sub_collection"] == {"cot": 20, "flan": 40, "niv": 20, "t0": 20}
    assert sum(summary["per_message"].values()) == 100 and summary["seed"] == 3


def test_system_messages_orca_is_applied_and_recorded_in_log_and_metrics(base_dir, tmp_path):
    lines = [json.loads(line) for line in SAMPLE.read_text().splitlines()]
    data = tmp_path / "with_ids.jsonl"
    data.write_text("".join(json.dumps({**r, "id": f"{('niv', 't0', 'cot', 'flan')[i % 4]}.{i}"}) + "\n"
                            for i, r in enumerate(lines)))
    out = tmp_path / "run"
    train(quick_config(base_dir, out, stages=[Stage(data=[str(data)], max_steps=1)], system_messages="orca", seed=5))
    (logged,) = records(out, "system_messages")
    empty = sum(1 for r in lines if not r["system_prompt"])
    assert logged["seed"] == 5 and logged["assigned"] == empty and logged["data"] == "stage 1"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["system_messages"][0]["per_message"] == logged["per_message"]


# ---------------------------------------------------------------------------------------------
# The docs tell the truth about the options
# ---------------------------------------------------------------------------------------------

def test_docs_document_exactly_the_options_the_train_command_has():
    command = _cli()
    cli_options = {opt for p in command.params for opt in p.opts + p.secondary_opts if opt.startswith("--")}
    cli_options.add("--help")
    text = (ROOT / "docs" / "training.md").read_text(encoding="utf-8")
    other_commands = {"--nproc_per_node", "--standalone", "--base", "--diff", "--no-deps",  # torchrun, apply, pip
                      "--workdir", "--hidden", "--layers", "--logdir"}  # demo, tensorboard
    mentioned = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9_-]*[a-z0-9]", text)) - other_commands
    assert mentioned - cli_options == set(), "documented but not an option"
    assert cli_options - {"--help"} - mentioned == set(), "an option the docs do not describe"
