"""The DeepSpeed engine: ZeRO-1, -2 (with and without the optimizer offloaded) and -3 on two gloo processes
train the tiny model to the losses of one process, through a skipped step; a run killed mid-way resumes from DeepSpeed's own checkpoint files,
committed by keel, to the losses of the uninterrupted run, and `keel ckpt export` consolidates them; a loss spike rolls the run back to them as it
does a one-process run.

Runs are real `keel train --nproc-per-node 2` processes, supervised on the embedded Ray.
"""
import deepspeed  # noqa: F401 - a dependency `make test` installs: a broken install must fail, not skip
import pytest
from engine_runs import (KILLED, ROLLBACK, UNINTERRUPTED, anomalies, assert_exports_the_weights_of,
                         assert_resumed_as_uninterrupted, assert_rolled_back_as_one_process, assert_same_steps,
                         keel_train, one_process_run)

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def one_process(corpus_dir, tmp_path_factory):
    return one_process_run(corpus_dir, tmp_path_factory.mktemp("one"))


@pytest.mark.parametrize("zero", [["parallel.zero_stage=1"], ["parallel.zero_stage=2"], ["parallel.zero_stage=3"],
                                  ["parallel.zero_stage=2", "parallel.zero_offload_optimizer=true"]],
                         ids=["zero1", "zero2", "zero3", "zero2-offload"])
def test_zero_stage_matches_one_process_at_every_step_through_a_skipped_step(zero, one_process, corpus_dir,
                                                                              tmp_path):
    run_dir = keel_train(tmp_path, "ds", f"data.path={corpus_dir}", "parallel.engine=deepspeed", *zero)
    skipped = anomalies(one_process)
    assert skipped[0] == (14, "skip_step") and {a for _, a in skipped} == {"skip_step"}
    assert anomalies(run_dir) == skipped
    assert_same_steps(run_dir, one_process, 20)


def test_a_killed_deepspeed_run_resumes_from_its_committed_checkpoint_to_the_uninterrupted_losses_and_exports(
        corpus_dir, tmp_path):
    uninterrupted = one_process_run(corpus_dir, tmp_path / "one", *UNINTERRUPTED)
    run_dir = keel_train(tmp_path, "killed", f"data.path={corpus_dir}", "parallel.engine=deepspeed",
                         "parallel.zero_stage=2", *KILLED)
    # DeepSpeed's own files, inside keel's committed checkpoint, every one in its manifest.
    assert_resumed_as_uninterrupted(run_dir, uninterrupted, {
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt",
        "mp_rank_00_model_states.pt"})
    # `keel ckpt export` consolidates the ZeRO partitions into the weights one process would hold.
    assert_exports_the_weights_of(run_dir, uninterrupted)


def test_a_loss_spike_rolls_a_deepspeed_run_back_to_its_checkpoint_as_it_does_one_process(corpus_dir, tmp_path):
    reference = one_process_run(corpus_dir, tmp_path / "one", *ROLLBACK)
    run_dir = keel_train(tmp_path, "rollback", f"data.path={corpus_dir}", "parallel.engine=deepspeed",
                         "parallel.zero_stage=2", *ROLLBACK)
    assert_rolled_back_as_one_process(run_dir, reference)


def test_parallel_deepspeed_keys_merge_over_keels_and_the_keys_keel_sets_are_refused():
    from keel.parallel.deepspeed import ds_config
    from keel.training.config import ConfigError, load_config

    cfg = load_config(None, ["parallel.engine=deepspeed", "parallel.zero_stage=2",
                             "parallel.deepspeed={zero_optimization: {reduce_bucket_size: 1000}, "
                             "zero_allow_untested_optimizer: false}"])
    ds = ds_config(cfg, 2)
    assert ds["zero_optimization"] == {"stage": 2, "reduce_bucket_size": 1000}
    assert ds["zero_allow_untested_optimizer"] is False
    with pytest.raises(ConfigError, match=r"parallel.deepspeed.zero_optimization.stage is set by keel; use "
                                          r"parallel.zero_stage"):
        load_config(None, ["parallel.engine=deepspeed", "parallel.deepspeed={zero_optimization: {stage: 3}}"])
    with pytest.raises(ConfigError, match=r"parallel.deepspeed.gradient_clipping is set by keel; use optim.grad_clip"):
        load_config(None, ["parallel.engine=deepspeed", "parallel.deepspeed={gradient_clipping: 0.5}"])
    with pytest.raises(ConfigError, match=r"parallel.deepspeed is set but parallel.engine=native"):
        load_config(None, ["parallel.deepspeed={zero_optimization: {overlap_comm: true}}"])


def test_a_config_deepspeed_refuses_ends_the_run_in_one_line_without_a_retry(corpus_dir, tmp_path):
    import json
    import os
    import subprocess
    import sys

    from engine_runs import COMMON, ROOT, TINY_YAML

    sets = [*COMMON, f"data.path={corpus_dir}", f"train.output_dir={tmp_path}", "train.name=bad",
            "parallel.engine=deepspeed", "parallel.deepspeed={zero_optimization: {reduce_buket_size: 1000}}"]
    result = subprocess.run([sys.executable, "-m", "keel.launcher.cli", "train", str(TINY_YAML), "--nproc-per-node",
                             "2", *[a for s in sets for a in ("--set", s)]], cwd=ROOT, capture_output=True, text=True,
                            timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode != 0
    (line,) = [ln for ln in result.stderr.splitlines() if ln.startswith("keel: error:")]
    assert "DeepSpeed refused its config" in line and "reduce_buket_size" in line and "not retried" in line
    assert "Traceback" not in result.stderr
    ev = [json.loads(x) for x in (tmp_path / "bad" / "events.jsonl").read_text().splitlines()]
    assert [e["kind"] for e in ev if e["kind"] in ("restart", "gave_up")] == ["gave_up"]
    assert next(e for e in ev if e["kind"] == "gave_up")["reason"] == "not_retryable"
