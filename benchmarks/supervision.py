"""Claim: supervising a one-process run costs at most 5 s of start-up and keeps >= 0.98x its tokens/s.

`keel train configs/tiny.yaml` runs every run under the supervisor on an embedded Ray (one process
included); `--launcher inline` trains in the calling process with no supervision. Both are started here
as a user starts them, as subprocesses, interleaved over several rounds so that drifts in machine load
hit both alike, each in a fresh run directory. Measured per run, from its own files:
  start-up    from the command's start to the end of its first step (metrics.jsonl's first step record
              minus that step's own duration): imports, Ray, the worker actor, data, model, first eval
  tokens/s    the mean over the steps after the first five (warm-up), as the loop reports them
  wall        the whole command
Prints the medians and the ratios, and writes benchmarks/results/supervision.csv.

    python benchmarks/supervision.py [--steps 60] [--rounds 3]
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def one_run(launcher: str, out: Path, steps: int) -> dict:
    sets = [f"train.steps={steps}", "train.eval_every=0", "train.eval_batches=1", "checkpoint.interval=0",
            f"train.output_dir={out}", f"train.name={launcher}", "logging.progress=false",
            "logging.wandb.mode=disabled"]
    cmd = [sys.executable, "-m", "keel.launcher.cli", "train", "configs/tiny.yaml", "--launcher", launcher,
           *[a for s in sets for a in ("--set", s)]]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    t0 = time.time()
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    wall = time.time() - t0
    if result.returncode:
        raise SystemExit(f"{launcher} run failed:\n{result.stderr[-3000:]}")
    records = [json.loads(x) for x in (out / launcher / "metrics.jsonl").read_text().splitlines()]
    steps_ = [r for r in records if r["kind"] == "step"]
    first = steps_[0]
    steady = steps_[5:]
    tokens = sum(r["tokens_per_s"] * r["step_s"] for r in steady)
    return {"launcher": launcher, "startup_s": first["time"] - first["step_s"] - t0,
            "tokens_per_s": tokens / sum(r["step_s"] for r in steady), "wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--csv", default=str(ROOT / "benchmarks" / "results" / "supervision.csv"))
    args = parser.parse_args()

    runs = []
    for r in range(args.rounds):
        for launcher in ("inline", "ray"):
            with tempfile.TemporaryDirectory(prefix="keel-supervision-") as out:
                runs.append({"round": r + 1, **one_run(launcher, Path(out), args.steps)})
            x = runs[-1]
            print(f"round {r + 1} {launcher:6s}: start-up {x['startup_s']:5.2f} s, {x['tokens_per_s']:,.0f} tok/s, "
                  f"wall {x['wall_s']:.1f} s", flush=True)

    def med(launcher: str, key: str) -> float:
        return statistics.median(x[key] for x in runs if x["launcher"] == launcher)

    added = med("ray", "startup_s") - med("inline", "startup_s")
    ratio = med("ray", "tokens_per_s") / med("inline", "tokens_per_s")
    print(f"\nconfigs/tiny.yaml, {args.steps} steps x {args.rounds} interleaved rounds, {os.cpu_count()} CPUs")
    print(f"{'':22s}{'inline':>12s}{'supervised':>12s}")
    for key, label, fmt in (("startup_s", "start-up (s)", "{:12.2f}"), ("tokens_per_s", "tokens/s", "{:12,.0f}"),
                            ("wall_s", "wall (s)", "{:12.1f}")):
        print(f"{label:22s}" + fmt.format(med("inline", key)) + fmt.format(med("ray", key)))
    print(f"start-up added: {added:.2f} s (target <= 5 s: {'PASS' if added <= 5 else 'FAIL'})")
    print(f"tokens/s ratio: {ratio:.3f} (target >= 0.98: {'PASS' if ratio >= 0.98 else 'FAIL'})")
    Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
    with open(args.csv, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["round", "launcher", "startup_s", "tokens_per_s", "wall_s"])
        w.writeheader()
        w.writerows(runs)


if __name__ == "__main__":
    main()
