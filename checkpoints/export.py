"""Consolidated weights from a sharded checkpoint, for inference and Hugging Face-style loading.

Runs in one process with no process group: torch.distributed.checkpoint reads every rank's shards and
assembles full tensors, whatever layout wrote them.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from . import manifest as mf


def full_model_state(path: Path) -> dict[str, torch.Tensor]:
    """Every model tensor of the checkpoint at `path`, whole, on the CPU, by its canonical name."""
    metadata = FileSystemReader(path).read_metadata()
    model = {key.removeprefix("model."): torch.empty(meta.size, dtype=meta.properties.dtype)
             for key, meta in metadata.state_dict_metadata.items()
             if key.startswith("model.") and isinstance(meta, TensorStorageMetadata)}
    state = {"model": model}
    dcp.load(state, checkpoint_id=path, no_dist=True)
    return state["model"]


def export_safetensors(path: Path, out: Path) -> Path:
    """Write `out`/model.safetensors and `out`/config.json (the model section of the run's config)."""
    from safetensors.torch import save_file

    path, out = Path(path), Path(out)
    if problems := mf.problems(path):
        raise ValueError(f"{path} cannot be exported: {'; '.join(problems)}")
    manifest = mf.read_manifest(path)
    model_cfg = manifest["config"]["model"]
    weights = full_model_state(path)
    if model_cfg.get("tie_embeddings"):
        weights.pop("output.weight", None)  # the same tensor as tok_embeddings.weight; stored once
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, out / "model.safetensors",
              metadata={"format": "pt", "keel_step": str(manifest["step"])})
    (out / "config.json").write_text(json.dumps({"architecture": "keel.Transformer", "step": manifest["step"],
                                                 "tokens": manifest["tokens"], **model_cfg}, indent=1))
    return out
