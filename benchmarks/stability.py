"""Claims: the spike detector costs at most 1% of a training step (ratio <= 1.01), catches real-size loss
spikes, and does not raise false alarms on clean training.

1. Overhead: configs/tiny.yaml trained for --steps steps, once with stability.enabled=true and once false
   (off: no detector at all), interleaved over --rounds rounds: the ratio of their median tokens/s. Whole
   runs differ by a few percent from run to run on a shared CPU, far more than the detector costs, so the
   script also times Stabilizer.judge itself, per call, on the run's own loss curve: (step + judge) / step,
   both measured here, is the precise figure.
2. Detection: real loss/grad-norm curves from clean runs of the test-sized model (3 seeds x --curve-steps
   steps, detector off while recording). At every 7th step after the warm-up a spike of each size (loss x
   1.05 ... x 3) is put in, one at a time, and a detector fed the true prefix judges it: detection rate per
   size. False positives: anomalies raised on the unmodified curves, per judged step.
Prints the table, writes benchmarks/results/stability.csv and stability.png.

    python benchmarks/stability.py [--steps 40 --rounds 3 --curve-steps 500]
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

from keel.training.config import load_config
from keel.training.loop import train
from keel.training.presets import TEST_MODEL
from keel.training.stability import Stabilizer

ROOT = Path(__file__).resolve().parent.parent
SIZES = [1.05, 1.1, 1.2, 1.3, 1.5, 2.0, 3.0]
# The test-sized model (training/presets.py): 500 steps in seconds.
TINY = [*TEST_MODEL, "logging.log_every=100000"]


def curve(run_dir: Path) -> list[tuple[float, float]]:
    import json

    return [(r["loss"], r["grad_norm"]) for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if r["kind"] == "step"]


def judge_seconds(cfg, points) -> float:
    s = Stabilizer(cfg.stability)
    t0 = time.perf_counter()
    for i, (loss, g) in enumerate(points, 1):
        s.judge(i, loss, g)
    return (time.perf_counter() - t0) / len(points)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--curve-steps", type=int, default=500)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    out = Path(tempfile.mkdtemp(prefix="keel-stability-"))

    # 1. overhead
    on, off = [], []
    for r in range(args.rounds):
        order = ((True, on), (False, off)) if r % 2 == 0 else ((False, off), (True, on))  # alternate who goes first
        for enabled, times in order:
            cfg = load_config(ROOT / "configs" / "tiny.yaml",
                              [f"train.steps={args.steps}", "train.eval_every=0", "train.eval_batches=1",
                               "checkpoint.interval=0", "logging.wandb.mode=disabled", "logging.progress=false",
                               f"stability.enabled={str(enabled).lower()}", f"train.output_dir={out}",
                               f"train.name=overhead-{enabled}-{r}", "checkpoint.resume=never"])
            times.append(train(cfg).tokens_per_s)
    tps_on, tps_off = statistics.median(on), statistics.median(off)
    step_s = cfg.train.global_batch_size * cfg.data.seq_len / tps_off
    judge_s = judge_seconds(dataclasses.replace(cfg, stability=dataclasses.replace(cfg.stability, enabled=True)),
                            curve(out / f"overhead-False-{args.rounds - 1}") * 20)

    # 2. detection and false positives on real clean curves
    curves = []
    for seed in range(3):
        cfg = load_config(None, [*TINY, f"train.steps={args.curve_steps}", f"train.seed={seed}",
                                 "stability.enabled=false", f"train.output_dir={out}", f"train.name=curve{seed}"])
        train(cfg)
        curves.append(curve(out / f"curve{seed}"))
    base = dataclasses.replace(cfg.stability, enabled=True)
    false_alarms = judged = 0
    for points in curves:
        s = Stabilizer(base)
        for i, (loss, g) in enumerate(points, 1):
            verdict, _ = s.judge(i, loss, g)
            judged += verdict.kind != "warmup"
            false_alarms += verdict.anomalous
            if verdict.anomalous:
                print(f"false alarm: step {i} {verdict.reason}")
    detected = {size: [0, 0] for size in SIZES}
    for points in curves:
        for at in range(base.warmup + 10, len(points), 7):
            prefix = Stabilizer(base)
            for i, (loss, g) in enumerate(points[:at - 1], 1):
                prefix.judge(i, loss, g)
            state = prefix.detector.state_dict()
            for size in SIZES:
                prefix.detector.load_state_dict(state)
                verdict = prefix.detector.judge(at, points[at - 1][0] * size, points[at - 1][1])
                detected[size][0] += verdict.anomalous
                detected[size][1] += 1

    ratio = (step_s + judge_s) / step_s
    print(f"\noverhead: tiny.yaml {tps_on:,.0f} tok/s with stability on, {tps_off:,.0f} with it off "
          f"(median of {args.rounds}; off/on {tps_off / tps_on:.3f}); rounds on: "
          f"{', '.join(f'{x:,.0f}' for x in on)}; off: {', '.join(f'{x:,.0f}' for x in off)}")
    print(f"          Stabilizer.judge {judge_s * 1e6:.0f} us per step against a {step_s * 1e3:.0f} ms step: "
          f"ratio {ratio:.4f} (target <= 1.01: {'PASS' if ratio <= 1.01 else 'FAIL'})")
    print(f"false positives: {false_alarms} in {judged} judged steps of 3 clean {args.curve_steps}-step runs")
    print("spike size  detected")
    for size, (hit, n) in detected.items():
        print(f"  loss x{size:<5} {hit / n:6.1%}  ({hit}/{n})")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    with open(Path(args.out) / "stability.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["spike_size", "detected", "trials"])
        w.writerows([[size, hit, n] for size, (hit, n) in detected.items()])
        w.writerow(["false_positives", false_alarms, judged])
        w.writerow(["tokens_per_s_on_off", tps_on, tps_off])
        w.writerow(["judge_us_per_step", judge_s * 1e6, step_s * 1e6])

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(SIZES, [hit / n for hit, n in detected.values()], marker="o")
    ax.set_xscale("log")
    ax.set_xticks(SIZES, [f"x{s}" for s in SIZES])
    ax.set_xlabel("injected loss spike (multiple of the true loss)")
    ax.set_ylabel("detected on that step")
    ax.set_title(f"spike detection; false positives {false_alarms}/{judged} clean steps")
    fig.tight_layout()
    fig.savefig(Path(args.out) / "stability.png", dpi=110)


if __name__ == "__main__":
    main()
