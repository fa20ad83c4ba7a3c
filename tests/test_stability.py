"""Loss-spike detection and remediation: quiet on healthy curves, immediate on NaN, spikes and divergence;
in the loop, bad data is rolled back and skipped, a blown-up learning rate is undone, a NaN update is
never applied, and a run that stays unstable stops with a report."""
import math

import numpy as np
import pytest
import torch

from keel.training.stability import SpikeDetector


def healthy_curve(steps: int, seed: int):
    """A training-like loss curve: fast fall, slow tail, 2% multiplicative noise; grad norms likewise."""
    rng = np.random.default_rng(seed)
    t = np.arange(steps)
    loss = (2.0 + 3.5 * np.exp(-t / 40)) * (1 + 0.02 * rng.standard_normal(steps))
    grad = (0.8 + 4.0 * np.exp(-t / 20)) * (1 + 0.10 * rng.standard_normal(steps))
    return loss.tolist(), grad.tolist()


def run(detector, loss, grad, start=1):
    return [detector.judge(start + i, l, g) for i, (l, g) in enumerate(zip(loss, grad))]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_no_false_alarms_on_a_healthy_curve(seed):
    verdicts = run(SpikeDetector(), *healthy_curve(500, seed))
    assert [v for v in verdicts if v.anomalous] == []
    assert sum(v.kind == "warmup" for v in verdicts) == 50


def test_non_finite_loss_or_gradient_is_flagged_at_once_even_in_warmup():
    d = SpikeDetector()
    assert d.judge(1, math.nan, 1.0).kind == "non_finite"
    assert d.judge(2, 3.0, math.inf).kind == "non_finite"
    assert d.judge(3, 3.0, 1.0).kind == "warmup"


def test_disabled_stability_keeps_no_baseline_and_judges_nothing_but_non_finite_steps():
    from keel.training.config import StabilityConfig
    from keel.training.stability import Stabilizer

    off = Stabilizer(StabilityConfig(enabled=False))
    loss, grad = healthy_curve(200, seed=0)
    loss[150] *= 10  # a spike an enabled detector flags (see the test below)
    verdicts = [off.judge(i + 1, l, g)[0].kind for i, (l, g) in enumerate(zip(loss, grad))]
    assert set(verdicts) == {"off"} and len(off.detector.losses) == 0
    verdict, action = off.judge(201, math.nan, 1.0)
    assert verdict.kind == "non_finite" and off.drops(verdict, action)  # a NaN update is never applied


def test_a_spike_is_flagged_on_its_step_and_does_not_move_the_baseline():
    loss, grad = healthy_curve(300, 0)
    d = SpikeDetector()
    run(d, loss[:200], grad[:200])
    baseline = d.state_dict()
    spike = d.judge(201, loss[200] * 1.5, grad[200])
    assert spike.kind == "spike" and spike.z_loss > 6 and "loss z=" in spike.reason
    assert d.state_dict() == baseline  # a spike is kept out of the window
    assert d.judge(202, loss[201], grad[201]).kind == "ok"
    assert d.judge(203, loss[202], grad[202] * 20).kind == "spike"  # a gradient-norm spike alone


def test_a_slow_divergence_is_flagged_after_the_configured_number_of_steps():
    loss, grad = healthy_curve(200, 0)
    d = SpikeDetector(divergence_steps=20)
    run(d, loss, grad)
    level = float(np.median(loss[-100:]))
    # 15 % above the baseline (z about 3.5, since the window also holds the falling trend): no single
    # step is a spike, but the loss does not come back.
    verdicts = run(d, [level * 1.15] * 30, grad[-30:], start=201)
    kinds = [v.kind for v in verdicts]
    assert "spike" not in kinds
    assert kinds.index("divergence") == 19


def test_state_round_trip_gives_the_same_verdicts():
    loss, grad = healthy_curve(300, 1)
    a = SpikeDetector()
    run(a, loss[:150], grad[:150])
    b = SpikeDetector()
    b.load_state_dict(a.state_dict())
    tail = ([*loss[150:], loss[-1] * 2], [*grad[150:], grad[-1]])
    assert run(a, *tail, start=151) == run(b, *tail, start=151)


# -- in the training loop: real runs of the tiny test model, with injected trouble ---------------------

def events_of(run_dir, kind):
    import json

    return [e for e in map(json.loads, (run_dir / "events.jsonl").read_text().splitlines()) if e["kind"] == kind]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_clean_runs_of_500_steps_raise_no_alarm(tiny_config, seed):
    from keel.training.loop import train

    summary = train(tiny_config("train.steps=500", f"train.seed={seed}", f"train.name=clean{seed}"))
    assert summary.incidents == [] and events_of(summary.run_dir, "anomaly") == []


def test_injected_nan_gradient_is_never_applied(tiny_config):
    from keel.checkpoints.export import full_model_state
    from keel.training.loop import train

    summary = train(tiny_config("train.steps=8", "checkpoint.interval=1", "checkpoint.async_save=false",
                                "checkpoint.keep_last=10", "fault.inject=[nan@5]"))
    assert [(i["step"], i["kind"], i["action"]) for i in summary.incidents] == [(5, "non_finite", "skip_step")]
    folder = summary.run_dir / "checkpoints"
    before, after = full_model_state(folder / "step_0000004"), full_model_state(folder / "step_0000005")
    assert all(torch.equal(before[k], after[k]) for k in before)  # step 5 changed nothing
    assert all(torch.isfinite(t).all() for t in full_model_state(folder / "step_0000008").values())


def test_lower_lr_scales_the_learning_rate_for_its_window_then_restores_it(tiny_config):
    import json

    from keel.training.loop import train

    summary = train(tiny_config("train.steps=40", "schedule.name=constant", "schedule.warmup_steps=1",
                                "fault.inject=[nan@20]", "stability.actions=['lower_lr(factor=0.25, steps=10)']"))
    assert [(i["step"], i["action"]) for i in summary.incidents] == [(20, "lower_lr(factor=0.25, steps=10)")]
    records = [json.loads(line) for line in (summary.run_dir / "metrics.jsonl").read_text().splitlines()]
    lr = {r["step"]: r["lr"] for r in records if r["kind"] == "step"}
    base = lr[19]
    assert all(lr[s] == pytest.approx(0.25 * base) for s in range(20, 31))  # from the anomaly to step 30
    assert lr[31] == pytest.approx(base) and lr[40] == pytest.approx(base)


def test_garbage_batches_are_caught_rolled_back_skipped_and_the_run_ends_within_2_percent(tiny_config):
    from keel.training.loop import train

    common = ["train.steps=300", "checkpoint.interval=10"]
    clean = train(tiny_config(*common, "train.name=clean"))
    bad = train(tiny_config(*common, "train.name=garbage", "fault.inject=[garbage@150-160]",
                            "stability.actions=[skip_step, rollback(skip_batches=30)]"))
    assert bad.incidents[0]["step"] in (150, 151)  # garbage starts at step 150: caught within 2 steps
    (rollback,) = events_of(bad.run_dir, "rollback")
    assert rollback["to_step"] == 140
    first, stop = rollback["skipped_batches"]
    assert first <= 149 and stop >= 160  # batches 149..159 are the garbage ones (step = batch + 1)
    assert abs(bad.val_loss - clean.val_loss) / clean.val_loss <= 0.02

    # `keel spikes` tells the story: a table row per anomaly, and a plot.
    import subprocess
    import sys

    shown = subprocess.run([sys.executable, "-m", "keel.launcher.cli", "spikes", str(bad.run_dir)],
                           capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    assert "2 anomalies, 1 rollbacks" in shown.stdout and f"{first}..{stop - 1}" in shown.stdout
    assert (bad.run_dir / "spikes.png").stat().st_size > 10_000


def test_learning_rate_blow_up_is_caught_rolled_back_and_the_run_finishes(tiny_config):
    from keel.training.loop import train

    summary = train(tiny_config("train.steps=300", "checkpoint.interval=10", "fault.inject=[lr_spike@200-205]"))
    assert [i["action"] for i in summary.incidents][:2] == ["skip_step", "rollback(skip_batches=200)"]
    assert events_of(summary.run_dir, "rollback")[0]["to_step"] < 200
    assert summary.val_loss < summary.first_val_loss - 2 and math.isfinite(summary.val_loss)


def test_gives_up_after_max_rollbacks_with_a_report_of_steps_and_batches(tiny_config):
    from keel.training.loop import train
    from keel.training.stability import StabilityError

    with pytest.raises(StabilityError, match=r"still unstable after 2 rollbacks .*skipped batches \[\d+, \d+\]"):
        train(tiny_config("train.steps=300", "checkpoint.interval=10", "fault.inject=[garbage@100-300]",
                          "stability.actions=[rollback(skip_batches=5)]", "stability.max_rollbacks=2"))


def test_bad_policy_is_a_config_error_naming_the_forms(tiny_config):
    from keel.training.config import ConfigError

    with pytest.raises(ConfigError, match=r"cannot read 'rollback\(batches=3\)'.*takes skip_batches"):
        tiny_config("stability.actions=[rollback(batches=3)]")


def test_a_rollback_is_durable_at_once_and_retires_the_abandoned_trajectory(tiny_config):
    """Killed right after a rollback (before the next save), the run must resume from the checkpoint it
    rolled back to, skip the same batches and end exactly as the uninterrupted run: the rollback's
    decisions are in checkpoints/rollbacks.json the moment it happens, and checkpoints saved on the
    abandoned trajectory are never resumed from."""
    import shutil

    from keel.checkpoints import manifest as mf
    from keel.training.loop import train

    common = ["train.steps=200", "checkpoint.interval=10", "checkpoint.keep_last=20",
              "stability.actions=[skip_step, rollback(skip_batches=30)]"]
    # An episode with a checkpoint inside it: the garbage batch of step 150 is skipped and the step-150
    # checkpoint is saved; more garbage at 157 escalates to a rollback to before the episode (step 140).
    whole = train(tiny_config(*common, "train.name=whole", "fault.inject=[garbage@150, garbage@157-158]"))
    (rollback,) = events_of(whole.run_dir, "rollback")
    folder = whole.run_dir / "checkpoints"
    ledger = rollbacks_ledger(folder)
    assert ledger[-1]["to_step"] == rollback["to_step"] and [list(r) for r in ledger[-1]["skip_ranges"]] == \
        [rollback["skipped_batches"]]
    assert rollback.get("retired"), "no checkpoint of the abandoned trajectory was set aside"

    # The same run, "killed" right after that rollback: its checkpoints after the rollback target never
    # got written, but the ledger did.
    crashed = tiny_config(*common, "train.name=crashed", "fault.inject=[garbage@150, garbage@157-158]")
    shutil.copytree(folder, crashed.train.output_dir + "/crashed/checkpoints")
    target = rollback["to_step"]
    for e in mf.entries(crashed.train.output_dir + "/crashed/checkpoints"):
        if e.step > target:
            shutil.rmtree(e.path)
    resumed = train(crashed)
    (event,) = events_of(resumed.run_dir, "resumed")
    assert event["step"] == target and event["rollback_applied"] == rollback["from_step"]
    assert events_of(resumed.run_dir, "anomaly") == []  # the bad batches are not served again
    assert resumed.final_loss == whole.final_loss


def rollbacks_ledger(folder):
    from keel.checkpoints import rollbacks

    return rollbacks.read(folder)
