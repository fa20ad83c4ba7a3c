"""A run watched against its forecast: the eval loss beside the prediction, off_forecast when it strays."""
import json

from keel.training.forecast import OFF_EVALS, Forecast
from keel.training.loop import train


def write_forecast(path, steps, lo, hi, loss):
    path.write_text(json.dumps({"source": "test", "final": {"loss": loss, "lo": lo, "hi": hi},
                                "curve": [{"step": s, "loss": loss, "lo": lo, "hi": hi} for s in steps]}))
    return path


def test_an_off_forecast_is_reported_once_per_streak_of_evals_outside_the_interval(tmp_path):
    f = Forecast(write_forecast(tmp_path / "f.json", range(1, 10), 1.0, 2.0, 1.5))
    verdicts = [f.judge(s, loss)["off"] for s, loss in enumerate([3, 3, 3, 3, 1.5, 3, 3, 3], start=1)]
    assert verdicts == [False, False, True, False, False, False, False, True]
    assert OFF_EVALS == 3
    assert f.judge(42, 3.0) is None  # no prediction at that step


def events(run_dir):
    return [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]


def test_a_run_that_misses_its_forecast_says_so_and_one_that_meets_it_does_not(tiny_config, tmp_path, capsys):
    steps = [5, 10, 15, 20, 25, 30]
    # Far below anything 30 steps can reach: the run leaves the interval at every eval.
    unreachable = write_forecast(tmp_path / "low.json", steps, 0.1, 0.2, 0.15)
    missed = train(tiny_config("train.eval_every=5", "train.name=missed", f"train.forecast={unreachable}"))
    off = [e for e in events(missed.run_dir) if e["kind"] == "off_forecast"]
    assert [e["step"] for e in off] == [15]  # the third eval outside in a row, reported once
    outcome = [e for e in events(missed.run_dir) if e["kind"] == "forecast_outcome"]
    assert outcome and outcome[0]["observed"] == missed.val_loss
    assert "OUTSIDE the interval" in capsys.readouterr().out

    wide = write_forecast(tmp_path / "wide.json", steps, 0.0, 10.0, 3.0)
    met = train(tiny_config("train.eval_every=5", "train.name=met", f"train.forecast={wide}"))
    assert not [e for e in events(met.run_dir) if e["kind"] == "off_forecast"]
    assert "inside the interval" in capsys.readouterr().out
