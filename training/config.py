"""The run configuration: the schema's dataclasses (schema.py) loaded from YAML, overridden with
`--set a.b=value`.

Precedence is CLI > file > defaults. Everything is validated before anything runs, so a bad config never
costs a cluster allocation: unknown keys name the nearest valid key, wrong types name the field, the value
and the expected type, and each section checks its own value ranges in `__post_init__`.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from .errors import ConfigError
from .schema import (  # noqa: F401  (the schema is imported from here by the rest of keel)
    AttentionConfig,
    RMSNormConfig,
    SwiGLUConfig,
    RoPEConfig,
    CrossEntropyConfig,
    ModelConfig,
    DataConfig,
    OptimConfig,
    ScheduleConfig,
    TrainConfig,
    ParallelConfig,
    CheckpointConfig,
    StabilityConfig,
    WandbConfig,
    LoggingConfig,
    FaultConfig,
    Config,
)
from .specs import FAULT_ACTIONS, FAULT_FORM, STABILITY_ACTIONS  # noqa: F401  (re-exported)


# ---------------------------------------------------------------------------------------------------
# Building dataclasses from plain dicts, with the checks users see.

def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        return f"list[{_type_name(typing.get_args(tp)[0])}]"
    if typing.get_origin(tp) is tuple:
        return f"tuple[{', '.join(_type_name(a) for a in typing.get_args(tp))}]"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Return `value` as type `tp`, or raise ConfigError naming the field, the value and the type."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, where)
            except ConfigError:
                pass
    elif origin is Literal:
        if value in typing.get_args(tp):
            return value
        close = difflib.get_close_matches(str(value), [str(a) for a in typing.get_args(tp)], n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"{where}: {value!r} is not one of {_type_name(tp)}{hint}")
    elif origin is list:
        (arg,) = typing.get_args(tp)
        if isinstance(value, (list, tuple)):
            return [_coerce(v, arg, f"{where}[{i}]") for i, v in enumerate(value)]
        if isinstance(value, str):  # `--set fault.inject=kill@23`: a single item
            return [_coerce(value, arg, where)]
    elif origin is tuple:
        args = typing.get_args(tp)
        if isinstance(value, (list, tuple)) and len(value) == len(args):
            return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    elif dataclasses.is_dataclass(tp):
        if isinstance(value, dict):
            return _build(tp, value, where)
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        # YAML 1.1 reads `3e-4` (no dot) as a string; accept any string Python reads as a number.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is dict:  # a free-form mapping handed on as it is (parallel.deepspeed)
        if isinstance(value, dict):
            return value
    raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


# Names users bring from Megatron-LM, Hugging Face and torchtitan configs, mapped to ours.
ALIASES = {
    "learning_rate": "lr", "max_lr": "lr", "clip_grad": "grad_clip", "max_grad_norm": "grad_clip",
    "adam_eps": "eps", "adam_epsilon": "eps", "hidden_size": "dim", "num_layers": "n_layers",
    "num_hidden_layers": "n_layers", "num_attention_heads": "n_heads", "num_key_value_heads": "n_kv_heads",
    "num_query_groups": "n_kv_heads", "ffn_hidden_size": "ffn_dim", "intermediate_size": "ffn_dim",
    "seq_length": "seq_len", "max_position_embeddings": "max_seq_len", "train_iters": "steps",
    "max_steps": "steps", "batch_size": "global_batch_size", "lr_warmup_iters": "warmup_steps",
    "tensor_model_parallel_size": "tp", "pipeline_model_parallel_size": "pp",
    "tie_word_embeddings": "tie_embeddings", "dataset": "path", "data_path": "path",
}


def _unknown_key(key: str, valid: list[str], prefix: str) -> ConfigError:
    candidates = valid + [alias for alias, name in ALIASES.items() if name in valid]
    close = difflib.get_close_matches(key.lower(), candidates, n=1, cutoff=0.6)
    if close:
        hint = f"; did you mean '{prefix}{ALIASES.get(close[0], close[0])}'?"
    else:
        hint = f"; valid keys{' under ' + prefix.rstrip('.') if prefix else ''}: {', '.join(valid)}"
    return ConfigError(f"unknown config key '{prefix}{key}'{hint}")


def _build(cls: type, data: dict, where: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    prefix = f"{where}." if where else ""
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise _unknown_key(str(key), names, prefix)
        kwargs[key] = _coerce(value, hints[key], f"{prefix}{key}")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where or 'config'}: {e}") from e


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    """Write `value` at `a.b.c` in a nested dict, checking each name against the schema."""
    cls: Any = Config
    node = tree
    keys = dotted.split(".")
    for depth, key in enumerate(keys):
        valid = [f.name for f in dataclasses.fields(cls)]
        if key not in valid:
            raise _unknown_key(key, valid, ".".join(keys[:depth]) + ("." if depth else ""))
        if depth == len(keys) - 1:
            node[key] = value
            return
        cls = typing.get_type_hints(cls)[key]
        if not dataclasses.is_dataclass(cls):
            raise ConfigError(f"--set {dotted}: {'.'.join(keys[:depth + 1])} is a value, not a section")
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{'.'.join(keys[:depth + 1])} must be a section (a mapping)")


def parse_override(item: str) -> tuple[str, Any]:
    """`a.b=value` -> ("a.b", value); the value is read as YAML so numbers, bools and lists work."""
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set expects key=value (e.g. optim.lr=3e-4), got {item!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Defaults, then the YAML file, then each `a.b=value` override; validated as a whole."""
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} not found; pass a YAML file such as configs/tiny.yaml")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e})") from e
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections (model:, train:, ...)")
    for item in overrides:
        key, value = parse_override(item)
        _set_path(tree, key, value)
    hf_model = _fill_from_hf(tree)
    cfg = _build(Config, tree)
    if hf_model is not None:
        _check_against_hf(cfg.model, hf_model)
    if cfg.train.name is None:
        cfg.train.name = path.stem if path is not None else "run"
    return cfg


def config_from_dict(tree: dict) -> Config:
    """A config written out whole (a checkpoint's manifest, a run's config.yaml), read back and checked."""
    return _build(Config, tree)


def _fill_from_hf(tree: dict) -> dict | None:
    """With model.init_from=hf:PATH, fill the model fields the config leaves out from PATH/config.json;
    returns the model fields that config.json gives (None without init_from)."""
    model = tree.get("model")
    init_from = model.get("init_from") if isinstance(model, dict) else None
    if not isinstance(init_from, str) or not init_from.startswith("hf:"):
        return None
    from ..checkpoints.hf_config import HFFormatError, from_hf_config, hf_path, read_hf_config

    try:
        folder = hf_path(init_from)
        theirs = from_hf_config(read_hf_config(folder), folder)
    except HFFormatError as e:
        raise ConfigError(f"model.init_from: {e}") from e
    for key, value in theirs.items():
        model.setdefault(key, value)
    return theirs


def _check_against_hf(model: ModelConfig, theirs: dict) -> None:
    from ..checkpoints.hf_config import FIELDS

    for key, value in theirs.items():
        ours = model.hidden_dim if key == "ffn_dim" else getattr(model, key)
        if key == "init_std" or ours == value or (isinstance(value, float) and math.isclose(ours, value)):
            continue
        raise ConfigError(f"model.{key}={ours} but {model.init_from} has {FIELDS[key]}={value}; leave "
                          f"model.{key} out (it is read from config.json) or set it to {value}")


def config_to_dict(cfg: Config) -> dict:
    def plain(x):
        if isinstance(x, tuple):
            return list(x)
        return x
    return dataclasses.asdict(cfg, dict_factory=lambda items: {k: plain(v) for k, v in items})


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
