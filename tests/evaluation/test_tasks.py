"""Multiple-choice scoring, BIG-bench task parsing, and the lm-eval adapter (tiny model; real tasks marked slow)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from amoeba_export.backends import get_backend
from amoeba_export.backends.pytorch import PyTorchRunner
from amoeba_export.errors import DataError
from amoeba_export.evaluation import tasks as t
from amoeba_export.modelio import load_tokenizer
from amoeba_export.testing import tiny_llama

TASK = {
    "name": "toy", "description": "a toy task", "task_prefix": "Pick one.",
    "example_input_prefix": "\nexample: ", "example_output_prefix": "\nanswer: ",
    "examples": [
        {"input": "the cat sat on the", "target_scores": {"mat": 1, "model": 0}},
        {"input": "the cat sat on the", "target_scores": {"mat": 1, "model": 0}},  # duplicate, dropped
        {"input": "we export small", "target_scores": {"subnets": 1, "cats": 0, "worlds": 1}},
        {"input": "no choices", "target": "x"},
    ],
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tasks") / "hf"
    tiny_llama(path)
    return path, PyTorchRunner(path), load_tokenizer(path)


def test_parse_follows_bigbench_json_format():
    task = t.parse_task(TASK, "toy")
    assert len(task.examples) == 2
    first = task.examples[0]
    # BIG-bench shows the choices in RandomState(42).permutation(sorted(choices)) order
    assert first.prompt == "Pick one.\nexample: the cat sat on the\n  choice: model\n  choice: mat\nanswer: "
    assert first.choices == ("mat", "model") and first.correct == {0}
    assert task.examples[1].correct == {0, 2}
    assert task.chance == pytest.approx((1 / 2 + 2 / 3) / 2)
    with pytest.raises(DataError, match="no multiple-choice"):
        t.parse_task({"examples": [{"input": "a", "target": "b"}]}, "gen")


def test_split_encode_keeps_the_joint_tokenization(tiny):
    _, _, tok = tiny
    ctx, cont = t.split_encode(tok, "the cat sat on the ", "mat")
    assert ctx + cont == tok("the cat sat on the mat")["input_ids"]
    assert tok.decode(cont) == " mat"


def test_continuation_logprob_matches_a_direct_computation(tiny):
    path, runner, tok = tiny
    ctx, cont = t.split_encode(tok, "the cat sat", " on the mat")
    got, greedy = t.continuation_logprob(runner, ctx, cont)
    ids = torch.tensor([ctx + cont])
    logp = torch.log_softmax(torch.from_numpy(runner.logits(ctx + cont)).double(), -1)
    want = sum(float(logp[len(ctx) - 1 + i, c]) for i, c in enumerate(cont))
    # float32 logits summed in another order: agreement to ~1e-6 relative, not bitwise
    assert got == pytest.approx(want, abs=1e-5) and ids.shape[1] == len(ctx) + len(cont)
    argmax = logp[len(ctx) - 1:-1].argmax(-1).tolist()
    assert greedy == (argmax == cont)


def test_evaluate_mc_counts_the_highest_scoring_choice(tiny):
    _, runner, tok = tiny
    task = t.parse_task(TASK, "toy")
    # Mark as correct exactly what the model prefers, then exactly what it does not: accuracy 1, then 0.
    best, worst = [], []
    for ex in task.examples:
        scores = [t.continuation_logprob(runner, *t.split_encode(tok, ex.prompt, c))[0] for c in ex.choices]
        best.append(t.MCExample(ex.prompt, ex.choices, frozenset({int(np.argmax(scores))})))
        worst.append(t.MCExample(ex.prompt, ex.choices, frozenset({int(np.argmin(scores))})))
    assert t.evaluate_mc(runner, tok, t.MCTask("b", "", tuple(best)), progress=False)["accuracy"] == 1.0
    result = t.evaluate_mc(runner, tok, t.MCTask("w", "", tuple(worst)), progress=False)
    assert (result["correct"], result["total"]) == (0, 2)
    # one right choice of 2, then of 3: guessing gets 1/2 + 1/3 right on average with variance 1/4 + 2/9, so
    # 0 correct lies 1.21 standard errors below chance
    assert result["z_vs_chance"] == pytest.approx(-(5 / 6) / (1 / 4 + 2 / 9) ** 0.5)


def test_any_logits_function_runs_as_a_runner(tiny):
    from amoeba_export.evaluation.perplexity import hf_logits_fn
    from amoeba_export.modelio import load_model

    path, runner, tok = tiny
    ids = tok("the cat sat on the mat")["input_ids"]
    wrapped = t.LogitsRunner(hf_logits_fn(load_model(path)))
    np.testing.assert_allclose(wrapped.logits(ids), runner.logits(ids), atol=1e-5, rtol=0)
    task = t.parse_task(TASK, "toy")
    assert t.evaluate_mc(wrapped, tok, task, progress=False) == t.evaluate_mc(runner, tok, task, progress=False)


def test_runner_as_lm_eval_model(tiny, tmp_path):
    from lm_eval.api.instance import Instance

    path, runner, tok = tiny
    artifact = get_backend("pytorch").export(path, tmp_path / "pt", "F32")
    lm = t.runner_lm(artifact.path, max_length=64)

    def req(kind, *args):
        return Instance(request_type=kind, doc={}, arguments=args, idx=0)

    (ll, greedy), = lm.loglikelihood([req("loglikelihood", "the cat sat", " on the mat")])
    assert (ll, greedy) == pytest.approx(t.continuation_logprob(runner, *t.split_encode(tok, "the cat sat",
                                                                                        " on the mat")))
    text = "hello tiny world! the cat sat on the mat."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    rolling, = lm.loglikelihood_rolling([req("loglikelihood_rolling", text)])
    prefix = tok.bos_token_id
    assert rolling == pytest.approx(t.continuation_logprob(runner, [prefix], ids)[0], abs=1e-4)
    out, = lm.generate_until([req("generate_until", "the cat", {"until": ["\n"], "max_gen_toks": 6})])
    greedy_ids = runner.generate(tok("the cat")["input_ids"], 6, stop_ids=[tok.eos_token_id])
    assert out == tok.decode(greedy_ids, skip_special_tokens=True).split("\n")[0]


@pytest.mark.slow
def test_bigbench_cause_and_effect_on_the_default_model():
    from amoeba_export.resources import default_model_dir

    names = t.bigbench_task_names()
    assert "cause_and_effect/two_sentences" in names and len(names) > 100
    task = t.load_bigbench_task("cause_and_effect/two_sentences")
    assert len(task.examples) == 51 and task.chance == 0.5
    model = default_model_dir()
    result = t.evaluate_mc(PyTorchRunner(model), load_tokenizer(model), task, progress=False)
    # Measured here: 25/51 (two_sentences), 24/51 (one_sentence), 29/51 (one_sentence_no_prompt) — SmolLM2-135M
    # is near chance on these with plain log-likelihood scoring. A broken scorer (labels ignored, all-first
    # choice, label leakage) lands outside this band.
    assert result["total"] == 51 and result["accuracy"] == pytest.approx(result["correct"] / 51)
    assert 0.3 < result["accuracy"] < 0.8, result
    # The band alone passes an "always the first choice" scorer. Reversing every example's choices (labels
    # follow) must leave a real scorer's count unchanged; a position-bound scorer gets 51 − c ≠ c (51 is odd).
    from dataclasses import replace

    flipped = replace(task, examples=tuple(
        replace(e, choices=e.choices[::-1], correct=frozenset(len(e.choices) - 1 - i for i in e.correct))
        for e in task.examples))
    again = t.evaluate_mc(PyTorchRunner(model), load_tokenizer(model), flipped, progress=False)
    assert again["correct"] == result["correct"], (again, result)
    with pytest.raises(DataError, match="subtasks: .*cause_and_effect/one_sentence"):
        t.load_bigbench_task("cause_and_effect/nope")
