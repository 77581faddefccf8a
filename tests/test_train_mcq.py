"""Specification of the multiple-choice scorer (BBH/AGIEval-style, log-likelihood per choice)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from orca_diff.train import data as orca_data  # noqa: E402
from orca_diff.train.mcq import BUILTIN_NAME, Question, read_questions, score  # noqa: E402
from test_train import one_torch_thread, rows, tokenizer, tiny_llama  # noqa: E402,F401  (fixtures)

BBH_MC = {"examples": [
    {"input": "Today is Monday. What day is tomorrow?\nOptions:\n(A) Sunday\n(B) Tuesday\n(C) Friday", "target": "(B)"},
    {"input": "Which is a fruit?\nOptions:\n(A) apple\n(B) chair", "target": "(A)"}]}
BBH_BINARY = {"examples": [{"input": "not ( True ) and ( True ) is", "target": "False"},
                           {"input": "True and not False is", "target": "True"}]}
BBH_FREE = {"examples": [{"input": f"Sort the words: w{i} v{i}", "target": f"v{i} w{i}"} for i in range(20)]}
AGIEVAL = [{"passage": "A passage.", "question": "Which one?", "options": ["(A)one", "(B)two", "(C)three"],
            "label": "C", "other": None}]


def test_the_real_benchmarks_file_formats_are_read_with_their_choices_and_answers(tmp_path):
    (tmp_path / "date_understanding.json").write_text(json.dumps(BBH_MC))
    (tmp_path / "boolean_expressions.json").write_text(json.dumps(BBH_BINARY))
    (tmp_path / "word_sorting.json").write_text(json.dumps(BBH_FREE))
    (tmp_path / "lsat-ar.jsonl").write_text("".join(json.dumps(r) + "\n" for r in AGIEVAL))
    mc, notes = read_questions(str(tmp_path / "date_understanding.json"))
    assert [(q.task, q.choices, q.answer) for q in mc] == [("date_understanding", ("(A)", "(B)", "(C)"), 1),
                                                           ("date_understanding", ("(A)", "(B)"), 0)]
    binary, _ = read_questions(str(tmp_path / "boolean_expressions.json"))
    assert [(q.choices, q.answer) for q in binary] == [(("False", "True"), 0), (("False", "True"), 1)]
    free, notes = read_questions(str(tmp_path / "word_sorting.json"))
    assert free == [] and "free-form" in notes[0]
    (agi,) = read_questions(str(tmp_path / "lsat-ar.jsonl"))[0]
    assert agi.task == "lsat-ar" and agi.choices == (" (A)", " (B)", " (C)") and agi.answer == 2
    assert agi.prompt.startswith("A passage.\n\nQ: Which one?")
    builtin, _ = read_questions(BUILTIN_NAME)
    assert len(builtin) == 12 and {q.task for q in builtin} == {"arithmetic", "yes_no", "word_problems"}


def test_each_choice_is_scored_by_its_log_likelihood_and_the_best_one_wins(tokenizer):
    """Against a direct computation: the whole sequence through the model, log-probs of the choice's tokens."""
    tokenizer.pad_token = tokenizer.eos_token
    model = tiny_llama(len(tokenizer), seed=3)
    questions = [Question("t", "What is two plus two ?", ("The answer is four .", "five", "The"), 0),
                 Question("t", "Is the sky blue ?", ("Yes", "No ."), 1)]
    expected = []
    torch.set_grad_enabled(False)
    for q in questions:
        scores = []
        for choice in q.choices:
            prompt = [tokenizer.bos_token_id] + tokenizer(orca_data.render_prompt("", q.prompt),
                                                          add_special_tokens=False)["input_ids"]
            target = tokenizer(choice, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([prompt + target])
            logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
            scores.append(sum(float(logp[len(prompt) - 1 + k, t]) for k, t in enumerate(target)))
        expected.append(max(range(len(scores)), key=scores.__getitem__))
    torch.set_grad_enabled(True)
    result = score(model, tokenizer, questions, torch.device("cpu"))
    assert result["picked"] == expected
    hits = [int(p == q.answer) for p, q in zip(expected, questions)]
    assert result["tasks"]["t"] == {"accuracy": sum(hits) / 2, "questions": 2}


def test_eval_mc_scores_the_saved_model_at_the_end_and_with_eval_only(tmp_path):
    from click.testing import CliRunner

    from orca_diff.cli.main import cli
    from orca_diff.synth import LlamaShape, write_llama
    from test_train import SAMPLE

    base = write_llama(tmp_path / "base", LlamaShape(), "BF16")
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, ["train", "--model", str(base), "--data", str(SAMPLE), "--max-steps", "1",
                                      "--max-seq-len", "128", "--out", str(out), "--eval-mc", "builtin", "-q"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["eval_mc"]["tasks"]) == {"arithmetic", "yes_no", "word_problems"}
    again = CliRunner().invoke(cli, ["train", "--eval-only", "--model", str(out / "model"), "--eval-mc", "builtin"])
    assert again.exit_code == 0, again.output
    for task, r in metrics["eval_mc"]["tasks"].items():
        assert f"{task}: accuracy {r['accuracy']:.3f}" in again.output
