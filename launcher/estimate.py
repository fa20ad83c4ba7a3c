"""`keel estimate`: what a config costs before it runs, from the one FLOP/memory counter."""
from __future__ import annotations

from rich.console import Console
from rich.table import Table

from ..parallel.dims import ParallelDims, check_layout
from ..training.config import Config
from ..training.flops import count_params, memory_per_device, training_flops_per_token


def print_estimate(cfg: Config, world_size: int) -> None:
    m, T, p = cfg.model, cfg.data.seq_len, cfg.parallel
    dims = ParallelDims.of(p, world_size)
    check_layout(cfg, dims)
    params = count_params(m)
    fpt = training_flops_per_token(m, T)
    tokens_per_step = cfg.train.global_batch_size * T
    n_micro = cfg.train.global_batch_size // dims.dp // cfg.train.micro_batch_size
    in_flight = n_micro if p.pp_schedule == "gpipe" else min(n_micro, dims.pp * p.pp_stages_per_rank)
    mem = memory_per_device(m, T, cfg.train.micro_batch_size, cfg.train.precision, dp_shard=dims.dp_shard,
                            tp=dims.tp, pp=dims.pp, micro_batches_in_flight=in_flight if dims.pp > 1 else 1)
    console = Console(highlight=False)

    console.print(f"[bold]{cfg.train.name}[/]: {params.total / 1e6:,.2f}M parameters", soft_wrap=True)
    t = Table()
    t.add_column("quantity")
    t.add_column("value", justify="right")
    t.add_row("parameters (total)", f"{params.total:,}")
    t.add_row("  non-embedding", f"{params.non_embedding:,}")
    t.add_row("  in matmuls (the N of 6N)", f"{params.matmul:,}")
    t.add_row("training FLOPs / token (6N + attention)", f"{fpt / 1e6:,.2f} M")
    t.add_row("tokens / step", f"{tokens_per_step:,}")
    t.add_row("FLOPs / run", f"{fpt * tokens_per_step * cfg.train.steps:.3e}")
    console.print(t)

    layout = f"dp_replicate={dims.dp_replicate} x dp_shard={dims.dp_shard} x tp={dims.tp} x pp={dims.pp}"
    console.print(f"[bold]memory per device[/]: {world_size} processes ({layout}), micro-batch "
                  f"{cfg.train.micro_batch_size}, {cfg.train.precision}", soft_wrap=True)
    t = Table()
    t.add_column("part")
    t.add_column("GB", justify="right")
    for name in ("weights", "grads", "optimizer", "activations", "total"):
        t.add_row(name, f"{getattr(mem, name) / 1e9:,.3f}")
    console.print(t)
