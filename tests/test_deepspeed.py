"""The DeepSpeed engine: ZeRO-1, -2 and -3 on two gloo processes train the tiny model to the losses of one
process, through a skipped step; a run killed mid-way resumes from DeepSpeed's own checkpoint files,
committed by keel, to the losses of the uninterrupted run.

Runs are real `keel train --nproc-per-node 2` processes, supervised on the embedded Ray.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import deepspeed  # noqa: F401 - a dependency `make test` installs: a broken install must fail, not skip
import pytest

from keel.training.config import load_config
from keel.training.loop import train
from keel.training.presets import TEST_MODEL

ROOT = Path(__file__).parent.parent
TINY_YAML = ROOT / "configs" / "tiny.yaml"  # with TEST_MODEL's settings over it, here and in the runs
pytestmark = pytest.mark.timeout(600)
# A learning rate 100x too high at steps 12-13 makes the loss spike from step 14 on, and every one of those
# updates is dropped (skip_step): the engine's skip must leave weights and optimizer state as they were, on
# every rank, or the losses part from the one-process run's.
COMMON = [*TEST_MODEL, "train.steps=20", "train.micro_batch_size=2", "train.precision=fp32",
          "checkpoint.interval=0", "fault.inject=lr_spike@12-13", "stability.window=10", "stability.warmup=10",
          "stability.loss_z=3", "stability.actions=[skip_step]"]


def records(run_dir: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def anomalies(run_dir: Path) -> list[tuple[int, str]]:
    events = map(json.loads, (run_dir / "events.jsonl").read_text().splitlines())
    return [(e["step"], e["action"]) for e in events if e["kind"] == "anomaly"]


def keel_train(out: Path, name: str, *overrides: str) -> Path:
    sets = [a for o in [*COMMON, f"train.output_dir={out}", f"train.name={name}", *overrides] for a in ("--set", o)]
    result = subprocess.run([sys.executable, "-m", "keel.launcher.cli", "train", str(TINY_YAML),
                             "--nproc-per-node", "2", *sets],
                            cwd=ROOT, capture_output=True, text=True, timeout=540,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out / name


def one_process_run(corpus_dir: Path, out: Path, *overrides: str) -> Path:
    return train(load_config(TINY_YAML, [*COMMON, f"data.path={corpus_dir}", f"train.output_dir={out}",
                                         "train.name=ref", *overrides])).run_dir


@pytest.fixture(scope="module")
def one_process(corpus_dir, tmp_path_factory):
    return one_process_run(corpus_dir, tmp_path_factory.mktemp("one"))


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stage_matches_one_process_at_every_step_through_a_skipped_step(stage, one_process, corpus_dir,
                                                                              tmp_path):
    run_dir = keel_train(tmp_path, "ds", f"data.path={corpus_dir}", "parallel.engine=deepspeed",
                         f"parallel.zero_stage={stage}")
    skipped = anomalies(one_process)
    assert skipped[0] == (14, "skip_step") and {a for _, a in skipped} == {"skip_step"}
    assert anomalies(run_dir) == skipped
    got, want = records(run_dir, "step"), records(one_process, "step")
    assert [r["step"] for r in got] == list(range(1, 21))
    for g, w in zip(got, want):
        assert g["loss"] == pytest.approx(w["loss"], rel=1e-4), g["step"]
        assert g["grad_norm"] == pytest.approx(w["grad_norm"], rel=1e-4), g["step"]


def test_a_killed_deepspeed_run_resumes_from_its_committed_checkpoint_to_the_uninterrupted_losses(
        corpus_dir, tmp_path):
    uninterrupted = one_process_run(corpus_dir, tmp_path / "one", "fault.inject=[]")
    run_dir = keel_train(tmp_path, "killed", f"data.path={corpus_dir}", "parallel.engine=deepspeed",
                         "parallel.zero_stage=2", "checkpoint.interval=5", "fault.inject=kill:r1@12")
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    assert [e["cause"] for e in events if e["kind"] == "failure"] == ["process_died"]
    assert next(e for e in events if e["kind"] == "resumed")["step"] == 10
    # DeepSpeed's own files, inside a committed keel checkpoint with every file in its manifest.
    newest = run_dir / "checkpoints" / "step_0000020"
    manifest = json.loads((newest / "manifest.json").read_text())
    names = {f["name"] for f in manifest["files"]}
    assert {"zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt",
            "mp_rank_00_model_states.pt", "trainer.json", "rng_rank00000.pt", "rng_rank00001.pt"} <= names
    # Every step's loss, the replayed ones after the resume included, is that of the one-process run.
    last = {r["step"]: r["loss"] for r in records(run_dir, "step")}
    want = {r["step"]: r["loss"] for r in records(uninterrupted, "step")}
    assert [last[s] for s in range(1, 21)] == pytest.approx([want[s] for s in range(1, 21)], rel=1e-4)
