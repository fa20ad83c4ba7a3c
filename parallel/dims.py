"""The parallel layout as one validated object: degrees that multiply to the world size."""
from __future__ import annotations

from dataclasses import dataclass


class LayoutError(ValueError):
    """A parallel layout that cannot run on this world size or model."""


@dataclass(frozen=True)
class ParallelDims:
    dp_replicate: int
    dp_shard: int
    tp: int
    pp: int
    world_size: int

    @classmethod
    def of(cls, parallel, world_size: int) -> "ParallelDims":
        """The degrees a config's `parallel` section asks for (any object with dp_replicate, dp_shard, tp
        and pp), resolved for `world_size` processes."""
        return cls.resolve(parallel.dp_replicate, parallel.dp_shard, parallel.tp, parallel.pp, world_size)

    @classmethod
    def resolve(cls, dp_replicate: int, dp_shard: int, tp: int, pp: int, world_size: int) -> "ParallelDims":
        """Fill the one degree given as -1 with what the others leave of the world size, then check."""
        degrees = {"dp_replicate": dp_replicate, "dp_shard": dp_shard, "tp": tp, "pp": pp}
        fixed = 1
        for d in degrees.values():
            fixed *= d if d != -1 else 1
        rest = [name for name, d in degrees.items() if d == -1]
        layout = " x ".join(f"{k}={v}" for k, v in degrees.items())
        if rest:
            if world_size % fixed:
                raise LayoutError(f"parallel layout {layout} does not fit world size {world_size}: the fixed "
                                  f"degrees multiply to {fixed}, which does not divide {world_size}; change "
                                  f"the degrees or the number of processes")
            degrees[rest[0]] = world_size // fixed
        product = degrees["dp_replicate"] * degrees["dp_shard"] * degrees["tp"] * degrees["pp"]
        if product != world_size:
            shown = " x ".join(f"{k}={v}" for k, v in degrees.items())
            raise LayoutError(f"parallel layout {shown} = {product} processes, but the world size is "
                              f"{world_size}; make the degrees multiply to {world_size} or set one to -1")
        return cls(world_size=world_size, **degrees)

    @property
    def dp(self) -> int:
        """Data-parallel replicas in total: how many slices the global batch is cut into."""
        return self.dp_replicate * self.dp_shard


def check_layout(cfg, dims: ParallelDims) -> None:
    """Model- and batch-dependent checks, before any process builds anything (cfg: training Config)."""
    m, t, p = cfg.model, cfg.train, cfg.parallel
    if p.engine == "megatron":
        check_megatron(cfg, dims)
    if p.engine == "deepspeed" and (dims.tp > 1 or dims.pp > 1 or dims.dp_replicate > 1):
        raise LayoutError(f"parallel.engine=deepspeed is data parallel only (ZeRO over every rank): set "
                          f"parallel.tp=1, parallel.pp=1 and parallel.dp_replicate=1 (got tp={dims.tp}, "
                          f"pp={dims.pp}, dp_replicate={dims.dp_replicate}), or use parallel.engine=native")
    if dims.tp > 1:
        for name in ("n_heads", "n_kv_heads"):
            if getattr(m, name) % dims.tp:
                raise LayoutError(f"parallel.tp={dims.tp} does not divide model.{name}={getattr(m, name)}; "
                                  f"each tensor-parallel rank must hold whole heads")
        if m.hidden_dim % dims.tp:
            raise LayoutError(f"parallel.tp={dims.tp} does not divide the FFN hidden size {m.hidden_dim}")
        if m.vocab_size % dims.tp:
            raise LayoutError(f"parallel.tp={dims.tp} does not divide model.vocab_size={m.vocab_size}")
    if p.engine == "native":
        check_native(cfg, dims)
    if t.global_batch_size % (dims.dp * t.micro_batch_size):
        raise LayoutError(f"train.global_batch_size={t.global_batch_size} must be a multiple of data-parallel "
                          f"degree {dims.dp} x train.micro_batch_size={t.micro_batch_size}")


def check_native(cfg, dims: ParallelDims) -> None:
    """What the native engine (FSDP2, DTensor tensor parallel, torch's pipeline schedules) cannot combine."""
    m, t, p = cfg.model, cfg.train, cfg.parallel
    if dims.tp > 1:
        if m.qk_norm:
            raise LayoutError("model.qk_norm with parallel.tp > 1 is not supported yet (its gains would see only "
                              "the local heads' gradients); set model.qk_norm=false or parallel.tp=1")
        if m.rmsnorm.impl not in ("auto", "torch"):
            # Sequence parallelism hands the norms DTensors; the fused kernels take plain tensors. (q, k, gate
            # and up are plain local shards, so rope/swiglu/attention kernels are fine.)
            raise LayoutError(f"model.rmsnorm.impl={m.rmsnorm.impl} cannot run with parallel.tp > 1 (sequence-"
                              f"parallel norms run on DTensors); set model.rmsnorm.impl=auto or torch")
        if p.compile:
            # Measured (tests/test_parallel.py, torch 2.13 on gloo): a compiled block's backward hands the
            # sequence-parallel redistribution a plain tensor where it expects a DTensor, and every rank
            # fails with "'Tensor' object has no attribute '_local_tensor'".
            raise LayoutError("parallel.compile=true with parallel.tp > 1 fails in the compiled backward of the "
                              "tensor-parallel blocks (torch's DTensor redistribution); set parallel.compile=false "
                              "or parallel.tp=1")
        if m.z_loss and p.loss_parallel:
            raise LayoutError("model.z_loss needs the full logits; with parallel.tp > 1 set "
                              "parallel.loss_parallel=false")
    if m.cross_entropy.impl != "unfused" and (dims.tp > 1 or dims.pp > 1):
        # tp: the output layer is a vocab-sharded DTensor, and loss_parallel already avoids gathering the
        # logits. pp: the schedule's loss function only sees the last stage's output, not its weight.
        raise LayoutError(f"model.cross_entropy.impl={m.cross_entropy.impl} computes the loss from the whole output "
                          f"layer on one rank; it cannot be combined with parallel.tp > 1 or parallel.pp > 1 yet. "
                          f"Set model.cross_entropy.impl=unfused (with tp > 1, parallel.loss_parallel=true keeps "
                          f"the logits vocab-sharded instead)")
    if m.tie_embeddings and (dims.tp > 1 or dims.pp > 1):
        raise LayoutError("model.tie_embeddings needs the embedding and the output layer in one place; it cannot "
                          "be combined with parallel.tp > 1 or parallel.pp > 1 yet")
    if dims.pp > 1:
        stages = dims.pp * p.pp_stages_per_rank
        if m.n_layers < stages:
            raise LayoutError(f"{stages} pipeline stages (parallel.pp={dims.pp} x pp_stages_per_rank="
                              f"{p.pp_stages_per_rank}) need at least as many layers, model.n_layers={m.n_layers}")
        micro = t.global_batch_size // dims.dp // t.micro_batch_size
        if micro < dims.pp:
            raise LayoutError(f"the pipeline has {micro} micro-batches per step but {dims.pp} stages; make "
                              f"train.global_batch_size / (data-parallel degree x micro_batch_size) >= "
                              f"parallel.pp")


def check_megatron(cfg, dims: ParallelDims) -> None:
    """What the megatron-core engine (parallel/megatron.py) runs: tensor (+ sequence) parallel x pipeline
    parallel (megatron-core's 1F1B and interleaved schedules) x data parallel, with megatron-core's RoPE,
    SwiGLU and vocabulary-parallel cross-entropy, and keel's attention and norms."""
    m, t, p = cfg.model, cfg.train, cfg.parallel
    refused = {
        "parallel.dp_replicate > 1": dims.dp_replicate > 1,  # its data parallelism is one kind: use dp_shard
        "parallel.activation_checkpoint": p.activation_checkpoint != "none",
        "parallel.compile": p.compile,
        "model.z_loss": bool(m.z_loss),  # megatron-core's vocabulary-parallel cross-entropy has none
        # Across stages megatron-core keeps a second copy of the embedding on the last stage, which keel does
        # not yet keep in step with the first (and megatron-core makes it with .cuda()).
        "model.tie_embeddings with parallel.pp > 1": m.tie_embeddings and dims.pp > 1,
        # Settings of keel's own kernels that megatron-core's layers replace: refused rather than ignored.
        "model.cross_entropy.impl": m.cross_entropy.impl != "unfused",
        "model.rmsnorm.impl": m.rmsnorm.impl != "auto",
        "model.rope.impl": m.rope.impl != "auto",
        "model.swiglu.impl": m.swiglu.impl != "auto",
    }
    bad = [name for name, is_set in refused.items() if is_set]
    if bad:
        raise LayoutError(f"parallel.engine=megatron does not support {', '.join(bad)} yet (it runs tensor "
                          f"parallel x pipeline parallel x data parallel, with megatron-core's RoPE, SwiGLU and "
                          f"cross-entropy); leave them at their defaults or use parallel.engine=native")
    if dims.tp > 1 and cfg.data.seq_len % dims.tp:
        raise LayoutError(f"parallel.tp={dims.tp} does not divide data.seq_len={cfg.data.seq_len}; megatron-core's "
                          f"sequence parallel gives each tensor-parallel rank an equal slice of the sequence")
    if dims.pp > 1:
        if p.pp_schedule not in ("1f1b", "interleaved_1f1b"):
            raise LayoutError(f"parallel.pp_schedule={p.pp_schedule} is not one of megatron-core's schedules; set "
                              f"parallel.pp_schedule=1f1b or interleaved_1f1b, or use parallel.engine=native")
        if p.pp_schedule == "interleaved_1f1b" and p.pp_stages_per_rank < 2:
            raise LayoutError("parallel.pp_schedule=interleaved_1f1b runs several stages on each rank; set "
                              "parallel.pp_stages_per_rank >= 2, or parallel.pp_schedule=1f1b")
        stages = dims.pp * p.pp_stages_per_rank
        if m.n_layers % stages:
            raise LayoutError(f"megatron-core splits model.n_layers={m.n_layers} evenly over {stages} pipeline "
                              f"stages (parallel.pp={dims.pp} x pp_stages_per_rank={p.pp_stages_per_rank}); make "
                              f"model.n_layers a multiple of {stages}")
        micro = t.global_batch_size // dims.dp // t.micro_batch_size
        if micro < dims.pp or (p.pp_stages_per_rank > 1 and micro % dims.pp):
            need = "a multiple of" if p.pp_stages_per_rank > 1 else "at least"
            raise LayoutError(f"the pipeline has {micro} micro-batches per step; megatron-core's "
                              f"{p.pp_schedule} schedule needs {need} parallel.pp={dims.pp}: change "
                              f"train.global_batch_size / (data-parallel degree x train.micro_batch_size)")
