"""The training loss: token cross-entropy plus optional z-loss on the output logits."""
from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Callable, ContextManager

import torch

from ..kernels.cross_entropy import cross_entropy_from_logits

if TYPE_CHECKING:
    from .config import ModelConfig


def lm_loss(logits_BTV: torch.Tensor, targets_BT: torch.Tensor, z_loss: float = 0.0
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (loss to backpropagate, cross-entropy to report), both means over the tokens whose target
    is not IGNORE_INDEX.

    z-loss (PaLM, Chowdhery et al. 2022) adds z_loss * log(Z)^2 so the softmax normaliser stays near 1;
    it is reported separately because it is not a property of the model's predictions. The one definition
    is kernels/cross_entropy.py's, which the fused paths are tested against.
    """
    return cross_entropy_from_logits(logits_BTV.flatten(0, 1), targets_BT.flatten(), z_loss)


def model_loss(model: torch.nn.Module, inputs_BT: torch.Tensor, targets_BT: torch.Tensor, cfg: "ModelConfig",
               compute: Callable[[], ContextManager] = contextlib.nullcontext) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss to backpropagate, cross-entropy to report) of `model` on a batch: the one way the engines
    score a batch, for training and evaluation alike.

    `compute` is the context the model's forward runs in (autocast). With model.cross_entropy.impl
    "unfused" the logits leave the model and lm_loss runs on them in fp32 outside it; otherwise the model
    computes the loss itself, chunk by chunk, without materialising the logits (Transformer.forward).
    """
    if cfg.cross_entropy.impl == "unfused":
        with compute():
            logits_BTV = model(inputs_BT)
        return lm_loss(logits_BTV, targets_BT, cfg.z_loss)
    with compute():
        return model(inputs_BT, targets_BT)
