"""Checkpoint failures never stop or corrupt a run, changed settings are not resumed silently, and
verification is shared by the ranks.

A full disk is injected with `fault.inject=[enospc_in_save@N]` (an OSError(ENOSPC) raised inside the
save, after the shards are written and before the commit); a failed copy to CPU memory by making the
stager raise. Files and DCP are real throughout.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_checkpoints import ROOT, ckpt, events, free_port, keel_train, ok

from keel.checkpoints.compat import changed_settings


def kinds(run_dir: Path, kind: str) -> list[dict]:
    return [e for e in events(run_dir) if e["kind"] == kind]


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# -- a failed save is reported, the run goes on ---------------------------------------------------------

def test_full_disk_during_an_async_save_is_reported_the_run_finishes_and_resumes_from_the_previous(tiny_config):
    from keel.checkpoints.manager import Checkpointer
    from keel.training.config import config_to_dict
    from keel.training.loop import train

    cfg = tiny_config("train.steps=20", "checkpoint.interval=10", "fault.inject=[enospc_in_save@20]")
    assert cfg.checkpoint.async_save
    summary = train(cfg)  # returns: the failed save did not end the run
    (failed,) = kinds(summary.run_dir, "checkpoint_failed")
    assert failed["step"] == 20 and "No space left on device" in failed["error"] and "Errno 28" in failed["error"]
    folder = summary.run_dir / "checkpoints"
    assert names(folder) == ["step_0000010", "step_0000020.tmp"]  # left uncommitted, never loaded

    chooser = Checkpointer(config_to_dict(cfg), folder, 0, 1, {})
    assert chooser.choose("auto") == folder / "step_0000010"
    chooser.close()
    resumed = train(cfg)  # the fault fires once per run folder, as a disk that was freed meanwhile
    assert [e["step"] for e in kinds(resumed.run_dir, "resumed")] == [10]
    assert names(folder) == ["step_0000010", "step_0000020"]  # saved, and the leftover .tmp replaced
    assert ckpt("verify", "--deep", folder / "step_0000020").returncode == 0


def test_a_failed_copy_to_cpu_memory_is_reported_and_the_next_save_works(tiny_config, monkeypatch):
    from torch.distributed.checkpoint.staging import DefaultStager

    from keel.training.loop import train

    real_stage, calls = DefaultStager.stage, []

    def stage_once_out_of_memory(self, state_dict, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("cannot allocate the host copy of the state (out of memory)")
        return real_stage(self, state_dict, **kwargs)

    monkeypatch.setattr(DefaultStager, "stage", stage_once_out_of_memory)
    summary = train(tiny_config("train.steps=20", "checkpoint.interval=10", "checkpoint.async_save=true"))
    (failed,) = kinds(summary.run_dir, "checkpoint_failed")
    assert failed["step"] == 10 and "out of memory" in failed["error"]
    assert [e["step"] for e in kinds(summary.run_dir, "checkpoint_saved")] == [20]
    assert names(summary.run_dir / "checkpoints") == ["step_0000020"]  # retention removed step_0000010.tmp


def test_two_ranks_give_up_a_save_one_could_not_write_and_share_the_checksums(corpus_dir, tiny_overrides, tmp_path):
    # Rank 1 alone hits the full disk: rank 0 must not commit a checkpoint missing rank 1's part, and
    # neither may wait for the other. The checksums each rank made of its own files then verify, and
    # a corrupted shard is found by the ranks' shared re-hashing at resume.
    overrides = [*tiny_overrides, "train.steps=30", "parallel.dp_shard=2", "train.micro_batch_size=4",
                 "checkpoint.keep_last=5"]
    run = tmp_path / "run"
    ok(keel_train(tmp_path, "run", [*overrides, "fault.inject=[enospc_in_save:r1@20]"], 2, corpus_dir))
    (failed,) = kinds(run, "checkpoint_failed")
    assert failed["step"] == 20 and failed["error"].startswith("rank 1: OSError: [Errno 28]")
    folder = run / "checkpoints"
    assert names(folder) == ["step_0000010", "step_0000030"]
    files = {f["name"] for f in json.loads((folder / "step_0000030" / "manifest.json").read_text())["files"]}
    assert {"__0_0.distcp", "__1_0.distcp", "rng_rank00000.pt", "rng_rank00001.pt", ".metadata"} <= files
    assert ckpt("verify", "--deep", run).returncode == 0

    shard = folder / "step_0000030" / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    resumed = ok(keel_train(tmp_path, "run", overrides, 2, corpus_dir))
    assert "resumed: step=10" in resumed.stdout
    (skipped,) = kinds(run, "checkpoint_skipped")
    assert skipped["path"].endswith("step_0000030") and "__1_0.distcp fails its xxh3_128" in skipped["reason"]


# Two ranks under torchrun saving a small state through the Checkpointer; rank 1's first copy to CPU memory
# fails. Without agreement before DCP's collectives, rank 0 would wait in DCP's planning for rank 1.
STAGING_FAILS_ON_RANK_1 = """
import json, sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.staging import DefaultStager

from keel.checkpoints.manager import Checkpointer
from keel.training.config import config_to_dict, load_config

dist.init_process_group("gloo")
rank = dist.get_rank()
if rank == 1:
    real_stage = DefaultStager.stage

    def fail_once(self, state_dict, **kwargs):
        DefaultStager.stage = real_stage
        raise RuntimeError("cannot allocate the host copy of the state")

    DefaultStager.stage = fail_once


class Engine:
    def state_dict(self):
        return {"model": {f"w{rank}": torch.full((1000,), float(rank))}}


cfg = load_config(None, ["checkpoint.async_save=true", "logging.wandb.mode=disabled"])
seen = []
ckpt = Checkpointer(config_to_dict(cfg), Path(sys.argv[1]), rank, 2, {}, event=lambda kind, **f: seen.append({"kind": kind, **f}))
for step in (1, 2):
    ckpt.save(step, Engine(), {"step": step})
ckpt.close()
if rank == 0:
    print(json.dumps(seen))
dist.destroy_process_group()
"""


def two_ranks_run(source: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """Run the script `source` as two ranks under torchrun, its checkpoints under tmp_path; it must succeed."""
    script = tmp_path / "save.py"
    script.write_text(source)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
                             "--master-addr=127.0.0.1", f"--master-port={free_port()}", str(script),
                             str(tmp_path / "checkpoints")], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    # torchrun's own report ends stderr; a rank's native abort message comes earlier, so it is picked out.
    aborts = [line for line in result.stderr.splitlines()
              if any(s in line for s in ("terminate called", "Fatal Python error", "what():", "Aborted"))]
    assert result.returncode == 0, "\n".join([result.stdout[-2000:], *aborts, result.stderr[-2000:]])
    return result


def test_a_copy_to_cpu_memory_failing_on_one_rank_is_given_up_by_both_without_waiting(tmp_path):
    result = two_ranks_run(STAGING_FAILS_ON_RANK_1, tmp_path)
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert [(e["kind"], e["step"]) for e in seen] == [("checkpoint_failed", 1), ("checkpoint_saved", 2)]
    assert seen[0]["error"] == "rank 1: RuntimeError: cannot allocate the host copy of the state"
    assert names(tmp_path / "checkpoints") == ["step_0000002"]


# A process that saved through a Checkpointer and destroyed its process group keeps no gloo thread alive:
# one left running into interpreter exit can abort a rank whose run had finished (torchrun then fails
# the job). The module used to hold both groups, the default one included, for the life of the process.
CLOSED_THEN_DESTROYED = """
import gc, json, os, sys
from pathlib import Path

import torch
import torch.distributed as dist

from keel.checkpoints.manager import Checkpointer
from keel.training.config import config_to_dict, load_config


def threads():
    names = []
    for t in os.listdir("/proc/self/task"):
        try:
            names.append(Path(f"/proc/self/task/{t}/comm").read_text().strip())
        except FileNotFoundError:  # a thread that ended meanwhile
            pass
    return sorted(names)


dist.init_process_group("gloo")
rank = dist.get_rank()


class Engine:
    def state_dict(self):
        return {"model": {f"w{rank}": torch.full((1000,), float(rank))}}


cfg = load_config(None, ["checkpoint.async_save=true", "logging.wandb.mode=disabled"])
ckpt = Checkpointer(config_to_dict(cfg), Path(sys.argv[1]), rank, 2, {})
ckpt.save(1, Engine(), {"step": 1})
ckpt.close()
during = threads()
dist.destroy_process_group()
gc.collect()
print(json.dumps({"rank": rank, "during": during, "after": threads()}))
"""


def test_destroying_the_process_group_after_checkpointing_stops_every_gloo_thread(tmp_path):
    result = two_ranks_run(CLOSED_THEN_DESTROYED, tmp_path)
    ranks = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert sorted(r["rank"] for r in ranks) == [0, 1]
    for r in ranks:
        assert sum("gloo" in name for name in r["during"]) >= 4  # two groups' threads: what must stop
        assert [name for name in r["after"] if "gloo" in name] == [], r


# -- settings that change the run are not resumed silently --------------------------------------------

def test_resume_with_other_optimizer_or_batch_settings_is_refused_naming_each_until_accepted(tiny_config):
    from keel.checkpoints.manager import CheckpointError
    from keel.training.loop import train

    train(tiny_config("train.steps=5", "checkpoint.interval=5"))
    changed = ("train.steps=10", "checkpoint.interval=5", "optim.lr=1e-3", "train.global_batch_size=16")
    with pytest.raises(CheckpointError) as refused:
        train(tiny_config(*changed))
    message = str(refused.value)
    assert "\n" not in message
    for change in ("optim.lr: 0.003 -> 0.001", "train.global_batch_size: 8 -> 16", "train.steps: 5 -> 10"):
        assert change in message
    assert "--resume-changed" in message and "checkpoint.resume_changed=true" in message

    summary = train(tiny_config(*changed, "checkpoint.resume_changed=true"))
    (accepted,) = kinds(summary.run_dir, "resume_changed")
    assert accepted["keys"] == ["optim.lr", "train.global_batch_size", "train.steps"]
    assert [e["step"] for e in kinds(summary.run_dir, "resumed")] == [5]


def test_changed_settings_compares_only_what_changes_data_order_or_optimization():
    saved = {"train": {"steps": 10, "seed": 0, "global_batch_size": 8, "eval_every": 5},
             "data": {"path": "corpus", "seq_len": 32, "tokenizer": "byte"},
             "optim": {"lr": 1e-3, "betas": [0.9, 0.95]}, "schedule": {"name": "cosine", "warmup_steps": 5},
             "parallel": {"tp": 1}}
    now = json.loads(json.dumps(saved))
    now["optim"]["betas"] = (0.9, 0.95)  # a tuple in the live config, a list in the manifest: the same
    now["train"]["eval_every"], now["parallel"]["tp"] = 1, 2  # neither changes what is learned
    now["optim"]["eps"] = 1e-8  # not in the saved config (an older checkpoint): nothing to compare
    assert changed_settings(saved, now) == []
    now["schedule"]["warmup_steps"], now["train"]["seed"] = 50, 1
    assert changed_settings(saved, now) == [("schedule.warmup_steps", 5, 50), ("train.seed", 0, 1)]
