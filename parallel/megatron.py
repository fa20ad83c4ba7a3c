"""The megatron-core engine (parallel.engine: megatron): the model is megatron-core's GPTModel, built from
keel's model config with a layer spec, tensor parallel across parallel.tp ranks and data parallel across
the rest, driven by keel's loop.

What megatron-core brings: its transformer layers and their tensor-parallel linears (column-parallel QKV
and gate/up, row-parallel output projections), its RoPE, RMSNorm and SwiGLU, and its vocabulary-parallel
embedding, output layer and cross-entropy (the logits stay split over the vocabulary). keel plugs its own
attention kernels into the layer spec in place of megatron-core's `DotProductAttention` (an unfused
softmax), so `model.attention.impl` means the same here as in the native model.

What keel keeps: the first weights (the native model's, converted to megatron-core's layout and cut into
this rank's shard by megatron_layout.py, so a run starts where a one-process run starts), AdamW and its
parameter groups, the learning-rate schedule, the micro-batch loop, gradient clipping by the global norm,
the loss-spike policy and checkpoints (each tensor-parallel rank's state, one file per rank of the first
replica, inside keel's atomic commit and manifest). Data parallel replicas average their gradients with one
all-reduce per step.

Not built yet: pipeline parallel (megatron-core's schedules), activation recomputation and torch.compile
(refused at config time, parallel/dims.py), sequence parallel, and megatron-core's distributed optimizer
(its builder is CUDA-only). Written for GPUs too, but run only on CPUs so far.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..kernels.attention import attention
from ..kernels.cross_entropy import IGNORE_INDEX
from ..training.config import Config, ModelConfig
from .dims import ParallelDims
from .engine import Engine, OneOptimizer, adamw
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


def transformer_config(m: ModelConfig, tp: int) -> TransformerConfig:
    """megatron-core's TransformerConfig for keel's Llama-style model: RMSNorm, SwiGLU, no biases, no
    dropout, grouped-query attention, interleaved RoPE (keel rotates pairs (x0, x1), (x2, x3), ...)."""
    return TransformerConfig(
        num_layers=m.n_layers, hidden_size=m.dim, num_attention_heads=m.n_heads, num_query_groups=m.n_kv_heads,
        kv_channels=m.head_dim, ffn_hidden_size=m.hidden_dim, normalization="RMSNorm", layernorm_epsilon=m.norm_eps,
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False, add_qkv_bias=False,
        hidden_dropout=0.0, attention_dropout=0.0, qk_layernorm=m.qk_norm, rotary_interleaved=True,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=1, sequence_parallel=False,
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


def layer_spec(m: ModelConfig) -> ModuleSpec:
    """megatron-core's local (no Transformer Engine) layer spec, with keel's attention as its core."""
    spec = get_gpt_layer_local_spec(qk_layernorm=m.qk_norm, normalization="RMSNorm")
    spec.submodules.self_attention.submodules.core_attention = ModuleSpec(
        module=KeelCoreAttention, params={"impl": m.attention.impl})
    return spec


class MegatronLM(nn.Module):
    """GPTModel behind keel's model interface: tokens [B, T] -> logits [B, T, V], or with targets
    (loss, cross-entropy) from megatron-core's vocabulary-parallel cross-entropy."""

    def __init__(self, gpt: GPTModel, cfg: ModelConfig):
        super().__init__()
        self.gpt, self.cfg = gpt, cfg
        self.register_buffer("positions", torch.arange(cfg.max_seq_len), persistent=False)

    def forward(self, tokens_BT: torch.Tensor, targets_BT: torch.Tensor | None = None):
        positions_BT = self.positions[: tokens_BT.shape[1]].expand_as(tokens_BT)
        if targets_BT is None:
            return self.gpt(tokens_BT, positions_BT, None, runtime_gather_output=True).float()
        keep_BT = targets_BT != IGNORE_INDEX
        per_token_BT = self.gpt(tokens_BT, positions_BT, None, labels=targets_BT.clamp(min=0))
        ce = (per_token_BT * keep_BT).sum() / keep_BT.sum().clamp(min=1)
        return ce, ce


def native_shapes(m: ModelConfig) -> dict[str, torch.Size]:
    from ..training.model import build_model

    return {name: p.shape for name, p in build_model(m, device="meta").named_parameters()}


class MegatronEngine(OneOptimizer, Engine):
    def __init__(self, cfg: Config, device: torch.device, dims: ParallelDims):
        self.cfg, self.device, self.dims = cfg, device, dims
        if not dist.is_initialized():
            # A one-process run (the launcher starts no process group for it): megatron-core's parallel
            # state is built on torch.distributed groups all the same. A HashStore needs no port. The loop
            # destroys the group when the run ends (training/loop.py train).
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                                    world_size=1)
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=dims.tp)
        if device.type == "cpu":
            from . import megatron_cpu

            megatron_cpu.install()
        else:
            tensor_parallel.model_parallel_cuda_manual_seed(cfg.train.seed)
        self.tp_rank = parallel_state.get_tensor_model_parallel_rank()
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.tp_group = parallel_state.get_tensor_model_parallel_group()
        self.dp_group = parallel_state.get_data_parallel_group()

        m = cfg.model
        gpt = GPTModel(config=transformer_config(m, dims.tp), transformer_layer_spec=layer_spec(m),
                       vocab_size=m.vocab_size, max_sequence_length=m.max_seq_len, position_embedding_type="rope",
                       rotary_base=int(m.rope_theta), share_embeddings_and_output_weights=m.tie_embeddings,
                       parallel_output=True)
        value_of = initial_values(m, cfg.train.seed, "cpu")
        native = {name: value_of(name, shape) for name, shape in native_shapes(m).items()}
        weights = megatron_weights(native, m.n_layers, m.n_heads, m.n_kv_heads, dims.tp, self.tp_rank)
        with torch.no_grad():
            for name, param in gpt.named_parameters():
                param.copy_(weights.pop(name))
                if (dim := partition_dim(name)) is not None:
                    # megatron-core marks its split weights only inside its own initialisation (skipped
                    # here); its gradient-norm rule (and keel's) needs the mark to count each split once.
                    tensor_parallel.set_tensor_model_parallel_attributes(param, True, dim, 1)
        if weights:
            raise RuntimeError(f"megatron-core's GPTModel has no parameters named {sorted(weights)}")
        self.model = MegatronLM(gpt, m).to(device)
        self.optimizer = adamw(self.model, cfg, device)
        self._boundary = False

    # -- the micro-batch loop's hooks (parallel/engine.py) ------------------------------------------------
    def score(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with self.compute_context():
            return self.model(inputs, targets)

    def before_micro_batch(self, index: int, count: int) -> None:
        self._boundary = index == count - 1

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()
        if self._boundary and self.dp_size > 1:
            # One flat all-reduce of every gradient: the replicas' mean, once per step.
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            flat = torch.cat([g.flatten() for g in grads])
            dist.all_reduce(flat, op=dist.ReduceOp.AVG, group=self.dp_group)
            for g, reduced in zip(grads, flat.split([g.numel() for g in grads])):
                g.copy_(reduced.view_as(g))

    def global_mean(self, local_mean: torch.Tensor) -> float:
        # Tensor-parallel ranks of one replica hold the same loss: the mean over replicas is the global one.
        if self.dp_size > 1:
            dist.all_reduce(local_mean, op=dist.ReduceOp.AVG, group=self.dp_group)
        return local_mean.item()

    # -- the rest of the interface ----------------------------------------------------------------------
    def clip_grad_norm(self, max_norm: float) -> float:
        from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

        # A weight every tensor-parallel rank holds whole (the norms) counts once, on tp rank 0.
        grads = [p.grad for p in self.model.parameters()
                 if p.grad is not None and param_is_not_tensor_parallel_duplicate(p, self.tp_group)]
        squares = torch.stack([g.float().square().sum() for g in grads]).sum() if grads else \
            torch.zeros((), device=self.device)
        if self.dims.tp > 1:
            dist.all_reduce(squares, group=self.tp_group)
        norm = squares.sqrt()
        if max_norm > 0:
            # torch.nn.utils.clip_grad_norm_'s rule, so that clipped steps match the native engines'.
            coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
            for p in self.model.parameters():
                if p.grad is not None:
                    p.grad.mul_(coef)
        return norm.item()

    # -- checkpoints: one file per tensor-parallel rank, inside keel's atomic commit and manifest --------
    native_checkpoint = True

    def _file(self) -> str:
        return f"megatron_tp{self.tp_rank:03d}.pt"

    def save_native(self, folder: Path) -> list[str]:
        """Every rank, together: the first replica's ranks each write their shard of the model and of the
        optimizer state (the other replicas hold the same). Returns the names this rank wrote."""
        if self.dp_rank != 0:
            return []
        torch.save({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()},
                   folder / self._file())
        return [self._file()]

    def load_native(self, folder: Path) -> None:
        state = torch.load(folder / self._file(), map_location=self.device, weights_only=True)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])

    def state_dict(self) -> dict:
        raise NotImplementedError("the megatron-core engine checkpoints through save_native / load_native")

    def load_state_dict(self, state: dict) -> None:
        raise NotImplementedError("the megatron-core engine checkpoints through save_native / load_native")
