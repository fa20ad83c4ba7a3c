"""The model: plain PyTorch, built on meta, causal, grouped-query attention that matches full MHA."""
import torch

from keel.training.config import ModelConfig
from keel.training.loss import lm_loss
from keel.training.model import build_model

CFG = dict(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=16)


def materialise(cfg, seed=0):
    model = build_model(cfg)
    model.to_empty(device="cpu")
    model.init_weights(seed=seed)
    return model


def test_builds_on_meta_without_allocating_then_materialises_deterministically():
    cfg = ModelConfig(**CFG)
    model = build_model(cfg)
    assert all(p.is_meta for p in model.parameters())
    a, b = materialise(cfg, seed=1), materialise(cfg, seed=1)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(materialise(cfg, seed=2).layers["0"].attention.wq.weight, a.layers["0"].attention.wq.weight)


def test_outputs_at_a_position_ignore_later_tokens():
    model = materialise(ModelConfig(**CFG))
    x = torch.randint(0, 256, (2, 16))
    y = x.clone()
    y[:, 10:] = torch.randint(0, 256, (2, 6))
    with torch.no_grad():
        assert torch.allclose(model(x)[:, :10], model(y)[:, :10], atol=1e-6)
        assert not torch.allclose(model(x)[:, 10:], model(y)[:, 10:])


def test_grouped_query_attention_equals_mha_with_repeated_kv_heads():
    gqa = materialise(ModelConfig(**CFG))
    mha = materialise(ModelConfig(**{**CFG, "n_kv_heads": 4}))
    state = gqa.state_dict()
    for i in range(2):
        for name in ("wk", "wv"):  # each KV head serves n_heads / n_kv_heads = 2 query heads
            w = state[f"layers.{i}.attention.{name}.weight"].view(2, 16, 64)
            state[f"layers.{i}.attention.{name}.weight"] = w.repeat_interleave(2, dim=0).reshape(64, 64)
    mha.load_state_dict(state)
    x = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(gqa(x), mha(x), atol=1e-5, rtol=1e-5)


def test_tied_embeddings_share_one_tensor_and_qk_norm_adds_gains():
    tied = materialise(ModelConfig(**CFG, tie_embeddings=True, qk_norm=True))
    assert tied.output.weight is tied.tok_embeddings.weight
    assert tied.layers["0"].attention.q_norm is not None
    tied(torch.randint(0, 256, (1, 8))).sum().backward()
    # Trains through both: the shared matrix gets one gradient (embedding rows and output rows summed),
    # and every gain of the query/key norms gets its own.
    assert tied.tok_embeddings.weight.grad is not None and tied.tok_embeddings.weight.grad.abs().sum() > 0
    for norm in (tied.layers["0"].attention.q_norm, tied.layers["0"].attention.k_norm):
        assert norm.weight.grad is not None and norm.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in tied.parameters())


def test_fresh_model_predicts_nearly_uniform_and_z_loss_adds_a_penalty():
    model = materialise(ModelConfig(**CFG))
    x = torch.randint(0, 256, (4, 16))
    logits = model(x)
    loss, ce = lm_loss(logits, x)
    assert abs(ce.item() - torch.log(torch.tensor(256.0)).item()) < 0.1
    loss_z, ce_z = lm_loss(logits, x, z_loss=1e-2)
    assert ce_z == ce and loss_z > loss
