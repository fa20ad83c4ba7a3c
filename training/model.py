"""A plain decoder-only transformer, Llama style: RMSNorm, RoPE, SwiGLU, grouped-query attention.

It knows nothing of meshes or devices: build it on the meta device, let `parallel/` shard it from outside,
then `to_empty()` + `init_weights()` materialise it (as torchtitan does).

Shape legend: B batch, T sequence, D model dim, H query heads, K key/value heads, d head dim, F ffn hidden,
V vocab.
"""
from __future__ import annotations

import math
import zlib

import torch
from torch import nn

from ..kernels.attention import attention
from ..kernels.cross_entropy import fused_linear_cross_entropy
from ..kernels.ops import apply_rope, rms_norm, rope, swiglu  # noqa: F401  (apply_rope: the reference RoPE)
from .config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, impl: str = "auto"):
        super().__init__()
        self.eps, self.impl = eps, impl
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, x):
        # Every backend (kernels/ops.py) normalises in fp32: bf16 sums of squares lose the precision that
        # keeps the norm stable.
        return rms_norm(x, self.weight, self.eps, self.impl)


def rope_tables(head_dim: int, max_seq_len: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [T, d/2] for rotary position embeddings (Su et al. 2021)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles_Tf = torch.outer(torch.arange(max_seq_len, device=device, dtype=torch.float32), inv_freq)
    return angles_Tf.cos(), angles_Tf.sin()


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.impl, self.rope_impl = cfg.attention.impl, cfg.rope.impl
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps, cfg.rmsnorm.impl) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps, cfg.rmsnorm.impl) if cfg.qk_norm else None

    def forward(self, x_BTD, cos_Tf, sin_Tf):
        B, T, _ = x_BTD.shape
        # -1 rather than n_heads: under tensor parallelism each rank holds only its share of the heads.
        q_BHTd = self.wq(x_BTD).view(B, T, -1, self.head_dim).transpose(1, 2)
        k_BKTd = self.wk(x_BTD).view(B, T, -1, self.head_dim).transpose(1, 2)
        v_BKTd = self.wv(x_BTD).view(B, T, -1, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q_BHTd, k_BKTd = self.q_norm(q_BHTd), self.k_norm(k_BKTd)
        q_BHTd, k_BKTd = rope(q_BHTd, k_BKTd, cos_Tf, sin_Tf, self.rope_impl)
        o_BHTd = attention(q_BHTd, k_BKTd, v_BKTd, causal=True, impl=self.impl)
        return self.wo(o_BHTd.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    """SwiGLU (Shazeer 2020): w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden_dim: int, impl: str = "auto"):
        super().__init__()
        self.impl = impl
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x_BTD):
        return self.w2(swiglu(self.w1(x_BTD), self.w3(x_BTD), self.impl))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps, cfg.rmsnorm.impl)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps, cfg.rmsnorm.impl)
        self.feed_forward = FeedForward(cfg.dim, cfg.hidden_dim, cfg.swiglu.impl)

    def forward(self, x_BTD, cos_Tf, sin_Tf):
        h_BTD = x_BTD + self.attention(self.attention_norm(x_BTD), cos_Tf, sin_Tf)
        return h_BTD + self.feed_forward(self.ffn_norm(h_BTD))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        # A ModuleDict keyed by layer index keeps parameter names stable when pipeline parallelism
        # deletes the layers another stage owns (torchtitan does the same).
        self.layers = nn.ModuleDict({str(i): Block(cfg) for i in range(cfg.n_layers)})
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps, cfg.rmsnorm.impl)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.tie_weights()
        # Non-persistent: derived from the config, so checkpoints need not carry them.
        self.register_buffer("rope_cos", torch.empty(cfg.max_seq_len, cfg.head_dim // 2), persistent=False)
        self.register_buffer("rope_sin", torch.empty(cfg.max_seq_len, cfg.head_dim // 2), persistent=False)

    def tie_weights(self):
        if self.cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight

    @torch.no_grad()
    def init_weights(self, seed: int = 0):
        """Fill every parameter and buffer of an unwrapped, unsharded model after `to_empty()`
        (parallel.materialise does the same for wrapped and sharded ones)."""
        self.tie_weights()  # to_empty() materialises each module's parameters separately, untying them
        self.init_buffers()
        for name, param in self.named_parameters():
            param.copy_(initial_value(self.cfg, name, param.shape, seed, param.device))

    @torch.no_grad()
    def init_buffers(self):
        cfg = self.cfg
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta, device=self.rope_cos.device)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)

    def forward(self, tokens_BT: torch.Tensor, targets_BT: torch.Tensor | None = None):
        """Token ids [B, T] -> logits [B, T, V] (fp32 at the output so the loss is computed in fp32).

        With `targets_BT`: (loss, cross-entropy) from model.cross_entropy's fused linear + cross-entropy
        instead, straight from the final hidden states, so the [B, T, V] logits never exist at once
        (training/loss.py `model_loss` decides which). It runs here, inside forward, because FSDP gathers
        the root unit's weights (the output layer's among them) only around the root's forward.

        A pipeline stage that lacks the embedding takes hidden states [B, T, D] instead, and one that
        lacks the head returns hidden states (parallel/pipeline.py removes what a stage does not own).
        """
        h_BTD = self.tok_embeddings(tokens_BT) if self.tok_embeddings is not None else tokens_BT
        for layer in self.layers.values():
            h_BTD = layer(h_BTD, self.rope_cos, self.rope_sin)
        if self.output is None:
            return h_BTD
        if targets_BT is None:
            return self.output(self.norm(h_BTD)).float()
        ce = self.cfg.cross_entropy
        return fused_linear_cross_entropy(self.norm(h_BTD), self.output.weight, targets_BT, z_loss=self.cfg.z_loss,
                                          impl=ce.impl, chunk_size=ce.chunk_size)


def initial_value(cfg: ModelConfig, name: str, shape: torch.Size, seed: int,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """The initial value of parameter `name`, identical whatever the parallel layout.

    Each parameter draws from its own generator seeded by (seed, name), so a tensor-parallel shard, a
    pipeline stage holding layers 4-7 or a single process all start from the same weights. The draw happens
    on `device`, the parameter's own: one CPU thread takes over a minute for a 1B model's truncated normals,
    a GPU milliseconds. Layouts on one kind of device match; a CUDA draw differs from a CPU one.
    """
    if name.endswith("norm.weight"):
        return torch.ones(shape, device=device)
    # Residual-stream output projections get std / sqrt(2 * n_layers) so the residual's variance
    # does not grow with depth (GPT-2's scaled init).
    std = cfg.init_std / math.sqrt(2 * cfg.n_layers) if name.endswith(("wo.weight", "w2.weight")) else cfg.init_std
    generator = torch.Generator(device=device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    out = torch.empty(shape, device=device)
    return nn.init.trunc_normal_(out, std=std, a=-3 * std, b=3 * std, generator=generator)


def build_model(cfg: ModelConfig, device: torch.device | str = "meta") -> Transformer:
    """Build on `device` without allocating or initialising (meta by default)."""
    with torch.device(device):
        return Transformer(cfg)
