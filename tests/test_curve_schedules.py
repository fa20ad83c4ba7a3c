"""The loss-curve law on real runs (the short version of benchmarks/curve_schedules.py): one model trained
with three schedules on the embedded Ray; the law fitted to two runs predicts the third's curve."""
import csv

import pytest


@pytest.mark.timeout(600)
def test_two_schedules_of_real_runs_predict_the_third_schedules_curve(tmp_path, capsys, benchmark_script):
    bench = benchmark_script("curve_schedules")
    assert bench.main(["--steps", "600", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out

    records = {n: tmp_path / "runs" / n / "record.json" for n in bench.SCHEDULES}
    assert all(p.is_file() for p in records.values())
    rows = list(csv.DictReader((tmp_path / "curve_schedules.csv").read_text().splitlines()))
    assert {r["held_out"] for r in rows} == {"cosine", "constant", "wsd"}
    wsd = [r for r in rows if r["held_out"] == "wsd"]
    assert wsd[0]["fitted_on"] == "cosine+constant"
    # The schedules really differ where WSD decays: its last eval lies below the constant run's.
    final = {n: float([r for r in rows if r["held_out"] == n][-1]["observed"]) for n in ("wsd", "constant")}
    assert final["wsd"] < final["constant"] * 0.98
    # WSD's decay, never seen in either fitted run, is predicted: the final loss within 1.5% (here +0.1%; with
    # the annealing decay held at Tissue et al.'s 0.999 instead of fitted, -3.0%), every eval within 4%.
    assert abs(float(wsd[-1]["error"])) < 0.015
    assert max(abs(float(r["error"])) for r in wsd) < 0.04
    assert (tmp_path / "curve_schedules.png").is_file()
    assert "wsd from cosine + constant" in out

    # A second call finds the runs recorded and trains nothing.
    stamps = {n: p.stat().st_mtime for n, p in records.items()}
    assert bench.main(["--steps", "600", "--out", str(tmp_path)]) == 0
    assert {n: p.stat().st_mtime for n, p in records.items()} == stamps
