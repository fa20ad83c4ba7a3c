"""Parameter and FLOP counts: one source of truth, checked against a hand computation and the model."""
import pytest

from keel.training.config import ModelConfig
from keel.training.flops import (appendix_f_flops, count_params, memory_per_device, model_appendix_f_flops,
                                 training_flops_per_token)
from keel.training.model import build_model

# d=64, 2 layers, 4 query heads and 2 KV heads of dim 16, SwiGLU hidden 128, vocab 256.
SMALL = dict(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=32)


def test_param_count_matches_hand_computation():
    p = count_params(ModelConfig(**SMALL))
    assert p.embedding == 256 * 64 == 16384
    assert p.attention == 2 * (64 * 64 + 64 * 32 + 64 * 32 + 64 * 64) == 24576
    assert p.ffn == 2 * 3 * 64 * 128 == 49152
    assert p.norms == 2 * 2 * 64 + 64 == 320
    assert p.output == 16384
    assert p.total == 106816
    assert p.matmul == 24576 + 49152 + 16384 == 90112   # output matmul counts, embedding lookup does not


def test_training_flops_per_token_is_6n_plus_causal_attention():
    # 6 * 90112 + 12 * L * H * d * T / 2 (causal counted once, half the full score matrix)
    assert training_flops_per_token(ModelConfig(**SMALL), seq_len=32) == 6 * 90112 + 12 * 2 * 4 * 16 * 32 / 2
    assert training_flops_per_token(ModelConfig(**SMALL), 32, causal=False) == 6 * 90112 + 12 * 2 * 4 * 16 * 32


@pytest.mark.parametrize("extra", [{}, {"tie_embeddings": True}, {"qk_norm": True}, {"ffn_dim": None}])
def test_count_agrees_with_the_built_model(extra):
    cfg = ModelConfig(**{**SMALL, **extra})
    model = build_model(cfg)  # meta device: nothing allocated
    assert count_params(cfg).total == sum(p.numel() for p in model.parameters())


def test_memory_estimate_counts_fp32_weights_grads_and_two_adam_moments():
    cfg = ModelConfig(**SMALL)
    mem = memory_per_device(cfg, seq_len=32, micro_batch_size=4)
    assert (mem.weights, mem.grads, mem.optimizer) == (4 * 106816, 4 * 106816, 8 * 106816)
    assert memory_per_device(cfg, 32, 8).activations == 2 * mem.activations


def test_memory_per_device_falls_with_each_parallel_degree():
    cfg = ModelConfig(**SMALL)
    one = memory_per_device(cfg, 32, 4)
    fsdp = memory_per_device(cfg, 32, 4, dp_shard=4)
    tp = memory_per_device(cfg, 32, 4, tp=2)
    pp = memory_per_device(cfg, 32, 4, pp=2, micro_batches_in_flight=2)
    assert fsdp.weights == one.weights / 4 and fsdp.optimizer == one.optimizer / 4
    assert fsdp.activations == one.activations  # FSDP shards state, not activations
    assert tp.weights == one.weights / 2 and tp.activations == one.activations / 2  # sequence parallel
    assert pp.weights == one.weights / 2
    # the first stage holds half the layers but two micro-batches of them, and no logits
    assert pp.activations < one.activations


# Hoffmann et al. 2022, Table A4: layers, d_model, ffw_size, heads, kv_size -> published ratio of the
# appendix-F FLOPs to 6ND (sequence 2048, vocabulary 32k).
TABLE_A4 = [((10, 640, 2560, 10, 64), 1.03), ((20, 1024, 4096, 16, 64), 1.10), ((24, 1280, 5120, 10, 128), 1.08),
            ((26, 1792, 7168, 14, 128), 1.04), ((28, 2048, 8192, 16, 128), 1.03), ((40, 3584, 14336, 28, 128), 0.99)]


@pytest.mark.parametrize("shape,ratio", TABLE_A4, ids=[f"d{s[1]}" for s, _ in TABLE_A4])
def test_appendix_f_count_reproduces_chinchilla_table_a4(shape, ratio):
    L, d, f, h, _ = shape
    S, V = 2048, 32000
    # The paper's N: everything but the input embedding, in its architecture (Transformer-XL relative
    # positions: an extra d^2 + 2d per layer; biases; two LayerNorms per layer and a final one).
    per_layer = (3 * d * d + 3 * d) + (d * d + 2 * d) + (d * d + d) + (d * f + f) + (f * d + d) + 4 * d
    N = L * per_layer + 2 * d + d * V
    exact = appendix_f_flops(S, V, d, h, L, f, embedding_and_logits=False)
    assert exact / (6 * N * S) == pytest.approx(ratio, abs=0.01)


def test_appendix_f_count_of_keel_model_is_close_to_6n_plus_attention():
    # The two counts differ only by the softmax and the unmasked half of the score matrix.
    cfg = ModelConfig(**SMALL)
    T = 32
    full_scores = training_flops_per_token(cfg, T, causal=False) * T
    softmax = 3 * 3 * cfg.n_heads * T * T * cfg.n_layers
    assert model_appendix_f_flops(cfg, T) == pytest.approx(full_scores + softmax, rel=1e-12)
