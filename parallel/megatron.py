"""The megatron-core engine (parallel.engine: megatron): the model is megatron-core's GPTModel (built by
megatron_model.py), tensor parallel with sequence parallel across parallel.tp ranks, pipeline parallel across
parallel.pp ranks under megatron-core's schedules (1F1B, or interleaved with parallel.pp_stages_per_rank
stages per rank), and data parallel across the rest, driven by keel's loop.

What megatron-core brings: its transformer layers and their tensor-parallel linears (column-parallel QKV
and gate/up, row-parallel output projections, the sequence gathered and scattered around them), its RoPE and
SwiGLU, its vocabulary-parallel embedding, output layer and cross-entropy (the logits stay split over the
vocabulary), and its pipeline schedules and the sends and receives between stages.

What keel keeps: the first weights (the native model's, converted to megatron-core's layout and cut into
this rank's shard, so a run starts where a one-process run starts), attention and the norms (through the
layer spec), AdamW and its parameter groups, the learning-rate schedule, the micro-batch loop when there is
no pipeline, gradient clipping by the global norm, the loss-spike policy and checkpoints (each model-parallel
rank's state, one file per rank of the first replica, inside keel's atomic commit and manifest). Data
parallel replicas average their gradients with one all-reduce per step.

Not built: activation recomputation and torch.compile (refused at config time, parallel/dims.py), tied
embeddings across pipeline stages, and megatron-core's distributed optimizer (its builder is CUDA-only).
Written for GPUs too, but run only on CPUs so far.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from ..training.config import Config
from .dims import LayoutError, ParallelDims
from .engine import Engine, OneOptimizer, adamw
from .megatron_model import (MegatronLM, build_stages, global_name, parallel_state, stage_loss,
                             sums_over_tensor_parallel, tensor_parallel, transformer_config)


class MegatronEngine(OneOptimizer, Engine):
    def __init__(self, cfg: Config, device: torch.device, dims: ParallelDims):
        self.cfg, self.device, self.dims = cfg, device, dims
        if device.type == "cpu" and cfg.train.precision != "fp32":
            # Measured with megatron-core 0.16.1: its linear layers re-enter the forward's autocast in their
            # backward for CUDA alone, and its sequence-parallel gathers keep the input's dtype.
            raise LayoutError(f"parallel.engine=megatron trains in fp32 on a CPU (megatron-core's layers apply "
                              f"autocast on CUDA only); set train.precision=fp32, or train on GPUs")
        if not dist.is_initialized():
            # A one-process run (the launcher starts no process group for it): megatron-core's parallel
            # state is built on torch.distributed groups all the same. A HashStore needs no port. The loop
            # destroys the group when the run ends (training/loop.py train).
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                                    world_size=1)
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        # Checked with the layout (dims.check_megatron): interleaved schedules run several stages per rank.
        per_rank = cfg.parallel.pp_stages_per_rank if dims.pp > 1 else 1
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=dims.tp, pipeline_model_parallel_size=dims.pp,
            virtual_pipeline_model_parallel_size=per_rank if per_rank > 1 else None)
        if device.type == "cpu":
            from . import megatron_cpu

            megatron_cpu.install()
        else:
            tensor_parallel.model_parallel_cuda_manual_seed(cfg.train.seed)
        self.tp_rank = parallel_state.get_tensor_model_parallel_rank()
        self.pp_rank = parallel_state.get_pipeline_model_parallel_rank()
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.tp_group = parallel_state.get_tensor_model_parallel_group()
        self.dp_group = parallel_state.get_data_parallel_group()

        self.stages = build_stages(cfg.model, transformer_config(cfg.model, dims.tp, dims.pp, per_rank),
                                   cfg.train.seed, self.tp_rank)
        if dims.pp == 1:
            self.model = MegatronLM(self.stages[0][0], cfg.model).to(device)
        else:  # the schedule runs the stages itself; one module holds them for the optimizer and clipping
            self.model = torch.nn.ModuleList([gpt for gpt, _ in self.stages]).to(device)
        self.tp_summed = [p for gpt, _ in self.stages for name, p in gpt.named_parameters()
                          if dims.tp > 1 and sums_over_tensor_parallel(name, p)]
        self.optimizer = adamw(self.model, cfg, device)
        self._boundary = False

    # -- the micro-batch loop's hooks (parallel/engine.py), when there is no pipeline ---------------------
    def score(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with self.compute_context():
            return self.model(inputs, targets)

    def before_micro_batch(self, index: int, count: int) -> None:
        self._boundary = index == count - 1

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()
        if self._boundary:
            self._reduce_grads()

    def global_mean(self, local_mean: torch.Tensor) -> float:
        if self.dims.pp > 1:  # the last stage scored the batch
            dist.broadcast(local_mean, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                           group=parallel_state.get_pipeline_model_parallel_group())
        # Tensor-parallel ranks of one replica hold the same loss: the mean over replicas is the global one.
        if self.dp_size > 1:
            dist.all_reduce(local_mean, op=dist.ReduceOp.AVG, group=self.dp_group)
        return local_mean.item()

    def _reduce_grads(self) -> None:
        """Once per step, after the last backward: the tensor-parallel sums (norm gains that saw part of the
        work), then the replicas' mean, each one flat all-reduce."""
        if self.tp_summed:
            _all_reduce([p.grad for p in self.tp_summed if p.grad is not None], dist.ReduceOp.SUM, self.tp_group)
        if self.dp_size > 1:
            _all_reduce([p.grad for p in self.model.parameters() if p.grad is not None], dist.ReduceOp.AVG,
                        self.dp_group)

    # -- pipeline parallel: megatron-core's schedule runs the micro-batches -----------------------------
    def forward_backward(self, inputs_bT: torch.Tensor, targets_bT: torch.Tensor) -> float:
        if self.dims.pp == 1:
            return super().forward_backward(inputs_bT, targets_bT)
        self.model.train()
        local = self._run_schedule(inputs_bT, targets_bT, forward_only=False)
        self._reduce_grads()
        return self.global_mean(local)

    @torch.no_grad()
    def eval_loss(self, inputs_bT: torch.Tensor, targets_bT: torch.Tensor) -> float:
        if self.dims.pp == 1:
            return super().eval_loss(inputs_bT, targets_bT)
        self.model.eval()
        return self.global_mean(self._run_schedule(inputs_bT, targets_bT, forward_only=True))

    def _run_schedule(self, inputs_bT: torch.Tensor, targets_bT: torch.Tensor, forward_only: bool) -> torch.Tensor:
        """This rank's part of the schedule over its micro-batches; the mean cross-entropy on the last stage
        (zero elsewhere). The schedule divides each micro-batch's loss by their count before its backward."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        chunks = self.micro_batches(inputs_bT, targets_bT)
        rows, length = chunks[0][0].shape
        positions_BT = torch.arange(length, device=self.device).expand(rows, length)

        def forward_step(data, gpt):
            inputs, targets = next(data)
            with self.compute_context():
                out = gpt(inputs, positions_BT, None, labels=targets.clamp(min=0))

            def loss(per_token_BT):  # called on the last stage only
                loss_value, ce = stage_loss(per_token_BT, targets)
                # A copy: the schedule divides the loss it is handed in place.
                return loss_value, {"ce": ce.detach().clone()}
            return out, loss

        stages = [gpt for gpt, _ in self.stages]
        # An interleaved schedule reads the micro-batches once per stage it runs.
        data = [iter(chunks) for _ in stages] if len(stages) > 1 else iter(chunks)
        reduced = get_forward_backward_func()(forward_step_func=forward_step, data_iterator=data, model=stages,
                                              num_microbatches=len(chunks), seq_length=length,
                                              micro_batch_size=rows, forward_only=forward_only)
        if not parallel_state.is_pipeline_last_stage():
            return torch.zeros((), device=self.device)
        return torch.stack([r["ce"] for r in reduced]).mean()

    # -- the rest of the interface ----------------------------------------------------------------------
    def clip_grad_norm(self, max_norm: float) -> float:
        from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

        # A weight every tensor-parallel rank holds whole (the norms) counts once, on tp rank 0; each
        # pipeline stage counts its own weights.
        grads = [p.grad for p in self.model.parameters()
                 if p.grad is not None and param_is_not_tensor_parallel_duplicate(p, self.tp_group)]
        squares = torch.stack([g.float().square().sum() for g in grads]).sum() if grads else \
            torch.zeros((), device=self.device)
        if self.dims.tp * self.dims.pp > 1:
            dist.all_reduce(squares, group=parallel_state.get_model_parallel_group())
        norm = squares.sqrt()
        if max_norm > 0:
            # torch.nn.utils.clip_grad_norm_'s rule, so that clipped steps match the native engines'.
            coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
            for p in self.model.parameters():
                if p.grad is not None:
                    p.grad.mul_(coef)
        return norm.item()

    # -- checkpoints: one file per model-parallel rank, inside keel's atomic commit and manifest ---------
    native_checkpoint = True

    def _file(self) -> str:
        pipeline = f"_pp{self.pp_rank:03d}" if self.dims.pp > 1 else ""
        return f"megatron_tp{self.tp_rank:03d}{pipeline}.pt"

    def _layout(self) -> dict[str, int]:
        return {"tp": self.dims.tp, "pp": self.dims.pp, "pp_stages_per_rank": len(self.stages)}

    def save_native(self, folder: Path) -> list[str]:
        """Every rank, together: the first replica's ranks each write their shard of the model (its layers
        numbered as in the whole model) and of the optimizer state (the other replicas hold the same).
        Returns the names this rank wrote."""
        if self.dp_rank != 0:
            return []
        model = {f"gpt.{global_name(name, offset)}": t for gpt, offset in self.stages
                 for name, t in gpt.state_dict().items()}
        torch.save({"model": model, "optimizer": self.optimizer.state_dict(), "layout": self._layout()},
                   folder / self._file())
        return [self._file()]

    def load_native(self, folder: Path) -> None:
        # The checkpoint manager checked the world size; the shards fit only the layout that wrote them.
        path = folder / self._file()
        if not path.is_file():  # another layout's files: read which (only on this path to an error)
            path = next(iter(sorted(folder.glob("megatron_tp*.pt"))), path)
        state = torch.load(path, map_location=self.device, weights_only=True)
        saved = state.get("layout")
        if saved != self._layout() or path.name != self._file():
            said = ", ".join(f"{k}={v}" for k, v in saved.items()) if saved else "another layout"
            now = ", ".join(f"{k}={v}" for k, v in self._layout().items())
            raise LayoutError(f"checkpoint {folder} was saved with {said} and this run has {now}; the megatron-core "
                              f"engine resumes with the parallel.tp, parallel.pp and parallel.pp_stages_per_rank it "
                              f"saved with")
        for gpt, offset in self.stages:
            gpt.load_state_dict({name: state["model"][f"gpt.{global_name(name, offset)}"]
                                 for name in gpt.state_dict()})
        self.optimizer.load_state_dict(state["optimizer"])

    def state_dict(self) -> dict:
        raise NotImplementedError("the megatron-core engine checkpoints through save_native / load_native")

    def load_state_dict(self, state: dict) -> None:
        raise NotImplementedError("the megatron-core engine checkpoints through save_native / load_native")


def _all_reduce(grads: list[torch.Tensor], op, group) -> None:
    """One flat all-reduce of `grads`, written back in place."""
    if not grads:
        return
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat, op=op, group=group)
    for g, reduced in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(reduced.view_as(g))
