"""The training loss: token cross-entropy plus optional z-loss on the output logits."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def lm_loss(logits_BTV: torch.Tensor, targets_BT: torch.Tensor, z_loss: float = 0.0
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (loss to backpropagate, cross-entropy to report), both means over tokens.

    z-loss (PaLM, Chowdhery et al. 2022) adds z_loss * log(Z)^2 so the softmax normaliser stays near 1;
    it is reported separately because it is not a property of the model's predictions.
    """
    logits_NV = logits_BTV.flatten(0, 1).float()
    ce = F.cross_entropy(logits_NV, targets_BT.flatten())
    if z_loss == 0.0:
        return ce, ce.detach()
    log_z_N = torch.logsumexp(logits_NV, dim=-1)
    return ce + z_loss * log_z_N.pow(2).mean(), ce.detach()
