"""`keel scale plan` and what the fits accept: ladders that can be trusted, runs measured alike."""
import dataclasses

import pytest

from keel.scaling.plan import LadderError, Ladder, parse_budgets, plan
from keel.scaling.points import check_comparable, check_endpoint, load_points
from keel.training.flops import count_params, training_flops_per_token
from keel.training.record import RunRecord

BASE = ["data.seq_len=64", "model.max_seq_len=64"]


@pytest.fixture(scope="module")
def ladder():
    return plan(None, BASE, parse_budgets("1e11:1e12:4"), sizes=5, target_flops=1e15, output_dir="runs/l")


def test_budgets_are_spaced_evenly_in_log_space():
    assert parse_budgets("1e11:1e13:3") == pytest.approx([1e11, 1e12, 1e13])
    with pytest.raises(LadderError, match="LOW:HIGH:COUNT"):
        parse_budgets("1e13:1e11:3")


def test_each_budget_gets_at_least_three_sizes_at_its_flops_and_sizes_recur_across_budgets(ladder):
    fitted = [r for r in ladder.rungs if r.role == "ladder"]
    budgets = sorted({r.budget for r in fitted})
    assert len(budgets) == 4
    for b in budgets:
        rungs = [r for r in fitted if r.budget == b]
        assert len(rungs) >= 3 and len({r.params for r in rungs}) == len(rungs)
        for r in rungs:
            cfg = ladder.config(r)  # every rung is a valid config
            assert count_params(cfg.model).non_embedding == r.params
            assert r.flops == training_flops_per_token(cfg.model, 64) * cfg.train.steps * cfg.train.global_batch_size * 64
            assert r.flops == pytest.approx(b, rel=0.1)
    sizes = [r.params for r in fitted]
    assert any(sizes.count(n) >= 3 for n in sizes)  # one size at several budgets: curves of several lengths


def test_learning_rate_follows_deepseek_in_compute_and_one_over_width_across_sizes_with_one_batch(ladder):
    # DeepSeek's rules, taken at the ladder's middle budget and the width of its expected optimum, carried
    # along C by DeepSeek's exponent and across widths by muP (lr x width / C^-0.125 is one constant for
    # every run, the check run included). One batch for every run: no batch jump bends the frontier.
    references = {r.lr * r.dim / (0.3118 * r.budget ** -0.125) for r in ladder.rungs}
    assert max(references) == pytest.approx(min(references), rel=1e-3)
    reference = min(references)
    assert round(reference) % 8 == 0 and reference == pytest.approx(round(reference), rel=1e-3)  # a width
    assert min(r.dim for r in ladder.rungs) <= reference <= max(r.dim for r in ladder.rungs)
    assert len({r.global_batch_size for r in ladder.rungs}) == 1
    middle = (1e11 * 1e12) ** 0.5
    assert ladder.rungs[0].global_batch_size * 64 == pytest.approx(0.2920 * middle ** 0.3271, rel=0.5)


def test_every_run_scores_the_same_held_out_windows_and_the_check_run_is_ten_times_the_largest(ladder):
    assert {r.eval_batches * r.global_batch_size for r in ladder.rungs} == {512}  # EVAL_SEQUENCES
    check = [r for r in ladder.rungs if r.role == "check"]
    assert len(check) == 1 and check[0].budget == pytest.approx(10 * 1e12)


def test_a_ladder_survives_a_round_trip_through_its_file(ladder, tmp_path):
    ladder.save(tmp_path / "ladder.yaml")
    again = Ladder.load(tmp_path / "ladder.yaml")
    assert again == ladder


def test_a_rung_that_repeats_the_check_run_under_another_seed_trains_it_with_that_seed(ladder, tmp_path):
    check = next(r for r in ladder.rungs if r.role == "check")
    assert ladder.config(check).train.seed == 0 and not any("train.seed" in o for o in ladder.run_overrides(check))
    repeat = dataclasses.replace(check, name=f"{check.name}-seed2", role="check-seed", seed=2)
    with_repeat = dataclasses.replace(ladder, rungs=[*ladder.rungs, repeat])
    with_repeat.save(tmp_path / "ladder.yaml")
    again = Ladder.load(tmp_path / "ladder.yaml")
    assert again.config(again.rungs[-1]).train.seed == 2
    assert ladder.config(check).model == again.config(again.rungs[-1]).model


@pytest.mark.parametrize("budgets,sizes,message", [("1e11:1e12:2", 5, "at least 3"), ("1e11:5e11:3", 5, "one decade"),
                                                   ("1e11:1e12:3", 2, "at least 3 sizes")])
def test_ladders_that_cannot_give_a_trustworthy_fit_are_refused(budgets, sizes, message):
    with pytest.raises(LadderError, match=message):
        plan(None, BASE, parse_budgets(budgets), sizes=sizes)


def record(**changes) -> RunRecord:
    base = RunRecord(name="r", params=1000, non_embedding_params=800, tokens=10_000, flops=5e7, flops_6nd=4.8e7,
                     final_loss=2.0, eval_curve=[{"step": 0, "tokens": 0, "loss": 5.5}, {"step": 100, "tokens": 10_000,
                                                                                         "loss": 2.0}],
                     lrs=[1e-3] * 100, schedule={"name": "cosine", "warmup_steps": 10, "min_lr_ratio": 0.1,
                                                 "decay_fraction": 0.2, "lr": 1e-3, "steps": 100},
                     final_lr_ratio=0.1, eval_at_end_of_decay=True, seed=0, batch_tokens=100, seq_len=64,
                     tokenizer="byte", vocab_size=256, data_fingerprint="d", eval_set="e", model={})
    return dataclasses.replace(base, **changes)


def test_losses_taken_before_the_schedule_finished_decaying_are_refused():
    check_endpoint(record())
    long_horizon = record(schedule={**record().schedule, "steps": 150})
    with pytest.raises(LadderError, match="cosine schedule 150 steps"):
        check_endpoint(long_horizon)
    wsd_mid = record(schedule={**record().schedule, "name": "wsd", "steps": 200})
    with pytest.raises(LadderError, match="stable phase"):
        check_endpoint(wsd_mid)


@pytest.mark.parametrize("field,what", [("tokenizer", "tokenizers"), ("eval_set", "held-out sets"),
                                        ("data_fingerprint", "data")])
def test_runs_measured_on_different_data_or_held_out_sets_are_not_fitted_together(field, what):
    with pytest.raises(LadderError, match=what):
        check_comparable([record(), record(name="other", **{field: "other"})])


def test_published_points_come_in_as_a_csv(tmp_path):
    (tmp_path / "paper.csv").write_text("params,tokens,loss\n1e8,2e9,3.1\n4e8,8e9,2.8\n")
    points = load_points([tmp_path / "paper.csv"])
    assert [(p.params, p.tokens, p.loss, p.flops) for p in points] == [(1e8, 2e9, 3.1, 6 * 1e8 * 2e9),
                                                                       (4e8, 8e9, 2.8, 6 * 4e8 * 8e9)]
    (tmp_path / "bad.csv").write_text("n,d,l\n1,2,3\n")
    with pytest.raises(LadderError, match="needs the columns params, tokens and loss"):
        load_points([tmp_path / "bad.csv"])


def test_the_held_out_set_is_a_whole_number_of_the_largest_batch_and_never_empty():
    small = plan(None, BASE, parse_budgets("1e11:1e12:3"), sizes=3, output_dir="runs/l", eval_sequences=100)
    largest = max(r.global_batch_size for r in small.rungs)
    assert {r.eval_batches * r.global_batch_size for r in small.rungs} == {-(-100 // largest) * largest}
    with pytest.raises(LadderError, match="--eval-sequences 0: the held-out set needs at least one sequence"):
        plan(None, BASE, parse_budgets("1e11:1e12:3"), sizes=3, output_dir="runs/l", eval_sequences=0)
