"""Hugging Face Llama weights <-> keel's canonical parameter names, both ways.

The one trap is RoPE's layout. keel (like Meta's reference Llama) rotates interleaved pairs of each head's
dimensions, (x0, x1), (x2, x3), ...; Hugging Face's Llama rotates halves, (x_i, x_{i+d/2}). Both compute the
same model if the rows of the query and key projections are permuted within each head: keel's rows
0, 2, 4, ... become HF's first half and 1, 3, 5, ... its second. Get this wrong and the converted model
loads without complaint and produces garbage (llama2.c #286, nanotron #427), which is why the round-trip
tests compare logits, not just shapes.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from .hf_config import CONFIG, HFFormatError

SAFETENSORS = "model.safetensors"
INDEX = "model.safetensors.index.json"

# keel name -> HF name; {i} is the layer index.
LAYER_NAMES = {
    "attention.wq.weight": "self_attn.q_proj.weight", "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight", "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight", "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight", "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
TOP_NAMES = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}
_LAYER = re.compile(r"layers\.(\d+)\.(.+)")


def hf_name(name: str) -> str:
    if name in TOP_NAMES:
        return TOP_NAMES[name]
    match = _LAYER.fullmatch(name)
    if match is None or match[2] not in LAYER_NAMES:
        raise HFFormatError(f"parameter {name!r} has no Hugging Face Llama counterpart")
    return f"model.layers.{match[1]}.{LAYER_NAMES[match[2]]}"


def interleaved_to_halves(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of a keel q/k projection [heads * d, D] in HF's rotate-half order."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def halves_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of interleaved_to_halves: HF q/k rows in keel's interleaved-pair order."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def _heads_of(name: str, n_heads: int, n_kv_heads: int) -> int | None:
    """How many RoPE heads the rows of `name` hold, or None when RoPE does not touch it."""
    if name.endswith("attention.wq.weight"):
        return n_heads
    if name.endswith("attention.wk.weight"):
        return n_kv_heads
    return None


def to_hf_state(weights: dict[str, torch.Tensor], model: dict) -> dict[str, torch.Tensor]:
    """keel's consolidated weights under HF's names, q/k rows in HF's rotary layout."""
    n_heads, n_kv_heads = model["n_heads"], model.get("n_kv_heads") or model["n_heads"]
    out = {}
    for name, tensor in weights.items():
        if model.get("tie_embeddings") and name == "output.weight":
            continue  # the same tensor as the embedding; HF re-ties it from tie_word_embeddings
        heads = _heads_of(name, n_heads, n_kv_heads)
        out[hf_name(name)] = interleaved_to_halves(tensor, heads) if heads else tensor
    return out


class HFWeights:
    """The tensors of an HF Llama folder (one model.safetensors or an index of shards), read lazily by
    keel's canonical name and in keel's layout: each rank reads only what it needs, memory-mapped."""

    def __init__(self, folder: Path, n_heads: int, n_kv_heads: int, tie_embeddings: bool):
        self.folder = Path(folder)
        self.n_heads, self.n_kv_heads, self.tie = n_heads, n_kv_heads, tie_embeddings
        if (self.folder / INDEX).is_file():
            self.file_of = {name: self.folder / file
                            for name, file in json.loads((self.folder / INDEX).read_text())["weight_map"].items()}
        elif (self.folder / SAFETENSORS).is_file():
            self.file_of = None
        else:
            raise HFFormatError(f"{self.folder} holds no {SAFETENSORS} (nor {INDEX}); save the model with "
                                f"save_pretrained(..., safe_serialization=True)")
        self._open: dict[Path, object] = {}

    def _file(self, name: str) -> Path:
        if self.file_of is None:
            return self.folder / SAFETENSORS
        if name not in self.file_of:
            raise HFFormatError(f"{self.folder} has no tensor {name!r} (its {CONFIG} and weights disagree)")
        return self.file_of[name]

    def _handle(self, file: Path):
        from safetensors import safe_open

        if file not in self._open:
            self._open[file] = safe_open(str(file), framework="pt")
        return self._open[file]

    def names(self) -> set[str]:
        if self.file_of is not None:
            return set(self.file_of)
        return set(self._handle(self.folder / SAFETENSORS).keys())

    def tensor(self, name: str, shape: torch.Size) -> torch.Tensor:
        """keel parameter `name` as fp32, checked against the `shape` keel's config gives it."""
        theirs = hf_name(name)
        if name == "output.weight" and theirs not in self.names():
            theirs = hf_name("tok_embeddings.weight")  # tied in HF: lm_head is stored as the embedding
        handle = self._handle(self._file(theirs))
        if theirs not in handle.keys():
            raise HFFormatError(f"{self.folder} has no tensor {theirs!r}; is it a Llama checkpoint?")
        value = handle.get_tensor(theirs).float()
        if tuple(value.shape) != tuple(shape):
            raise HFFormatError(f"{self.folder}: {theirs} has shape {tuple(value.shape)} but keel's config gives "
                                f"{name} {tuple(shape)}; fill the model section from its {CONFIG} (leave those "
                                f"fields out) or fix them")
        heads = _heads_of(name, self.n_heads, self.n_kv_heads)
        return halves_to_interleaved(value, heads) if heads else value
