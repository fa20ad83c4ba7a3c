"""The megatron-core engine: GPTModel built from keel's config, with keel's first weights, trains the tiny
model to the native model's losses, one process and on two gloo processes: tensor parallel with sequence
parallel (tp=2), pipeline parallel under megatron-core's 1F1B and interleaved schedules (pp=2), or data
parallel, through skipped steps; a killed tp=2 or pp=2 run resumes from its committed checkpoint to the
uninterrupted losses (and exports the uninterrupted weights), and a loss spike rolls it back as it does a
one-process run. keel's weight layout converts to megatron-core's and back exactly.

Two-process runs are real `keel train --nproc-per-node 2` processes, supervised on the embedded Ray.
"""
import os
import subprocess
import sys

import megatron.core  # noqa: F401 - a dependency `make test` installs: a broken install must fail, not skip
import pytest
import torch
from engine_runs import (COMMON, KILLED, ROLLBACK, ROOT, TINY_YAML, UNINTERRUPTED, anomalies,
                         assert_exports_the_weights_of, assert_resumed_as_uninterrupted,
                         assert_rolled_back_as_one_process, assert_same_steps, events, keel_train, one_process_run)

from keel.parallel.dims import LayoutError, ParallelDims, check_layout
from keel.parallel.megatron_layout import megatron_weights, native_weights
from keel.training.config import load_config
from keel.training.model import build_model
from keel.training.presets import TEST_MODEL

pytestmark = pytest.mark.timeout(600)
MEGATRON = "parallel.engine=megatron"


@pytest.fixture(scope="module")
def native(corpus_dir, tmp_path_factory):
    return one_process_run(corpus_dir, tmp_path_factory.mktemp("native"))


@pytest.fixture(scope="module")
def megatron_tp1(corpus_dir, tmp_path_factory):
    return one_process_run(corpus_dir, tmp_path_factory.mktemp("megatron"), MEGATRON)


def test_one_process_megatron_matches_the_native_model_from_the_same_weights(native, megatron_tp1):
    # The first weights are the native model's, converted to GPTModel's fused QKV and gate/up layout: a
    # wrong conversion shows at step 1. Through the skipped steps (lr_spike in COMMON) as well.
    assert anomalies(native)[0] == (14, "skip_step")
    assert anomalies(megatron_tp1) == anomalies(native)
    assert_same_steps(megatron_tp1, native, 20)


@pytest.fixture(scope="module")
def uninterrupted(corpus_dir, tmp_path_factory):
    return one_process_run(corpus_dir, tmp_path_factory.mktemp("uninterrupted"), *UNINTERRUPTED)


@pytest.mark.parametrize("layout", ["parallel.tp=2", "parallel.pp=2", "parallel.dp_shard=2"])
def test_two_processes_match_one_process_megatron_and_the_native_model(layout, native, megatron_tp1, corpus_dir,
                                                                       tmp_path):
    # tp=2 runs with sequence parallel. pp=2: one layer per stage, the step's 4 micro-batches through
    # megatron-core's 1F1B schedule.
    run_dir = keel_train(tmp_path, "mg", f"data.path={corpus_dir}", MEGATRON, layout)
    assert anomalies(run_dir) == anomalies(native)
    assert_same_steps(run_dir, megatron_tp1, 20)
    assert_same_steps(run_dir, native, 20, rel=1e-3)


def test_tensor_and_sequence_parallel_with_qk_norm_matches_the_native_model(corpus_dir, tmp_path):
    # Under sequence parallel each tp rank normalises half the sequence, and a QK-norm gain always sees
    # only its rank's heads: without their gradients summed over the two ranks, the steps part.
    native_qk = one_process_run(corpus_dir, tmp_path / "one", "model.qk_norm=true")
    run_dir = keel_train(tmp_path, "mg", f"data.path={corpus_dir}", MEGATRON, "parallel.tp=2", "model.qk_norm=true")
    assert anomalies(run_dir) == anomalies(native_qk)
    assert_same_steps(run_dir, native_qk, 20, rel=1e-3)


def test_the_interleaved_schedule_runs_two_stages_per_rank_to_the_one_process_losses(corpus_dir, tmp_path):
    # Stages 0 and 2 on rank 0, 1 and 3 on rank 1, a layer each. Without COMMON's loss spike: its chaotic
    # gradients (norms of ~500) amplify the last digits that the stages' partial sums round differently.
    settings = [MEGATRON, "model.n_layers=4", "fault.inject=[]"]
    one_process = one_process_run(corpus_dir, tmp_path / "one", *settings)
    run_dir = keel_train(tmp_path, "mg", f"data.path={corpus_dir}", *settings, "parallel.pp=2",
                         "parallel.pp_schedule=interleaved_1f1b", "parallel.pp_stages_per_rank=2")
    assert anomalies(run_dir) == anomalies(one_process) == []
    assert_same_steps(run_dir, one_process, 20)


@pytest.mark.parametrize("layout, files", [
    ("parallel.tp=2", {"megatron_tp000.pt", "megatron_tp001.pt"}),  # each tensor-parallel rank's shard
    ("parallel.pp=2", {"megatron_tp000_pp000.pt", "megatron_tp000_pp001.pt"}),  # each stage's layers
])
def test_a_killed_model_parallel_run_resumes_from_its_committed_checkpoint_to_the_uninterrupted_losses_and_exports(
        layout, files, uninterrupted, corpus_dir, tmp_path):
    run_dir = keel_train(tmp_path, "killed", f"data.path={corpus_dir}", MEGATRON, layout, *KILLED)
    # One file per model-parallel rank, each rank's shard of the model and of AdamW's state.
    assert_resumed_as_uninterrupted(run_dir, uninterrupted, files)
    # `keel ckpt export` gathers the shards back into keel's names: the weights one process would hold.
    assert_exports_the_weights_of(run_dir, uninterrupted)


def test_a_checkpoint_resumed_with_another_model_parallel_layout_stops_in_one_line_without_a_retry(corpus_dir,
                                                                                                    tmp_path):
    # A pp=2 run dies after its step-5 checkpoint and is not restarted; the same run started again with tp=2
    # (the same 2 ranks, so the world-size check passes) finds shards cut for another layout.
    common = [*COMMON, f"data.path={corpus_dir}", f"train.output_dir={tmp_path}", "train.name=mg", MEGATRON,
              "train.steps=10", "checkpoint.interval=5"]

    def run(*overrides):
        sets = [a for o in [*common, *overrides] for a in ("--set", o)]
        return subprocess.run([sys.executable, "-m", "keel.launcher.cli", "train", str(TINY_YAML),
                               "--nproc-per-node", "2", *sets], cwd=ROOT, capture_output=True, text=True,
                              timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})

    assert run("parallel.pp=2", "fault.inject=kill:r1@7", "fault.max_restarts=0").returncode != 0
    done = run("parallel.tp=2", "fault.inject=[]")
    assert done.returncode != 0
    assert "Traceback" not in done.stderr + done.stdout
    assert "was saved with tp=1, pp=2, pp_stages_per_rank=1 and this run has tp=2, pp=1, pp_stages_per_rank=1; the " \
           "megatron-core engine resumes with the parallel.tp, parallel.pp and parallel.pp_stages_per_rank it saved " \
           "with" in done.stderr
    # The second run's one failure, not retried.
    assert [e["cause"] for e in events(tmp_path / "mg", "failure")] == ["process_died", "error"]
    assert [e["reason"] for e in events(tmp_path / "mg", "gave_up")] == ["max_restarts", "not_retryable"]


def test_a_loss_spike_rolls_a_tensor_parallel_run_back_to_its_checkpoint_as_it_does_one_process(corpus_dir,
                                                                                                tmp_path):
    reference = one_process_run(corpus_dir, tmp_path / "one", *ROLLBACK)
    run_dir = keel_train(tmp_path, "rollback", f"data.path={corpus_dir}", MEGATRON, "parallel.tp=2", *ROLLBACK)
    assert_rolled_back_as_one_process(run_dir, reference)


@pytest.mark.parametrize("extra", [[], ["model.qk_norm=true"], ["model.tie_embeddings=true"]])
@pytest.mark.parametrize("tp", [1, 2])
def test_keel_weights_convert_to_megatron_shards_and_back_exactly(tp, extra):
    cfg = load_config(None, [*TEST_MODEL, *extra]).model
    model = build_model(cfg, "cpu")
    model.init_weights(seed=0)
    native = dict(model.named_parameters())
    shards = [megatron_weights(native, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, tp, r) for r in range(tp)]
    assert all(s.keys() == shards[0].keys() for s in shards)
    back = native_weights(shards, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads)
    assert back.keys() == native.keys()
    for name in native:
        assert torch.equal(back[name], native[name]), name


@pytest.mark.parametrize("settings, named", [
    (["model.tie_embeddings=true", "parallel.pp=2"], "model.tie_embeddings with parallel.pp > 1"),
    (["model.z_loss=1e-4"], "model.z_loss"),
    (["model.rmsnorm.impl=triton"], "model.rmsnorm.impl"),
])
def test_what_the_megatron_engine_does_not_run_is_refused_in_one_line_naming_it(settings, named, tiny_config):
    cfg = tiny_config(MEGATRON, *settings)
    with pytest.raises(LayoutError, match=rf"^parallel.engine=megatron does not support {named} yet .* use "
                                          rf"parallel.engine=native$"):
        check_layout(cfg, ParallelDims.of(cfg.parallel, 2))


@pytest.mark.parametrize("settings, message", [
    (["parallel.pp_schedule=gpipe"], r"parallel.pp_schedule=gpipe is not one of megatron-core's schedules; set "
                                     r"parallel.pp_schedule=1f1b or interleaved_1f1b"),
    (["model.n_layers=3"], r"megatron-core splits model.n_layers=3 evenly over 2 pipeline stages .* make "
                           r"model.n_layers a multiple of 2"),
    (["model.n_layers=4", "parallel.pp_schedule=interleaved_1f1b", "parallel.pp_stages_per_rank=2",
      "train.global_batch_size=6", "train.micro_batch_size=2"],
     r"the pipeline has 3 micro-batches per step; megatron-core's interleaved_1f1b schedule needs a multiple of "
     r"parallel.pp=2"),
    (["train.micro_batch_size=8"], r"the pipeline has 1 micro-batches per step; .* needs at least parallel.pp=2"),
])
def test_a_pipeline_megatron_core_cannot_schedule_is_refused_saying_what_to_change(settings, message, tiny_config):
    cfg = tiny_config(MEGATRON, "parallel.pp=2", "model.n_layers=2", "train.global_batch_size=8",
                      "train.micro_batch_size=2", *settings)
    with pytest.raises(LayoutError, match=message):
        check_layout(cfg, ParallelDims.of(cfg.parallel, 2))


def test_reduced_precision_on_a_cpu_is_refused_before_anything_is_built(tiny_config):
    # megatron-core's linear layers replay autocast in their backward on CUDA only: on a CPU the first bf16
    # backward multiplies a bf16 gradient by an fp32 weight.
    from keel.training.loop import train

    with pytest.raises(LayoutError, match=r"^parallel.engine=megatron trains in fp32 on a CPU .* set "
                                          r"train.precision=fp32, or train on GPUs$"):
        train(tiny_config(MEGATRON, "train.precision=bf16"))


def test_sequence_parallel_needs_a_sequence_that_splits_evenly_over_the_tensor_parallel_ranks(tiny_config):
    cfg = tiny_config(MEGATRON, "parallel.tp=2", "data.seq_len=31")
    with pytest.raises(LayoutError, match=r"parallel.tp=2 does not divide data.seq_len=31; megatron-core's sequence "
                                          r"parallel gives each tensor-parallel rank an equal slice"):
        check_layout(cfg, ParallelDims.of(cfg.parallel, 2))
