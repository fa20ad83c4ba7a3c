"""A run's curve read off the ladder's runs with similar tokens per parameter, and when it stands aside."""
import dataclasses
import math

import numpy as np
import pytest

from keel.scaling.curve_shapes import CurveShapes, fit_curve_shapes
from keel.scaling.fit import ScalingFit
from keel.scaling.forecast import compare_seeds, forecast_for, seed_lines, write_seeds_csv
from keel.scaling.shared_curve import fit_shared_curves
from keel.training.config import ScheduleConfig, load_config
from keel.training.schedule import lr_at
from test_scaling_forecast import record, scaling_fit

BATCH = 1024


def schedule(steps, name="cosine", warmup=0.1, lr=0.01):
    cfg = ScheduleConfig(name=name, warmup_steps=max(1, round(warmup * steps)), min_lr_ratio=0.1)
    return [lr_at(s, lr, steps, cfg) for s in range(steps)]


def shape(f, ratio):
    """ln L(f)/L(1): how far above its end a run stands at the fraction f of its steps. Steeper the fewer
    tokens per parameter it trains on, as on this machine's ladders."""
    return (0.3 - 0.03 * math.log(ratio)) * (np.asarray(f, float) ** -0.5 - 1)


def run(n, ratio, lr=0.01):
    steps = round(n * ratio / BATCH)
    at = [round(k * steps / 10) for k in range(1, 11)]
    final = 2.5 - 0.1 * math.log(ratio)
    ratio = steps * BATCH / n  # as rounded to whole steps
    r = record(8000, 100)  # every other field of a record
    curve = [{"step": s, "tokens": s * BATCH, "loss": float(final * np.exp(shape(s / steps, ratio)))} for s in at]
    return dataclasses.replace(r, name=f"n{n}-r{ratio:.0f}", non_embedding_params=n, tokens=steps * BATCH,
                               eval_curve=curve, final_loss=curve[-1]["loss"], lrs=schedule(steps, lr=lr))


LADDER = [run(n, ratio) for n in (16000, 32000, 64000) for ratio in (10, 20, 50, 120, 300)]


def test_a_runs_curve_is_the_shape_of_ladder_runs_with_its_tokens_per_parameter_ending_at_its_forecast():
    shapes = fit_curve_shapes(LADDER)
    assert len(shapes.ratios) == len(LADDER)
    # A size the ladder never ran (twice its largest), at another peak rate
    n, ratio = 128000, 70.0
    steps = round(n * ratio / BATCH)
    lrs = schedule(steps, lr=0.003)
    at = [round(k * steps / 10) for k in range(1, 11)]
    predicted = shapes.predict(lrs, steps * BATCH, n, at, final=1.3)
    truth = 1.3 * np.exp(shape(np.asarray(at) / steps, steps * BATCH / n))
    assert np.max(np.abs(np.asarray(predicted) / truth - 1)) < 0.003
    assert predicted[-1] == pytest.approx(1.3)
    # The shape follows the ratio: at 12 tokens per parameter the curve starts much higher above its end
    steep = shapes.predict(schedule(round(n * 12 / BATCH)), round(n * 12 / BATCH) * BATCH, n,
                           [round(n * 12 / BATCH / 10)], final=1.3)
    assert steep[0] / 1.3 > predicted[0] / 1.3 + 0.1


def test_the_shapes_stand_aside_where_the_ladder_does_not_cover_the_run():
    shapes = fit_curve_shapes(LADDER)
    n = 128000
    steps = round(n * 70 / BATCH)
    at = [round(k * steps / 10) for k in range(1, 11)]
    assert shapes.predict(schedule(steps), steps * BATCH, n, at, 1.3) is not None
    # another schedule shape: WSD, or cosine with a 2% warmup
    assert shapes.predict(schedule(steps, name="wsd"), steps * BATCH, n, at, 1.3) is None
    assert shapes.predict(schedule(steps, warmup=0.02), steps * BATCH, n, at, 1.3) is None
    # more or fewer tokens per parameter than any ladder run
    for ratio in (3, 1000):
        s = round(n * ratio / BATCH)
        assert shapes.predict(schedule(s), s * BATCH, n, [s // 2, s], 1.3) is None
    # an eval before the ladder's first ones (the runs evaluated from a tenth of the way)
    assert shapes.predict(schedule(steps), steps * BATCH, n, [steps // 20, *at], 1.3) is None
    # a ladder whose runs disagree on the schedule keeps only the runs of the common shape
    mixed = LADDER + [dataclasses.replace(run(32000, 50), lrs=schedule(round(32000 * 50 / BATCH), name="wsd"))]
    assert len(fit_curve_shapes(mixed).ratios) == len(LADDER)
    assert fit_curve_shapes(LADDER[:3]) is None  # too few runs


def test_a_forecast_takes_the_ladder_runs_shape_and_falls_back_to_the_curve_law():
    shared = fit_shared_curves([record(n, steps, lr) for n in (8000, 16000, 32000)
                                for steps, lr in ((100, 0.012), (200, 0.01), (300, 0.008))])
    fit = dataclasses.replace(scaling_fit(0.35), shared_curve=shared, curve_shapes=fit_curve_shapes(LADDER))
    n, steps = 16000, round(16000 * 70 / BATCH)
    at = [round(k * steps / 10) for k in range(1, 11)]
    curve, source = fit.predict_curve(n, schedule(steps), BATCH, at, final=1.3)
    assert source == "ladder runs" and curve == fit.curve_shapes.predict(schedule(steps), steps * BATCH, n, at, 1.3)
    assert fit.predict_curve(n, schedule(steps, name="wsd"), BATCH, at, final=1.3)[1] == "curve law"
    assert fit.predict_curve(16000, schedule(steps), BATCH, at)[1] == "curve law"  # no final: the law's own L0
    # fit.json keeps the shapes
    restored = CurveShapes.from_dict(fit.curve_shapes.to_dict())
    assert restored.predict(schedule(steps), steps * BATCH, n, at, 1.3) == curve


def test_fit_json_round_trips_the_shapes(tmp_path):
    fit = dataclasses.replace(scaling_fit(0.35), curve_shapes=fit_curve_shapes(LADDER))
    fit.save(tmp_path / "fit.json")
    assert ScalingFit.load(tmp_path / "fit.json").curve_shapes == fit.curve_shapes


def noisy_ladder(sigma, seed):
    """LADDER's runs, each eval before the last moved by its own N(0, sigma) in ln L, as a run's seed moves it."""
    rng = np.random.default_rng(seed)
    ladder = []
    for r in LADDER:
        curve = [{**e, "loss": e["loss"] * float(np.exp(rng.normal(0, sigma)))} for e in r.eval_curve[:-1]]
        ladder.append(dataclasses.replace(r, eval_curve=[*curve, r.eval_curve[-1]]))
    return ladder


def test_the_curves_interval_carries_one_runs_scatter_about_the_shape():
    sigma, n, ratio = 0.02, 128000, 70.0
    steps = round(n * ratio / BATCH)
    at = [round(k * steps / 10) for k in range(1, 11)]
    # The ladder's runs, each read off the others, miss their own shape by about the scatter they were drawn with
    # (each eval's estimate rests on the ~6 runs nearest in D/N, so it wanders); at the last eval by nothing,
    # since every shape ends at 0 there.
    scatter = fit_curve_shapes(noisy_ladder(sigma, 0)).scatter(schedule(steps), steps * BATCH, n, at)
    assert np.mean(scatter[:-1]) == pytest.approx(sigma, rel=0.2) and scatter[-1] == 0
    assert max(fit_curve_shapes(LADDER).scatter(schedule(steps), steps * BATCH, n, at)) < 1e-3
    assert fit_curve_shapes(LADDER).scatter(schedule(steps, name="wsd"), steps * BATCH, n, at) is None

    # The forecast's interval along the curve is that scatter, about the final loss's own interval (zero here):
    # it holds ~80% of the evals of new runs that scatter as the ladder's did.
    cfg = load_config(None, ["model.vocab_size=256", "model.dim=64", "model.n_layers=2", "model.n_heads=4",
                             "model.n_kv_heads=4", "model.max_seq_len=64", "data.seq_len=64",
                             "train.global_batch_size=16", "train.micro_batch_size=16", "train.steps=1400",
                             "train.eval_every=140", "schedule.warmup_steps=140", "schedule.min_lr_ratio=0.1"])
    inside, widths = [], []
    for seed in range(20):
        fit = dataclasses.replace(scaling_fit(0.35), curve_shapes=fit_curve_shapes(noisy_ladder(sigma, seed)))
        forecast = forecast_for(fit, cfg)
        assert forecast["curve_from"] == "ladder runs"
        points = forecast["curve"]
        assert points[-1]["lo"] == points[-1]["hi"] == forecast["final"]["loss"]
        # the curve this run would follow without its own scatter: the true shape, to its forecast final loss
        truth = points[-1]["loss"] * np.exp(shape([p["step"] / 1400 for p in points[:-1]],
                                                  forecast["tokens"] / forecast["params"]))
        run = truth * np.exp(np.random.default_rng(100 + seed).normal(0, sigma, len(truth)))
        inside += [p["lo"] <= v <= p["hi"] for p, v in zip(points, run)]
        widths += [math.log(p["hi"] / p["loss"]) for p in points[:-1]]
    assert 0.7 <= np.mean(inside) <= 0.92
    assert np.median(widths) == pytest.approx(1.2816 * sigma, rel=0.25)


def test_runs_under_several_seeds_are_each_set_beside_the_forecast_and_so_is_their_mean_curve(tmp_path):
    steps = [100, 200, 300]
    forecast = {"final": {"loss": 2.0, "lo": 1.9, "hi": 2.1},
                "curve": [{"step": s, "loss": v, "lo": 0.97 * v, "hi": 1.03 * v}
                          for s, v in zip(steps, (3.0, 2.4, 2.0))]}
    # Two seeds stray 4% either way at the first eval; their mean meets the forecast there.
    seeds = [[3.12, 2.40, 2.00], [2.88, 2.46, 2.02]]
    records = [dataclasses.replace(record(8000, 300), final_loss=c[-1],
                                   eval_curve=[{"step": s, "tokens": s * BATCH, "loss": v} for s, v in zip(steps, c)])
               for c in seeds]
    result = compare_seeds(forecast, records)
    assert [r["curve_inside"] for r in result["runs"]] == [2, 2]
    assert [r["worst_curve_error"] for r in result["runs"]] == pytest.approx([0.04, 0.04])
    mean = result["mean_curve"]
    assert [m["mean"] for m in mean] == pytest.approx([math.sqrt(3.12 * 2.88), math.sqrt(2.40 * 2.46), math.sqrt(4.04)])
    assert result["mean_inside"] == 3 and result["worst_mean_error"] == pytest.approx(math.sqrt(2.4 * 2.46) / 2.4 - 1)
    lines = seed_lines(result, [0, 1])
    assert lines[0].startswith("seed 0: final +0.00%, worst eval 4.00% off, 2 of 3 evals inside")
    assert "mean curve: worst eval 1.24% off the forecast (step 200), 3 of 3 evals inside" in lines[-1]
    rows = write_seeds_csv(result, [0, 1], tmp_path / "seeds.csv").read_text().splitlines()
    assert rows[0] == "step,predicted,p10,p90,seed0,seed1,mean,error"
    assert rows[1].startswith("100,3.00000,2.91000,3.09000,3.12000,2.88000")
