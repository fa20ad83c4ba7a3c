"""Predictable scaling, end to end on this machine: plan a ladder, run it, fit, predict a held-out run with
10x the largest ladder budget before it starts, run it, and compare.

    python benchmarks/scaling.py            # 19-run ladder, five budgets over 2e10..6e11 FLOPs, check run at 6e12
    python benchmarks/scaling.py --quick    # 9 runs over 2e10..2e11, check at 2e12 (a few minutes)
    python benchmarks/scaling.py --tasks    # every run also scored on next-line completion; the check run's
                                            # answer NLL and pass rate forecast too (tasks.csv)
    python benchmarks/scaling.py --check-seeds 3  # the check run under seeds 0, 1 and 2 (check_seeds.csv)

Models this small are far from Chinchilla's regime: their output layer and attention are most of their
FLOPs, and their compute-optimal run sees more tokens per parameter (70-150 per non-embedding parameter at
the budgets of this machine's first ladder), so the sizes centre on 100 (keel scale plan --tokens-per-param)
rather than Chinchilla's 20.

Every run is a supervised `keel train` run on the embedded Ray (keel scale run), on the embedded corpus
(this Python's standard library, byte-level). Prints the prediction and its 80% interval (made before the
check run starts), the observed final loss, the worst error along the eval curve, and the wall times;
writes the ladder, fit.json, the report (PNG plots, runs.csv, check.csv) and scaling.csv under --out.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the short version (9 runs, check at 2e12)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "scaling"))
    ap.add_argument("--parallel", type=int, default=2)
    ap.add_argument("--budgets", default=None, help="the ladder's budgets, LOW:HIGH:COUNT (default 2e10:6e11:5; "
                    "--quick 2e10:2e11:3): another ladder to check the method on")
    ap.add_argument("--tasks", action="store_true",
                    help="score every run on the built-in next-line suite (train.tasks=heldout) and forecast the check "
                         "run's answer NLL and pass rate too (writes tasks.csv)")
    ap.add_argument("--eval-sequences", type=int, default=512,
                    help="held-out sequences every run is scored on (ladders A-E of RESULTS.md used 64)")
    ap.add_argument("--check-seeds", type=int, default=1,
                    help="train the check run under this many seeds (0, 1, ...), after the forecast, and set the "
                    "forecast beside each run and beside their mean curve: a run's seed alone moves its early evals "
                    "by 1-3%%")
    args = ap.parse_args()

    from keel.launcher.raylaunch import train_on_ray
    from keel.scaling.fit import fit_points
    from keel.scaling.forecast import (compare, compare_seeds, forecast_for, seed_lines, task_lines,
                                       write_forecast, write_seeds_csv)
    from keel.scaling.plan import parse_budgets, plan
    from keel.scaling.points import load_points
    from keel.scaling.report import write_report
    from keel.scaling.runner import QUIET, run_ladder
    from keel.training.record import read_record

    budgets, sizes = ("2e10:2e11:3", 3) if args.quick else ("2e10:6e11:5", 5)
    budgets = args.budgets or budgets
    out = Path(args.out) / ("quick" if args.quick else "full") / (budgets.replace(":", "_") + ("_tasks" if args.tasks else ""))
    base = ["data.seq_len=64", "model.max_seq_len=64", "logging.wandb.mode=disabled",
            *(["train.tasks=heldout"] if args.tasks else [])]
    ladder = plan(str(ROOT / "configs" / "tiny.yaml"), base, parse_budgets(budgets), sizes=sizes,
                  output_dir=str(out / "runs"), target_flops=1e15, tokens_per_param=100,
                  eval_sequences=args.eval_sequences)
    fitted = [r for r in ladder.rungs if r.role == "ladder"]
    check = next(r for r in ladder.rungs if r.role == "check")
    # The check run again under other seeds: neither fitted nor the check run (their own role).
    repeats = [dataclasses.replace(check, name=f"{check.name}-seed{s}", role="check-seed", seed=s)
               for s in range(1, args.check_seeds)]
    ladder.rungs += repeats
    out.mkdir(parents=True, exist_ok=True)
    ladder.save(out / "ladder.yaml")
    print(f"ladder: {len(fitted)} runs over {budgets} FLOPs ({sum(r.flops for r in fitted):.3g} in all); check run "
          f"{check.name}: N {check.params}, D {check.tokens}, {check.flops:.3g} FLOPs", flush=True)

    t0 = time.perf_counter()
    status = run_ladder(ladder, ("ladder",), parallel=args.parallel)
    ladder_s = time.perf_counter() - t0
    failed = [k for k, v in status.items() if v.startswith("failed")]
    if failed:
        sys.exit(f"ladder runs failed: {failed}")

    t1 = time.perf_counter()
    fit = fit_points(load_points([out / "ladder.yaml"]))
    fit.save(out / "fit.json")
    fit_s = time.perf_counter() - t1
    cfg = ladder.config(check)
    forecast = forecast_for(fit, cfg, str(out / "fit.json"))
    f = forecast["final"]
    curve = f"the whole curve from the {forecast['curve_from']}" if forecast["curve_law"] else "without the whole curve"
    print(f"prediction before the check run starts: final loss {f['loss']:.4f}, 80% interval [{f['lo']:.4f}, "
          f"{f['hi']:.4f}] by {f['method']} ({curve}); "
          + "; ".join(f"{m} {f[m]['loss']:.4f} [{f[m]['lo']:.4f}, {f[m]['hi']:.4f}]" for m in ("approach3", "frontier")
                      if m in f), flush=True)
    rerun = (out / "runs" / check.name / "record.json").exists()
    # A re-run keeps the forecast the check run was made with; the new one goes beside the ladder.
    path = write_forecast(forecast, out / "reforecast.json" if rerun else out / "runs" / check.name / "forecast.json")

    t2 = time.perf_counter()
    if rerun:  # the forecast above came after the check run
        print(f"check run {check.name} finished earlier: its record is compared with the forecast just made, "
              f"which is NOT a prediction made before it ran", flush=True)
    else:
        train_on_ray(ladder.base, [*ladder.run_overrides(check), *QUIET, f"train.forecast={path}"])
    check_s = time.perf_counter() - t2
    result = compare(forecast, read_record(out / "runs" / check.name))
    r = result["final"]
    print(f"check run: observed {r['observed']:.4f}, predicted {r['predicted']:.4f} ({100 * r['error']:+.2f}%), "
          f"{'inside' if r['inside'] else 'OUTSIDE'} the 80% interval; worst eval along the curve "
          f"{100 * result['worst_curve_error']:.2f}% off ({len(result['curve'])} evals)")
    for line in task_lines(result):
        print(f"check run's tasks, {line}")
    t3 = time.perf_counter()
    if repeats:
        failed = [k for k, v in run_ladder(ladder, ("check-seed",), parallel=args.parallel).items()
                  if v.startswith("failed")]
        if failed:
            sys.exit(f"check runs under other seeds failed: {failed}")
        seeds = [0, *(r.seed for r in repeats)]
        by_seed = compare_seeds(forecast, [read_record(out / "runs" / r.name) for r in (check, *repeats)])
        for line in seed_lines(by_seed, seeds):
            print(f"check run, {line}")
        write_seeds_csv(by_seed, seeds, out / "check_seeds.csv")
    seeds_s = time.perf_counter() - t3
    print(f"wall: ladder {ladder_s:.0f} s, fit {fit_s:.1f} s, check run {check_s:.0f} s, total "
          f"{ladder_s + fit_s + check_s:.0f} s{f' (and {seeds_s:.0f} s for the other seeds)' if repeats else ''}; "
          f"the check run used {check.flops / sum(x.flops for x in fitted):.1f}x the "
          f"ladder's compute")
    write_report(fit, out / "report", runs=[str(out / "ladder.yaml")], target_flops=check.flops * 3,
                 check=str(out / "runs" / check.name))
    with open(out / "scaling.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["ladder_runs", "ladder_flops", "check_flops", "method", "predicted", "p10", "p90", "observed", "error",
                    "inside", "worst_curve_error", "ladder_s", "check_s"])
        w.writerow([len(fitted), f"{sum(x.flops for x in fitted):.4g}", f"{check.flops:.4g}", f["method"], f"{r['predicted']:.5f}",
                    f"{r['lo']:.5f}", f"{r['hi']:.5f}", f"{r['observed']:.5f}", f"{r['error']:+.5f}", r["inside"],
                    f"{result['worst_curve_error']:.5f}", f"{ladder_s:.0f}", f"{check_s:.0f}"])
    if "tasks" in result:
        with open(out / "tasks.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["quantity", "predicted", "p10", "p90", "observed", "error", "inside", "two_step_law"])
            for name, t in result["tasks"].items():
                w.writerow([name, f"{t['predicted']:.5g}", f"{t['lo']:.5g}", f"{t['hi']:.5g}", f"{t['observed']:.5g}",
                            f"{t['error']:+.5f}", t["inside"], "" if t["law"] is None else f"{t['law']:.5g}"])
    print(f"wrote {out}/ (ladder.yaml, fit.json, report/, scaling.csv{', tasks.csv' if 'tasks' in result else ''})")


if __name__ == "__main__":
    main()
