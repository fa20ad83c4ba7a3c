"""Pipeline parallelism with torch.distributed.pipelining: stages cut from the plain model.

Every stage is a copy of the meta-device model with the layers it does not own removed; the first stage
keeps the embedding, the last the final norm, the output layer and the loss. Layers are balanced by count.
Interleaved schedules give each rank several stages, looped: stage i runs on rank i mod pp.
"""
from __future__ import annotations

import copy

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import get_schedule_class

from ..training.model import Transformer

SCHEDULES = {"gpipe": "GPipe", "1f1b": "1F1B", "interleaved_1f1b": "Interleaved1F1B",
             "interleaved_zero_bubble": "InterleavedZeroBubble"}
SINGLE_STAGE = ("gpipe", "1f1b")


def stage_ids(pp_rank: int, pp: int, stages_per_rank: int) -> list[int]:
    return [pp_rank + i * pp for i in range(stages_per_rank)]


def layers_of_stage(n_layers: int, n_stages: int, stage: int) -> range:
    base, extra = divmod(n_layers, n_stages)
    start = stage * base + min(stage, extra)
    return range(start, start + base + (stage < extra))


def split_stage(model: Transformer, stage: int, n_stages: int) -> Transformer:
    """A copy of the (meta-device) model holding only what `stage` runs."""
    part = copy.deepcopy(model)
    keep = {str(i) for i in layers_of_stage(model.cfg.n_layers, n_stages, stage)}
    for name in list(part.layers.keys()):
        if name not in keep:
            del part.layers[name]
    if stage != 0:
        part.tok_embeddings = None
    if stage != n_stages - 1:
        part.norm = None
        part.output = None
    return part


def build_schedule(stages: list[torch.nn.Module], ids: list[int], n_stages: int, device: torch.device,
                   pp_mesh: DeviceMesh, schedule: str, n_microbatches: int, loss_fn):
    pipeline_stages = [PipelineStage(module, i, n_stages, device, group=pp_mesh.get_group())
                       for module, i in zip(stages, ids)]
    cls = get_schedule_class(SCHEDULES[schedule])
    if schedule in SINGLE_STAGE:
        return cls(pipeline_stages[0], n_microbatches=n_microbatches, loss_fn=loss_fn)
    return cls(pipeline_stages, n_microbatches=n_microbatches, loss_fn=loss_fn)
