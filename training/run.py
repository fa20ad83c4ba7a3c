"""Config file + overrides -> a finished run, with user errors reported as one line.

Shared by `keel train` and `python -m keel.training` (which is what torchrun starts).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import sys
from typing import TYPE_CHECKING, Callable, TypeVar

if TYPE_CHECKING:
    from .loop import RunSummary

T = TypeVar("T")


# Where each user error is defined, relative to this package.
USER_ERRORS = ((".config", "ConfigError"), (".corpus", "DataError"), ("..parallel.dims", "LayoutError"),
               ("..checkpoints.manager", "CheckpointError"), (".stability", "StabilityError"),
               ("..checkpoints.hf_config", "HFFormatError"))


def user_errors() -> tuple[type[Exception], ...]:
    """Errors caused by what the user asked for: shown as one line, no traceback unless --debug, and never
    retried by the supervisor (a restart would only repeat them). The one list of them.

    Only those whose module is already loaded: an exception of a class never defined cannot have been
    raised, and importing them all to ask would load torch (checkpoints/) and numpy (the corpus) into every
    command that fails, `keel list` with no cluster included, and into `keel train` on Ray, whose driver
    only validates and supervises."""
    loaded = ((sys.modules.get(importlib.util.resolve_name(module, __package__)), name)
              for module, name in USER_ERRORS)
    return tuple(getattr(module, name) for module, name in loaded if module is not None)


def guarded(fn: Callable[[], T], debug: bool = False) -> T:
    try:
        return fn()
    except Exception as e:
        if debug or not isinstance(e, user_errors()):
            raise
        print(f"keel: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def summary_line(s: dict) -> str:
    """A run's closing line, the same whether it trained here or under the supervisor: `s` holds
    RunSummary's fields (a dict, as a rank sends them to the Ray driver)."""
    mfu = f", MFU {100 * s['mfu']:.1f}%" if s.get("mfu") is not None else ""
    incidents = s.get("incidents") or []
    return (f"done: {s['steps']} steps, {s['tokens'] / 1e6:.2f}M tokens in {s['wall_s']:.0f}s "
            f"({s['tokens_per_s']:,.0f} tok/s{mfu}); final loss {s['final_loss']:.4f}, val loss "
            f"{s['first_val_loss']:.3f} -> {s['val_loss']:.3f} nats/token; run dir {s['run_dir']} "
            f"(config.yaml, metrics.jsonl, events.jsonl, wandb/)"
            + (f"; {len(incidents)} loss anomalies handled: "
               + ", ".join(f"step {i['step']} {i['kind']} -> {i['action']}" for i in incidents)
               if incidents else ""))


def train_from_file(config: str, overrides: list[str]) -> RunSummary:
    from .config import load_config
    from .loop import RankEnv, train

    env = RankEnv.from_environ()
    summary = train(load_config(config, overrides), env)
    if env.rank == 0:
        print(summary_line(dataclasses.asdict(summary)))
    return summary


def add_train_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config, e.g. configs/tiny.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set optim.lr=3e-4 (repeatable)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for configuration errors")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m keel.training", description="Run the training loop "
                                     "in this process (what torchrun starts on each rank).")
    add_train_args(parser)
    args = parser.parse_args(argv)
    guarded(lambda: train_from_file(args.config, args.overrides), args.debug)
