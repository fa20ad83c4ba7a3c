"""megatron-core's GPTModel built from keel's model config, for the megatron-core engine (megatron.py): its
TransformerConfig, its layer spec with keel's attention as the core, and this rank's pipeline stages holding
keel's first weights.

The model is Llama-style as keel's is: RMSNorm, SwiGLU, no biases or dropout, grouped-query attention,
interleaved RoPE. keel plugs its own attention kernels into the layer spec in place of megatron-core's
`DotProductAttention` (an unfused softmax), so `model.attention.impl` means the same here as in the native
model, and an RMSNorm that allows sequence parallel in place of megatron-core's torch norm (which refuses it;
its sequence-parallel norms are Apex's or Transformer Engine's, CUDA-only).
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.attention import attention
from ..kernels.cross_entropy import IGNORE_INDEX
from ..training.config import ModelConfig
from .materialise import initial_values
from .megatron_layout import megatron_weights, partition_dim

# megatron-core warns about what keel chose for it: no Apex or Transformer Engine (once per module), the
# async all-reduce's CUDA setting, deprecations of arguments keel leaves at their defaults (one per forward
# of every linear). None of it is the user's to act on.
warnings.filterwarnings("ignore", module=r"megatron\.")
with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.module import MegatronModule
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset


def transformer_config(m: ModelConfig, tp: int, pp: int = 1, stages_per_rank: int = 1) -> TransformerConfig:
    """megatron-core's TransformerConfig for keel's Llama-style model: RMSNorm, SwiGLU, no biases, no
    dropout, grouped-query attention, interleaved RoPE (keel rotates pairs (x0, x1), (x2, x3), ...).
    Tensor parallel runs with sequence parallel, as the native engine's does."""
    return TransformerConfig(
        num_layers=m.n_layers, hidden_size=m.dim, num_attention_heads=m.n_heads, num_query_groups=m.n_kv_heads,
        kv_channels=m.head_dim, ffn_hidden_size=m.hidden_dim, normalization="RMSNorm", layernorm_epsilon=m.norm_eps,
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False, add_qkv_bias=False,
        hidden_dropout=0.0, attention_dropout=0.0, qk_layernorm=m.qk_norm, rotary_interleaved=True,
        tensor_model_parallel_size=tp, sequence_parallel=tp > 1,
        pipeline_model_parallel_size=pp, virtual_pipeline_model_parallel_size=stages_per_rank if stages_per_rank > 1
        else None, pipeline_dtype=torch.float32,  # the residual stream, fp32 under autocast too
        # One send or receive at a time: the batched form ends in torch.cuda.synchronize().
        batch_p2p_comm=False, batch_p2p_sync=False,
        # keel gives every weight its value (below); megatron-core's own initialisation would be thrown away.
        perform_initialization=False, use_cpu_initialization=True, params_dtype=torch.float32,
        # The fusions are Apex / Transformer Engine / CUDA kernels.
        bias_activation_fusion=False, bias_dropout_fusion=False, masked_softmax_fusion=False,
        apply_rope_fusion=False, gradient_accumulation_fusion=False, persist_layer_norm=False,
        cross_entropy_loss_fusion=False,
    )


class KeelCoreAttention(MegatronModule):
    """keel's attention kernels (kernels/attention.py) as megatron-core's core attention: takes and returns
    what `DotProductAttention` does (q [T, B, H/tp, d], k and v [T, B, K/tp, d] -> [T, B, H/tp * d])."""

    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type, attention_type: str,
                 attention_dropout: float | None = None, softmax_scale: float | None = None,
                 cp_comm_type: str | None = None, pg_collection=None, impl: str = "auto"):
        super().__init__(config=config)
        self.impl, self.softmax_scale = impl, softmax_scale

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("keel's core attention takes neither packed sequences nor an attention bias")
        q_BHTd, k_BKTd, v_BKTd = (x.permute(1, 2, 0, 3) for x in (query, key, value))
        o_BHTd = attention(q_BHTd, k_BKTd, v_BKTd, causal=True, impl=self.impl, scale=self.softmax_scale)
        return o_BHTd.permute(2, 0, 1, 3).flatten(2)


class RMSNorm(nn.RMSNorm):
    """torch's RMSNorm, the module megatron-core's own torch norm builds, taking megatron-core's arguments and
    allowing sequence parallel: each tensor-parallel rank then normalises its slice of the sequence, so the
    gain's gradient is partial there, and the mark tells the engine to sum it over the ranks."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **unused):
        super().__init__(hidden_size, eps=eps)
        self.weight.sequence_parallel = config.sequence_parallel


def block_spec(m: ModelConfig, config: TransformerConfig, vp_stage: int | None) -> TransformerBlockSubmodules:
    """The layers of one pipeline stage: megatron-core's local (no Transformer Engine) layer spec with keel's
    attention as its core and keel's RMSNorm, then the final norm."""
    spec = get_gpt_layer_local_spec(qk_layernorm=m.qk_norm, normalization="RMSNorm")
    spec.submodules.self_attention.submodules.core_attention = ModuleSpec(
        module=KeelCoreAttention, params={"impl": m.attention.impl})
    layer = spec.submodules
    layer.input_layernorm = layer.pre_mlp_layernorm = RMSNorm
    if m.qk_norm:
        layer.self_attention.submodules.q_layernorm = layer.self_attention.submodules.k_layernorm = RMSNorm
    return TransformerBlockSubmodules(layer_specs=[spec] * get_num_layers_to_build(config, vp_stage),
                                      layer_norm=RMSNorm)


def sums_over_tensor_parallel(name: str, param: nn.Parameter) -> bool:
    """A weight every tensor-parallel rank holds whole but sees only part of the work of: the norms under
    sequence parallel (a slice of the sequence each), the QK-norm gains always (the rank's heads only).
    Their gradients are summed over the ranks, as megatron-core's finalize_model_grads does."""
    return getattr(param, "sequence_parallel", False) or "q_layernorm" in name or "k_layernorm" in name


def global_name(name: str, layer_offset: int) -> str:
    """A stage's parameter name with its layer numbered as in the whole model."""
    if not name.startswith("decoder.layers."):
        return name
    index, rest = name.removeprefix("decoder.layers.").split(".", 1)
    return f"decoder.layers.{int(index) + layer_offset}.{rest}"


def native_shapes(m: ModelConfig) -> dict[str, torch.Size]:
    from ..training.model import build_model

    return {name: p.shape for name, p in build_model(m, device="meta").named_parameters()}


def build_stages(m: ModelConfig, config: TransformerConfig, seed: int, tp_rank: int) -> list[tuple[GPTModel, int]]:
    """This rank's pipeline stages (one, or pp_stages_per_rank for an interleaved schedule), each with the
    index of its first layer in the whole model, holding keel's first weights for seed `seed`: the native
    model's values converted to GPTModel's fused layouts and cut into this tensor-parallel rank's shard."""
    value_of = initial_values(m, seed, "cpu")
    native = {name: value_of(name, shape) for name, shape in native_shapes(m).items()}
    weights = megatron_weights(native, m.n_layers, m.n_heads, m.n_kv_heads, config.tensor_model_parallel_size,
                               tp_rank)
    vp_stages = range(config.virtual_pipeline_model_parallel_size) if config.virtual_pipeline_model_parallel_size \
        else [None]
    stages = []
    for vp_stage in vp_stages:
        gpt = GPTModel(config=config, transformer_layer_spec=block_spec(m, config, vp_stage),
                       vocab_size=m.vocab_size, max_sequence_length=m.max_seq_len, position_embedding_type="rope",
                       rotary_base=int(m.rope_theta), share_embeddings_and_output_weights=m.tie_embeddings,
                       parallel_output=True, vp_stage=vp_stage,
                       pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
                       post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage))
        offset = get_transformer_layer_offset(config, vp_stage)
        with torch.no_grad():
            for name, param in gpt.named_parameters():
                param.copy_(weights.pop(global_name(name, offset)))
                if (dim := partition_dim(name)) is not None:
                    # megatron-core marks its split weights only inside its own initialisation (skipped
                    # here); its gradient-norm rule (and keel's) needs the mark to count each split once.
                    tensor_parallel.set_tensor_model_parallel_attributes(param, True, dim, 1)
        stages.append((gpt, offset))
    if config.pipeline_model_parallel_size == 1 and weights:
        raise RuntimeError(f"megatron-core's GPTModel has no parameters named {sorted(weights)}")
    return stages


class MegatronLM(nn.Module):
    """A one-stage GPTModel behind keel's model interface: tokens [B, T] -> logits [B, T, V], or with targets
    (loss, cross-entropy) from megatron-core's vocabulary-parallel cross-entropy."""

    def __init__(self, gpt: GPTModel, cfg: ModelConfig):
        super().__init__()
        self.gpt, self.cfg = gpt, cfg
        self.register_buffer("positions", torch.arange(cfg.max_seq_len), persistent=False)

    def forward(self, tokens_BT: torch.Tensor, targets_BT: torch.Tensor | None = None):
        positions_BT = self.positions[: tokens_BT.shape[1]].expand_as(tokens_BT)
        if targets_BT is None:
            return self.gpt(tokens_BT, positions_BT, None, runtime_gather_output=True).float()
        return stage_loss(self.gpt(tokens_BT, positions_BT, None, labels=targets_BT.clamp(min=0)), targets_BT)


def stage_loss(per_token_BT: torch.Tensor, targets_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, cross-entropy) of a micro-batch from the last stage's per-token cross-entropy, ignoring the
    positions keel masks."""
    keep_BT = targets_BT != IGNORE_INDEX
    ce = (per_token_BT * keep_BT).sum() / keep_BT.sum().clamp(min=1)
    return ce, ce
