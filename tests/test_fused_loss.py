"""model.cross_entropy: the chunked fused linear + cross-entropy trains the model to the unfused loss curve, in
one process and under FSDP (two real gloo processes), and the layouts it cannot serve are refused before
anything is built."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from keel.parallel.dims import LayoutError, ParallelDims, check_layout
from keel.training.config import ConfigError, load_config
from keel.training.flops import memory_per_device
from keel.training.loop import train
from keel.training.loss import lm_loss
from keel.training.model import build_model

ROOT = Path(__file__).parent.parent
# 20 fp32 steps with evaluations at 0, 10 and 20 (they take the same loss path). Micro-batches of 4 rows
# (128 tokens: two per step in one process) in chunks of 48 tokens end in a ragged chunk (48 + 48 + 32).
# No checkpoints: configs/tiny.yaml would save one at the last step.
COMMON = ("train.steps=20", "train.micro_batch_size=4", "train.precision=fp32", "train.eval_every=10",
          "model.cross_entropy.chunk_size=48", "checkpoint.interval=0")
CHUNKED = "model.cross_entropy.impl=chunked"


def curves(run_dir: Path) -> tuple[list[float], list[float]]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return ([r["loss"] for r in records if r["kind"] == "step"],
            [r["val_loss"] for r in records if r["kind"] == "eval"])


def worst_relative(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b) and a
    return max(abs(x - y) / abs(y) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def settings(tiny_settings, corpus_dir) -> list[str]:
    return [*tiny_settings, *COMMON, f"data.path={corpus_dir}", "train.name=run"]


def train_in_process(settings, out: Path, *extra: str) -> tuple[list[float], list[float]]:
    train(load_config(ROOT / "configs" / "tiny.yaml", [*settings, f"train.output_dir={out}", *extra]))
    return curves(out / "run")


@pytest.fixture(scope="module")
def unfused(settings, tmp_path_factory):
    return train_in_process(settings, tmp_path_factory.mktemp("unfused"))


def test_chunked_loss_follows_the_unfused_loss_curve_in_one_process(settings, unfused, tmp_path):
    steps, evals = train_in_process(settings, tmp_path, CHUNKED)
    ref_steps, ref_evals = unfused
    assert len(steps) == 20 and len(evals) == 3  # evaluations at steps 0, 10 and 20
    print(f"one process: worst relative difference {worst_relative(steps, ref_steps):.1e} (steps), "
          f"{worst_relative(evals, ref_evals):.1e} (evals)")
    assert worst_relative(steps, ref_steps) <= 1e-5, (steps, ref_steps)
    assert worst_relative(evals, ref_evals) <= 1e-5, (evals, ref_evals)
    assert ref_steps[-1] < ref_steps[0] - 0.5  # and the run learned


def test_chunked_loss_under_fsdp_matches_one_process(settings, unfused, tmp_path):
    # dp_shard=2: the output layer belongs to the root FSDP unit, whose weights are gathered around the
    # root's forward; the fused loss runs inside that forward (Transformer.forward with targets). Two
    # micro-batches of 2 rows per rank: gradients accumulate unsynchronised before the last one.
    sets = [a for o in [*settings, CHUNKED, "parallel.dp_shard=2", "train.micro_batch_size=2",
                        f"train.output_dir={tmp_path}"] for a in ("--set", o)]
    result = subprocess.run([sys.executable, "-m", "keel.launcher.cli", "train", "configs/tiny.yaml",
                             "--launcher", "torchrun", "--nproc-per-node", "2", *sets], cwd=ROOT,
                            capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    steps, evals = curves(tmp_path / "run")
    ref_steps, ref_evals = unfused
    print(f"dp_shard=2: worst relative difference {worst_relative(steps, ref_steps):.1e} (steps), "
          f"{worst_relative(evals, ref_evals):.1e} (evals)")
    assert worst_relative(steps, ref_steps) <= 1e-5, (steps, ref_steps)
    assert worst_relative(evals, ref_evals) <= 1e-5, (evals, ref_evals)


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied-embeddings"])
def test_model_forward_with_targets_gives_lm_loss_and_its_gradients(tie):
    cfg = load_config(None, ["model.dim=32", "model.n_layers=1", "model.n_heads=4", "model.max_seq_len=16",
                             "data.seq_len=16", "model.z_loss=1e-2", f"model.tie_embeddings={str(tie).lower()}",
                             "model.cross_entropy.impl=chunked", "model.cross_entropy.chunk_size=5"]).model
    model = build_model(cfg, "cpu")
    model.init_weights(seed=3)
    tokens_BT = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    targets_BT = tokens_BT.roll(-1, dims=1)
    loss, ce = model(tokens_BT, targets_BT)
    fused = torch.autograd.grad(loss, list(model.parameters()))
    ref_loss, ref_ce = lm_loss(model(tokens_BT), targets_BT, cfg.z_loss)
    plain = torch.autograd.grad(ref_loss, list(model.parameters()))
    assert (loss.item(), ce.item()) == pytest.approx((ref_loss.item(), ref_ce.item()), rel=1e-6)
    for (name, _), a, b in zip(model.named_parameters(), fused, plain):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7), name


def layout(world_size, *overrides):
    cfg = load_config(ROOT / "configs" / "tiny.yaml", list(overrides))
    check_layout(cfg, ParallelDims.of(cfg.parallel, world_size))


def test_fused_loss_config_refusals_name_the_fix(settings, tmp_path, monkeypatch):
    layout(2, CHUNKED, "parallel.dp_shard=2", "train.micro_batch_size=8")  # FSDP is fine
    fix = r"cannot be combined with parallel.tp > 1 or parallel.pp > 1 yet. Set model.cross_entropy.impl=unfused"
    with pytest.raises(LayoutError, match=r"model.cross_entropy.impl=chunked .*" + fix):
        layout(2, CHUNKED, "parallel.tp=2")
    with pytest.raises(LayoutError, match=fix):
        layout(2, "model.cross_entropy.impl=auto", "parallel.pp=2", "train.micro_batch_size=8")
    with pytest.raises(ConfigError, match=r"model.cross_entropy.impl: 'fused' is not one of"):
        load_config(None, ["model.cross_entropy.impl=fused"])
    with pytest.raises(ConfigError, match=r"model.cross_entropy.chunk_size must be positive"):
        load_config(None, ["model.cross_entropy.chunk_size=0"])
    # Device checks run in train() before any data or model is touched.
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for impl, why in (("liger", "'liger' needs a CUDA device"), ("triton", "'triton' needs a CUDA device")):
        cfg = load_config(None, [*settings, f"model.cross_entropy.impl={impl}", "train.device=cpu",
                                 f"train.output_dir={tmp_path}"])
        with pytest.raises(ConfigError, match=f"model.cross_entropy.impl: cross-entropy impl {why}"):
            train(cfg)
    assert not (tmp_path / "run").exists()


def test_memory_estimate_counts_one_chunk_of_logits():
    cfg = load_config(None, ["model.vocab_size=128256", "model.dim=2048", "model.n_heads=16"]).model
    unfused = memory_per_device(cfg, seq_len=4096, micro_batch_size=4).activations
    cfg.cross_entropy.impl = "chunked"
    chunked = memory_per_device(cfg, seq_len=4096, micro_batch_size=4).activations
    assert unfused - chunked == (4096 * 4 - 512) * 128256 * 4 * 2  # 512-token chunks instead of 16384 tokens
