"""How much of a scaling forecast's miss is noise: a ladder's check run trained again under other seeds.

Each seed changes the initial weights and the order of the training data; every run is scored on the same
held-out sequences (the ladder's). The spread of the final eval losses is the noise any single check run
carries, against which a forecast's error can be read. With the ladder's fit.json beside it (or --fit), each
run's whole eval curve is also set beside the forecast made from that fit, and so is the seeds' mean curve.

    python benchmarks/scaling_seeds.py benchmarks/results/scaling/2e10_3e11_5/ladder.yaml --seeds 0 1 2
    python benchmarks/scaling_seeds.py LADDER --seeds 0 1 2 --eval-sequences 512   # another held-out set
    python benchmarks/scaling_seeds.py benchmarks/results/scaling/4.5e10_1e12_5_tasks/ladder.yaml \
        --out benchmarks/results/scaling_seeds/R     # + the curves against its fit.json

Runs `--parallel` at once (default 2, one CPU thread each), without supervision (`--launcher inline`: the
same training, none of Ray's start-up), under --out; prints and writes seeds.csv there.
"""
from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ladder", help="a ladder.yaml with a check run (benchmarks/scaling.py writes one)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--eval-sequences", type=int, default=None,
                    help="score on this many held-out sequences instead of the ladder's")
    ap.add_argument("--parallel", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "scaling_seeds"))
    ap.add_argument("--fit", default=None, help="the fit to forecast the check run's curve with (default: the "
                    "fit.json beside the ladder, if there is one)")
    args = ap.parse_args()

    from keel.scaling.fit import ScalingFit
    from keel.scaling.forecast import compare_seeds, forecast_for, seed_lines, write_seeds_csv
    from keel.scaling.plan import Ladder
    from keel.training.record import read_record

    ladder = Ladder.load(args.ladder)
    check = next(r for r in ladder.rungs if r.role == "check")
    if args.eval_sequences:
        check.eval_batches = -(-args.eval_sequences // check.global_batch_size)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sequences = check.eval_batches * check.global_batch_size
    print(f"{check.name} (N {check.params}, D {check.tokens}, lr {check.lr}) under seeds {args.seeds}, "
          f"scored on {sequences} held-out sequences", flush=True)

    base = ladder.base
    if base and not Path(base).exists():  # a ladder planned in another checkout: this one's copy of its config
        base = ladder.base = str(ROOT / "configs" / Path(base).name)

    def command(seed: int) -> list[str]:
        overrides = [*ladder.run_overrides(check), f"train.output_dir={out}",
                     f"train.name={check.name}-eval{sequences}-seed{seed}", f"train.seed={seed}",
                     "train.cpu_threads=1", "logging.progress=false", "logging.wandb.mode=disabled"]
        return [sys.executable, "-m", "keel.launcher.cli", "train", *([base] if base else []), "--launcher", "inline",
                *(a for o in overrides for a in ("--set", o))]

    rows, queue = [], list(args.seeds)
    while queue:
        batch, queue = queue[:args.parallel], queue[args.parallel:]
        procs = {seed: subprocess.Popen(command(seed), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                 for seed in batch}
        for seed, proc in procs.items():
            _, err = proc.communicate()
            if proc.returncode:
                sys.exit(f"seed {seed} failed: {err.strip().splitlines()[-1] if err.strip() else proc.returncode}")
            record = json.loads((out / f"{check.name}-eval{sequences}-seed{seed}" / "record.json").read_text())
            rows.append({"seed": seed, "eval_sequences": sequences, "final_loss": record["final_loss"]})
            print(f"seed {seed}: final eval loss {record['final_loss']:.4f}", flush=True)
    losses = [r["final_loss"] for r in rows]
    mean = statistics.mean(losses)
    spread = (max(losses) - min(losses)) / mean
    print(f"mean {mean:.4f}, spread (max - min) / mean {spread:.2%}"
          + (f", standard deviation {statistics.stdev(losses) / mean:.2%} of the mean" if len(losses) > 1 else ""))
    with open(out / f"seeds_eval{sequences}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    fit = Path(args.fit) if args.fit else Path(args.ladder).parent / "fit.json"
    if fit.is_file():
        forecast = forecast_for(ScalingFit.load(fit), ladder.config(check), str(fit))
        records = [read_record(out / f"{check.name}-eval{sequences}-seed{s}") for s in args.seeds]
        result = compare_seeds(forecast, records)
        print(f"against the forecast from {fit} ({forecast['final']['method']} law, the curve from the "
              f"{forecast['curve_from']}):")
        for line in seed_lines(result, args.seeds):
            print(line)
        path = write_seeds_csv(result, args.seeds, out / f"{check.name}-eval{sequences}-curves.csv")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
