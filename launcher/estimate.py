"""`keel estimate`: what a config costs before it runs, from the one FLOP/memory counter."""
from __future__ import annotations

from rich.console import Console
from rich.table import Table

from ..training.config import Config
from ..training.flops import count_params, memory_per_device, training_flops_per_token


def print_estimate(cfg: Config) -> None:
    m, T = cfg.model, cfg.data.seq_len
    params = count_params(m)
    fpt = training_flops_per_token(m, T)
    tokens_per_step = cfg.train.global_batch_size * T
    mem = memory_per_device(m, T, cfg.train.micro_batch_size, cfg.train.precision)
    console = Console(highlight=False)

    t = Table(title=f"{cfg.train.name}: {params.total / 1e6:,.2f}M parameters", show_header=True)
    t.add_column("quantity")
    t.add_column("value", justify="right")
    t.add_row("parameters (total)", f"{params.total:,}")
    t.add_row("  non-embedding", f"{params.non_embedding:,}")
    t.add_row("  in matmuls (the N of 6N)", f"{params.matmul:,}")
    t.add_row("training FLOPs / token (6N + attention)", f"{fpt / 1e6:,.2f} M")
    t.add_row("tokens / step", f"{tokens_per_step:,}")
    t.add_row("FLOPs / run", f"{fpt * tokens_per_step * cfg.train.steps:.3e}")
    console.print(t)

    t = Table(title=f"memory per device (1 process, micro-batch {cfg.train.micro_batch_size}, {cfg.train.precision})")
    t.add_column("part")
    t.add_column("GB", justify="right")
    for name in ("weights", "grads", "optimizer", "activations", "total"):
        t.add_row(name, f"{getattr(mem, name) / 1e9:,.3f}")
    console.print(t)
