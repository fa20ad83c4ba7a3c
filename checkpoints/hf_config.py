"""keel's model section <-> a Hugging Face `LlamaForCausalLM` config.json (plain JSON: no torch here, so the
config loader can fill a model section from an HF folder before anything heavy is imported).

keel's model is Llama's architecture, so the mapping is one to one; what Llama cannot express (QK-norm) is
refused by name rather than silently dropped, and an HF config keel cannot reproduce exactly (biases, RoPE
scaling, another activation) is refused the same way on import.
"""
from __future__ import annotations

import json
from pathlib import Path

PREFIX = "hf:"
CONFIG = "config.json"

# keel model field -> HF LlamaConfig key, for the fields both describe.
FIELDS = {"vocab_size": "vocab_size", "dim": "hidden_size", "ffn_dim": "intermediate_size",
          "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads",
          "n_kv_heads": "num_key_value_heads", "max_seq_len": "max_position_embeddings",
          "rope_theta": "rope_theta", "norm_eps": "rms_norm_eps", "tie_embeddings": "tie_word_embeddings",
          "init_std": "initializer_range"}
# HF's Llama defaults for keys a config.json may leave out (LlamaConfig's own defaults).
HF_DEFAULTS = {"num_key_value_heads": None, "rope_theta": 10000.0, "rms_norm_eps": 1e-6,
               "tie_word_embeddings": False, "initializer_range": 0.02, "max_position_embeddings": 2048}


# What a Llama config.json cannot leave out (LlamaConfig's defaults for these describe no real model).
REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


class HFFormatError(ValueError):
    """An HF folder or a keel model that the other side cannot represent exactly; one line, with the fix."""


def hf_path(init_from: str) -> Path:
    """The folder named by `model.init_from: hf:PATH`."""
    if not init_from.startswith(PREFIX):
        raise HFFormatError(f"model.init_from={init_from!r} is not understood; use hf:PATH (a local folder "
                            f"holding a Hugging Face Llama config.json and model.safetensors)")
    return Path(init_from[len(PREFIX):]).expanduser()


def unsupported_by_llama(model: dict) -> list[str]:
    """The features of a keel model section that HF's Llama has no place for."""
    problems = []
    if model.get("qk_norm"):
        problems.append("model.qk_norm=true (Llama has no query/key norms)")
    return problems


def to_hf_config(model: dict, *, dtype: str, eot: int | None) -> dict:
    """config.json for `LlamaForCausalLM` from keel's model section (as a plain dict)."""
    if problems := unsupported_by_llama(model):
        raise HFFormatError(f"this model cannot be exported as a Hugging Face Llama: {'; '.join(problems)}; "
                            f"export it with --to keel instead")
    n_heads = model["n_heads"]
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
              "head_dim": model["dim"] // n_heads, "attention_bias": False, "mlp_bias": False,
              "attention_dropout": 0.0, "use_cache": True, "dtype": dtype}
    for ours, theirs in FIELDS.items():
        config[theirs] = model[ours]
    config["intermediate_size"] = hidden_dim(model)
    # transformers 5 reads RoPE from rope_parameters; 4.x from rope_theta (kept for older readers).
    config["rope_parameters"] = {"rope_type": "default", "rope_theta": float(model["rope_theta"])}
    config["num_key_value_heads"] = model.get("n_kv_heads") or n_heads
    # keel separates documents with one end-of-text token and reads a prompt as a document's start (after
    # it), as GPT-2 does: that token is both the beginning and the end of a sequence.
    if eot is not None:
        config["bos_token_id"] = config["eos_token_id"] = eot
    return config


def hidden_dim(model: dict) -> int:
    """The SwiGLU width of a model section (ModelConfig.hidden_dim, for a plain dict)."""
    if model.get("ffn_dim") is not None:
        return model["ffn_dim"]
    multiple = model.get("ffn_multiple_of", 64)
    return multiple * -(-int(8 * model["dim"] / 3) // multiple)


def read_hf_config(folder: Path) -> dict:
    folder = Path(folder)
    path = folder / CONFIG
    if not path.is_file():
        raise HFFormatError(f"{folder} has no {CONFIG}; point model.init_from at a folder written by "
                            f"save_pretrained() or `keel ckpt export --to hf`")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise HFFormatError(f"{path} is not valid JSON ({e})") from e


def from_hf_config(config: dict, where: Path) -> dict:
    """keel's model fields from an HF Llama config.json, refusing what keel's model would compute differently."""
    missing = [k for k in REQUIRED if k not in config]
    if missing:
        raise HFFormatError(f"{where}/{CONFIG} lacks {', '.join(missing)}; is it a Llama config?")
    problems = []
    if config.get("model_type", "llama") != "llama":
        problems.append(f"model_type={config.get('model_type')!r} (keel reads Llama checkpoints)")
    if config.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={config['hidden_act']!r} (keel's SwiGLU uses silu)")
    for key in ("attention_bias", "mlp_bias"):
        if config.get(key):
            problems.append(f"{key}=true (keel's linear layers have no bias)")
    rope = rope_parameters(config)
    if rope.get("rope_type", "default") != "default":
        problems.append(f"RoPE scaling {rope.get('rope_type')!r} (keel implements plain RoPE)")
    n_heads = config["num_attention_heads"]
    if config.get("head_dim") not in (None, config["hidden_size"] // n_heads):
        problems.append(f"head_dim={config['head_dim']} != hidden_size / num_attention_heads")
    if problems:
        raise HFFormatError(f"{where} cannot be loaded into keel's model: {'; '.join(problems)}")
    model = {ours: config.get(theirs, HF_DEFAULTS.get(theirs)) for ours, theirs in FIELDS.items()}
    model["rope_theta"] = float(rope.get("rope_theta", model["rope_theta"]))
    model["n_kv_heads"] = model["n_kv_heads"] or n_heads
    return model


def rope_parameters(config: dict) -> dict:
    """RoPE settings, from transformers 5's `rope_parameters` or 4's `rope_theta` + `rope_scaling`."""
    if isinstance(config.get("rope_parameters"), dict):
        return config["rope_parameters"]
    rope = dict(config.get("rope_scaling") or {})
    rope.setdefault("rope_type", rope.pop("type", "default"))
    if "rope_theta" in config:
        rope["rope_theta"] = config["rope_theta"]
    return rope
