"""The engine: everything the loop needs from "a way to run the model", and nothing else.

The loop asks an engine to run forward+backward over this rank's share of a global batch, clip, step and
evaluate, and for its state. How the model is split (FSDP, tensor/pipeline parallel, DeepSpeed ZeRO,
megatron-core) stays behind this interface, so new engines plug in without touching `loop.py`.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..checkpoints.state import load_model_optim_state, model_optim_state
from ..parallel.data_parallel import apply_activation_checkpointing, apply_compile
from ..parallel.materialise import materialise
from .config import Config, ConfigError
from .device import autocast
from .loss import model_loss
from .model import Transformer, build_model

if TYPE_CHECKING:
    from ..parallel.dims import ParallelDims


class Engine(ABC):
    model: nn.Module
    device: torch.device
    dp_rank: int = 0   # this rank's index among data-parallel replicas (which slice of the batch it reads)
    dp_size: int = 1

    @abstractmethod
    def forward_backward(self, inputs_bT: torch.Tensor, targets_bT: torch.Tensor) -> float:
        """Accumulate gradients over this rank's rows of the global batch; return the global mean
        cross-entropy (identical on every rank)."""

    @abstractmethod
    def clip_grad_norm(self, max_norm: float) -> float:
        """Global gradient norm before clipping; clips to max_norm when it is > 0."""

    @abstractmethod
    def optimizer_step(self, lr: float) -> None:
        """Apply the accumulated gradients at learning rate `lr`, then zero them."""

    @abstractmethod
    def zero_grad(self) -> None:
        """Drop the accumulated gradients without applying them (a skipped step)."""

    @abstractmethod
    def eval_loss(self, inputs_bT: torch.Tensor, targets_bT: torch.Tensor) -> float:
        """Global mean cross-entropy of a batch, without touching gradients."""

    @abstractmethod
    def state_dict(self) -> dict:
        """Model and optimizer state for torch.distributed.checkpoint, keyed the same in every layout
        (see checkpoints/state.py), holding the live tensors: loading into it in place loads them."""

    @abstractmethod
    def load_state_dict(self, state: dict) -> None: ...


def adamw(model: nn.Module, cfg: Config, device: torch.device) -> torch.optim.AdamW:
    # Decay matrices and embeddings only: decaying norm gains pulls them toward zero for no benefit.
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.optim.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=cfg.optim.betas, eps=cfg.optim.eps,
                             fused=device.type == "cuda")


class LocalEngine(Engine):
    """One process, one device, no parallelism: the reference every parallel layout must match."""

    def __init__(self, cfg: Config, device: torch.device):
        self.cfg, self.device = cfg, device
        model = build_model(cfg.model, device="meta")
        if cfg.parallel.activation_checkpoint != "none":
            apply_activation_checkpointing(model, cfg.parallel.activation_checkpoint)
        if cfg.parallel.compile:
            apply_compile(model)
        materialise(model, device, cfg.train.seed)
        self.model: Transformer = model
        self.optimizer = adamw(model, cfg, device)

    def _micro_batches(self, inputs_bT, targets_bT):
        mb = self.cfg.train.micro_batch_size
        return zip(inputs_bT.split(mb), targets_bT.split(mb))

    def _compute(self):
        return autocast(self.device, self.cfg.train.precision)

    def forward_backward(self, inputs_bT, targets_bT) -> float:
        self.model.train()
        chunks = list(self._micro_batches(inputs_bT.to(self.device), targets_bT.to(self.device)))
        total = torch.zeros((), device=self.device)
        for inputs, targets in chunks:
            loss, ce = model_loss(self.model, inputs, targets, self.cfg.model, self._compute)
            # Micro-batches hold equal token counts, so the mean of their means is the global mean.
            (loss / len(chunks)).backward()
            total += ce
        return (total / len(chunks)).item()

    def clip_grad_norm(self, max_norm: float) -> float:
        params = [p for p in self.model.parameters() if p.grad is not None]
        if max_norm > 0:
            return torch.nn.utils.clip_grad_norm_(params, max_norm).item()
        return torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])).item()

    def optimizer_step(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.zero_grad()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def eval_loss(self, inputs_bT, targets_bT) -> float:
        self.model.eval()
        total, chunks = 0.0, list(self._micro_batches(inputs_bT.to(self.device), targets_bT.to(self.device)))
        for inputs, targets in chunks:
            total += model_loss(self.model, inputs, targets, self.cfg.model, self._compute)[1].item()
        return total / len(chunks)

    def state_dict(self) -> dict:
        return model_optim_state([self.model], [self.optimizer])

    def load_state_dict(self, state: dict) -> None:
        load_model_optim_state([self.model], [self.optimizer], state)


def make_engine(cfg: Config, device: torch.device, dims: "ParallelDims") -> Engine:
    if cfg.parallel.engine != "native":
        raise ConfigError(f"parallel.engine={cfg.parallel.engine} arrives with the DeepSpeed / megatron-core "
                          f"engines issue; use parallel.engine=native")
    if dims.world_size == 1:
        return LocalEngine(cfg, device)
    from ..parallel.native import NativeEngine

    return NativeEngine(cfg, device, dims)
