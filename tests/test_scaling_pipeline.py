"""plan -> (runs) -> fit -> predict -> forecast -> check -> report, on runs whose losses follow known laws.

The runs here are not trained: each rung's run directory is written as a finished run would leave it
(config.yaml, metrics.jsonl with its evals, record.json built by the trainer's own code), with eval losses
from a known truth, so that what the pipeline predicts can be compared with what it should. The trainer
writing real records is tested in test_run_record.py; a real ladder trains in test_scaling_ladder.py.
"""
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from keel.launcher.cli import main
from keel.scaling.fit import ScalingFit
from keel.scaling.forecast import forecast_for
from keel.scaling.plan import Ladder, parse_budgets, plan
from keel.training.config import dump_config
from keel.training.record import build_record, write_record

BASE = ["data.seq_len=64", "model.max_seq_len=64"]
E, A, ALPHA, B, BETA = 1.2, 60.0, 0.35, 900.0, 0.33   # the truth: L(N, D) = E + A/N^a + B/D^b


def truth(n, tokens):
    return E + A / n ** ALPHA + B / tokens ** BETA


def fake_tasks(loss: float) -> dict:
    """A task suite's scores for a run of this final loss: the answer NLL a line in the loss, the pass
    probability a sigmoid in the answer NLL (the bridge and Llama 3's second step, exactly)."""
    nll = 0.2 + 1.1 * loss
    rate = 1 / (1 + np.exp(4.0 * (nll - 2.0)))
    return {"suite": "s", "temperature": 1.0, "answer_nll": nll, "pass_rate": rate, "pass_prob": rate,
            "per_problem": {"pass_rate": [rate] * 3, "pass_prob": [rate] * 3}}


def fake_run(ladder: Ladder, rung, data_dir, noise=0.0, rng=None, tasks=False):
    cfg = ladder.config(rung)
    run_dir = Path(ladder.output_dir) / rung.name
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    every, T = cfg.train.eval_every, cfg.data.seq_len
    steps = sorted({0, *range(every, cfg.train.steps + 1, every), cfg.train.steps})
    batch = cfg.train.global_batch_size * T
    lines = []
    for s in steps:
        loss = 5.5 if s == 0 else truth(rung.params, s * batch)
        if rng is not None:
            loss *= float(np.exp(rng.normal(0, noise)))
        lines.append(json.dumps({"kind": "eval", "step": s, "val_loss": loss}))
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    record = build_record(cfg, run_dir, data_dir)
    if tasks:
        record.tasks = fake_tasks(record.final_loss)
    write_record(record, run_dir)
    return run_dir


@pytest.fixture
def data_dir(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    (d / "meta.json").write_text(json.dumps({"tokenizer": "byte", "vocab_size": 256, "splits": {}}))
    return d


def test_fit_predicts_a_held_out_run_ten_times_the_largest_budget_and_the_tools_show_it(tmp_path, data_dir, capsys):
    ladder = plan(None, BASE + [f"data.path={data_dir}"], parse_budgets("1e11:1e12:4"), sizes=5,
                  output_dir=str(tmp_path / "runs"), target_flops=1e14)
    ladder.save(tmp_path / "ladder.yaml")
    rng = np.random.default_rng(0)
    for rung in ladder.rungs:
        fake_run(ladder, rung, data_dir, noise=0.003, rng=rng)

    main(["scale", "fit", str(tmp_path / "ladder.yaml"), "-o", str(tmp_path / "fit.json"), "--replicates", "60"])
    out = capsys.readouterr().out
    fitted = [r for r in ladder.rungs if r.role == "ladder"]
    assert f"approach 3 on {len(fitted)} runs" in out and "approach 2" in out and "frontier law" in out
    fit = ScalingFit.load(tmp_path / "fit.json")
    assert fit.approach3.alpha == pytest.approx(ALPHA, abs=0.1) and len(fit.replicates) >= 50

    check = next(r for r in ladder.rungs if r.role == "check")
    loss, interval = fit.loss(check.params, check.tokens)
    assert loss == pytest.approx(truth(check.params, check.tokens), rel=0.02)

    main(["scale", "predict", str(tmp_path / "fit.json"), "--flops", "1e14"])
    out = capsys.readouterr().out
    assert "compute-optimal N" in out
    lo, hi = fit.frontier_loss(1e14)[1].p10, fit.frontier_loss(1e14)[1].p90
    assert f"frontier law: loss {float(fit.frontier.predict(1e14)):.4f}, 80% interval [{lo:.4f}, {hi:.4f}]" in out
    check_dir = tmp_path / "runs" / check.name
    main(["scale", "check", str(check_dir), str(tmp_path / "fit.json")])
    out = capsys.readouterr().out
    assert "final: predicted" in out and "observed" in out

    main(["scale", "report", str(tmp_path / "fit.json"), "-o", str(tmp_path / "report"), "--runs",
          str(tmp_path / "ladder.yaml"), "--check", str(check_dir)])
    written = {p.name for p in (tmp_path / "report").iterdir()}
    assert {"runs.csv", "isoflop.png", "frontier.png", "residuals.png", "curves.png", "check.csv"} <= written
    rows = (tmp_path / "report" / "runs.csv").read_text().splitlines()
    assert len(rows) == 1 + len(fitted)


def test_a_ladder_scored_on_tasks_forecasts_the_check_runs_answer_nll_and_pass_rate_with_intervals(
        tmp_path, data_dir, capsys):
    ladder = plan(None, BASE + [f"data.path={data_dir}"], parse_budgets("1e11:1e12:4"), sizes=5,
                  output_dir=str(tmp_path / "runs"), target_flops=1e14)
    ladder.save(tmp_path / "ladder.yaml")
    rng = np.random.default_rng(0)
    fitted = [r for r in ladder.rungs if r.role == "ladder"]
    for rung in fitted:
        fake_run(ladder, rung, data_dir, noise=0.003, rng=rng, tasks=True)
    main(["scale", "fit", str(tmp_path / "ladder.yaml"), "-o", str(tmp_path / "fit.json"), "--replicates", "60"])
    fit = ScalingFit.load(tmp_path / "fit.json")
    assert fit.tasks["nll_from_loss"]["slope"] == pytest.approx(1.1, rel=0.01)

    # Before the check run: its answer NLL and pass rate from its loss forecast, each with an interval.
    check = next(r for r in ladder.rungs if r.role == "check")
    forecast = forecast_for(fit, ladder.config(check))
    nll, rate = forecast["tasks"]["answer_nll"], forecast["tasks"]["pass_rate"]
    assert nll["value"] == pytest.approx(0.2 + 1.1 * forecast["final"]["loss"], rel=1e-3)
    assert nll["lo"] < nll["value"] < nll["hi"] and rate["lo"] < rate["value"] < rate["hi"]
    true_nll = fake_tasks(truth(check.params, check.tokens))["answer_nll"]
    assert nll["value"] == pytest.approx(true_nll, rel=0.02)
    # These runs lie on the line exactly. Runs that scatter about it (by 0.05 nats) widen the interval by
    # that scatter: the check run will scatter as much.
    line = {**fit.tasks["nll_from_loss"], "rms": 0.05}
    wide = forecast_for(dataclasses.replace(fit, tasks={**fit.tasks, "nll_from_loss": line}),
                        ladder.config(check))["tasks"]["answer_nll"]
    assert wide["value"] == nll["value"] and wide["hi"] - wide["lo"] > max(nll["hi"] - nll["lo"], 0.1)
    # Likewise the pass rate: these runs lie on step 2's sigmoid, runs that pass 2.7x apart at one answer NLL
    # (a logit off by 1) widen its interval to hold as much.
    assert fit.tasks["sigmoid_logit_rms"] < 1e-3
    off = forecast_for(dataclasses.replace(fit, tasks={**fit.tasks, "sigmoid_logit_rms": 1.0}),
                       ladder.config(check))["tasks"]["pass_rate"]
    assert off["value"] == rate["value"] and off["hi"] / off["lo"] > max(rate["hi"] / rate["lo"], 2.7)

    check_dir = fake_run(ladder, check, data_dir, tasks=True)
    main(["scale", "check", str(check_dir), str(tmp_path / "fit.json")])
    out = capsys.readouterr().out
    assert f"tasks, answer NLL: predicted {nll['value']:.4g} [{nll['lo']:.4g}, {nll['hi']:.4g}], observed" in out
    assert "tasks, pass rate: predicted" in out and "two-step law from compute" in out


def test_keel_scale_fit_refits_published_points_from_a_csv(tmp_path, capsys):
    rng = np.random.default_rng(1)
    rows = ["params,tokens,loss"]
    for c in np.geomspace(1e18, 1e20, 4):
        for k in np.geomspace(0.25, 4, 5):
            n = k * np.sqrt(c / 120)
            d = c / (6 * n)
            rows.append(f"{n:.6g},{d:.6g},{(1.82 + 482 / n ** 0.348 + 2085 / d ** 0.366) * np.exp(rng.normal(0, 0.002)):.6f}")
    (tmp_path / "paper.csv").write_text("\n".join(rows) + "\n")
    main(["scale", "fit", str(tmp_path / "paper.csv"), "-o", str(tmp_path / "fit.json"), "--replicates", "40"])
    fit = ScalingFit.load(tmp_path / "fit.json")
    assert fit.approach3.alpha == pytest.approx(0.348, abs=0.05) and fit.approach3.beta == pytest.approx(0.366, abs=0.05)
    main(["scale", "predict", str(tmp_path / "fit.json"), "--params", "1e9", "--tokens", "2e10"])
    assert "80% interval" in capsys.readouterr().out


def test_a_fit_with_too_few_runs_is_one_line_with_the_fix(tmp_path, capsys):
    (tmp_path / "few.csv").write_text("params,tokens,loss\n1e8,2e9,3.1\n4e8,8e9,2.8\n")
    with pytest.raises(SystemExit) as e:
        main(["scale", "fit", str(tmp_path / "few.csv")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("keel: error: 2 runs") and "Traceback" not in err


def test_keel_train_forecast_predicts_the_run_before_step_one_and_sets_the_outcome_beside_it(
        tmp_path, corpus_dir, tiny_overrides, capsys):
    rows = ["params,tokens,loss"]
    for c in np.geomspace(1e9, 1e11, 4):
        for k in np.geomspace(0.25, 4, 5):
            n = k * np.sqrt(c / 120)
            rows.append(f"{n:.6g},{c / (6 * n):.6g},{truth(n, c / (6 * n)):.6f}")
    (tmp_path / "points.csv").write_text("\n".join(rows) + "\n")
    main(["scale", "fit", str(tmp_path / "points.csv"), "-o", str(tmp_path / "fit.json"), "--replicates", "30"])
    capsys.readouterr()
    sets = [a for s in [*tiny_overrides, f"data.path={corpus_dir}", f"train.output_dir={tmp_path}", "train.name=fc"]
            for a in ("--set", s)]
    main(["train", "configs/tiny.yaml", *sets, "--launcher", "inline", "--forecast", str(tmp_path / "fit.json")])
    out = capsys.readouterr().out
    forecast = json.loads((tmp_path / "fc" / "forecast.json").read_text())
    assert forecast["final"]["lo"] < forecast["final"]["loss"] < forecast["final"]["hi"]
    assert out.index("forecast (") < out.index("done:")  # predicted before the run, compared after it
    assert "forecast vs outcome: predicted" in out
    events = [json.loads(line)["kind"] for line in (tmp_path / "fc" / "events.jsonl").read_text().splitlines()]
    assert "forecast_outcome" in events
