"""The training loop, top to bottom. It does not care how it was started (CLI, torchrun, a Ray actor)."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import torch.distributed as dist

from ..kernels.attention import check_attention_impl
from ..parallel.dims import ParallelDims, check_layout
from ..parallel.mesh import init_distributed
from .config import Config, ConfigError, dump_config
from .corpus import cache_dir, default_corpus, read_meta
from .data import BatchLoader, TokenWindows
from .device import peak_flops, pick_device, seed_everything
from .engine import Engine, make_engine
from .flops import training_flops_per_token
from .metrics import RunLogger, peak_memory_gb
from .schedule import lr_at


@dataclass
class RunSummary:
    run_dir: Path
    steps: int
    tokens: int
    final_loss: float
    val_loss: float
    first_val_loss: float
    wall_s: float
    tokens_per_s: float   # mean over steps after the first (the first pays one-off warm-up costs)
    mfu: float | None


@dataclass(frozen=True)
class RankEnv:
    """Where this process stands, from the variables torchrun and the Ray launcher set."""
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @classmethod
    def from_environ(cls) -> "RankEnv":
        return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)),
                   int(os.environ.get("WORLD_SIZE", 1)))


def resolve_data(cfg: Config, progress: bool = True) -> Path:
    """The prepared data folder, checked against the model before anything is built."""
    if cfg.data.path is None:
        data_dir = default_corpus(cfg.data.tokenizer, vocab_size=cfg.model.vocab_size, progress=progress)
    else:
        data_dir = Path(cfg.data.path)
    meta = read_meta(data_dir)
    if meta["vocab_size"] > cfg.model.vocab_size:
        raise ConfigError(f"the {meta['tokenizer']} tokenizer of {data_dir} has {meta['vocab_size']} tokens but "
                          f"model.vocab_size={cfg.model.vocab_size}; set model.vocab_size={meta['vocab_size']}")
    return data_dir


def check_attention(cfg: Config, device: torch.device) -> None:
    """A kernel that cannot run this model on this device says so now, not with a wrong result later."""
    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
    try:
        check_attention_impl(cfg.model.attention.impl, cfg.model.head_dim, dtype, device.type)
    except ValueError as e:
        raise ConfigError(f"model.attention.impl: {e}") from e


def evaluate(engine: Engine, windows: TokenWindows, cfg: Config) -> float:
    # A fresh loader each time: every evaluation scores the same held-out batches, so points compare.
    loader = BatchLoader(windows, cfg.train.global_batch_size, engine.dp_rank, engine.dp_size, seed=cfg.train.seed)
    losses = [engine.eval_loss(*next(loader)) for _ in range(cfg.train.eval_batches)]
    return sum(losses) / len(losses)


def train(cfg: Config, env: RankEnv | None = None) -> RunSummary:
    env = env or RankEnv.from_environ()
    dims = ParallelDims.resolve(cfg.parallel.dp_replicate, cfg.parallel.dp_shard, cfg.parallel.tp,
                                cfg.parallel.pp, env.world_size)
    check_layout(cfg, dims)
    if cfg.train.cpu_threads:
        torch.set_num_threads(cfg.train.cpu_threads)
    device = pick_device(cfg.train.device, env.local_rank)
    check_attention(cfg, device)
    distributed = env.world_size > 1
    if distributed:
        init_distributed(device)
    try:
        return _train(cfg, env, dims, device)
    finally:
        if distributed:
            dist.destroy_process_group()


def _train(cfg: Config, env: RankEnv, dims: ParallelDims, device: torch.device) -> RunSummary:
    is_main = env.rank == 0
    # Rank 0 prepares the corpus if it is missing; the others wait and then find it ready.
    if is_main:
        data_dir = resolve_data(cfg, progress=cfg.logging.progress)
    if env.world_size > 1:
        dist.barrier()
    if not is_main:
        data_dir = resolve_data(cfg, progress=False)
    seed_everything(cfg.train.seed)

    engine = make_engine(cfg, device, dims)
    T, G = cfg.data.seq_len, cfg.train.global_batch_size
    train_loader = BatchLoader(TokenWindows(data_dir, "train", T), G, engine.dp_rank, engine.dp_size,
                               seed=cfg.train.seed)
    val_windows = TokenWindows(data_dir, "val", T)

    run_dir = Path(cfg.train.output_dir) / cfg.train.name
    log = RunLogger(cfg, run_dir, enabled=is_main)
    if is_main:
        (run_dir / "config.yaml").write_text(dump_config(cfg))
    flops_per_token = training_flops_per_token(cfg.model, T)
    # Only rank 0 reports MFU; measuring on every rank at once would also share the cores being measured.
    peak, peak_source = peak_flops(device, cfg.train.precision) if is_main else (float("nan"), "")
    layout = f"dp_replicate={dims.dp_replicate} dp_shard={dims.dp_shard} tp={dims.tp} pp={dims.pp}"
    log.print(f"run {run_dir} | data {data_dir} | {env.world_size} x {device.type} ({layout}) | MFU against "
              f"{peak / 1e12:.2f} TFLOP/s per device ({peak_source}), {flops_per_token / 1e6:.1f} MFLOP/token")
    log.event("run_start", steps=cfg.train.steps, world_size=env.world_size, device=str(device), layout=layout)

    tokens_per_step = G * T
    start = time.perf_counter()
    first_val = evaluate(engine, val_windows, cfg)
    log.eval(0, first_val)
    val_loss, loss, step_times, warned_mfu = first_val, float("nan"), [], False
    # A step's time runs from the end of the previous step's compute to the end of its own, so the
    # logging of the previous step is paid for; evaluation time is excluded from throughput.
    last = time.perf_counter()
    for step in range(1, cfg.train.steps + 1):
        lr = lr_at(step - 1, cfg.optim.lr, cfg.train.steps, cfg.schedule)
        inputs, targets = next(train_loader)
        loss = engine.forward_backward(inputs, targets)
        grad_norm = engine.clip_grad_norm(cfg.optim.grad_clip)
        engine.optimizer_step(lr)
        now = time.perf_counter()  # .item() in the engine already waited for the device
        dt, last = now - last, now
        step_times.append(dt)
        tokens_per_s = tokens_per_step / dt
        mfu = flops_per_token * tokens_per_s / (peak * env.world_size)
        if mfu > 1 and not warned_mfu:
            warned_mfu = True
            log.print(f"[yellow]warning:[/] MFU {100 * mfu:.0f}% exceeds 100%, so the peak it is measured against "
                      f"({peak_source}) is too low; delete {cache_dir() / 'peak_flops.json'} to measure it again")
        log.step({"step": step, "loss": loss, "grad_norm": grad_norm, "lr": lr, "tokens": step * tokens_per_step,
                  "tokens_per_s": tokens_per_s, "step_s": dt, "mfu": mfu, "peak_mem_gb": peak_memory_gb(device)})
        if step == cfg.train.steps or (cfg.train.eval_every and step % cfg.train.eval_every == 0):
            t_eval = time.perf_counter()
            val_loss = evaluate(engine, val_windows, cfg)
            log.eval(step, val_loss)
            last += time.perf_counter() - t_eval

    wall = time.perf_counter() - start
    steady = step_times[1:] or step_times
    mean_tps = tokens_per_step * len(steady) / sum(steady)
    summary = RunSummary(run_dir=run_dir, steps=cfg.train.steps, tokens=cfg.train.steps * tokens_per_step,
                         final_loss=loss, val_loss=val_loss, first_val_loss=first_val, wall_s=wall,
                         tokens_per_s=mean_tps, mfu=flops_per_token * mean_tps / (peak * env.world_size))
    log.event("run_end", steps=summary.steps, tokens=summary.tokens, val_loss=val_loss, wall_s=wall)
    log.close()
    return summary
