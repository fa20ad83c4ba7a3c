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
    # Every `keel train` below starts an embedded Ray: bound to loopback (shared/PLATFORM.md).
    env = {**os.environ, "WANDB_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    env.pop("RAY_ADDRESS", None)
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


def test_inline_says_it_has_no_supervision_and_asking_for_a_missing_gpu_is_one_line(tmp_path):
    result = run([*KEEL, "train", "configs/tiny.yaml", "--launcher", "inline",
                  *sets("train.device=cuda", f"train.output_dir={tmp_path}")])
    assert "no supervisor" in result.stderr
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "keel: error: train.device=cuda but no CUDA device is visible here" in result.stderr


def test_a_missing_gpu_under_the_supervisor_is_refused_before_anything_is_placed(tmp_path):
    # Not retried: the one line comes from the capacity check, before a worker exists.
    result = run([*KEEL, "train", "configs/tiny.yaml", *sets("train.device=cuda", f"train.output_dir={tmp_path}")])
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "the job asks for 1 GPUs (1 workers x 1) but the cluster has 0 (set train.device=cpu" in result.stderr
    assert not (tmp_path / "tiny").exists()


def test_a_missing_package_is_one_line_naming_what_installs_it(tmp_path):
    # Python refuses to import a module whose sys.modules entry is None: as if Ray were not installed.
    code = ("import sys; sys.modules['ray'] = None; from keel.launcher.cli import main; "
            f"main(['train', 'configs/tiny.yaml', '--set', 'train.output_dir={tmp_path}'])")
    result = run([sys.executable, "-c", code])
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == ("keel: error: this needs ray, which is not installed here; install it with "
                                     "pip install 'keel[ray]' (or `make install`)")
