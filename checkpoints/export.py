"""Consolidated weights from a sharded checkpoint: as a Hugging Face Llama folder (`--to hf`, what other
tools load) or in keel's own names (`--to keel`).

Runs in one process with no process group: torch.distributed.checkpoint reads every rank's shards and
assembles full tensors, whatever layout wrote them (DeepSpeed's consolidation does the same for its ZeRO
files, parallel/megatron_layout.py for megatron-core's).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from . import manifest as mf
from .hf import SAFETENSORS, to_hf_state
from .hf_config import CONFIG, to_hf_config

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def full_model_state(path: Path) -> dict[str, torch.Tensor]:
    """Every model tensor of the checkpoint at `path`, whole, on the CPU, by its canonical name, whichever
    engine wrote it: DCP shards (the native engines), DeepSpeed's ZeRO files, or megatron-core's file per
    model-parallel rank."""
    engine = "native"
    if (path / mf.MANIFEST).exists():
        engine = mf.read_manifest(path)["config"]["parallel"].get("engine", "native")
    if engine == "deepspeed":
        return _deepspeed_model_state(path)
    if engine == "megatron":
        return _megatron_model_state(path)
    metadata = FileSystemReader(path).read_metadata()
    model = {key.removeprefix("model."): torch.empty(meta.size, dtype=meta.properties.dtype)
             for key, meta in metadata.state_dict_metadata.items()
             if key.startswith("model.") and isinstance(meta, TensorStorageMetadata)}
    state = {"model": model}
    dcp.load(state, checkpoint_id=path, no_dist=True)
    return state["model"]


def _deepspeed_model_state(path: Path) -> dict[str, torch.Tensor]:
    # DeepSpeed's own consolidation: the fp32 master weights, gathered from every rank's ZeRO partition.
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with contextlib.redirect_stdout(None):  # it prints a line per file it reads
        state = get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name)
    # Activation checkpointing wraps the blocks, and DeepSpeed saves the wrapped names.
    return {name.replace("_checkpoint_wrapped_module.", ""): t for name, t in state.items()}


def _megatron_model_state(path: Path) -> dict[str, torch.Tensor]:
    from ..parallel.megatron_layout import native_weights

    m = mf.read_manifest(path)["config"]["model"]
    # megatron_tp{T}.pt, or megatron_tp{T}_pp{P}.pt per pipeline stage (its layers numbered as in the whole
    # model): every stage of a tensor-parallel rank together make that rank's shard.
    shards: dict[str, dict[str, torch.Tensor]] = {}
    for f in sorted(path.glob("megatron_tp*.pt")):
        tp_rank = f.stem.removeprefix("megatron_tp").split("_pp")[0]
        state = torch.load(f, map_location="cpu", weights_only=True)["model"]
        shards.setdefault(tp_rank, {}).update({k.removeprefix("gpt."): v for k, v in state.items()})
    return native_weights([shards[r] for r in sorted(shards)], m["n_layers"], m["n_heads"],
                          m["n_kv_heads"] or m["n_heads"])


def checked_manifest(path: Path) -> dict:
    if problems := mf.problems(path):
        raise ValueError(f"{path} cannot be exported: {'; '.join(problems)}")
    return mf.read_manifest(path)


def export_keel(path: Path, out: Path) -> Path:
    """`out`/model.safetensors under keel's names and `out`/config.json (the run's model section)."""
    from safetensors.torch import save_file

    path, out = Path(path), Path(out)
    manifest = checked_manifest(path)
    model_cfg = manifest["config"]["model"]
    weights = full_model_state(path)
    if model_cfg.get("tie_embeddings"):
        weights.pop("output.weight", None)  # the same tensor as tok_embeddings.weight; stored once
    with _staged(out) as tmp:
        save_file({k: v.contiguous() for k, v in weights.items()}, tmp / SAFETENSORS,
                  metadata={"format": "pt", "keel_step": str(manifest["step"])})
        (tmp / CONFIG).write_text(json.dumps({"architecture": "keel.Transformer", "step": manifest["step"],
                                              "tokens": manifest["tokens"], **model_cfg}, indent=1))
    return out


def export_hf(path: Path, out: Path, *, dtype: str = "float32", eot: int | None = None,
              tokenizer_file: Path | None = None) -> Path:
    """A folder `transformers.AutoModelForCausalLM.from_pretrained(out)` loads as LlamaForCausalLM:
    config.json, generation_config.json, model.safetensors under HF's names with q/k in HF's rotary
    layout, and, given the run's `tokenizer_file` (a `tokenizers` JSON), the tokenizer beside them."""
    from safetensors.torch import save_file

    path, out = Path(path), Path(out)
    manifest = checked_manifest(path)
    model_cfg = manifest["config"]["model"]
    config = to_hf_config(model_cfg, dtype=dtype, eot=eot)  # refuses what Llama cannot express, first
    weights = to_hf_state(full_model_state(path), model_cfg)
    with _staged(out) as tmp:
        save_file({k: v.to(DTYPES[dtype]).contiguous() for k, v in weights.items()}, tmp / SAFETENSORS,
                  metadata={"format": "pt", "keel_step": str(manifest["step"])})
        (tmp / CONFIG).write_text(json.dumps(config, indent=2))
        generation = {"do_sample": False} if eot is None else {"bos_token_id": eot, "eos_token_id": eot,
                                                                "do_sample": False}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2))
        if tokenizer_file is not None:
            _write_tokenizer(tmp, Path(tokenizer_file), eot, model_cfg["max_seq_len"])
    return out


def _write_tokenizer(folder: Path, tokenizer_file: Path, eot: int | None, max_len: int) -> None:
    from tokenizers import Tokenizer

    shutil.copyfile(tokenizer_file, folder / "tokenizer.json")
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_len,
              "clean_up_tokenization_spaces": False}
    if eot is not None:
        text = Tokenizer.from_file(str(tokenizer_file)).id_to_token(eot)
        config.update(bos_token=text, eos_token=text)
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


@contextlib.contextmanager
def _staged(out: Path):
    """Write into a temporary sibling of `out`, renamed into place once complete: an export that fails
    half-way never leaves a folder that looks finished, nor damages an earlier export."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
