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

With --baseline-tree DIR (another checkout of keel, say the commit before a change), a third run per round
trains supervised with that tree's code (imported through a `keel` link to it), so a change's effect is
measured in the same run, interleaved with both.

With --beside-ray, another run per round trains inline while a separate process holds an embedded Ray as
keel starts one, with one actor that it polls as the supervisor polls a rank's: what Ray's presence alone
costs, with no supervised path in the training process.

    python benchmarks/supervision.py [--steps 60] [--rounds 3] [--baseline-tree DIR] [--beside-ray]
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

# The process beside a "beside-ray" run: an embedded Ray and one idle actor, polled every POLL_S.
HOLD_RAY = """
import signal, sys, time
import ray
from keel.launcher.cluster import connect
from keel.launcher.supervisor import POLL_S
connect(None)
signal.signal(signal.SIGTERM, lambda *_: (ray.shutdown(), sys.exit(0)))  # leaves nothing running behind it

@ray.remote
class Idle:
    def heartbeat(self):
        return []

actor = Idle.remote()
ray.get(actor.heartbeat.remote())
print("ready", flush=True)
while True:
    time.sleep(POLL_S)
    ray.get(actor.heartbeat.remote())
"""


def one_run(arm: str, out: Path, steps: int, tree: Path | None = None) -> dict:
    """One run; `arm` is "inline", "ray", "baseline" (supervised, with the code in `tree`) or "beside-ray"
    (inline, beside an embedded Ray that another process holds)."""
    launcher = "ray" if arm in ("ray", "baseline") else "inline"
    sets = [f"train.steps={steps}", "train.eval_every=0", "train.eval_batches=1", "checkpoint.interval=0",
            f"train.output_dir={out}", f"train.name={arm}", "logging.progress=false",
            "logging.wandb.mode=disabled"]
    cmd = [sys.executable, "-m", "keel.launcher.cli", "train", "configs/tiny.yaml", "--launcher", launcher,
           *[a for s in sets for a in ("--set", s)]]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    cwd = ROOT
    if arm == "baseline":
        link = out / "path" / "keel"  # `import keel` finds the baseline tree ahead of the installed one
        link.parent.mkdir()
        link.symlink_to(tree.resolve())
        env["PYTHONPATH"] = str(link.parent)
        cwd = tree
    beside = None
    if arm == "beside-ray":
        beside = subprocess.Popen([sys.executable, "-c", HOLD_RAY], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                  text=True)
        if beside.stdout.readline().strip() != "ready":
            raise SystemExit("the embedded Ray beside the run did not start")
    t0 = time.time()
    try:
        result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    finally:
        if beside is not None:
            beside.terminate()
            beside.wait(timeout=60)
    wall = time.time() - t0
    if result.returncode:
        raise SystemExit(f"{arm} run failed:\n{result.stderr[-3000:]}")
    records = [json.loads(x) for x in (out / arm / "metrics.jsonl").read_text().splitlines()]
    steps_ = [r for r in records if r["kind"] == "step"]
    first = steps_[0]
    steady = steps_[5:]
    tokens = sum(r["tokens_per_s"] * r["step_s"] for r in steady)
    return {"launcher": arm, "startup_s": first["time"] - first["step_s"] - t0,
            "tokens_per_s": tokens / sum(r["step_s"] for r in steady), "wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--baseline-tree", type=Path, help="another keel checkout, run supervised as a third arm")
    parser.add_argument("--beside-ray", action="store_true",
                        help="also train inline beside an embedded Ray held by another process")
    parser.add_argument("--csv", default=str(ROOT / "benchmarks" / "results" / "supervision.csv"))
    args = parser.parse_args()
    arms = ("inline", "ray") + ("baseline",) * bool(args.baseline_tree) + ("beside-ray",) * args.beside_ray

    runs = []
    for r in range(args.rounds):
        for arm in arms:
            with tempfile.TemporaryDirectory(prefix="keel-supervision-") as out:
                runs.append({"round": r + 1, **one_run(arm, Path(out), args.steps, args.baseline_tree)})
            x = runs[-1]
            print(f"round {r + 1} {arm:8s}: start-up {x['startup_s']:5.2f} s, {x['tokens_per_s']:,.0f} tok/s, "
                  f"wall {x['wall_s']:.1f} s", flush=True)

    def med(launcher: str, key: str) -> float:
        return statistics.median(x[key] for x in runs if x["launcher"] == launcher)

    def paired(a: str, b: str) -> float:
        """The median over rounds of a's tokens/s over b's in the same round: drifts in the machine's speed
        between rounds cancel."""
        return statistics.median(x["tokens_per_s"] / y["tokens_per_s"] for x in runs if x["launcher"] == a
                                 for y in runs if y["launcher"] == b and y["round"] == x["round"])

    added = med("ray", "startup_s") - med("inline", "startup_s")
    ratio = med("ray", "tokens_per_s") / med("inline", "tokens_per_s")
    print(f"\nconfigs/tiny.yaml, {args.steps} steps x {args.rounds} interleaved rounds, {os.cpu_count()} CPUs")
    names = {"inline": "inline", "ray": "supervised", "baseline": "baseline", "beside-ray": "beside Ray"}
    print(f"{'':22s}" + "".join(f"{names[arm]:>12s}" for arm in arms))
    for key, label, fmt in (("startup_s", "start-up (s)", "{:12.2f}"), ("tokens_per_s", "tokens/s", "{:12,.0f}"),
                            ("wall_s", "wall (s)", "{:12.1f}")):
        print(f"{label:22s}" + "".join(fmt.format(med(arm, key)) for arm in arms))
    print(f"start-up added: {added:.2f} s (target <= 5 s: {'PASS' if added <= 5 else 'FAIL'})")
    print(f"tokens/s ratio: {ratio:.3f} (target >= 0.98: {'PASS' if ratio >= 0.98 else 'FAIL'}); "
          f"median of the rounds' own ratios {paired('ray', 'inline'):.3f}")
    if args.baseline_tree:
        print(f"baseline tree {args.baseline_tree}: supervised {paired('baseline', 'inline'):.3f}x inline; "
              f"this tree's supervised run {paired('ray', 'baseline'):.3f}x the baseline's (medians of rounds)")
    if args.beside_ray:
        print(f"inline beside an embedded Ray: {paired('beside-ray', 'inline'):.3f}x inline; the supervised run "
              f"{paired('ray', 'beside-ray'):.3f}x it (medians of rounds)")
    Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
    with open(args.csv, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["round", "launcher", "startup_s", "tokens_per_s", "wall_s"])
        w.writeheader()
        w.writerows(runs)


if __name__ == "__main__":
    main()
