"""The training loop, top to bottom. It does not care how it was started (CLI, torchrun, a Ray actor)."""
from __future__ import annotations

import contextlib
import gc
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from ..checkpoints import rollbacks
from ..checkpoints.manager import Checkpointer
from ..kernels.attention import check_attention_impl
from ..kernels.cross_entropy import check_cross_entropy_impl
from ..kernels.ops import check_op_impl
from ..parallel.dims import ParallelDims, check_layout
from ..parallel.engine import Engine
from ..parallel.factory import make_engine
from ..parallel.mesh import init_distributed
from .config import Config, ConfigError, config_to_dict, dump_config
from .corpus import cache_dir, default_corpus, read_meta
from .data import HELD_OUT_SEED, BatchLoader, TokenWindows
from .device import autocast, peak_flops, pick_device, seed_everything, slow_precision_warning
from .faults import FaultInjector
from .flops import training_flops_per_token
from .forecast import Forecast
from .metrics import RunLogger, peak_memory_gb
from .record import build_record, write_record
from .schedule import lr_at
from .stability import Action, Stabilizer, StabilityError, Verdict
from .tasks import run_tasks


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
    incidents: list[dict] = field(default_factory=list)  # loss anomalies and what was done about them


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


class Beats:
    """What the launcher's supervisor hears from this rank (`on_beat`): every step's record, and the start
    and end of the phases that may rightly take longer than a step (evaluation, checkpoint save, restoring
    a checkpoint for a rollback), so that it can tell a slow phase from a hang."""

    def __init__(self, send: Callable[[dict], None] | None):
        self.send = send

    def step(self, record: dict) -> None:
        if self.send is not None:
            self.send({"phase": "step", **record})

    @contextlib.contextmanager
    def phase(self, name: str, step: int):
        if self.send is None:
            yield
            return
        self.send({"phase": name, "step": step})
        t0 = time.perf_counter()
        yield
        self.send({"phase": f"{name}_end", "step": step, "seconds": time.perf_counter() - t0})


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


def check_kernels(cfg: Config, device: torch.device, tp: int = 1) -> None:
    """A kernel that cannot run this model on this device says so now, not with a wrong result later.
    (Kernel choices that depend on the parallel layout are checked by parallel.dims.check_layout.)"""
    m = cfg.model
    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
    try:
        check_attention_impl(m.attention.impl, m.head_dim, dtype, device.type)
    except ValueError as e:
        raise ConfigError(f"model.attention.impl: {e}") from e
    # Sizes as one process sees them: tensor parallelism splits the heads.
    sizes = {"rmsnorm": dict(dim=m.dim), "swiglu": {},
             "rope": dict(dim=m.head_dim, n_heads=m.n_heads // tp, n_kv_heads=m.n_kv_heads // tp)}
    for op, kwargs in sizes.items():
        try:
            check_op_impl(op, getattr(m, op).impl, device.type, dtype=dtype, **kwargs)
        except ValueError as e:
            raise ConfigError(f"model.{op}.impl: {e}") from e
    try:
        check_cross_entropy_impl(m.cross_entropy.impl, device)
    except ValueError as e:
        raise ConfigError(f"model.cross_entropy.impl: {e}") from e


# Events worth a console line as well as a line in events.jsonl.
LOUD = {"checkpoint_skipped": "yellow", "checkpoint_failed": "red", "rng_not_restored": "yellow",
        "resumed": "green", "checkpoint_saved": "dim", "anomaly": "red", "rollback": "yellow",
        "checkpoints_set_aside": "yellow", "resume_changed": "yellow", "off_forecast": "red"}


def report(log: RunLogger, kind: str, **fields) -> None:
    log.event(kind, **fields)
    if kind in LOUD:
        text = " ".join(f"{k}={v}" for k, v in fields.items())
        log.print(f"[{LOUD[kind]}]{kind.replace('_', ' ')}[/]: {text}")


def remediate(action: Action, verdict: Verdict, stability: Stabilizer, engine: Engine, ckpt: Checkpointer,
              loader: BatchLoader, log: RunLogger, beats: Beats) -> int | None:
    """Report an anomalous step and carry out `action` (the loop already dropped the step's update, or
    applied it at the lowered rate for lower_lr). Returns the step to continue from after a rollback."""
    report(log, "anomaly", step=verdict.step, verdict=verdict.kind, reason=verdict.reason, action=str(action),
           z_loss=round(verdict.z_loss, 2), z_grad=round(verdict.z_grad, 2))
    if action.name != "rollback":
        return None
    with beats.phase("restore", verdict.step):
        ckpt.wait()
        # The newest checkpoint from before the trouble began: the first anomaly of this episode showed in
        # the loss at step `onset`, so the update of step onset - 1 may be the cause; go back before it.
        target = ckpt.choose("auto", before=stability.onset - 1)
        if target is None:
            raise StabilityError(stability.report(f"no committed checkpoint before step {stability.onset - 1} to "
                                                  f"roll back to; set checkpoint.interval"))
        served = loader.batch - 1  # the batch of the step that triggered the rollback
        skips = list(loader.skip_ranges)  # earlier rollbacks' skips stay, whatever the checkpoint remembers
        trainer = ckpt.restore(engine, target)
    loader.load_state_dict(trainer["loader"])
    for start, stop in skips:
        loader.skip(start, stop)
    # Skip the batches that led up to the trouble, from the checkpoint's position to skip_batches past the
    # one that triggered this (PaLM skipped 200-500 batches around each spike).
    skipped = [loader.batch, served + 1 + action.skip_batches]
    loader.skip(*skipped)
    stability.incidents[-1]["skipped"] = skipped
    if ckpt.rank == 0:
        # Durable now, not at the next save: a restart from here on keeps the skip and the count, and
        # never resumes on the trajectory just abandoned (checkpoints/rollbacks.py).
        rollbacks.record(ckpt.folder, {"from_step": verdict.step, "to_step": trainer["step"],
                                       "checkpoint": str(target), "skip_ranges": [list(r) for r in loader.skip_ranges],
                                       "stability": stability.state_dict()})
        retired = rollbacks.retire_after(ckpt.folder, trainer["step"])
    report(log, "rollback", from_step=verdict.step, to_step=trainer["step"], checkpoint=str(target),
           skipped_batches=skipped, rollbacks=stability.rollbacks,
           **({"retired": [p.name for p in retired]} if ckpt.rank == 0 and retired else {}))
    return trainer["step"]


def watch(forecast: Forecast | None, step: int, val_loss: float, log: RunLogger) -> None:
    """The eval beside its forecast; an off_forecast event once it has stayed outside the interval."""
    judged = forecast.judge(step, val_loss) if forecast is not None else None
    if judged is None:
        return
    log.print(f"[magenta]  forecast {judged['loss']:.4f} [{judged['lo']:.4f}, {judged['hi']:.4f}][/]"
              + (" [red]outside[/]" if judged["outside"] else ""))
    if judged["off"]:
        report(log, "off_forecast", step=step, observed=round(val_loss, 5), predicted=round(judged["loss"], 5),
               lo=round(judged["lo"], 5), hi=round(judged["hi"], 5), evals_outside=forecast.off_streak)


def evaluate(engine: Engine, windows: TokenWindows, cfg: Config) -> float:
    # A fresh loader each time: every evaluation scores the same held-out batches, so points compare. Its
    # seed is not the run's: runs that differ only in seed are scored on the same tokens.
    loader = BatchLoader(windows, cfg.train.global_batch_size, engine.dp_rank, engine.dp_size, seed=HELD_OUT_SEED)
    losses = [engine.eval_loss(*next(loader)) for _ in range(cfg.train.eval_batches)]
    return sum(losses) / len(losses)


def score_tasks(cfg: Config, engine: Engine, data_dir: Path, device: torch.device, env: RankEnv, log: RunLogger,
                beats: Beats, step: int) -> dict | None:
    """The capability suite of train.tasks on the final model, for the RunRecord (training/tasks.py)."""
    if not cfg.train.tasks:
        return None
    if env.world_size > 1:
        # engine.model is this rank's shard (FSDP, TP, a pipeline stage): scoring needs the whole model.
        log.print(f"train.tasks={cfg.train.tasks}: tasks are evaluated only in one-process runs for now; skipped")
        return None
    with beats.phase("eval", step), autocast(device, cfg.train.precision):  # the supervisor allows for an eval
        tasks = run_tasks(cfg.train.tasks, data_dir, engine.model, device, samples=cfg.train.task_samples,
                          context=cfg.data.seq_len, n_problems=cfg.train.task_problems)
    log.event("tasks", **{k: v for k, v in tasks.items() if k != "per_problem"})
    log.print(f"tasks ({tasks['source']}, {tasks['problems']} problems): pass rate {tasks['pass_rate']:.3f} "
              f"({tasks['samples']} samples), greedy {tasks['greedy_accuracy']:.3f}, "
              f"answer NLL {tasks['answer_nll']:.3f} nats/token")
    return tasks


def train(cfg: Config, env: RankEnv | None = None, on_beat: Callable[[dict], None] | None = None,
          on_event: Callable[[dict], None] | None = None) -> RunSummary:
    """Run (or resume) the training of `cfg` on this rank. `on_beat` receives every step's record and the
    phases between steps (the launcher's heartbeat; see Beats). `on_event`, when given, receives rank 0's
    events instead of events.jsonl (the supervisor writes them; see training/metrics.py)."""
    env = env or RankEnv.from_environ()
    dims = ParallelDims.of(cfg.parallel, env.world_size)
    check_layout(cfg, dims)
    if cfg.train.cpu_threads:
        torch.set_num_threads(cfg.train.cpu_threads)
    device = pick_device(cfg.train.device, env.local_rank)
    check_kernels(cfg, device, dims.tp)
    distributed = env.world_size > 1
    if distributed:
        init_distributed(device)
    try:
        return _train(cfg, env, dims, device, Beats(on_beat), on_event)
    finally:
        if distributed or dist.is_initialized():  # a one-process megatron-core engine starts its own group
            dist.destroy_process_group()
        # The run's model, optimizer and autograd state sit in reference cycles; left to the collector at
        # interpreter exit, freeing their tensors there can abort the process ("terminate called without
        # an active exception", seen under torchrun with the chunked loss: pytorch/pytorch#179291). Free
        # them now, while the interpreter is whole.
        gc.collect()


def _train(cfg: Config, env: RankEnv, dims: ParallelDims, device: torch.device, beats: Beats,
           on_event: Callable[[dict], None] | None) -> RunSummary:
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
    faults = FaultInjector(cfg.fault.inject, env.rank, run_dir)
    layout = {"dp_replicate": dims.dp_replicate, "dp_shard": dims.dp_shard, "tp": dims.tp, "pp": dims.pp}
    early_events: list[tuple[str, dict]] = []  # what restore has to say before the logger exists
    ckpt = Checkpointer(config_to_dict(cfg), Path(cfg.checkpoint.folder or run_dir / "checkpoints"), env.rank, env.world_size,
                        layout, event=lambda kind, **f: early_events.append((kind, f)), before_commit=faults.in_save)
    resume_from = ckpt.choose(cfg.checkpoint.resume)
    if cfg.checkpoint.resume == "never":
        ckpt.set_aside()
    log = RunLogger(cfg, run_dir, enabled=is_main, fresh=resume_from is None, send_event=on_event)
    ckpt.event = lambda kind, **f: report(log, kind, **f)
    for kind, fields in early_events:
        report(log, kind, **fields)
    if is_main:
        (run_dir / "config.yaml").write_text(dump_config(cfg))
    flops_per_token = training_flops_per_token(cfg.model, T)
    # Only rank 0 reports MFU; measuring on every rank at once would also share the cores being measured.
    peak, peak_source = peak_flops(device, cfg.train.precision) if is_main else (float("nan"), "")
    layout_text = " ".join(f"{k}={v}" for k, v in layout.items())
    log.print(f"run {run_dir} | data {data_dir} | {env.world_size} x {device.type} ({layout_text}) | MFU against "
              f"{peak / 1e12:.2f} TFLOP/s per device ({peak_source}), {flops_per_token / 1e6:.1f} MFLOP/token")
    if (slow := slow_precision_warning(device, cfg.train.precision)) is not None:
        log.print(f"[yellow]warning:[/] {slow}")
    # `fresh`: a run that starts from step 0 begins a new events.jsonl (a supervisor drops the lines from before it).
    log.event("run_start", steps=cfg.train.steps, world_size=env.world_size, device=str(device), layout=layout,
              fresh=resume_from is None)
    forecast = Forecast(cfg.train.forecast) if cfg.train.forecast and is_main else None
    if forecast is not None:
        log.print(f"[magenta]{forecast.opening_line(cfg.train.steps)}[/]")

    start_step, first_val = 0, None
    stability = Stabilizer(cfg.stability)
    if resume_from is not None:
        trainer = ckpt.restore(engine, resume_from)
        train_loader.load_state_dict(trainer["loader"])
        stability.load_state_dict(trainer["stability"])
        start_step, first_val = trainer["step"], trainer["first_val_loss"]
        # A rollback after this checkpoint was saved: carry on as the run did after it.
        rollback = rollbacks.pending(ckpt.folder, start_step) if resume_from.parent == ckpt.folder else None
        if rollback is not None:
            train_loader.skip_ranges = [tuple(r) for r in rollback["skip_ranges"]]
            stability.load_state_dict(rollback["stability"])
        report(log, "resumed", step=start_step, path=str(resume_from),
               **({"rollback_applied": rollback["from_step"], "skip_ranges": rollback["skip_ranges"]}
                  if rollback else {}))

    tokens_per_step = G * T
    start = time.perf_counter()
    if first_val is None:
        first_val = evaluate(engine, val_windows, cfg)
        log.eval(0, first_val)
    val_loss, loss, step_times, warned_mfu = first_val, float("nan"), [], False
    # A step's time runs from the end of the previous step's compute to the end of its own, so the
    # logging of the previous step is paid for; evaluation and checkpoint saves are excluded from
    # throughput (benchmarks/checkpoint.py measures what a save blocks).
    last = time.perf_counter()
    step = start_step
    while step < cfg.train.steps:
        step += 1
        scheduled_lr = lr_at(step - 1, cfg.optim.lr, cfg.train.steps, cfg.schedule) * faults.lr_factor(step)
        inputs, targets = next(train_loader)
        inputs, targets = faults.garbage(train_loader.batch - 1, inputs, targets, cfg.model.vocab_size)
        faults.slow(step)
        loss = engine.forward_backward(inputs, targets)
        faults.poison_gradients(step, engine.model)
        grad_norm = engine.clip_grad_norm(cfg.optim.grad_clip)
        # Judged before the update, so that an anomalous update can be dropped (see Stabilizer.drops).
        verdict, action = stability.judge(step, loss, grad_norm)
        lr = scheduled_lr * stability.lr_factor(step)  # after judging: a lower_lr taken now applies at once
        if stability.drops(verdict, action):
            engine.zero_grad()
        else:
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
        record = {"step": step, "loss": loss, "grad_norm": grad_norm, "lr": lr, "tokens": step * tokens_per_step,
                  "tokens_per_s": tokens_per_s, "step_s": dt, "mfu": mfu, "peak_mem_gb": peak_memory_gb(device),
                  "verdict": verdict.kind}
        log.step(record)
        beats.step(record)
        paused = time.perf_counter()
        if action is not None:
            resume_at = remediate(action, verdict, stability, engine, ckpt, train_loader, log, beats)
            if resume_at is not None:  # rolled back: carry on from the checkpoint's step
                step = resume_at
                last += time.perf_counter() - paused
                continue
        if step == cfg.train.steps or (cfg.train.eval_every and step % cfg.train.eval_every == 0):
            with beats.phase("eval", step):
                val_loss = evaluate(engine, val_windows, cfg)
            log.eval(step, val_loss)
            watch(forecast, step, val_loss, log)
        interval = cfg.checkpoint.interval
        if interval and (step % interval == 0 or step == cfg.train.steps):
            with beats.phase("save", step):
                ckpt.save(step, engine, {"step": step, "tokens": step * tokens_per_step, "first_val_loss": first_val,
                                         "loader": train_loader.state_dict(), "stability": stability.state_dict()})
        faults.after_step(step)
        last += time.perf_counter() - paused
    if start_step >= cfg.train.steps:
        log.print(f"the run was already complete at step {start_step}; to train again from scratch use "
                  f"--resume never or another train.name")
        val_loss = evaluate(engine, val_windows, cfg)
    with beats.phase("save", step):  # the last asynchronous save finishes writing
        ckpt.close()

    wall = time.perf_counter() - start
    steady = step_times[1:] or step_times
    mean_tps = tokens_per_step * len(steady) / sum(steady) if steady else float("nan")
    summary = RunSummary(run_dir=run_dir, steps=cfg.train.steps, tokens=cfg.train.steps * tokens_per_step,
                         final_loss=loss, val_loss=val_loss, first_val_loss=first_val, wall_s=wall,
                         tokens_per_s=mean_tps, mfu=flops_per_token * mean_tps / (peak * env.world_size),
                         incidents=stability.incidents)
    log.event("run_end", steps=summary.steps, tokens=summary.tokens, val_loss=val_loss, wall_s=wall)
    if forecast is not None:
        log.event("forecast_outcome", predicted=forecast.final, observed=val_loss)
        log.print(f"[magenta]{forecast.closing_line(val_loss)}[/]")
    tasks = score_tasks(cfg, engine, data_dir, device, env, log, beats, step)
    log.close()
    if is_main:  # after close: the record reads the eval curve back from metrics.jsonl
        write_record(build_record(cfg, run_dir, data_dir, tasks=tasks), run_dir)
    return summary
