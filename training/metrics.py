"""Where per-step numbers go: a rich progress bar and console lines, metrics.jsonl / events.jsonl in the
run directory, and wandb (offline by default). Only rank 0 writes; other ranks get a silent logger.

events.jsonl has one writer. Under the launcher's supervisor that is the supervisor, which also writes the
launcher's own events (failures, restarts, goodput): rank 0 hands it every training event (`send_event`,
carried with the heartbeats). A run without a supervisor (`--launcher inline`) writes the file itself."""
from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from .config import Config, config_to_dict


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    # ru_maxrss is in KiB on Linux: the whole process's high-water mark, the honest CPU figure.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def _fmt_step(r: dict) -> str:
    parts = [f"step {r['step']}", f"loss {r['loss']:.4f}", f"gnorm {r['grad_norm']:.3f}", f"lr {r['lr']:.2e}",
             f"{r['tokens_per_s']:,.0f} tok/s"]
    if r.get("mfu") is not None:
        parts.append(f"MFU {100 * r['mfu']:.1f}%")
    parts.append(f"mem {r['peak_mem_gb']:.2f} GB")
    return " | ".join(parts)


class RunLogger:
    def __init__(self, cfg: Config, run_dir: Path, enabled: bool = True, fresh: bool = True,
                 send_event: Callable[[dict], None] | None = None):
        self.cfg, self.run_dir, self.enabled, self._send_event = cfg, run_dir, enabled, send_event
        self._wandb = self._progress = self._task = self._events = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        mode = "w" if fresh else "a"
        self._metrics = open(run_dir / "metrics.jsonl", mode)
        if send_event is None:
            self._events = open(run_dir / "events.jsonl", mode)
        from rich.console import Console

        self.console = Console(file=sys.stdout, highlight=False)
        if cfg.logging.wandb.mode != "disabled":
            self._wandb = self._start_wandb()
        if cfg.logging.progress:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                      TimeRemainingColumn(), TextColumn("{task.fields[status]}"),
                                      console=self.console, transient=True)
            self._progress.start()
            self._task = self._progress.add_task("train", total=cfg.train.steps, status="")

    def _start_wandb(self):
        import os

        import wandb

        # Offline runs must not try the network at all; wandb's own console noise would fight the bar.
        os.environ.setdefault("WANDB_SILENT", "true")
        w = self.cfg.logging.wandb
        return wandb.init(project=w.project, entity=w.entity, mode=w.mode, dir=str(self.run_dir),
                          name=self.cfg.train.name, config=config_to_dict(self.cfg), reinit="finish_previous",
                          settings=wandb.Settings(console="off"))

    def print(self, message: str) -> None:
        if self.enabled:
            # soft_wrap: a log line stays one line even when stdout is a pipe (rich assumes 80 columns).
            self.console.print(message, soft_wrap=True)

    def step(self, record: dict) -> None:
        if not self.enabled:
            return
        self._metrics.write(json.dumps({"kind": "step", "time": time.time(), **record}) + "\n")
        self._metrics.flush()
        if self._wandb is not None:
            numbers = {f"train/{k}": v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
            self._wandb.log(numbers, step=record["step"])
        if self._progress is not None:
            self._progress.update(self._task, completed=record["step"],
                                  status=f"loss {record['loss']:.4f} | {record['tokens_per_s']:,.0f} tok/s")
        if record["step"] % self.cfg.logging.log_every == 0 or record["step"] == self.cfg.train.steps:
            self.print(_fmt_step(record))

    def eval(self, step: int, val_loss: float) -> None:
        if not self.enabled:
            return
        self._metrics.write(json.dumps({"kind": "eval", "time": time.time(), "step": step,
                                        "val_loss": val_loss}) + "\n")
        self._metrics.flush()
        if self._wandb is not None:
            self._wandb.log({"eval/loss": val_loss}, step=step)
        self.print(f"[cyan]eval[/] step {step} | val loss {val_loss:.4f}")

    def event(self, kind: str, **fields) -> None:
        """Something a person should know about (run start/end, later failures, spikes, restarts)."""
        if not self.enabled:
            return
        event = {"kind": kind, "time": time.time(), **fields}
        if self._send_event is not None:
            self._send_event(event)
            return
        self._events.write(json.dumps(event) + "\n")
        self._events.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        if self._progress is not None:
            self._progress.stop()
        if self._wandb is not None:
            self._wandb.finish()
        self._metrics.close()
        if self._events is not None:
            self._events.close()
