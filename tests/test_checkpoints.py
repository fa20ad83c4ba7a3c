"""Checkpoints: a killed run resumes to the very same losses, an interrupted or damaged save is never
loaded, and a checkpoint written by one parallel layout loads into another.

Runs are real training processes (`python -m keel.training`, under torchrun for several ranks, so no
supervisor restarts them behind the test's back) killed with real SIGKILLs injected with `fault.inject`
at exact steps.
"""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from keel.launcher.cluster import free_port
from keel.training.config import config_to_dict

ROOT = Path(__file__).parent.parent
KEEL = [sys.executable, "-m", "keel.launcher.cli"]
# tiny.yaml as the acceptance asks, trimmed of evaluation; micro-batches of 4 so 2-rank layouts accumulate.
COMMON = ["train.eval_every=0", "train.eval_batches=1", "train.micro_batch_size=4", "train.precision=fp32",
          "logging.wandb.mode=disabled", "logging.progress=false", "logging.log_every=1000",
          "checkpoint.interval=10"]


def keel_train(out: Path, name: str, overrides: list[str], nproc: int = 1,
               corpus: Path | None = None) -> subprocess.CompletedProcess:
    items = [*COMMON, *overrides, f"train.output_dir={out}", f"train.name={name}"]
    if corpus is not None:
        items.append(f"data.path={corpus}")
    launch = [sys.executable]
    if nproc > 1:
        launch += ["-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1",
                   f"--master-port={free_port()}"]
    args = [*launch, "-m", "keel.training", "configs/tiny.yaml", *[a for item in items for a in ("--set", item)]]
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"})


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def step_losses(run_dir: Path) -> dict[int, float]:
    """Loss per step; a step logged twice (before a kill and after the resume) keeps its last value."""
    losses = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["kind"] == "step":
            losses[record["step"]] = record["loss"]
    return losses


def events(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]


def ckpt(*args) -> subprocess.CompletedProcess:
    return subprocess.run([*KEEL, "ckpt", *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def stdlib_corpus():
    from keel.training.corpus import default_corpus

    return default_corpus("byte", progress=False)


# -- exact resume --------------------------------------------------------------------------------------

@pytest.mark.parametrize("nproc, layout", [(1, ["checkpoint.async_save=false"]), (2, ["parallel.dp_shard=2"])],
                         ids=["1 process, sync save", "dp_shard=2, async save"])
def test_resume_after_sigkill_replays_identical_losses(nproc, layout, stdlib_corpus, tmp_path):
    # Saves every 5 steps; killed 3 steps past the one at 10, so the resume replays steps 11-13 and goes on.
    overrides = ["train.steps=16", "checkpoint.interval=5", *layout]
    straight = ok(keel_train(tmp_path, "straight", overrides, nproc, stdlib_corpus))
    killed = keel_train(tmp_path, "killed", [*overrides, "fault.inject=[kill@13]"], nproc, stdlib_corpus)
    assert killed.returncode != 0, "the injected SIGKILL did not stop the run"
    assert max(step_losses(tmp_path / "killed")) == 13

    resumed = ok(keel_train(tmp_path, "killed", overrides, nproc, stdlib_corpus))
    assert "resumed: step=10" in resumed.stdout
    want, got = step_losses(tmp_path / "straight"), step_losses(tmp_path / "killed")
    assert [got[s] for s in range(11, 17)] == [want[s] for s in range(11, 17)]  # bit-identical
    assert "done: 16 steps" in straight.stdout


# -- an interrupted or damaged save is never loaded ---------------------------------------------------

def test_save_killed_before_commit_resumes_from_the_previous_checkpoint_and_says_why(corpus_dir, tiny_overrides,
                                                                                     tmp_path):
    overrides = [*tiny_overrides, "train.steps=30"]
    killed = keel_train(tmp_path, "run", [*overrides, "fault.inject=[kill_in_save@20]"], corpus=corpus_dir)
    assert killed.returncode != 0
    folder = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["step_0000010", "step_0000020.tmp"]
    assert "not committed" in ckpt("ls", tmp_path / "run").stdout

    resumed = ok(keel_train(tmp_path, "run", overrides, corpus=corpus_dir))
    assert "checkpoint skipped: path=" in resumed.stdout and "step_0000020.tmp" in resumed.stdout
    assert "resumed: step=10" in resumed.stdout
    skipped = [e for e in events(tmp_path / "run") if e["kind"] == "checkpoint_skipped"]
    assert "the save never finished" in skipped[0]["reason"]
    # The stale folder is cleaned up once a newer checkpoint commits.
    assert sorted(p.name for p in folder.iterdir()) == ["step_0000010", "step_0000020", "step_0000030"]


def test_corrupted_or_truncated_shard_fails_verify_and_is_skipped_at_resume(corpus_dir, tiny_overrides, tmp_path):
    ok(keel_train(tmp_path, "run", [*tiny_overrides, "train.steps=30"], corpus=corpus_dir))
    folder = tmp_path / "run" / "checkpoints"
    assert ckpt("verify", "--deep", tmp_path / "run").returncode == 0  # the checksums the writers made hold

    # A checkpoint from before the switch to XXH3 names sha256 in its manifest: it is still checked with
    # sha256, and still loaded (the resume below comes back to this step).
    old = folder / "step_0000010"
    manifest = json.loads((old / "manifest.json").read_text())
    for entry in manifest["files"]:
        del entry["xxh3_128"]
        entry["sha256"] = hashlib.sha256((old / entry["name"]).read_bytes()).hexdigest()
    (old / "manifest.json").write_text(json.dumps(manifest))
    assert ckpt("verify", "--deep", old).returncode == 0

    shard = next((folder / "step_0000030").glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped bit-pattern in the middle of the weights
    shard.write_bytes(bytes(data))
    # Same size: the quick check (presence and sizes) cannot see it; --deep re-reads the bytes.
    assert ckpt("verify", folder / "step_0000030").returncode == 0
    result = ckpt("verify", "--deep", folder / "step_0000030")
    assert result.returncode == 1 and f"{shard.name} fails its xxh3_128 checksum (corrupted)" in result.stdout

    other = next((folder / "step_0000020").glob("*.distcp"))
    with open(other, "r+b") as f:
        f.truncate(other.stat().st_size // 2)
    result = ckpt("verify", tmp_path / "run")
    assert result.returncode == 1 and "truncated" in result.stdout and "step_0000010: ok" in result.stdout

    resumed = ok(keel_train(tmp_path, "run", [*tiny_overrides, "train.steps=30"], corpus=corpus_dir))
    assert "resumed: step=10" in resumed.stdout
    skipped = [e for e in events(tmp_path / "run") if e["kind"] == "checkpoint_skipped"]
    assert [Path(e["path"]).name for e in skipped] == ["step_0000030", "step_0000020"]
    assert f"{shard.name} fails its xxh3_128 checksum" in skipped[0]["reason"] and "truncated" in skipped[1]["reason"]


# -- resharding -------------------------------------------------------------------------------------------

def test_checkpoint_saved_at_dp_shard_2_resumes_at_tp_2_and_on_one_process(stdlib_corpus, tmp_path):
    overrides = ["train.steps=20"]
    ok(keel_train(tmp_path, "dp2", [*overrides, "parallel.dp_shard=2"], 2, stdlib_corpus))
    step10 = tmp_path / "dp2" / "checkpoints" / "step_0000010"
    reference = step_losses(tmp_path / "dp2")
    for name, nproc, layout in [("tp2", 2, ["parallel.tp=2"]), ("single", 1, [])]:
        result = ok(keel_train(tmp_path, name, [*overrides, *layout, f"checkpoint.resume={step10}"], nproc,
                               stdlib_corpus))
        assert "resumed: step=10" in result.stdout
        losses = step_losses(tmp_path / name)
        assert sorted(losses) == list(range(11, 21))
        worst = max(abs(losses[s] - reference[s]) / reference[s] for s in losses)
        assert worst <= 1e-5, f"{name}: worst relative difference {worst:.2e}"


# -- in-process behaviour ----------------------------------------------------------------------------------

def test_retention_keeps_the_last_k_and_every_mth(tiny_config):
    from keel.training.loop import train

    cfg = tiny_config("train.steps=30", "checkpoint.interval=5", "checkpoint.keep_last=2",
                      "checkpoint.keep_every=10")
    summary = train(cfg)
    names = sorted(p.name for p in (summary.run_dir / "checkpoints").iterdir())
    assert names == ["step_0000010", "step_0000020", "step_0000025", "step_0000030"]


def test_a_save_hashes_its_shards_as_it_writes_them_and_retention_hides_what_it_deletes(tiny_config, monkeypatch):
    # The manifest's checksums of the DCP shards come from the bytes on their way to the file: the save
    # reads back only the small files written outside DCP (RNG, trainer.json, .metadata). Retention renames
    # what it drops at once, so no resume can choose a half-deleted folder, and deletes it behind training.
    from keel.checkpoints import manifest as mf
    from keel.checkpoints.manager import Checkpointer
    from keel.parallel.local import LocalEngine

    read_back, real_checksum = [], mf.checksum
    monkeypatch.setattr(mf, "checksum", lambda path, *a: read_back.append(Path(path).name) or real_checksum(path, *a))
    cfg = tiny_config("checkpoint.async_save=false", "checkpoint.keep_last=1")
    folder = Path(cfg.train.output_dir) / "ckpt"
    saver = Checkpointer(config_to_dict(cfg), folder, 0, 1, {})
    engine = LocalEngine(cfg, torch.device("cpu"))
    saver.save(1, engine, {"step": 1})
    saver.save(2, engine, {"step": 2})
    assert [p.name for p in folder.iterdir() if p.name.startswith("step_0000001")] in ([], ["step_0000001.deleting"])
    assert [e.step for e in mf.entries(folder)] == [2]
    saver.close()
    assert sorted(p.name for p in folder.iterdir()) == ["step_0000002"]
    assert not [n for n in read_back if n.endswith(".distcp")], read_back
    assert mf.problems(folder / "step_0000002", deep=True) == []  # the streamed checksums are the files'

def test_finished_run_is_not_trained_again_and_resume_never_starts_afresh(tiny_config):
    from keel.training.loop import train

    first = train(tiny_config("train.steps=10", "checkpoint.interval=10"))
    again = train(tiny_config("train.steps=10", "checkpoint.interval=10"))
    assert again.val_loss == first.val_loss and again.first_val_loss == first.first_val_loss
    kinds = [e["kind"] for e in events(first.run_dir)]
    assert "resumed" in kinds
    old_manifest = (first.run_dir / "checkpoints" / "step_0000010" / "manifest.json").read_text()
    fresh = train(tiny_config("train.steps=10", "checkpoint.interval=10", "checkpoint.resume=never"))
    assert "resumed" not in [e["kind"] for e in events(fresh.run_dir)]
    # The first run's checkpoints were moved aside whole, not deleted nor mixed with the new run's.
    (aside,) = fresh.run_dir.glob("checkpoints.before-*")
    assert sorted(p.name for p in aside.iterdir()) == ["step_0000010"]
    assert (aside / "step_0000010" / "manifest.json").read_text() == old_manifest
    assert sorted(p.name for p in (fresh.run_dir / "checkpoints").iterdir()) == ["step_0000010"]


def test_resume_into_a_different_model_names_the_differences(tiny_config):
    from keel.checkpoints.manager import CheckpointError
    from keel.training.loop import train

    train(tiny_config("train.steps=5", "checkpoint.interval=5"))
    with pytest.raises(CheckpointError, match=r"model.dim: 32 there, 64 here"):
        train(tiny_config("train.steps=10", "checkpoint.interval=5", "model.dim=64"))


def test_resume_with_other_kernels_is_the_same_model(tiny_config):
    # Which kernel runs an op is not the architecture: it may change between save and resume.
    from keel.training.loop import train

    train(tiny_config("train.steps=5", "checkpoint.interval=5", "model.rmsnorm.impl=torch"))
    resumed = train(tiny_config("train.steps=6", "checkpoint.interval=5", "model.rmsnorm.impl=auto",
                                "model.swiglu.impl=torch", "model.attention.impl=sdpa",
                                "checkpoint.resume_changed=true"))  # train.steps 5 -> 6
    assert "resumed" in [e["kind"] for e in events(resumed.run_dir)]


def test_resume_from_a_path_that_is_not_a_checkpoint_is_one_clear_line(tmp_path):
    result = subprocess.run([*KEEL, "train", "configs/tiny.yaml", "--resume", str(tmp_path / "nope")], cwd=ROOT,
                            capture_output=True, text=True, timeout=300, env={**os.environ, "WANDB_MODE": "disabled"})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"keel: error: checkpoint.resume={tmp_path / 'nope'}: cannot resume from it" in result.stderr


def test_ls_lists_steps_tokens_layout_and_status(tiny_config):
    from keel.training.loop import train

    summary = train(tiny_config("train.steps=10", "checkpoint.interval=5"))
    out = ckpt("ls", summary.run_dir).stdout
    assert "step_0000005" not in out  # steps, not folder names
    rows = [line for line in out.splitlines() if "committed" in line]
    assert len(rows) == 2 and "1,280" in rows[0] and "single" in rows[0]  # 5 steps x 8 x 32 tokens


def test_keel_export_reproduces_the_logged_validation_loss(tiny_config, tmp_path):
    from safetensors.torch import load_file

    from keel.training.config import ModelConfig, _build
    from keel.training.data import TokenWindows
    from keel.parallel.local import LocalEngine
    from keel.training.loop import evaluate, train

    cfg = tiny_config("train.steps=10", "checkpoint.interval=10", "train.eval_every=10")
    summary = train(cfg)
    result = ckpt("export", summary.run_dir / "checkpoints" / "step_0000010", tmp_path / "export", "--to", "keel")
    assert result.returncode == 0, result.stderr
    weights = load_file(tmp_path / "export" / "model.safetensors")
    model_cfg = json.loads((tmp_path / "export" / "config.json").read_text())
    assert _build(ModelConfig, {k: v for k, v in model_cfg.items() if k not in ("architecture", "step", "tokens")}) \
        == cfg.model

    engine = LocalEngine(cfg, torch.device("cpu"))
    engine.model.load_state_dict(weights)
    val = evaluate(engine, TokenWindows(cfg.data.path, "val", cfg.data.seq_len), cfg)
    assert val == pytest.approx(summary.val_loss, rel=1e-6)


def test_torchrun_restart_after_a_killed_rank_resumes_from_the_checkpoint(corpus_dir, tiny_overrides, tmp_path):
    # torchrun keeps its store across --max-restarts; keel gives each attempt its own keys, without which
    # the restarted ranks could not even form their process group (parallel/mesh.py). Saves are synchronous
    # so that step 10's is committed before the kill at 12 however loaded the machine is (an async save
    # still in flight when a rank dies is lost by design, and the resume would come from step 5).
    items = [*tiny_overrides, f"data.path={corpus_dir}", f"train.output_dir={tmp_path}", "train.name=run",
             "parallel.dp_shard=2", "train.micro_batch_size=4", "checkpoint.interval=5", "checkpoint.async_save=false",
             "fault.inject=[kill:r1@12]"]
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--max-restarts=1",
                             "--master-addr=127.0.0.1", f"--master-port={free_port()}", "-m", "keel.training",
                             "configs/tiny.yaml", *[a for item in items for a in ("--set", item)]],
                            cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"})
    # torchrun's own report ends stderr; a rank's native abort message comes earlier, so it is picked out.
    aborts = [line for line in result.stderr.splitlines()
              if any(s in line for s in ("terminate called", "Fatal Python error", "what():", "Aborted"))]
    assert result.returncode == 0, "\n".join([result.stdout[-2000:], *aborts, result.stderr[-2000:]])
    assert "resumed: step=10" in result.stdout and max(step_losses(tmp_path / "run")) == 30
