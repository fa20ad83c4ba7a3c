"""The `keel` command as a user types it: real subprocesses, one clear line for bad input."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
KEEL = [sys.executable, "-m", "keel.launcher.cli"]


def run(args, **kw):
    env = {**os.environ, "WANDB_MODE": "disabled"}
    return subprocess.run(args, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300, **kw)


def sets(*items):
    return [arg for item in items for arg in ("--set", item)]


@pytest.mark.parametrize("args, message", [
    (sets("optim.lerning_rate=1"), "unknown config key 'optim.lerning_rate'; did you mean 'optim.lr'?"),
    (sets("optim.lr=-0.001"), "optim.lr must be positive, got -0.001"),
    (sets("data.path=/no/such/corpus"), "data.path '/no/such/corpus' does not exist"),
    (sets("parallel.tp=2"), "parallel layout dp_replicate=1 x dp_shard=-1 x tp=2 x pp=1 does not fit world size 1"),
])
def test_bad_input_exits_nonzero_with_one_line_and_no_traceback(args, message, tmp_path):
    result = run([*KEEL, "train", "configs/tiny.yaml", *args, *sets(f"train.output_dir={tmp_path}")])
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"keel: error: {result.stderr.split('keel: error: ')[1].strip()}"]
    assert message in result.stderr and "Traceback" not in result.stderr


def test_debug_flag_shows_the_traceback(tmp_path):
    result = run([*KEEL, "train", "configs/tiny.yaml", "--debug", *sets("optim.lr=-1")])
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_prepare_then_train_on_it_with_python_dash_m(tmp_path, tiny_overrides):
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": f"def f{i}(x):\n    return x + {i}\n" * 20}) + "\n"
                           for i in range(50)))
    prep = run([*KEEL, "data", "prepare", str(src), "--out", str(tmp_path / "data")])
    assert prep.returncode == 0, prep.stderr
    assert f"--set data.path={tmp_path / 'data'}" in prep.stdout
    trained = run([sys.executable, "-m", "keel.training", "configs/tiny.yaml",
                   *sets(*tiny_overrides, "train.steps=5", f"data.path={tmp_path / 'data'}", f"train.output_dir={tmp_path}")])
    assert trained.returncode == 0, trained.stderr
    assert "done: 5 steps" in trained.stdout and (tmp_path / "tiny" / "metrics.jsonl").is_file()


def test_runs_under_torchrun(tmp_path, corpus_dir, tiny_overrides):
    result = run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "--master-addr",
                  "127.0.0.1", "--master-port", "29517", "-m", "keel.training", "configs/tiny.yaml",
                  *sets(*tiny_overrides, "train.steps=3", f"data.path={corpus_dir}", f"train.output_dir={tmp_path}")])
    assert result.returncode == 0, result.stderr
    assert "done: 3 steps" in result.stdout


def test_estimate_prints_params_flops_and_memory():
    result = run([*KEEL, "estimate", "configs/llama-1b.yaml"])
    assert result.returncode == 0, result.stderr
    assert "1,235,814,400" in result.stdout  # Llama-3.2-1B's published count
    for word in ("FLOPs / token", "weights", "optimizer", "activations"):
        assert word in result.stdout
