"""Time to recover from a killed rank and from a hung rank: keel's Ray supervisor vs torchrun --max-restarts.

Both run the same 2-rank tiny model (dp_shard=2, gloo, checkpoints every 5 steps) with the same injected
fault (`fault.inject`, training/faults.py): `kill:r1@K` SIGKILLs rank 1 right after step K, `hang:r1@K`
stops rank 1 there forever. Measured from the run's own files, identically for both launchers:
  recovery   = first step record written after the fault - the fault's marker time (written as it fires)
  recomputed = K - (the first step after the fault - 1): steps done twice because they were not in the
               newest committed checkpoint
torchrun has no hang detection: its restart waits for the gloo collective to time out (the process
group timeout, 300 s in parallel/mesh.py), so the torchrun hang case is skipped unless --torchrun-hang.

    python benchmarks/recovery.py                     # 3 repeats each, ~6 minutes on 2 cores
    python benchmarks/recovery.py --repeats 1 --torchrun-hang
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from keel.launcher.cluster import free_port
from keel.training.presets import TEST_MODEL

ROOT = Path(__file__).resolve().parent.parent
TINY = [*TEST_MODEL, "train.micro_batch_size=4", "train.steps=40", "parallel.dp_shard=2", "checkpoint.interval=5"]


def measure(run_dir: Path, fault_step: int) -> dict:
    marker = next((run_dir / "faults").iterdir())
    failed_at = float(marker.read_text())
    steps = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "step"]
    # The restarted attempt is where the step count goes back (or, with a checkpoint at the very fault
    # step, the first step past it); a record merely written after the marker may still be a survivor
    # rank's log of the fault step itself.
    first = next(r for i, r in enumerate(steps) if r["time"] > failed_at and
                 (r["step"] <= max(x["step"] for x in steps[:i]) or r["step"] > fault_step))
    return {"recovery_s": first["time"] - failed_at, "recomputed": fault_step - (first["step"] - 1),
            "finished": steps[-1]["step"] == 40, "final_loss": steps[-1]["loss"]}


def run(launcher: str, fault: str, out: Path, corpus: Path, hang_timeout: float, timeout: float) -> dict:
    name = f"{launcher}-{fault.replace(':', '_').replace('@', '_')}"
    sets = [*TINY, f"data.path={corpus}", f"train.output_dir={out}", f"train.name={name}", f"fault.inject={fault}",
            f"fault.hang_timeout_s={hang_timeout}", "fault.max_restarts=1"]
    args = [a for s in sets for a in ("--set", s)]
    if launcher == "keel":
        cmd = [sys.executable, "-m", "keel.launcher.cli", "train", "configs/tiny.yaml", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--max-restarts=1",
               "--master-addr=127.0.0.1", f"--master-port={free_port()}", "-m", "keel.training",
               "configs/tiny.yaml", *args]
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    t = time.time()
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise SystemExit(f"{launcher} {fault} failed ({result.returncode}):\n{result.stdout[-2000:]}\n"
                         f"{result.stderr[-3000:]}")
    return {**measure(out / name, int(fault.split("@")[1])), "wall_s": time.time() - t}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--hang-timeout", type=float, default=10.0, help="keel's fault.hang_timeout_s")
    parser.add_argument("--fault-step", type=int, default=12)
    parser.add_argument("--torchrun-hang", action="store_true", help="also wait out torchrun's hang (~5 min)")
    parser.add_argument("--json", type=Path, help="write the raw measurements here")
    args = parser.parse_args()

    from keel.training.corpus import prepare, stdlib_path

    work = Path(tempfile.mkdtemp(prefix="keel-recovery-"))
    corpus = work / "corpus"
    prepare([stdlib_path() / "email"], corpus, tokenizer="byte", val_percent=20, progress=False)
    rows, raw = [], {}
    for kind in ("kill", "hang"):
        fault = f"{kind}:r1@{args.fault_step}"
        launchers = ["keel", "torchrun"] if kind == "kill" or args.torchrun_hang else ["keel"]
        results = {launcher: [] for launcher in launchers}
        # Interleaved, so that a busy spell on the machine does not land on one launcher only.
        for i in range(args.repeats):
            for launcher in launchers:
                if launcher == "torchrun" and kind == "hang" and i > 0:
                    continue  # one ~5-minute wait is enough to show it
                r = run(launcher, fault, work / f"{launcher}-{kind}-{i}", corpus, args.hang_timeout, timeout=900)
                results[launcher].append(r)
                print(f"  {launcher:8s} {kind}: recovered in {r['recovery_s']:.2f}s, {r['recomputed']} steps "
                      f"re-computed", file=sys.stderr, flush=True)
        for launcher in ("keel", "torchrun"):
            if launcher not in results:
                rows.append((kind, launcher, None, None, "skipped: waits for the 300 s collective timeout"))
                continue
            res = results[launcher]
            raw[f"{launcher}/{kind}"] = res
            assert all(r["finished"] for r in res)
            rec = [r["recovery_s"] for r in res]
            rows.append((kind, launcher, statistics.mean(rec), statistics.mean(r["recomputed"] for r in res),
                         f" (min {min(rec):.2f}, max {max(rec):.2f}, n={len(rec)})"))
    print(f"\nrecovery: failure -> first step after restart (2 ranks, gloo, tiny model, checkpoint every 5 steps, "
          f"fault after step {args.fault_step}; keel fault.hang_timeout_s={args.hang_timeout:g})")
    print(f"{'fault':6s} {'launcher':9s} {'mean recovery':>14s} {'re-computed':>12s}")
    for kind, launcher, rec, recomputed, note in rows:
        if rec is None:
            print(f"{kind:6s} {launcher:9s} {'-':>14s} {'-':>12s}  {note}")
        else:
            print(f"{kind:6s} {launcher:9s} {rec:>13.2f}s {recomputed:>12.1f}  {note}")
    means = {(k, lch): r for k, lch, r, _, _ in rows if r is not None}
    if ("kill", "keel") in means and ("kill", "torchrun") in means:
        print(f"kill: keel / torchrun recovery time = {means[('kill', 'keel')] / means[('kill', 'torchrun')]:.2f}")
    if args.json:
        args.json.write_text(json.dumps(raw, indent=1))


if __name__ == "__main__":
    main()
