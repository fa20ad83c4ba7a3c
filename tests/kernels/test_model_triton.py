"""A model trained with keel's Triton kernels follows the PyTorch loss curve (interpreter on CPU)."""
import json

from keel.training.loop import train


# head_dim 16: the smallest tile the attention kernel is tested at; fp32 so the comparison measures the kernels.
SHAPE = ["model.dim=32", "model.n_heads=2", "model.n_kv_heads=1", "train.global_batch_size=4",
         "train.micro_batch_size=4", "train.steps=20", "train.precision=fp32"]
ALL_TORCH = ["model.attention.impl=sdpa", "model.rmsnorm.impl=torch", "model.swiglu.impl=torch",
             "model.rope.impl=torch"]
ALL_TRITON = ["model.attention.impl=triton", "model.rmsnorm.impl=triton", "model.swiglu.impl=triton",
              "model.rope.impl=triton"]


def step_losses(summary):
    records = [json.loads(line) for line in (summary.run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["kind"] == "step"]


def test_triton_attention_trains_along_the_sdpa_loss_curve(tiny_config):
    sdpa = step_losses(train(tiny_config(*SHAPE, "model.attention.impl=sdpa", "train.name=sdpa")))
    triton = step_losses(train(tiny_config(*SHAPE, "model.attention.impl=triton", "train.name=triton")))
    assert len(triton) == len(sdpa) == 20
    assert max(abs(a - b) for a, b in zip(triton, sdpa)) <= 1e-3
    assert sdpa[-1] < sdpa[0] - 0.3


def test_all_triton_kernels_together_train_along_the_pytorch_loss_curve(tiny_config):
    # Attention, every RMSNorm, SwiGLU and RoPE. The interpreter runs one program at a time and these kernels
    # launch one per row or position (~2 ms each), so: 16 tokens a step, one layer.
    shape = [*SHAPE, "model.n_layers=1", "model.ffn_dim=32", "data.seq_len=8", "train.global_batch_size=2",
             "train.micro_batch_size=2"]
    torch_run = step_losses(train(tiny_config(*shape, *ALL_TORCH, "train.name=torch")))
    triton_run = step_losses(train(tiny_config(*shape, *ALL_TRITON, "train.name=triton")))
    assert len(triton_run) == len(torch_run) == 20
    assert max(abs(a - b) for a, b in zip(triton_run, torch_run)) <= 1e-3
    assert torch_run[-1] < torch_run[0] - 0.3
