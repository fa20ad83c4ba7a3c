"""Shared by the engine tests (test_deepspeed.py, test_megatron.py): the tiny run every engine must
reproduce, started as one process or as a real `keel train --nproc-per-node 2`, and what they compare."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from keel.training.config import load_config
from keel.training.loop import train
from keel.training.presets import TEST_MODEL

ROOT = Path(__file__).parent.parent
TINY_YAML = ROOT / "configs" / "tiny.yaml"  # with TEST_MODEL's settings over it, here and in the runs
# A learning rate 100x too high at steps 12-13 makes the loss spike from step 14 on, and every one of those
# updates is dropped (skip_step): the engine's skip must leave weights and optimizer state as they were, on
# every rank, or the losses part from the one-process run's.
COMMON = [*TEST_MODEL, "train.steps=20", "train.micro_batch_size=2", "train.precision=fp32",
          "checkpoint.interval=0", "fault.inject=lr_spike@12-13", "stability.window=10", "stability.warmup=10",
          "stability.loss_z=3", "stability.actions=[skip_step]"]
# Garbage batches 19-21 (read at steps 19-21) spike the loss; the run rolls back to its step-15 checkpoint (the engine
# reloads its own files) and skips the batches from the anomaly's on.
ROLLBACK = ["train.steps=30", "checkpoint.interval=5", "fault.inject=garbage@19-21",
            "stability.actions=[rollback(skip_batches=5)]"]
# Rank 1 killed at step 12: the supervisor restarts both ranks from the step-10 checkpoint. The
# uninterrupted run saves at the same steps, for the exported weights to be compared.
KILLED = ["fault.inject=kill:r1@12", "checkpoint.interval=5"]
UNINTERRUPTED = ["fault.inject=[]", "checkpoint.interval=5"]


def records(run_dir: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def events(run_dir: Path, kind: str) -> list[dict]:
    return [e for e in map(json.loads, (run_dir / "events.jsonl").read_text().splitlines()) if e["kind"] == kind]


def anomalies(run_dir: Path) -> list[tuple[int, str]]:
    return [(e["step"], e["action"]) for e in events(run_dir, "anomaly")]


def keel_train(out: Path, name: str, *overrides: str) -> Path:
    sets = [a for o in [*COMMON, f"train.output_dir={out}", f"train.name={name}", *overrides] for a in ("--set", o)]
    result = subprocess.run([sys.executable, "-m", "keel.launcher.cli", "train", str(TINY_YAML),
                             "--nproc-per-node", "2", *sets],
                            cwd=ROOT, capture_output=True, text=True, timeout=540,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out / name


def one_process_run(corpus_dir: Path, out: Path, *overrides: str, name: str = "ref") -> Path:
    return train(load_config(TINY_YAML, [*COMMON, f"data.path={corpus_dir}", f"train.output_dir={out}",
                                         f"train.name={name}", *overrides])).run_dir


def assert_same_steps(got_dir: Path, want_dir: Path, steps: int, rel: float = 1e-4) -> None:
    """Every step's loss and gradient norm (the last record of each step, after any replay) match, and so
    does the held-out loss of the evaluation at the last step."""
    got = {r["step"]: r for r in records(got_dir, "step")}
    want = {r["step"]: r for r in records(want_dir, "step")}
    assert sorted(got) == sorted(want) == list(range(1, steps + 1))
    for s in range(1, steps + 1):
        assert got[s]["loss"] == pytest.approx(want[s]["loss"], rel=rel), s
        assert got[s]["grad_norm"] == pytest.approx(want[s]["grad_norm"], rel=rel), s
    got_eval, want_eval = records(got_dir, "eval")[-1], records(want_dir, "eval")[-1]
    assert got_eval["step"] == want_eval["step"] == steps
    assert got_eval["val_loss"] == pytest.approx(want_eval["val_loss"], rel=rel)


def assert_rolled_back_as_one_process(run_dir: Path, reference: Path) -> None:
    """The run rolled back to its step-15 checkpoint, skipped the garbage, and every step after matches the
    one-process run that did the same."""
    (rollback,) = events(reference, "rollback")
    assert rollback["to_step"] == 15
    first, stop = rollback["skipped_batches"]
    assert first <= 19 and stop >= 22  # batches 19..21 are the garbage ones
    assert [(e["to_step"], e["skipped_batches"]) for e in events(run_dir, "rollback")] == \
        [(15, rollback["skipped_batches"])]
    assert_same_steps(run_dir, reference, 30)


def assert_resumed_as_uninterrupted(run_dir: Path, uninterrupted: Path, engine_files: set[str]) -> None:
    """One death, one resume from step 10, the engine's own files in the newest checkpoint's manifest, and
    every step's loss (the replayed ones included) that of the uninterrupted run."""
    assert [e["cause"] for e in events(run_dir, "failure")] == ["process_died"]
    assert events(run_dir, "resumed")[0]["step"] == 10
    manifest = json.loads((run_dir / "checkpoints" / "step_0000020" / "manifest.json").read_text())
    assert engine_files | {"trainer.json", "rng_rank00000.pt", "rng_rank00001.pt"} <= \
        {f["name"] for f in manifest["files"]}
    assert_same_steps(run_dir, uninterrupted, 20)


def assert_exports_the_weights_of(run_dir: Path, reference: Path) -> None:
    """`keel ckpt export --to keel` of the run's last checkpoint holds, under keel's names, the weights of
    the reference run's last checkpoint."""
    from safetensors.torch import load_file

    from keel.checkpoints.export import full_model_state

    out = run_dir.parent / f"{run_dir.name}-export"
    done = subprocess.run([sys.executable, "-m", "keel.launcher.cli", "ckpt", "export",
                           str(run_dir / "checkpoints" / "step_0000020"), "--to", "keel", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    got, want = load_file(out / "model.safetensors"), full_model_state(reference / "checkpoints" / "step_0000020")
    assert sorted(got) == sorted(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-3, atol=1e-5, msg=name)
