"""Tokens/s and peak memory of each engine on the same model, measured in one run.

Every row is a real `keel train configs/tiny.yaml` (fp32; supervised on the embedded Ray) with one engine and
layout; the figures are the median tokens/s over the steps after warm-up and rank 0's peak memory (on a CPU
the process's high-water mark, libraries included; on a GPU torch's peak allocation), with the ratio to the
native engine on one process.

    python benchmarks/engines.py [--steps 12] [--gpus]

--gpus runs each rank on a GPU (`train.device=cuda`, bf16); otherwise gloo on CPUs, one thread per process.
Writes benchmarks/results/engines.csv and engines.png.
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
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
COMMON = ["train.micro_batch_size=4", "train.eval_every=0", "train.eval_batches=1", "logging.wandb.mode=disabled",
          "logging.progress=false", "checkpoint.interval=0"]
ROWS = [
    ("native", "1 process", 1, []),
    ("native", "FSDP dp_shard=2", 2, ["parallel.dp_shard=2"]),
    ("native", "tp=2", 2, ["parallel.tp=2"]),
    ("native", "pp=2 (1F1B)", 2, ["parallel.pp=2"]),
    ("deepspeed", "ZeRO-1, 2 ranks", 2, ["parallel.engine=deepspeed", "parallel.zero_stage=1"]),
    ("deepspeed", "ZeRO-2, 2 ranks", 2, ["parallel.engine=deepspeed", "parallel.zero_stage=2"]),
    ("deepspeed", "ZeRO-3, 2 ranks", 2, ["parallel.engine=deepspeed", "parallel.zero_stage=3"]),
    ("megatron", "1 process", 1, ["parallel.engine=megatron"]),
    ("megatron", "dp=2", 2, ["parallel.engine=megatron", "parallel.dp_shard=2"]),
    ("megatron", "tp=2 (sequence parallel)", 2, ["parallel.engine=megatron", "parallel.tp=2"]),
    ("megatron", "pp=2 (1F1B)", 2, ["parallel.engine=megatron", "parallel.pp=2"]),
]


def sets(items):
    return [a for item in items for a in ("--set", item)]


def measure(steps: int, gpus: bool) -> list[dict]:
    device = ["train.device=cuda", "train.precision=bf16"] if gpus else ["train.precision=fp32"]
    rows = []
    for engine, layout, nproc, overrides in ROWS:
        out = Path(tempfile.mkdtemp(prefix="keel-engines-"))
        cmd = [sys.executable, "-m", "keel.launcher.cli", "train", "configs/tiny.yaml", "--nproc-per-node", str(nproc),
               *sets([*COMMON, *device, f"train.steps={steps}", f"train.output_dir={out}", "train.name=b", *overrides])]
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if done.returncode:
            sys.exit(f"{engine} {layout} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
        records = [json.loads(x) for x in (out / "b" / "metrics.jsonl").read_text().splitlines()]
        steps_ = [r for r in records if r["kind"] == "step" and r["step"] > 2]
        row = {"engine": engine, "layout": layout, "processes": nproc,
               "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steps_),
               "peak_mem_gb": max(r["peak_mem_gb"] for r in steps_)}
        row["vs_native_1"] = row["tokens_per_s"] / rows[0]["tokens_per_s"] if rows else 1.0
        rows.append(row)
        print(f"{engine:<10} {layout:<25} {nproc} proc  {row['tokens_per_s']:>9,.0f} tok/s  "
              f"({row['vs_native_1']:.2f}x native, 1 process)  peak {row['peak_mem_gb']:.2f} GB")
    return rows


def plot(rows: list[dict], gpus: bool) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['engine']} {r['layout']}" for r in rows]
    colours = {"native": "tab:blue", "deepspeed": "tab:orange", "megatron": "tab:green"}
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5), sharey=True)
    for ax, key, label in ((axes[0], "tokens_per_s", "tokens/s"), (axes[1], "peak_mem_gb", "rank 0 peak memory, GB")):
        ax.barh(labels, [r[key] for r in rows], color=[colours[r["engine"]] for r in rows])
        ax.set_xlabel(label)
    axes[0].invert_yaxis()
    fig.suptitle(f"configs/tiny.yaml, {'GPUs, bf16' if gpus else 'CPUs (gloo), fp32, 1 thread per process'}")
    fig.tight_layout()
    path = RESULTS / "engines.png"
    fig.savefig(path, dpi=110)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--gpus", action="store_true", help="run every rank on a GPU (bf16)")
    args = ap.parse_args()
    rows = measure(args.steps, args.gpus)
    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(RESULTS / "engines.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {RESULTS / 'engines.csv'} and {plot(rows, args.gpus)}")


if __name__ == "__main__":
    main()
