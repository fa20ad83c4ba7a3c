"""The capability suite (training/tasks.py) and its forecasts (scaling/tasks_fit.py): next-line completion
from the held-out split, scored by pass rate and answer likelihood, recorded by every run, fitted by GPT-4's
and Llama 3's laws."""
import copy
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from keel.scaling.tasks_fit import fit_tasks, predict_tasks
from keel.training.config import ConfigError
from keel.training.corpus import DataError, prepare, read_meta, stdlib_path
from keel.training.loop import train
from keel.training.model import build_model
from keel.training.record import RunRecord, read_record
from keel.training.tasks import Problem, build_suite, evaluate_suite, load_suite, suite_fingerprint
from keel.training.tokenizer import load_tokenizer


def val_bytes(corpus_dir) -> bytes:
    meta = read_meta(corpus_dir)
    return b"".join((corpus_dir / s["file"]).read_bytes() for s in meta["splits"]["val"]["shards"])


def test_the_heldout_suite_is_deterministic_and_made_of_real_next_lines_of_val_text(corpus_dir):
    suite = build_suite(corpus_dir, n_problems=64)
    assert suite == build_suite(corpus_dir, n_problems=64) and len(suite) == 64
    assert suite_fingerprint(suite) != suite_fingerprint(build_suite(corpus_dir, n_problems=64, seed=1))
    val = val_bytes(corpus_dir)
    for p in suite:
        prompt, answer = bytes(p.prompt), bytes(p.answer)
        assert len(p.prompt) == 128 and prompt.endswith(b"\n") and 0 not in p.prompt  # within one document
        assert 3 <= len(answer) <= 16 and answer.endswith(b"\n") and answer.count(b"\n") == 1 and answer.strip()
        assert prompt + answer in val  # the line that follows the prompt in the val split, exactly


def test_with_bpe_an_answer_runs_to_the_next_token_that_holds_a_line_break(tmp_path):
    # BPE whitespace tokens carry the next line's indentation ("\n    "): prompts end with such a token and
    # answers run up to and including the next one, the tokens the model saw in training.
    data = tmp_path / "bpe"
    prepare([stdlib_path() / "email" / "mime"], data, tokenizer="bpe", vocab_size=512, val_percent=30, progress=False)
    tok = load_tokenizer("bpe", data)
    suite = build_suite(data, n_problems=16, prefix_tokens=32)
    assert len(suite) == 16 and suite == build_suite(data, n_problems=16, prefix_tokens=32)
    meta = read_meta(data)
    val = tok.decode(np.concatenate([np.fromfile(data / s["file"], dtype=meta["dtype"])
                                     for s in meta["splits"]["val"]["shards"]]))
    for p in suite:
        breaks = ["\n" in tok.decode([t]) for t in p.answer]
        assert "\n" in tok.decode([p.prompt[-1]]) and breaks[-1] and not any(breaks[:-1])
        assert tok.decode(p.answer).strip() and tok.decode([*p.prompt, *p.answer]) in val


def test_a_user_task_file_is_tokenized_with_the_corpus_tokenizer(corpus_dir, tmp_path, tiny_config):
    path = tmp_path / "tasks.jsonl"
    path.write_text(json.dumps({"prompt": "def f():\n", "answer": "    return 1\n"}) + "\n\n"
                    + json.dumps({"prompt": "", "answer": "import os\n"}) + "\n")
    assert load_suite(path, corpus_dir) == [
        Problem((0, *b"def f():\n"), tuple(b"    return 1\n")),  # a prompt starts a document: after eot (0)
        Problem((0,), tuple(b"import os\n"))]
    assert tiny_config(f"train.tasks={path}").train.tasks == str(path)
    path.write_text(json.dumps({"prompt": "x"}) + "\n")
    with pytest.raises(DataError, match=r"tasks.jsonl:1: expected a JSON object"):
        load_suite(path, corpus_dir)
    with pytest.raises(ConfigError, match="neither 'heldout' nor an existing file"):
        tiny_config(f"train.tasks={tmp_path / 'missing.jsonl'}")
    with pytest.raises(ConfigError, match="train.task_samples must be positive"):
        tiny_config("train.tasks=heldout", "train.task_samples=0")


class Successor(nn.Module):
    """A real model with a known distribution: after token x it gives x + 1 (mod V) probability `p` and
    spreads the rest evenly; it remembers whether it was in eval mode when called."""

    def __init__(self, vocab: int = 16, p: float = 0.8):
        super().__init__()
        table = torch.full((vocab, vocab), math.log((1 - p) / (vocab - 1)))
        table[torch.arange(vocab), (torch.arange(vocab) + 1) % vocab] = math.log(p)
        self.register_buffer("table", table)
        self.called_in_training = None

    def forward(self, tokens_BT):
        self.called_in_training = self.training
        return self.table[tokens_BT]


def test_greedy_pass_pass_rate_and_answer_nll_follow_the_models_distribution():
    model = Successor(p=0.8)
    right, wrong, wraps = Problem((1, 2, 3), (4, 5, 6)), Problem((1, 2, 3), (4, 6, 7)), Problem((9, 15), (0,))
    res = evaluate_suite(model, [right, wrong, wraps], "cpu", samples=4000, context=8)
    rows = res["per_problem"]
    assert rows["greedy"] == [1, 0, 1] and res["greedy_accuracy"] == pytest.approx(2 / 3, rel=1e-5)
    off = 0.2 / 15
    assert rows["pass_prob"] == pytest.approx([0.8 ** 3, 0.8 * off * 0.8, 0.8], rel=1e-5)
    # The samples follow the same distribution: 4000 of them land within 4 standard errors of it.
    for rate, prob in zip(rows["pass_rate"], rows["pass_prob"]):
        assert rate == pytest.approx(prob, abs=4 * math.sqrt(prob * (1 - prob) / 4000))
    nll_right, nll_wrong = -math.log(0.8), -(2 * math.log(0.8) + math.log(off)) / 3
    assert rows["answer_nll"] == pytest.approx([nll_right, nll_wrong, nll_right], rel=1e-5)
    assert model.training and model.called_in_training is False  # scored in eval mode, left as it was
    assert evaluate_suite(model, [right, wrong, wraps], "cpu", samples=4000, context=8) == res  # seeded
    # A colder temperature sharpens the samples, not the likelihood the NLL measures.
    cold = evaluate_suite(model, [right], "cpu", samples=8, temperature=0.5, context=8)
    sharpened = 0.8 ** 2 / (0.8 ** 2 + 15 * off ** 2)
    assert cold["per_problem"]["pass_prob"][0] == pytest.approx(sharpened ** 3, rel=1e-5)
    assert cold["answer_nll"] == pytest.approx(nll_right, rel=1e-5)


def test_training_lowers_the_answer_nll_from_chance_and_the_run_records_the_tasks(tiny_config, corpus_dir):
    cfg = tiny_config("train.steps=80", "train.tasks=heldout", "train.task_samples=4", "train.task_problems=48",
                      "train.name=tasks")
    untrained = build_model(cfg.model, "cpu")
    untrained.init_weights(cfg.train.seed)
    suite = build_suite(corpus_dir, n_problems=48)
    chance = evaluate_suite(untrained, suite, "cpu", context=cfg.data.seq_len)
    assert chance["answer_nll"] == pytest.approx(math.log(256), abs=0.1)  # near-uniform over 256 bytes

    tasks = read_record(train(cfg).run_dir).tasks
    assert tasks["source"] == "heldout" and tasks["suite"] == suite_fingerprint(suite)
    assert (tasks["problems"], tasks["samples"], tasks["context"]) == (48, 4, 32)
    assert tasks["answer_nll"] < chance["answer_nll"] - 1.5
    assert len(tasks["per_problem"]["pass_rate"]) == len(tasks["per_problem"]["answer_nll"]) == 48
    assert tasks["answer_nll"] == pytest.approx(np.mean(tasks["per_problem"]["answer_nll"]), rel=1e-4)


def record(flops: float, tasks: dict, loss: float = 1.0) -> RunRecord:
    return RunRecord(name=f"r{flops:g}", params=1, non_embedding_params=1, tokens=1, flops=flops, flops_6nd=flops,
                     final_loss=loss, eval_curve=[], lrs=[], schedule={}, final_lr_ratio=0.1,
                     eval_at_end_of_decay=True, seed=0, batch_tokens=1, seq_len=1, tokenizer="byte", vocab_size=256,
                     data_fingerprint="d", eval_set="e", model={}, tasks=tasks)


def ladder(alpha=3e4, k=0.3, nll_scale=2.0, nll_exp=-0.25, nll_floor=0.8, slope=3.0, midpoint=1.5, suite="s"):
    """Records whose pass rates follow GPT-4's law exactly on 4 problems (a 5th the smallest model never
    passes), and whose answer NLL and mean pass rate follow Llama 3's two steps exactly."""
    weights = np.array([0.5, 1.0, 1.5, 1.0])  # mean 1: -E_P[log p] = alpha C^-k
    runs = []
    for c in np.geomspace(1e15, 1e17, 6):
        rates = list(np.exp(-weights * alpha * c ** -k)) + [0.0 if c == 1e15 else 0.5]
        nll = nll_floor + nll_scale * (c / 1e16) ** nll_exp
        runs.append(record(c, {"suite": suite, "temperature": 1.0, "answer_nll": nll,
                               "pass_rate": 1 / (1 + math.exp(slope * (nll - midpoint))),
                               "per_problem": {"pass_rate": rates, "pass_prob": rates}},
                           loss=0.5 + 0.4 * nll))  # the eval loss, a line in the answer NLL
    return runs


def test_fit_tasks_recovers_gpt4s_pass_rate_law_and_llama3s_two_steps():
    fit = fit_tasks(ladder())
    assert fit["runs"] == 6 and fit["problems"] == 5 and fit["solved_problems"] == 4 and fit["skipped"] == {}
    assert fit["capability"]["alpha"] == pytest.approx(3e4, rel=1e-6)
    assert fit["capability"]["k"] == pytest.approx(0.3, rel=1e-6)
    assert fit["two_step"]["nll"]["exponent"] == pytest.approx(-0.25, rel=1e-3)
    assert fit["two_step"]["accuracy"]["slope"] == pytest.approx(3.0, rel=1e-3)
    assert fit["two_step"]["accuracy"]["midpoint"] == pytest.approx(1.5, rel=1e-3)
    at = predict_tasks(json.loads(json.dumps(fit)), 1e18)  # from fit.json, beyond the ladder
    nll = 0.8 + 2.0 * 100 ** -0.25
    assert at["answer_nll"] == pytest.approx(nll, rel=1e-3)
    assert at["pass_rate"] == pytest.approx(1 / (1 + math.exp(3 * (nll - 1.5))), rel=1e-3)
    assert at["solved_pass_rate"] == pytest.approx(math.exp(-3e4 * 1e18 ** -0.3), rel=1e-6)
    # The bridge: at the run's forecast eval loss, the answer NLL on the ladder's line, and its pass rate.
    bridged = predict_tasks(fit, 1e18, loss=0.5 + 0.4 * nll)
    assert bridged["answer_nll_from_loss"] == pytest.approx(nll, rel=1e-9)
    assert bridged["pass_rate_from_loss"] == pytest.approx(at["pass_rate"], rel=1e-3)
    assert at["answer_nll_from_loss"] is None  # no loss given, nothing to bridge from


def test_llama3s_first_step_is_fitted_on_the_compute_optimal_run_of_each_budget():
    # An IsoFLOP ladder: at each budget the optimum (the truth's NLL) and two sizes off it, whose eval loss
    # and answer NLL are higher. Through every run, step 1 would fit the budgets' averages, not the frontier.
    runs = []
    for r in ladder():
        runs.append(r)
        for k, penalty in enumerate((0.3, 0.6)):
            worse = copy.deepcopy(r.tasks)
            worse["answer_nll"] += penalty
            worse["pass_rate"] = 1 / (1 + math.exp(3.0 * (worse["answer_nll"] - 1.5)))
            runs.append(record(r.flops * (1 + 0.01 * (k + 1)), worse, loss=r.final_loss + 0.4 * penalty))
    fit = fit_tasks(runs)
    assert fit["two_step"]["nll"]["exponent"] == pytest.approx(-0.25, rel=1e-3)
    assert fit["two_step"]["nll"]["offset"] == pytest.approx(0.8, rel=1e-3)


def test_fit_tasks_refuses_mixed_suites_and_says_why_a_law_could_not_be_fitted():
    with pytest.raises(ValueError, match="2 different task suites"):
        fit_tasks(ladder()[:3] + ladder(suite="other")[3:])
    assert fit_tasks([record(1e15, {})]) is None  # nothing scored: nothing to fit
    few = fit_tasks(ladder()[:3])  # 3 runs: enough for GPT-4's line, not for a power law with offset
    assert few["capability"] is not None and few["two_step"] is None
    assert "at least 4" in few["skipped"]["two_step"]
    none_solved = ladder()
    for r in none_solved[:1]:
        r.tasks["per_problem"]["pass_rate"] = [0.0] * 5
    unsolved = fit_tasks(none_solved)
    assert unsolved["capability"] is None and "no problem is solved" in unsolved["skipped"]["capability"]
    assert predict_tasks(unsolved, 1e18)["solved_pass_rate"] is None
