"""The megatron-core engine: GPTModel built from keel's config, with keel's first weights, trains the tiny
model to the native model's losses, one process and tensor parallel (tp=2) or data parallel on two gloo
processes, through skipped steps; a killed tp=2 run resumes from its committed checkpoint to the
uninterrupted losses (and exports the uninterrupted weights), and a loss spike rolls it back as it does a
one-process run. keel's weight layout converts to megatron-core's and back exactly.

Two-process runs are real `keel train --nproc-per-node 2` processes, supervised on the embedded Ray.
"""
import megatron.core  # noqa: F401 - a dependency `make test` installs: a broken install must fail, not skip
import pytest
import torch
from engine_runs import (KILLED, ROLLBACK, UNINTERRUPTED, anomalies, assert_exports_the_weights_of,
                         assert_resumed_as_uninterrupted, assert_rolled_back_as_one_process, assert_same_steps,
                         keel_train, one_process_run)

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


@pytest.mark.parametrize("layout", ["parallel.tp=2", "parallel.dp_shard=2"])
def test_two_processes_match_one_process_megatron_and_the_native_model(layout, native, megatron_tp1, corpus_dir,
                                                                       tmp_path):
    run_dir = keel_train(tmp_path, "mg", f"data.path={corpus_dir}", MEGATRON, layout)
    assert anomalies(run_dir) == anomalies(native)
    assert_same_steps(run_dir, megatron_tp1, 20)
    assert_same_steps(run_dir, native, 20, rel=1e-3)


def test_a_killed_tensor_parallel_run_resumes_from_its_committed_checkpoint_to_the_uninterrupted_losses_and_exports(
        corpus_dir, tmp_path):
    uninterrupted = one_process_run(corpus_dir, tmp_path / "one", *UNINTERRUPTED)
    run_dir = keel_train(tmp_path, "killed", f"data.path={corpus_dir}", MEGATRON, "parallel.tp=2", *KILLED)
    # One file per tensor-parallel rank, each rank's shard of the model and of AdamW's state.
    assert_resumed_as_uninterrupted(run_dir, uninterrupted, {"megatron_tp000.pt", "megatron_tp001.pt"})
    # `keel ckpt export` gathers the shards back into keel's names: the weights one process would hold.
    assert_exports_the_weights_of(run_dir, uninterrupted)


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


@pytest.mark.parametrize("setting, named", [
    ("parallel.pp=2", "parallel.pp > 1"),
    ("model.z_loss=1e-4", "model.z_loss"),
    ("model.rmsnorm.impl=triton", "model.rmsnorm.impl"),
])
def test_what_the_megatron_engine_does_not_run_is_refused_in_one_line_naming_it(setting, named, tiny_config):
    cfg = tiny_config(MEGATRON, setting)
    with pytest.raises(LayoutError, match=rf"^parallel.engine=megatron does not support {named} yet .* use "
                                          rf"parallel.engine=native$"):
        check_layout(cfg, ParallelDims.of(cfg.parallel, 2))
