"""The native engine: FSDP2 / HSDP, tensor + sequence parallel and pipeline parallel on one device mesh.

Application order per model part (torchtitan's): pipeline split first, then tensor parallel -> activation
checkpointing -> compile -> FSDP, then materialise from the meta device and fill every weight with the
same values a single process would have (model.initial_value), so layouts are interchangeable.
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor.parallel import loss_parallel

from ..checkpoints.state import load_model_optim_state, model_optim_state
from ..training.config import Config
from ..training.loss import lm_loss
from ..training.model import build_model
from .data_parallel import apply_activation_checkpointing, apply_compile, apply_fsdp
from .dims import ParallelDims
from .engine import Engine, adamw, plain
from .materialise import materialise
from .mesh import build_mesh
from .pipeline import build_schedule, split_stage, stage_ids
from .tensor_parallel import apply_tensor_parallel


class NativeEngine(Engine):
    def __init__(self, cfg: Config, device: torch.device, dims: ParallelDims):
        self.cfg, self.device, self.dims = cfg, device, dims
        self.mesh, dp = build_mesh(dims, device.type)
        self.dp_rank, self.dp_size = dp.get_local_rank(), dp.size()
        p = cfg.parallel
        self.use_fsdp = dims.dp > 1
        self.loss_parallel = dims.tp > 1 and p.loss_parallel

        whole = build_model(cfg.model, device="meta")
        if dims.pp > 1:
            self.n_stages = dims.pp * p.pp_stages_per_rank
            self.stage_ids = stage_ids(self.mesh["pp"].get_local_rank(), dims.pp, p.pp_stages_per_rank)
            parts = [split_stage(whole, i, self.n_stages) for i in self.stage_ids]
        else:
            self.n_stages, self.stage_ids, parts = 1, [0], [whole]
        dp_mesh = self.mesh["dp_replicate", "dp_shard"] if dims.dp_replicate > 1 else self.mesh["dp_shard"]
        for part in parts:
            if dims.tp > 1:
                apply_tensor_parallel(part, self.mesh["tp"], self.loss_parallel)
            if p.activation_checkpoint != "none":
                apply_activation_checkpointing(part, p.activation_checkpoint)
            if p.compile:
                apply_compile(part)
            if self.use_fsdp:
                # Under a pipeline every micro-batch runs forward again: keep the gathered weights.
                apply_fsdp(part, dp_mesh, cfg.train.precision, reshard_after_forward=dims.pp == 1)
            materialise(part, device, cfg.train.seed)
        self.parts = parts
        self.model = parts[0] if len(parts) == 1 else nn.ModuleList(parts)
        # One optimizer per model part, so each part's optimizer state is keyed by its own parameter names
        # (the same names in every layout: checkpoints reshard between layouts).
        self.optimizers = [adamw(part, cfg, device) for part in parts]

        local_batch = cfg.train.global_batch_size // self.dp_size
        self.n_micro = local_batch // cfg.train.micro_batch_size
        self._ces: list[torch.Tensor] = []
        if dims.pp > 1:
            self.schedule = build_schedule(parts, self.stage_ids, self.n_stages, device, self.mesh["pp"],
                                           p.pp_schedule, self.n_micro, self._pipeline_loss)
        self.has_first = 0 in self.stage_ids
        self.has_last = self.n_stages - 1 in self.stage_ids

    # -- the micro-batch loop's hooks (parallel/engine.py) ------------------------------------------------
    def loss_context(self):
        # The loss-parallel context must cover the backward too: it defines how the sharded softmax
        # gradient flows.
        return loss_parallel() if self.loss_parallel else contextlib.nullcontext()

    def compute_context(self):
        # With FSDP the mixed-precision policy casts weights; otherwise autocast does it.
        return contextlib.nullcontext() if self.use_fsdp else super().compute_context()

    def before_micro_batch(self, index: int, count: int) -> None:
        if self.use_fsdp:
            # Reduce-scatter gradients once, after the last micro-batch, not after each one.
            self.model.set_requires_gradient_sync(index == count - 1)

    def global_mean(self, local_mean: torch.Tensor | None) -> float:
        """Mean over data-parallel replicas of a loss only the last stage's first TP rank contributes."""
        owner = self.has_last and self.mesh["tp"].get_local_rank() == 0
        value = local_mean.detach().float().reshape(()) if owner else torch.zeros((), device=self.device)
        dist.all_reduce(value)
        return value.item() / self.dp_size

    # -- pipeline parallel: the schedule runs the micro-batches ------------------------------------------
    def _pipeline_loss(self, logits, targets):
        loss, ce = lm_loss(logits, targets, self.cfg.model.z_loss)
        self._ces.append(plain(ce))
        return loss

    def _run_pipeline(self, run, inputs_bT, targets_bT) -> float:
        """Run the schedule (step or eval); the first stage feeds inputs, the last scores targets."""
        self._ces.clear()
        losses: list[torch.Tensor] = []
        with self.loss_context(), self.compute_context():
            run(*([inputs_bT.to(self.device)] if self.has_first else []),
                **({"target": targets_bT.to(self.device), "losses": losses} if self.has_last else {}))
        if not self.has_last:
            return self.global_mean(None)
        # The first step() also calls the loss once while inferring shapes; this step's micro-batches
        # are the last len(losses) calls.
        return self.global_mean(torch.stack(self._ces[-len(losses):]).mean())

    # -- the Engine interface ----------------------------------------------------------------------------
    def forward_backward(self, inputs_bT, targets_bT) -> float:
        if self.dims.pp == 1:
            return super().forward_backward(inputs_bT, targets_bT)
        for part in self.parts:
            part.train()
        return self._run_pipeline(self.schedule.step, inputs_bT, targets_bT)

    @torch.no_grad()
    def eval_loss(self, inputs_bT, targets_bT) -> float:
        if self.dims.pp == 1:
            return super().eval_loss(inputs_bT, targets_bT)
        for part in self.parts:
            part.eval()
        return self._run_pipeline(self.schedule.eval, inputs_bT, targets_bT)

    def clip_grad_norm(self, max_norm: float) -> float:
        params = [p for p in self.model.parameters() if p.grad is not None]
        norm = plain(torch.nn.utils.get_total_norm([p.grad for p in params], 2.0))
        if self.dims.pp > 1:
            # Each stage holds different parameters: the global norm adds their squares.
            norm = norm.pow(2)
            dist.all_reduce(norm, group=self.mesh["pp"].get_group())
            norm = norm.sqrt()
        if max_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
        return norm.item()

    def optimizer_step(self, lr: float) -> None:
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["lr"] = lr
            opt.step()
        self.zero_grad()

    def zero_grad(self) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)

    def state_dict(self) -> dict:
        return model_optim_state(self.parts, self.optimizers)

    def load_state_dict(self, state: dict) -> None:
        load_model_optim_state(self.parts, self.optimizers, state)
