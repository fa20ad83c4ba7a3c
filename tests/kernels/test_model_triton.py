"""A model trained with the Triton attention kernel follows the SDPA loss curve (interpreter on CPU)."""
import json

import pytest

pytest.importorskip("triton", reason="triton is not installed (pip install triton==3.9.0)")

from keel.training.loop import train  # noqa: E402


def step_losses(summary):
    records = [json.loads(line) for line in (summary.run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["kind"] == "step"]


def test_triton_attention_trains_along_the_sdpa_loss_curve(tiny_config):
    # head_dim 16: the smallest tile the kernel is tested at; fp32 so the comparison measures the kernel.
    shape = ["model.dim=32", "model.n_heads=2", "model.n_kv_heads=1", "train.global_batch_size=4",
             "train.micro_batch_size=4", "train.steps=20", "train.precision=fp32"]
    sdpa = step_losses(train(tiny_config(*shape, "model.attention.impl=sdpa", "train.name=sdpa")))
    triton = step_losses(train(tiny_config(*shape, "model.attention.impl=triton", "train.name=triton")))
    assert len(triton) == len(sdpa) == 20
    assert max(abs(a - b) for a, b in zip(triton, sdpa)) <= 1e-3
    assert sdpa[-1] < sdpa[0] - 0.3
