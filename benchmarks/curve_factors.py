"""What sets a run's early loss curve? One ladder run trained again with one thing changed at a time (issue 14).

The forecast's curve missed the check runs' second eval (20% of the run) low on every ladder. The check run
differs from the ladder runs it is read off in its step count (~1,000 steps to that eval against 50-360),
its peak learning rate and its warmup; and every check run was trained under seed 0. This trains one ladder
run as planned, then again with each of those changed alone, and prints ln L(f)/L(1) at every eval fraction
f: the shape the forecast reads off such runs.

    python benchmarks/curve_factors.py benchmarks/results/scaling/4.5e10_1e12_5_tasks/ladder.yaml ladder-c1e12-n33k

Variants: as planned; seed 1; a quarter of the batch for 4x the steps (the same tokens, the held-out set
unchanged); the check run's peak learning rate; the check run's warmup in steps. Runs two at a time, inline
(one CPU thread each, no supervision: the same training, deterministic), under --out; writes curve_factors.csv.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import math
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ladder", help="a ladder.yaml with a check run (benchmarks/scaling.py writes one)")
    ap.add_argument("rung", help="the name of the ladder run to train again")
    ap.add_argument("--out", default="/tmp/keel-curve-factors")
    args = ap.parse_args()

    from keel.scaling.plan import Ladder
    from keel.training.record import read_record

    ladder = Ladder.load(args.ladder)
    if ladder.base and not Path(ladder.base).exists():  # planned in another checkout: this one's copy
        ladder.base = str(ROOT / "configs" / Path(ladder.base).name)
    ladder.output_dir = args.out
    run = next((r for r in ladder.rungs if r.name == args.rung), None)
    if run is None:
        sys.exit(f"{args.ladder} has no rung {args.rung!r}")
    check = next(r for r in ladder.rungs if r.role == "check")
    variants = {
        "as planned": {},
        "seed 1": {"seed": 1},
        "1/4 batch, 4x steps": {"global_batch_size": run.global_batch_size // 4, "steps": run.steps * 4,
                                "warmup_steps": run.warmup_steps * 4, "eval_batches": run.eval_batches * 4},
        "the check run's peak lr": {"lr": check.lr},
        "the check run's warmup": {"warmup_steps": check.warmup_steps},
    }

    def train(label: str) -> tuple[str, int, float, list[tuple[float, float]]]:
        rung = dataclasses.replace(run, name=f"{run.name}-{label.replace(' ', '_').replace('/', '')}",
                                   **variants[label])
        command = [sys.executable, "-m", "keel.launcher.cli", "train", *([ladder.base] if ladder.base else []),
                   "--launcher", "inline", "--resume", "never"]
        for o in [*ladder.run_overrides(rung), "logging.progress=false", "logging.log_every=1000000000",
                  "train.cpu_threads=1", "logging.wandb.mode=disabled"]:
            command += ["--set", o]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        evals = [(e["step"], e["loss"]) for e in read_record(Path(args.out) / rung.name).eval_curve if e["step"] > 0]
        final = evals[-1][1]
        return label, rung.steps, final, [(s / rung.steps, 100 * math.log(v / final)) for s, v in evals]

    print(f"{run.name} (N {run.params}, D/N {run.tokens / run.params:.0f}, {run.steps} steps, lr {run.lr:g}, "
          f"warmup {run.warmup_steps}); the check run: lr {check.lr:g}, warmup {check.warmup_steps}", flush=True)
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(train, variants))
    # At the planned run's eval fractions (a run 4x as long rounds its evals to other steps, and adds one just
    # before its end): each shape interpolated there.
    fractions = [f for f, _ in results[0][3]]
    shapes = [np.interp(fractions, [f for f, _ in shape], [v for _, v in shape]) for *_, shape in results]
    print(f"{'':<26}{'final':>8}" + "".join(f"{f:>7.1f}" for f in fractions) + "   (ln L(f)/L(1), %)")
    for (label, steps, final, _), shape in zip(results, shapes):
        print(f"{label:<26}{final:>8.4f}" + "".join(f"{v:>7.2f}" for v in shape))
    with open(Path(args.out) / "curve_factors.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["variant", "steps", "final_loss", *(f"f{f:.1f}" for f in fractions)])
        for (label, steps, final, _), shape in zip(results, shapes):
            w.writerow([label, steps, f"{final:.5f}", *(f"{v:.3f}" for v in shape)])
    print(f"wrote {Path(args.out) / 'curve_factors.csv'}")


if __name__ == "__main__":
    main()
