"""Claim: keel's trainer costs at most 5% throughput against a bare PyTorch loop (ratio >= 0.95).

Both run the same model (same config, seed and initialisation), the same batch shape and the same
optimizer in this one process, interleaved over several rounds so that drifts in machine load hit both
alike. keel runs as users run it (metrics.jsonl, console logging, progress bar and wandb offline on); the
bare loop is nanoGPT-style: random windows from the same token memmap, forward, backward, clip, step.
Throughput excludes each run's first step (one-off warm-up). Prints the median tokens/s of each and the
ratio, and writes a CSV.

    python benchmarks/overhead.py [--steps 40] [--rounds 3] [--set key=value ...]
"""
from __future__ import annotations

import argparse
import csv
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from keel.training.config import load_config
from keel.training.corpus import read_meta
from keel.training.device import seed_everything
from keel.parallel.engine import adamw
from keel.training.loop import resolve_data, train
from keel.training.model import build_model

ROOT = Path(__file__).resolve().parent.parent


def bare_loop(cfg, data_dir: Path) -> float:
    """The minimal loop a person would write by hand; returns tokens/s after the first step."""
    seed_everything(cfg.train.seed)
    meta = read_meta(data_dir)
    shard = meta["splits"]["train"]["shards"][0]
    tokens = np.memmap(data_dir / shard["file"], dtype=meta["dtype"], mode="r")
    model = build_model(cfg.model)
    model.to_empty(device="cpu")
    model.init_weights(seed=cfg.train.seed)
    opt = adamw(model, cfg, torch.device("cpu"))
    T, B = cfg.data.seq_len, cfg.train.global_batch_size
    rng = np.random.default_rng(0)
    times = []
    for _ in range(cfg.train.steps):
        t0 = time.perf_counter()
        starts = rng.integers(0, len(tokens) - T - 1, B)
        batch = torch.from_numpy(np.stack([tokens[s:s + T + 1] for s in starts]).astype(np.int64))
        logits = model(batch[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        times.append(time.perf_counter() - t0)
    return B * T * (len(times) - 1) / sum(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--csv", default=str(ROOT / "benchmarks" / "results" / "overhead.csv"))
    args = parser.parse_args()

    out = Path(tempfile.mkdtemp(prefix="keel-overhead-"))

    def config(name: str):
        return load_config(ROOT / "configs" / "tiny.yaml",
                           [f"train.steps={args.steps}", "train.eval_every=0", "train.eval_batches=1",
                            f"train.output_dir={out}", f"train.name={name}", *args.overrides])

    cfg = config("overhead")
    data_dir = resolve_data(cfg)
    keel_tps, bare_tps = [], []
    for r in range(args.rounds):
        # A run directory per round: tiny.yaml checkpoints its last step, and a second round in the same
        # folder would resume the finished run and train nothing (its tokens/s was NaN).
        keel_tps.append(train(config(f"overhead-r{r + 1}")).tokens_per_s)
        bare_tps.append(bare_loop(cfg, data_dir))
        print(f"round {r + 1}: keel {keel_tps[-1]:,.0f} tok/s, bare {bare_tps[-1]:,.0f} tok/s")
    keel_med, bare_med = statistics.median(keel_tps), statistics.median(bare_tps)
    ratio = keel_med / bare_med
    print(f"\nmodel {cfg.model.dim}d x {cfg.model.n_layers}L, batch {cfg.train.global_batch_size} x "
          f"{cfg.data.seq_len}, {args.steps} steps x {args.rounds} rounds, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"keel trainer : {keel_med:,.0f} tok/s (median)")
    print(f"bare loop    : {bare_med:,.0f} tok/s (median)")
    print(f"ratio        : {ratio:.3f}  (target >= 0.95: {'PASS' if ratio >= 0.95 else 'FAIL'})")
    Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
    with open(args.csv, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["round", "keel_tokens_per_s", "bare_tokens_per_s"])
        w.writerows([[i + 1, k, b] for i, (k, b) in enumerate(zip(keel_tps, bare_tps))])
        w.writerow(["median", keel_med, bare_med])


if __name__ == "__main__":
    main()
