"""The one place that counts parameters, training FLOPs per token and memory per device.

Metrics (MFU), `keel estimate` and scaling-law fits all read these numbers, so they agree.

FLOPs convention (Kaplan et al. 2020, PaLM appendix B): a matmul with N weights costs 2N FLOPs per token
forward and 4N backward, so 6N for training, where N counts the weights of every matmul, including the
output projection (tied or not) and excluding the input embedding (a lookup) and norm gains (elementwise).
Attention adds QK^T and AV: 2 * 2 * T * d * H FLOPs per token per layer forward for full attention; a
causal mask needs only half of the score matrix, so it is counted once, at half: 6 * L * H * d * T.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..kernels.cross_entropy import default_chunk_size
from .config import ModelConfig


@dataclass(frozen=True)
class ParamCount:
    embedding: int   # input embedding table
    attention: int   # q, k, v, o projections, all layers
    ffn: int         # SwiGLU w1, w2, w3, all layers
    norms: int       # RMSNorm gains (block norms, qk-norms and the final norm)
    output: int      # output projection; 0 when tied to the embedding

    @property
    def total(self) -> int:
        return self.embedding + self.attention + self.ffn + self.norms + self.output

    @property
    def matmul(self) -> int:
        """Weights that take part in a matmul, per token: the N of 6N."""
        lm_head = self.output if self.output else self.embedding
        return self.attention + self.ffn + lm_head

    @property
    def non_embedding(self) -> int:
        """Kaplan's N: every parameter except the embedding tables."""
        return self.total - self.embedding - self.output


def count_params(cfg: ModelConfig) -> ParamCount:
    D, L, d = cfg.dim, cfg.n_layers, cfg.head_dim
    qk_norm = 2 * d * L if cfg.qk_norm else 0
    return ParamCount(
        embedding=cfg.vocab_size * D,
        attention=L * (D * cfg.n_heads * d + 2 * D * cfg.n_kv_heads * d + cfg.n_heads * d * D),
        ffn=L * 3 * D * cfg.hidden_dim,
        norms=L * 2 * D + D + qk_norm,
        output=0 if cfg.tie_embeddings else cfg.vocab_size * D,
    )


def attention_flops_per_token(cfg: ModelConfig, seq_len: int, causal: bool = True) -> float:
    """Training FLOPs per token of the score and value matmuls (not the projections)."""
    full = 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len
    return full / 2 if causal else full


def training_flops_per_token(cfg: ModelConfig, seq_len: int, causal: bool = True) -> float:
    """6N + attention: forward and backward FLOPs to train on one token."""
    return 6 * count_params(cfg).matmul + attention_flops_per_token(cfg, seq_len, causal)


BYTES = {"fp32": 4, "bf16": 2}


@dataclass(frozen=True)
class MemoryEstimate:
    weights: float
    grads: float
    optimizer: float
    activations: float

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations


def memory_per_device(cfg: ModelConfig, seq_len: int, micro_batch_size: int, precision: str = "fp32",
                      dp_shard: int = 1, tp: int = 1, pp: int = 1, micro_batches_in_flight: int = 1
                      ) -> MemoryEstimate:
    """Bytes on the busiest device (the first pipeline stage) for a parallel layout.

    Weights and grads are kept in fp32 (autocast / FSDP mixed precision compute in bf16 but the master
    copy stays fp32); AdamW keeps two fp32 moments. FSDP shards all three over dp_shard (dp_replicate
    holds copies, so it does not divide them), tensor parallel over tp, pipeline parallel over pp.
    Activations follow Korthikanti et al. 2022 (Reducing Activation Recomputation, eq. 1) per layer:
    s*b*h*(34 + 5*a*s/h) bytes at 16-bit without recomputation; the 5*a*s/h score-matrix term is dropped
    because fused/SDPA attention never stores the T x T scores, and fp32 doubles it. With sequence
    parallelism all of it is divided by tp. A pipeline stage holds n_layers/pp layers, but keeps
    `micro_batches_in_flight` micro-batches of them (1F1B: up to pp; GPipe: all of them). Logits and
    their gradient add s*b*V*4*2 bytes (fp32, vocab-sharded by tp) on the last stage; they are counted
    whenever pp == 1. With a chunked fused cross-entropy (model.cross_entropy.impl != unfused) only one
    chunk of them exists at a time: chunk*V*4*2. Not counted: FSDP's transient all-gather of one block,
    allocator fragmentation.
    """
    n = count_params(cfg).total / (dp_shard * tp * pp)
    s, b, h = seq_len, micro_batch_size, cfg.dim
    per_layer = s * b * h * 34 * (BYTES[precision] / 2) / tp
    layers_per_stage = cfg.n_layers / pp
    activations = layers_per_stage * per_layer * micro_batches_in_flight
    if pp == 1:
        rows = s * b
        if cfg.cross_entropy.impl != "unfused":
            rows = min(rows, cfg.cross_entropy.chunk_size or default_chunk_size(rows, cfg.vocab_size))
        activations += rows * cfg.vocab_size * 4 * 2 / tp
    return MemoryEstimate(weights=4 * n, grads=4 * n, optimizer=8 * n, activations=activations)


def appendix_f_flops(seq_len: int, vocab_size: int, d_model: int, n_heads: int, n_layers: int, ffw_size: int,
                     key_size: int | None = None, n_kv_heads: int | None = None, ffn_matrices: int = 2,
                     embedding_and_logits: bool = True) -> float:
    """Training FLOPs of one sequence, counted op by op as in Hoffmann et al. 2022 (Chinchilla), Appendix F:
    embeddings, the q/k/v projections, the score matmul, the softmax (3 FLOPs per score), the value
    reduction, the output projection, the feed-forward matmuls and the logits; backward = 2 x forward.
    Unlike the 6N + attention count above it keeps the full (unmasked) score matrix and the softmax, as the
    paper does. `ffn_matrices` is 2 for the paper's GELU MLP, 3 for SwiGLU; `n_kv_heads` < n_heads for
    grouped-query attention. The paper's Table A4 leaves the embeddings and logits out (a typo in the
    appendix, per the authors' correspondence reported in karpathy/nanoGPT's scaling_laws notebook):
    embedding_and_logits=False reproduces it."""
    S, d, H = seq_len, d_model, n_heads
    k = key_size or d // H
    kv = n_kv_heads or H
    attention = (2 * S * d * k * (H + 2 * kv)     # q, k, v projections
                 + 2 * S * S * k * H               # q @ k^T
                 + 3 * H * S * S                   # softmax
                 + 2 * S * S * k * H               # scores @ v
                 + 2 * S * k * H * d)              # output projection
    dense = 2 * S * ffn_matrices * d * ffw_size
    forward = n_layers * (attention + dense)
    if embedding_and_logits:
        forward += 2 * S * vocab_size * d * 2      # the embedding (as a one-hot matmul) and the logits
    return 3 * forward


def model_appendix_f_flops(cfg: ModelConfig, seq_len: int) -> float:
    """appendix_f_flops of keel's own model (GQA, SwiGLU; the embedding is a lookup, so only the logits)."""
    full = appendix_f_flops(seq_len, cfg.vocab_size, cfg.dim, cfg.n_heads, cfg.n_layers, cfg.hidden_dim,
                            key_size=cfg.head_dim, n_kv_heads=cfg.n_kv_heads, ffn_matrices=3)
    return full - 3 * 2 * seq_len * cfg.vocab_size * cfg.dim
