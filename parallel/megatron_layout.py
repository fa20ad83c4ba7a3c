"""keel's weights <-> megatron-core GPTModel's, whole or cut per tensor-parallel rank.

Both ways, with no megatron import: the engine (parallel/megatron.py) converts keel's first weights into its
shard, and `keel ckpt export` (checkpoints/export.py) gathers a megatron-core checkpoint's shards back into
keel's names.

megatron-core fuses two pairs of keel's weights:
- QKV: for each key/value group in turn, the group's query heads, then its key head, then its value head;
  a tensor-parallel rank holds a contiguous run of whole groups.
- gate/up: on each rank, that rank's rows of the gate (keel's w1), then its rows of the up projection (w3).
"""
from __future__ import annotations

import torch


def partition_dim(name: str) -> int | None:
    """The dimension a GPTModel weight is split along across tensor-parallel ranks (None: every rank holds
    it whole: the norms)."""
    if "layernorm" in name:
        return None
    return 1 if name.endswith(("linear_proj.weight", "linear_fc2.weight")) else 0


def _renamed(n_layers: int) -> dict[str, str]:
    """keel name -> GPTModel name, for the weights that are the same tensor in both (cut the same way). A
    model has a subset: no output weight when tied, no QK-norm gains without QK-norm."""
    names = {"tok_embeddings.weight": "embedding.word_embeddings.weight",
             "norm.weight": "decoder.final_layernorm.weight", "output.weight": "output_layer.weight"}
    for i in range(n_layers):
        k, g = f"layers.{i}.", f"decoder.layers.{i}."
        names |= {k + "attention.wo.weight": g + "self_attention.linear_proj.weight",
                  k + "attention_norm.weight": g + "input_layernorm.weight",
                  k + "ffn_norm.weight": g + "pre_mlp_layernorm.weight",
                  k + "feed_forward.w2.weight": g + "mlp.linear_fc2.weight",
                  k + "attention.q_norm.weight": g + "self_attention.q_layernorm.weight",
                  k + "attention.k_norm.weight": g + "self_attention.k_layernorm.weight"}
    return names


@torch.no_grad()
def megatron_weights(native: dict[str, torch.Tensor], n_layers: int, n_heads: int, n_kv_heads: int, tp: int,
                     tp_rank: int) -> dict[str, torch.Tensor]:
    """keel's full weights (by keel's names) -> tensor-parallel rank `tp_rank`'s GPTModel weights."""
    def cut(name: str, w: torch.Tensor) -> torch.Tensor:
        dim = partition_dim(name)
        return w if dim is None else w.chunk(tp, dim=dim)[tp_rank]

    out = {g: cut(g, native[k]) for k, g in _renamed(n_layers).items() if k in native}
    group = n_heads // n_kv_heads
    for i in range(n_layers):
        k, g = f"layers.{i}.", f"decoder.layers.{i}."
        wk = native[k + "attention.wk.weight"]
        d = wk.shape[0] // n_kv_heads
        q_K = native[k + "attention.wq.weight"].view(n_kv_heads, group * d, -1)
        qkv = torch.cat([q_K, wk.view(n_kv_heads, d, -1), native[k + "attention.wv.weight"].view(n_kv_heads, d, -1)],
                        dim=1)
        out[g + "self_attention.linear_qkv.weight"] = cut("qkv", qkv.flatten(0, 1))
        out[g + "mlp.linear_fc1.weight"] = torch.cat([cut("fc1", native[k + "feed_forward.w1.weight"]),
                                                      cut("fc1", native[k + "feed_forward.w3.weight"])])
    return out


@torch.no_grad()
def native_weights(shards: list[dict[str, torch.Tensor]], n_layers: int, n_heads: int,
                   n_kv_heads: int) -> dict[str, torch.Tensor]:
    """Every tensor-parallel rank's GPTModel weights, in rank order -> keel's full weights by keel's names."""
    def whole(name: str) -> torch.Tensor:
        dim = partition_dim(name)
        return shards[0][name] if dim is None else torch.cat([s[name] for s in shards], dim=dim)

    out = {k: whole(g) for k, g in _renamed(n_layers).items() if g in shards[0]}
    group = n_heads // n_kv_heads
    for i in range(n_layers):
        k, g = f"layers.{i}.", f"decoder.layers.{i}."
        qkv = whole(g + "self_attention.linear_qkv.weight")
        d = qkv.shape[0] // (n_kv_heads * (group + 2))
        q, k_, v = qkv.view(n_kv_heads, (group + 2) * d, -1).split([group * d, d, d], dim=1)
        out |= {k + "attention.wq.weight": q.flatten(0, 1), k + "attention.wk.weight": k_.flatten(0, 1),
                k + "attention.wv.weight": v.flatten(0, 1)}
        gate_up = [s[g + "mlp.linear_fc1.weight"].chunk(2) for s in shards]
        out[k + "feed_forward.w1.weight"] = torch.cat([gu[0] for gu in gate_up])
        out[k + "feed_forward.w3.weight"] = torch.cat([gu[1] for gu in gate_up])
    return {name: t.contiguous() for name, t in out.items()}

