"""Throughput of each parallel layout, and the pipeline bubble of each schedule, measured in one run.

Part 1 runs configs/tiny.yaml (fp32) with `keel train --nproc-per-node N` for every layout and reports the
median tokens/s over the steps after warm-up, with the ratio to one process.

Part 2 measures the bubble of each pipeline schedule from its timeline: every rank records when each of
its stages computes a forward or backward chunk (wall-clock intervals, wrapped around PipelineStage's
forward_one_chunk / backward_one_chunk / backward_weight_one_chunk); the bubble fraction of a step is
1 - busy / wall, averaged over ranks and steps. Idle time includes communication waits. Next to it, the
textbook bubble (p-1)/(v*m+p-1) for p ranks, m micro-batches and v stages per rank (GPipe/1F1B: v=1).

    python benchmarks/parallel.py [--steps 12] [--skip-throughput] [--skip-bubble]

Writes benchmarks/results/parallel_throughput.csv, parallel_bubble.csv and parallel.png.
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
RESULTS = ROOT / "benchmarks" / "results"
COMMON = ["train.micro_batch_size=4", "train.eval_every=0", "train.eval_batches=1", "logging.wandb.mode=disabled",
          "logging.progress=false", "train.precision=fp32"]
LAYOUTS = [
    ("1 process", 1, []),
    ("dp_shard=2", 2, ["parallel.dp_shard=2"]),
    ("dp_replicate=2", 2, ["parallel.dp_replicate=2", "parallel.dp_shard=1"]),
    ("tp=2", 2, ["parallel.tp=2"]),
    ("pp=2 1F1B", 2, ["parallel.pp=2"]),
    ("dp_shard=2 x tp=2", 4, ["parallel.dp_shard=2", "parallel.tp=2"]),
    ("pp=2 x tp=2", 4, ["parallel.pp=2", "parallel.tp=2"]),
]
SCHEDULES = [("gpipe", 1), ("1f1b", 1), ("interleaved_1f1b", 2), ("interleaved_zero_bubble", 2)]


def sets(items):
    return [a for item in items for a in ("--set", item)]


def throughput(steps: int) -> list[dict]:
    rows = []
    for name, nproc, overrides in LAYOUTS:
        out = Path(tempfile.mkdtemp(prefix="keel-par-"))
        cmd = [sys.executable, "-m", "keel.launcher.cli", "train", "configs/tiny.yaml", "--nproc-per-node", str(nproc),
               *sets([*COMMON, f"train.steps={steps}", f"train.output_dir={out}", "train.name=b", *overrides])]
        subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        records = [json.loads(x) for x in (out / "b" / "metrics.jsonl").read_text().splitlines()]
        tps = statistics.median(r["tokens_per_s"] for r in records if r["kind"] == "step" and r["step"] > 2)
        rows.append({"layout": name, "processes": nproc, "tokens_per_s": tps})
        print(f"{name:<20} {nproc} proc  {tps:>10,.0f} tok/s  ({tps / rows[0]['tokens_per_s']:.2f}x one process)")
    return rows


def bubble_worker(out: str, schedule: str, stages_per_rank: int, n_micro: int, steps: int) -> None:
    """Runs on every rank under torchrun: train `steps` steps, record each stage's compute intervals."""
    from torch.distributed.pipelining import stage as stage_mod

    from keel.training.loop import RankEnv, train
    from keel.training.config import load_config

    intervals: list[tuple[float, float]] = []
    step_bounds: list[float] = []

    def timed(fn):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                intervals.append((t0, time.perf_counter()))
        return wrapper

    cls = stage_mod._PipelineStageBase
    for method in ("forward_one_chunk", "backward_one_chunk", "backward_weight_one_chunk"):
        setattr(cls, method, timed(getattr(cls, method)))
    from keel.parallel import native

    original_step = native.NativeEngine.forward_backward

    def step_timed(self, *a):
        step_bounds.append(time.perf_counter())
        result = original_step(self, *a)
        step_bounds.append(time.perf_counter())
        return result
    native.NativeEngine.forward_backward = step_timed

    rows = 4 * n_micro  # micro_batch_size 4
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [
        *COMMON, "parallel.pp=2", f"parallel.pp_schedule={schedule}", f"parallel.pp_stages_per_rank={stages_per_rank}",
        f"train.global_batch_size={rows}", f"train.steps={steps}", f"train.output_dir={out}", "train.name=bubble"])
    env = RankEnv.from_environ()
    train(cfg, env)  # only the forward_backward windows are scored, not evaluation
    fractions = []
    for i in range(2, len(step_bounds) // 2):  # skip warm-up steps
        start, end = step_bounds[2 * i], step_bounds[2 * i + 1]
        busy = sum(min(b, end) - max(a, start) for a, b in intervals if b > start and a < end)
        fractions.append(1 - busy / (end - start))
    Path(out, f"bubble_rank{env.rank}.json").write_text(json.dumps(fractions))


def bubbles(steps: int) -> list[dict]:
    rows = []
    for n_micro in (4, 8):
        for schedule, v in SCHEDULES:
            out = tempfile.mkdtemp(prefix="keel-bubble-")
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-addr=127.0.0.1",
                   f"--master-port={29600 + len(rows)}", __file__, "--bubble-worker", out, schedule, str(v),
                   str(n_micro), str(steps)]
            subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            per_rank = [json.loads(Path(out, f"bubble_rank{r}.json").read_text()) for r in range(2)]
            measured = statistics.mean(statistics.mean(f) for f in per_rank)
            # Narayanan et al. 2021: p ranks, m micro-batches, v stages per rank (1 for GPipe/1F1B).
            textbook = (2 - 1) / (v * n_micro + 2 - 1) if schedule != "interleaved_zero_bubble" else None
            rows.append({"schedule": schedule, "stages": 2 * v, "micro_batches": n_micro, "measured_bubble": measured,
                         "textbook_bubble": textbook})
            tb = f"{textbook:.3f}" if textbook is not None else "  -  "
            print(f"{schedule:<25} {2 * v} stages on 2 ranks, {n_micro} micro-batches: bubble {measured:.3f} "
                  f"(textbook (p-1)/(v*m+p-1) = {tb})")
    return rows


def plot(tp_rows, bubble_rows) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    if tp_rows:
        axes[0].barh([r["layout"] for r in tp_rows], [r["tokens_per_s"] for r in tp_rows], color="tab:blue")
        axes[0].set_xlabel("tokens/s (configs/tiny.yaml, fp32, gloo)")
        axes[0].invert_yaxis()
        axes[0].set_title("throughput per layout")
    if bubble_rows:
        for n_micro, color in ((4, "tab:orange"), (8, "tab:green")):
            rs = [r for r in bubble_rows if r["micro_batches"] == n_micro]
            xs = [i + (0.2 if n_micro == 8 else -0.2) for i in range(len(rs))]
            axes[1].bar(xs, [r["measured_bubble"] for r in rs], width=0.4, color=color, label=f"{n_micro} micro-batches")
        axes[1].set_xticks(range(len(SCHEDULES)), [s for s, _ in SCHEDULES], rotation=15)
        axes[1].set_ylabel("measured bubble fraction")
        axes[1].set_title("pipeline bubble (pp=2), from each rank's timeline")
        axes[1].legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "parallel.png", dpi=110)


def write_csv(name: str, rows: list[dict]) -> None:
    if rows:
        with open(RESULTS / name, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--bubble-worker":
        out, schedule, v, n_micro, steps = sys.argv[2:7]
        bubble_worker(out, schedule, int(v), int(n_micro), int(steps))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--skip-bubble", action="store_true")
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    import torch
    print(f"torch {torch.__version__}, {os.cpu_count()} CPU cores, gloo, 1 thread per process")
    tp_rows = [] if args.skip_throughput else throughput(args.steps)
    bubble_rows = [] if args.skip_bubble else bubbles(args.steps)
    write_csv("parallel_throughput.csv", tp_rows)
    write_csv("parallel_bubble.csv", bubble_rows)
    plot(tp_rows, bubble_rows)
    print(f"wrote {RESULTS}/parallel_throughput.csv, parallel_bubble.csv, parallel.png")


if __name__ == "__main__":
    main()
