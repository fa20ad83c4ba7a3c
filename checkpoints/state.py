"""Training state in a form any parallel layout can save and any other can load.

Model and optimizer state are keyed by each parameter's canonical name (wrappers left out) and, for the
optimizer, flattened to one entry per parameter ("state.layers.0.attention.wq.weight.exp_avg"). Sharded
tensors stay DTensors, so torch.distributed.checkpoint writes each rank's own shards and reshards on
load; pipeline stages contribute disjoint keys. RNG state is per rank and saved beside the shards.
"""
from __future__ import annotations

import random

import numpy as np
import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

FLAT = StateDictOptions(flatten_optimizer_state_dict=True)


def model_optim_state(parts: list[nn.Module], optimizers: list[torch.optim.Optimizer]) -> dict:
    """{"model": {name: tensor}, "optim": {flat key: value}} over every model part this rank holds.
    The tensors are the live ones (no copy): loading into them in place loads the model."""
    model, optim = {}, {}
    for part, opt in zip(parts, optimizers):
        model.update(get_model_state_dict(part))
        # Before the first step the optimizer has no moments yet; this creates them (a zero-lr step), so
        # a resume has tensors to load into.
        optim.update(get_optimizer_state_dict(part, opt, options=FLAT))
    return {"model": model, "optim": optim}


def load_model_optim_state(parts: list[nn.Module], optimizers: list[torch.optim.Optimizer], state: dict) -> None:
    for part, opt in zip(parts, optimizers):
        own = model_optim_state([part], [opt])
        set_model_state_dict(part, {k: state["model"][k] for k in own["model"]})
        set_optimizer_state_dict(part, opt, {k: state["optim"][k] for k in own["optim"]}, options=FLAT)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
