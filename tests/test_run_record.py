"""Every finished run leaves a RunRecord (record.json): what the scaling fits read about it."""
import json

import pytest
import torch

from keel.parallel.local import LocalEngine
from keel.training.data import TokenWindows
from keel.training.flops import count_params, training_flops_per_token
from keel.training.loop import evaluate, train
from keel.training.record import eval_curve, eval_set_fingerprint, read_record
from keel.training.schedule import lr_at


def test_a_finished_run_records_its_sizes_tokens_flops_and_eval_curve(tiny_config):
    cfg = tiny_config("train.eval_every=15", "train.name=rec")
    summary = train(cfg)
    r = read_record(summary.run_dir)
    assert r.tokens == 30 * 8 * 32 == summary.tokens
    assert r.params == count_params(cfg.model).total
    assert r.non_embedding_params == count_params(cfg.model).non_embedding < r.params
    assert r.flops == training_flops_per_token(cfg.model, 32) * r.tokens
    assert r.flops_6nd == 6 * r.non_embedding_params * r.tokens
    assert [e["step"] for e in r.eval_curve] == [0, 15, 30]
    assert r.eval_curve[1]["tokens"] == 15 * 8 * 32
    assert r.final_loss == summary.val_loss == r.eval_curve[-1]["loss"]
    assert r.lrs == [lr_at(s, cfg.optim.lr, 30, cfg.schedule) for s in range(30)]
    assert r.eval_at_end_of_decay and r.final_lr_ratio == pytest.approx(r.lrs[-1] / cfg.optim.lr)
    assert r.schedule["name"] == "cosine" and r.schedule["steps"] == 30


def test_the_eval_set_fingerprint_follows_the_held_out_windows_not_the_batch_size(tiny_config):
    # evaluate() scores eval_batches x global_batch_size windows: 2 x 8 and 4 x 4 are the same 16.
    a = read_record(train(tiny_config("train.steps=2", "train.name=a")).run_dir)
    b = read_record(train(tiny_config("train.steps=2", "train.name=b", "train.global_batch_size=4",
                                      "train.micro_batch_size=4", "train.eval_batches=4")).run_dir)
    c = read_record(train(tiny_config("train.steps=2", "train.name=c", "train.eval_batches=3")).run_dir)
    assert a.data_fingerprint == b.data_fingerprint == c.data_fingerprint
    assert a.eval_set == b.eval_set != c.eval_set
    assert b.eval_curve[0]["loss"] == pytest.approx(a.eval_curve[0]["loss"], rel=1e-5)  # same windows, same model


def test_runs_that_differ_only_in_seed_are_scored_on_the_same_held_out_tokens(tiny_config, corpus_dir):
    # The seed changes the initial weights and the training order, not what the eval loss measures: a seed
    # sweep's spread is then the training's, with no held-out sampling noise of its own.
    a, b = tiny_config("train.seed=0"), tiny_config("train.seed=1")
    engine = LocalEngine(a, torch.device("cpu"))
    windows = TokenWindows(corpus_dir, "val", a.data.seq_len)
    assert evaluate(engine, windows, b) == evaluate(engine, windows, a)
    other_windows = tiny_config("train.eval_batches=3")
    assert evaluate(engine, windows, other_windows) != evaluate(engine, windows, a)
    assert eval_set_fingerprint(a, "data") == eval_set_fingerprint(b, "data") != eval_set_fingerprint(other_windows, "data")


def test_a_restarted_run_records_each_evaluated_step_once_the_last_measurement_winning(tmp_path):
    rows = [{"kind": "eval", "step": 0, "val_loss": 5.0}, {"kind": "eval", "step": 10, "val_loss": 4.0},
            {"kind": "step", "step": 11, "loss": 3.9},
            {"kind": "eval", "step": 10, "val_loss": 4.1}, {"kind": "eval", "step": 20, "val_loss": 3.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert eval_curve(tmp_path / "metrics.jsonl", 100) == [
        {"step": 0, "tokens": 0, "loss": 5.0}, {"step": 10, "tokens": 1000, "loss": 4.1},
        {"step": 20, "tokens": 2000, "loss": 3.0}]
