"""`keel generate CKPT --prompt TEXT`: text from a checkpoint, greedy or sampled, to see what a model learned.

One process on the CPU (or one GPU): the checkpoint is consolidated whatever layout wrote it. A prompt is
read as the start of a document, after the end-of-text token that separates documents in training, so the
model sees it in the position it learned documents begin in. No KV cache: each new token reruns the
window, which is plenty for the models a look at samples is for.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..checkpoints import manifest as mf
from ..checkpoints.export import full_model_state
from .config import Config, config_from_dict
from .corpus import DataError, default_corpus
from .model import Transformer, build_model
from .tasks import corpus_tokenizer


def newest_checkpoint(path: Path) -> Path:
    """`path` itself if it is a checkpoint folder, else the newest sound committed checkpoint of a run."""
    path = Path(path)
    if mf.NAME.match(path.name):
        return path
    folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    for entry in reversed(mf.entries(folder)):
        if entry.committed and not mf.problems(entry.path, deep=False):
            return entry.path
    raise DataError(f"no committed checkpoint under {path}; pass a run folder (runs/NAME) or one of its "
                    f"checkpoints (runs/NAME/checkpoints/step_XXXXXXX)")


def run_corpus(cfg: Config) -> Path:
    """The prepared corpus a run trained on (its tokenizer decodes what the model writes)."""
    if cfg.data.path is not None:
        return Path(cfg.data.path)
    return default_corpus(cfg.data.tokenizer, vocab_size=cfg.model.vocab_size, progress=False)


def load_checkpoint_model(path: Path, device: torch.device | str = "cpu") -> tuple[Transformer, Config]:
    """The model of checkpoint `path`, whole, in eval mode, and the config of the run that wrote it."""
    if problems := mf.problems(path):
        raise DataError(f"{path} cannot be loaded: {'; '.join(problems)}")
    cfg = config_from_dict(mf.read_manifest(path)["config"])
    # The weights come from the checkpoint: nothing to fetch from the run's init_from folder.
    cfg.model.init_from = None
    model = build_model(cfg.model, device="meta")
    model.to_empty(device=device)
    model.init_buffers()
    weights = full_model_state(path)
    if cfg.model.tie_embeddings:
        weights["output.weight"] = weights["tok_embeddings.weight"]
    model.load_state_dict(weights)
    model.tie_weights()
    return model.eval(), cfg


@torch.no_grad()
def generate(model: Transformer, ids: list[int], max_new_tokens: int, temperature: float = 0.0,
             top_k: int | None = None, seed: int = 0, stop: int | None = None) -> list[int]:
    """`ids` followed by up to `max_new_tokens` tokens: the argmax each step at temperature 0, else a
    sample from the (top-k) softmax at `temperature`. Ends early at token `stop`."""
    device = model.rope_cos.device
    generator = torch.Generator(device=device).manual_seed(seed)
    out = list(ids)
    for _ in range(max_new_tokens):
        window = torch.tensor([out[-model.cfg.max_seq_len:]], device=device)
        logits_V = model(window)[0, -1].float()
        if temperature <= 0:
            token = int(logits_V.argmax())
        else:
            logits_V = logits_V / temperature
            if top_k is not None:
                kth = logits_V.topk(min(top_k, logits_V.numel())).values[-1]
                logits_V = logits_V.masked_fill(logits_V < kth, float("-inf"))
            token = int(torch.multinomial(logits_V.softmax(-1), 1, generator=generator))
        out.append(token)
        if token == stop:
            break
    return out


def complete(ckpt: Path, prompt: str, max_new_tokens: int = 200, temperature: float = 0.0,
             top_k: int | None = None, seed: int = 0) -> tuple[str, list[int]]:
    """The text a checkpoint writes after `prompt`, and every token id (prompt's included)."""
    model, cfg = load_checkpoint_model(newest_checkpoint(ckpt))
    tok, meta = corpus_tokenizer(run_corpus(cfg))
    ids = [meta["eot"], *tok.encode(prompt).tolist()]
    out = generate(model, ids, max_new_tokens, temperature, top_k, seed, stop=meta["eot"])
    new = out[len(ids):]
    return tok.decode(new[:-1] if new and new[-1] == meta["eot"] else new), out
