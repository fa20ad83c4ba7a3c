"""One process, one device, no parallelism: the engine every parallel layout must match (the micro-batch
loop is parallel/engine.py's, with its default hooks)."""
from __future__ import annotations

import torch

from ..checkpoints.state import load_model_optim_state, model_optim_state
from ..training.config import Config
from ..training.model import Transformer, build_model
from .data_parallel import apply_activation_checkpointing, apply_compile
from .engine import Engine, OneOptimizer, adamw
from .materialise import materialise


class LocalEngine(OneOptimizer, Engine):
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

    def clip_grad_norm(self, max_norm: float) -> float:
        params = [p for p in self.model.parameters() if p.grad is not None]
        if max_norm > 0:
            return torch.nn.utils.clip_grad_norm_(params, max_norm).item()
        return torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])).item()

    def state_dict(self) -> dict:
        return model_optim_state([self.model], [self.optimizer])

    def load_state_dict(self, state: dict) -> None:
        load_model_optim_state([self.model], [self.optimizer], state)
