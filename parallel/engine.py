"""The engine: everything the loop needs from "a way to run the model", and nothing else, and the one
micro-batch loop every engine runs.

The loop asks an engine to run forward+backward over this rank's share of a global batch, clip, step and
evaluate, and for its state. How the model is split (FSDP, tensor/pipeline parallel, DeepSpeed ZeRO,
megatron-core) stays behind this interface, so new engines plug in without touching `loop.py`; they
differ in a few hooks of the micro-batch loop (the contexts a forward runs in, how a backward is taken,
how a loss is averaged over ranks), not in copies of it.
"""
from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from ..training.config import Config
from ..training.device import autocast
from ..training.loss import model_loss


def plain(t: torch.Tensor) -> torch.Tensor:
    """A loss that may be a DTensor (tensor-parallel loss) as a plain tensor."""
    return t.full_tensor() if isinstance(t, DTensor) else t


class Engine(ABC):
    cfg: Config
    model: nn.Module
    device: torch.device
    dp_rank: int = 0   # this rank's index among data-parallel replicas (which slice of the batch it reads)
    dp_size: int = 1

    # -- the micro-batch loop, shared --------------------------------------------------------------------
    def micro_batches(self, inputs_bT: torch.Tensor, targets_bT: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        mb = self.cfg.train.micro_batch_size
        return list(zip(inputs_bT.to(self.device).split(mb), targets_bT.to(self.device).split(mb)))

    def forward_backward(self, inputs_bT: torch.Tensor, targets_bT: torch.Tensor) -> float:
        """Accumulate gradients over this rank's rows of the global batch; return the global mean
        cross-entropy (identical on every rank)."""
        self.model.train()
        chunks = self.micro_batches(inputs_bT, targets_bT)
        total = torch.zeros((), device=self.device)
        for i, (inputs, targets) in enumerate(chunks):
            self.before_micro_batch(i, len(chunks))
            with self.loss_context():
                loss, ce = self.score(inputs, targets)
                # Micro-batches hold equal token counts, so the mean of their means is the batch's mean.
                self.backward(loss / len(chunks))
            total += plain(ce).detach()
        return self.global_mean(total / len(chunks))

    @torch.no_grad()
    def eval_loss(self, inputs_bT: torch.Tensor, targets_bT: torch.Tensor) -> float:
        """Global mean cross-entropy of a batch, without touching gradients."""
        self.model.eval()
        chunks = self.micro_batches(inputs_bT, targets_bT)
        total = torch.zeros((), device=self.device)
        for inputs, targets in chunks:
            with self.loss_context():
                total += plain(self.score(inputs, targets)[1])
        return self.global_mean(total / len(chunks))

    # -- its hooks ---------------------------------------------------------------------------------------
    def score(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss to backpropagate, cross-entropy to report) of one micro-batch: keel's model_loss, unless the
        engine's model computes its own (megatron-core's vocabulary-parallel cross-entropy)."""
        return model_loss(self.model, inputs, targets, self.cfg.model, self.compute_context)

    def compute_context(self):
        """Where the model's forward runs: autocast to the training precision, unless the engine casts."""
        return autocast(self.device, self.cfg.train.precision)

    def loss_context(self):
        """Around forward and backward both (a tensor-parallel loss needs its context in the backward)."""
        return contextlib.nullcontext()

    def before_micro_batch(self, index: int, count: int) -> None:
        """Called before micro-batch `index` of `count` (FSDP syncs gradients on the last one only)."""

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def global_mean(self, local_mean: torch.Tensor) -> float:
        """This rank's mean loss -> the mean over every rank that holds a share of the batch."""
        return local_mean.item()

    # -- the rest of the interface -----------------------------------------------------------------------

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
    def state_dict(self) -> dict:
        """Model and optimizer state for torch.distributed.checkpoint, keyed the same in every layout
        (see checkpoints/state.py), holding the live tensors: loading into it in place loads them."""

    @abstractmethod
    def load_state_dict(self, state: dict) -> None: ...


class OneOptimizer:
    """The step and the skip of an engine that applies its gradients with one torch optimizer (LocalEngine,
    MegatronEngine); listed before Engine in the bases."""
    optimizer: torch.optim.Optimizer

    def optimizer_step(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.zero_grad()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)


def adamw(model: nn.Module, cfg: Config, device: torch.device) -> torch.optim.AdamW:
    # Decay matrices and embeddings only: decaying norm gains pulls them toward zero for no benefit.
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.optim.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    # torch's fused AdamW (one kernel over all parameters, DTensors included) exists for CPUs as well as
    # GPUs, and is the fastest update on both: benchmarks/overhead.py measures it against the foreach path.
    return torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=cfg.optim.betas, eps=cfg.optim.eps,
                             fused=device.type in ("cuda", "cpu"))


