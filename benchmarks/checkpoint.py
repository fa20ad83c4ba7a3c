"""Claim: an asynchronous checkpoint blocks training for under 10% of the time a synchronous one takes,
and saving runs at >= 0.8x the disk's raw sequential write speed (keel save / dd, as throughputs).

One process, a model of >= 100M parameters with its AdamW state (after one real training step), saved
through keel's Checkpointer exactly as the training loop does (DCP shards + RNG + manifest with XXH3-128
checksums + atomic rename). Measured in one run, on one disk:
  sync save      time for save() with checkpoint.async_save=false (write, the writer's checksums, commit)
  async stall    time save() blocks with async_save=true (copy to CPU memory); the writing goes on behind
  async total    time until that async checkpoint is committed
  raw write      `dd if=/dev/zero bs=1M conv=fsync` of the same number of bytes, for MB/s comparison
  restore        choose (presence, sizes, and every checksum re-read: one process does all the shares)
                 + DCP load into a fresh engine
Writes a CSV next to the printout.

    python benchmarks/checkpoint.py [--dim 768 --layers 12 --vocab 32000] [--repeats 3]
"""
from __future__ import annotations

import argparse
import csv
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from keel.checkpoints import manifest as mf
from keel.checkpoints.manager import Checkpointer
from keel.training.config import config_to_dict, load_config
from keel.parallel.local import LocalEngine
from keel.training.flops import count_params

ROOT = Path(__file__).resolve().parent.parent


def one_step(engine: LocalEngine, cfg) -> None:
    tokens = torch.randint(0, cfg.model.vocab_size, (1, cfg.data.seq_len + 1), device=engine.device)
    engine.forward_backward(tokens[:, :-1], tokens[:, 1:])
    engine.optimizer_step(1e-4)


def raw_write_seconds(folder: Path, n_bytes: int) -> float:
    target = folder / "dd.bin"
    t0 = time.perf_counter()
    subprocess.run(["dd", "if=/dev/zero", f"of={target}", "bs=1M", f"count={max(1, n_bytes >> 20)}",
                    "conv=fsync"], check=True, capture_output=True)
    seconds = time.perf_counter() - t0
    target.unlink()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to write (default: a temp folder on /tmp's disk)")
    parser.add_argument("--csv", default=str(ROOT / "benchmarks" / "results" / "checkpoint.csv"))
    args = parser.parse_args()

    base = Path(tempfile.mkdtemp(prefix="keel-ckpt-bench-", dir=args.dir))
    overrides = [f"model.dim={args.dim}", f"model.n_layers={args.layers}", f"model.vocab_size={args.vocab}",
                 f"model.n_heads={args.dim // 64}", f"model.n_kv_heads={args.dim // 64}", "model.max_seq_len=128",
                 "data.seq_len=128", f"train.output_dir={base}", "train.name=bench", "logging.wandb.mode=disabled"]
    cfg_sync = load_config(None, [*overrides, "checkpoint.async_save=false", "checkpoint.keep_last=1"])
    cfg_async = load_config(None, [*overrides, "checkpoint.async_save=true", "checkpoint.keep_last=1"])
    engine = LocalEngine(cfg_sync, torch.device("cpu"))
    one_step(engine, cfg_sync)
    n_params = count_params(cfg_sync.model).total
    layout = {"dp_replicate": 1, "dp_shard": 1, "tp": 1, "pp": 1}
    trainer = {"step": 0, "tokens": 0, "first_val_loss": 0.0, "loader": {}, "stability": {}}

    # Checkpointers live as long as a run, as in training; the first save of each is a warm-up (it
    # allocates the async stager's CPU copy of the state) and is reported on its own.
    sync = Checkpointer(config_to_dict(cfg_sync), base / "sync", 0, 1, layout)
    asy = Checkpointer(config_to_dict(cfg_async), base / "async", 0, 1, layout)
    rows = []
    try:
        for step in range(args.repeats + 1):
            t0, c0 = time.perf_counter(), time.process_time()
            sync.save(step, engine, {**trainer, "step": step})
            sync_s, sync_cpu_s = time.perf_counter() - t0, time.process_time() - c0
            n_bytes = sum(p.stat().st_size for p in sync.last_committed.iterdir())

            t0 = time.perf_counter()
            stall_s = asy.save(step, engine, {**trainer, "step": step})
            asy.wait()
            async_total_s = time.perf_counter() - t0

            raw_s = raw_write_seconds(base, n_bytes)

            fresh = LocalEngine(cfg_sync, torch.device("cpu"))
            loader = Checkpointer(config_to_dict(cfg_sync), base / "sync", 0, 1, layout)
            t0, c0 = time.perf_counter(), time.process_time()
            path = loader.choose("auto")
            t_verify = time.perf_counter() - t0
            loader.restore(fresh, path)
            load_s, load_cpu_s = time.perf_counter() - t0, time.process_time() - c0
            loader.close()
            assert all(torch.equal(a, b) for a, b in zip(engine.model.state_dict().values(),
                                                         fresh.model.state_dict().values())), \
                "the loaded model differs from the saved one"
            label = "warm-up" if step == 0 else f"repeat {step}"
            print(f"{label}: sync {sync_s:.2f}s | async stall {stall_s:.3f}s (committed after "
                  f"{async_total_s:.2f}s) | dd {raw_s:.2f}s | load {load_s:.2f}s (of which verify {t_verify:.2f}s)")
            rows.append({"repeat": label, "bytes": n_bytes, "sync_save_s": sync_s, "async_stall_s": stall_s,
                         "async_total_s": async_total_s, "raw_write_s": raw_s, "load_s": load_s,
                         "verify_s": t_verify, "sync_save_cpu_s": sync_cpu_s, "load_cpu_s": load_cpu_s})
            one_step(engine, cfg_sync)  # the next save holds different values, as in training
    finally:
        sync.close()
        asy.close()
        shutil.rmtree(base, ignore_errors=True)

    med = {k: statistics.median(row[k] for row in rows[1:]) for k in rows[0] if k != "repeat"}
    mb = med["bytes"] / 1e6
    print(f"\nmodel {n_params / 1e6:.0f}M parameters + AdamW state = {mb:,.0f} MB per checkpoint "
          f"({mf.CHECKSUM} checksums), torch {torch.__version__}, median of {args.repeats}")
    print(f"sync save        : {med['sync_save_s']:.2f} s  ({mb / med['sync_save_s']:,.0f} MB/s; "
          f"{med['sync_save_cpu_s']:.2f} CPU-s, all threads: the figure to compare on a busy machine)")
    print(f"raw write (dd)   : {med['raw_write_s']:.2f} s  ({mb / med['raw_write_s']:,.0f} MB/s)")
    speed = med["raw_write_s"] / med["sync_save_s"]  # throughput ratio: same bytes, time inverted
    print(f"save / dd        : {speed:.2f}  (keel save throughput over raw write; target >= 0.80: "
          f"{'PASS' if speed >= 0.8 else 'FAIL'})")
    print(f"async stall      : {med['async_stall_s']:.3f} s  (committed after {med['async_total_s']:.2f} s; "
          f"first save of a run: {rows[0]['async_stall_s']:.2f} s while the stager allocates)")
    ratio = med["async_stall_s"] / med["sync_save_s"]
    print(f"stall / sync     : {ratio:.3f}  (target < 0.10: {'PASS' if ratio < 0.10 else 'FAIL'})")
    print(f"restore          : {med['load_s']:.2f} s  (choose + verify {med['verify_s']:.2f} s, then DCP load; "
          f"{med['load_cpu_s']:.2f} CPU-s)")
    Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
    with open(args.csv, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


if __name__ == "__main__":
    main()
