"""The RunRecord: what a finished run tells the scaling fits (`record.json` in the run directory).

Written by rank 0 at the end of every run, from the config and metrics.jsonl (so a run that restarted
records its whole eval curve, each step once, the last measurement winning). Everything `scaling/` needs
to place the run on a scaling law is here: sizes, tokens, exact FLOPs and 6ND, the held-out loss at the
end and along the way, the schedule with its learning rate at every step, and fingerprints of the data and
of the eval set, so that runs measured on different data or held-out sets are never fitted together.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .config import Config
from .corpus import read_meta
from .data import HELD_OUT_SEED
from .flops import count_params, training_flops_per_token
from .schedule import lr_at

RECORD = "record.json"


@dataclass
class RunRecord:
    name: str
    params: int                   # every parameter
    non_embedding_params: int     # Kaplan's N (no embedding or output tables): the N of the fits
    tokens: int                   # D: training tokens seen (steps x batch tokens)
    flops: float                  # exact training FLOPs (training/flops.py: 6 x matmul weights + attention)
    flops_6nd: float              # 6 x non_embedding_params x tokens, for comparison with papers
    final_loss: float             # held-out loss after the last step (nats/token)
    eval_curve: list[dict]        # [{"step", "tokens", "loss"}], step 0 included
    lrs: list[float]              # the scheduled learning rate of every step (index 0 = step 1)
    schedule: dict                # name, warmup_steps, min_lr_ratio, decay_fraction, lr, steps
    final_lr_ratio: float         # lr of the last step / peak lr: 1 for a constant schedule
    eval_at_end_of_decay: bool    # the final eval follows a completed decay (cosine/WSD to its horizon)
    seed: int
    batch_tokens: int
    seq_len: int
    tokenizer: str
    vocab_size: int
    data_fingerprint: str         # of the prepared corpus (its meta.json)
    eval_set: str                 # of the held-out windows scored: corpus, seq_len, seed, sequences
    model: dict                   # dim, n_layers, n_heads, n_kv_heads, hidden_dim
    tasks: dict = field(default_factory=dict)   # capability suite results, when evaluated

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RunRecord":
        names = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in names})


def fingerprint(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def data_fingerprint(data_dir: Path) -> str:
    meta = json.loads((Path(data_dir) / "meta.json").read_text())
    meta.pop("sources", None)  # where it was prepared from is not what it holds
    return fingerprint(meta)


def eval_set_fingerprint(cfg: Config, data_fp: str) -> str:
    # evaluate() scores the first eval_batches x global_batch_size windows of one fixed permutation of the
    # validation split (HELD_OUT_SEED's, whatever the run's seed): these numbers fix the held-out set.
    return fingerprint(data_fp, cfg.data.seq_len, HELD_OUT_SEED, cfg.train.eval_batches * cfg.train.global_batch_size)


def eval_curve(metrics: Path, tokens_per_step: int) -> list[dict]:
    """Each evaluated step once (a restart re-evaluates replayed steps: the last measurement wins)."""
    by_step: dict[int, float] = {}
    if metrics.exists():
        for line in metrics.read_text().splitlines():
            if '"kind": "eval"' in line:
                row = json.loads(line)
                by_step[row["step"]] = row["val_loss"]
    return [{"step": s, "tokens": s * tokens_per_step, "loss": by_step[s]} for s in sorted(by_step)]


def build_record(cfg: Config, run_dir: Path, data_dir: Path, tasks: dict | None = None) -> RunRecord:
    m, T, steps = cfg.model, cfg.data.seq_len, cfg.train.steps
    batch_tokens = cfg.train.global_batch_size * T
    tokens = steps * batch_tokens
    p = count_params(m)
    lrs = [lr_at(s, cfg.optim.lr, steps, cfg.schedule) for s in range(steps)]
    curve = eval_curve(run_dir / "metrics.jsonl", batch_tokens)
    final = next((e["loss"] for e in curve if e["step"] == steps), float("nan"))
    data_fp = data_fingerprint(data_dir)
    s = cfg.schedule
    return RunRecord(
        name=cfg.train.name, params=p.total, non_embedding_params=p.non_embedding, tokens=tokens,
        flops=training_flops_per_token(m, T) * tokens, flops_6nd=6.0 * p.non_embedding * tokens,
        final_loss=final, eval_curve=curve, lrs=lrs,
        schedule={"name": s.name, "warmup_steps": s.warmup_steps, "min_lr_ratio": s.min_lr_ratio,
                  "decay_fraction": s.decay_fraction, "lr": cfg.optim.lr, "steps": steps},
        final_lr_ratio=lrs[-1] / cfg.optim.lr, eval_at_end_of_decay=s.name in ("cosine", "wsd"),
        seed=cfg.train.seed, batch_tokens=batch_tokens, seq_len=T, tokenizer=read_meta(data_dir)["tokenizer"],
        vocab_size=m.vocab_size, data_fingerprint=data_fp, eval_set=eval_set_fingerprint(cfg, data_fp),
        model={"dim": m.dim, "n_layers": m.n_layers, "n_heads": m.n_heads, "n_kv_heads": m.n_kv_heads,
               "hidden_dim": m.hidden_dim},
        tasks=tasks or {})


def write_record(record: RunRecord, run_dir: Path) -> Path:
    path = Path(run_dir) / RECORD
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record.to_dict(), indent=1))
    tmp.replace(path)  # a reader never sees half a record
    return path


def read_record(run_dir: Path) -> RunRecord:
    return RunRecord.from_dict(json.loads((Path(run_dir) / RECORD).read_text()))
