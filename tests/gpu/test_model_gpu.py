"""The model with every op on keel's Triton kernels (attention, RMSNorm, SwiGLU, RoPE, fused cross-entropy)
follows the all-PyTorch run for 20 bf16 steps on the GPU (in a dry run: 5 fp32 steps through the interpreter).

bf16 tolerance: the two runs round differently from the first matmul on, and training amplifies that, so the
first steps must agree to 2e-2 and every step to 0.1 nats (a wrong kernel is off by whole nats, or does not
learn); in fp32 (dry run) every step to 1e-3.
"""
import json

import pytest

from keel.training.loop import train

pytestmark = pytest.mark.gpu
ALL_TORCH = ["model.attention.impl=sdpa", "model.rmsnorm.impl=torch", "model.swiglu.impl=torch",
             "model.rope.impl=torch", "model.cross_entropy.impl=unfused"]
ALL_TRITON = ["model.attention.impl=triton", "model.rmsnorm.impl=triton", "model.swiglu.impl=triton",
              "model.rope.impl=triton", "model.cross_entropy.impl=triton"]
# Head dim 128 on the GPU: the tile sizes real models use.
SHAPE = {"cuda": ["model.dim=256", "model.n_heads=2", "model.n_kv_heads=1", "model.n_layers=2",
                  "model.ffn_dim=512", "model.max_seq_len=256", "data.seq_len=256", "train.global_batch_size=8",
                  "train.micro_batch_size=8", "train.steps=20", "train.precision=bf16", "train.device=cuda"],
         "cpu": ["model.dim=32", "model.n_heads=2", "model.n_kv_heads=1", "model.n_layers=1", "model.ffn_dim=32",
                 "data.seq_len=8", "train.global_batch_size=2", "train.micro_batch_size=2", "train.steps=5",
                 "train.precision=fp32", "train.device=cpu"]}


def step_losses(summary):
    records = [json.loads(line) for line in (summary.run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["kind"] == "step"]


def test_all_triton_model_follows_the_pytorch_loss_curve(device, tiny_config):
    shape = [*SHAPE[device], "logging.wandb.mode=disabled", "train.eval_every=0", "checkpoint.interval=0"]
    torch_run = step_losses(train(tiny_config(*shape, *ALL_TORCH, "train.name=torch")))
    triton_run = step_losses(train(tiny_config(*shape, *ALL_TRITON, "train.name=triton")))
    steps = 20 if device == "cuda" else 5
    assert len(triton_run) == len(torch_run) == steps
    diffs = [abs(a - b) for a, b in zip(triton_run, torch_run)]
    if device == "cuda":
        assert max(diffs[:3]) <= 2e-2 and max(diffs) <= 0.1, (triton_run, torch_run)
        assert torch_run[-1] < torch_run[0] - 0.3 and triton_run[-1] < triton_run[0] - 0.3
    else:
        assert max(diffs) <= 1e-3, (triton_run, torch_run)
