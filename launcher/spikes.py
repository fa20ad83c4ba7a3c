"""`keel spikes RUN_DIR`: the loss anomalies of a run and what was done about them, as a table and a plot."""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def plot(run_dir: Path, steps: list[dict], anomalies: list[dict], rollbacks: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Each pass over a stretch of steps is its own line: after a rollback the steps run again.
    passes, current = [], []
    for r in steps:
        if current and r["step"] <= current[-1]["step"]:
            passes.append(current)
            current = []
        current.append(r)
    passes.append(current)
    fig, axes = plt.subplots(2, 1, figsize=(11, 6), sharex=True)
    for ax, key, label in ((axes[0], "loss", "loss"), (axes[1], "grad_norm", "gradient norm")):
        for i, p in enumerate(passes):
            ax.plot([r["step"] for r in p], [r[key] for r in p], lw=1, color="C0" if i == 0 else f"C{i % 9 + 1}",
                    label="first pass" if i == 0 else f"after rollback {i}")
        # The record an anomaly judged is the last one of its step logged before it (replays come later).
        judged = [(a["step"], r[key]) for a in anomalies
                  for r in [max((r for r in steps if r["step"] == a["step"] and r["time"] <= a["time"]),
                                key=lambda r: r["time"], default=None)] if r is not None]
        ax.scatter([s for s, _ in judged], [v for _, v in judged], color="red", marker="x", zorder=3,
                   label="anomaly")
        for rb in rollbacks:
            ax.axvspan(rb["to_step"], rb["from_step"], color="orange", alpha=0.15)
        ax.set_ylabel(label)
        ax.set_yscale("log" if key == "grad_norm" else "linear")
    axes[0].legend(loc="upper right", fontsize=8)
    axes[1].set_xlabel("step (shaded: rolled back)")
    axes[0].set_title(f"{run_dir.name}: {len(anomalies)} anomalies, {len(rollbacks)} rollbacks")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def cmd_spikes(args) -> None:
    from rich.console import Console
    from rich.table import Table

    run_dir = Path(args.run_dir)
    steps = [r for r in _records(run_dir / "metrics.jsonl") if r.get("kind") == "step"]
    if not steps:
        raise SystemExit(f"keel: error: {run_dir / 'metrics.jsonl'} has no steps; pass a run folder such as runs/tiny")
    events = _records(run_dir / "events.jsonl")
    anomalies = [e for e in events if e["kind"] == "anomaly"]
    rollbacks = [e for e in events if e["kind"] == "rollback"]
    table = Table(title=f"{run_dir}: {len(anomalies)} anomalies, {len(rollbacks)} rollbacks", title_justify="left")
    for col in ("step", "verdict", "reason", "action", "rolled back to", "skipped batches"):
        table.add_column(col)
    for a in anomalies:
        rb = next((r for r in rollbacks if r["from_step"] == a["step"] and r["time"] >= a["time"]), None)
        table.add_row(str(a["step"]), a["verdict"], a["reason"], a["action"], str(rb["to_step"]) if rb else "",
                      "{}..{}".format(rb["skipped_batches"][0], rb["skipped_batches"][1] - 1) if rb else "")
    Console(highlight=False).print(table, soft_wrap=True)
    out = Path(args.out) if args.out else run_dir / "spikes.png"
    plot(run_dir, steps, anomalies, rollbacks, out)
    print(f"wrote {out}")


def add_spikes_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("spikes", help="loss anomalies of a run and the actions taken: table and plot (PNG)")
    p.add_argument("run_dir", help="a run folder, e.g. runs/tiny")
    p.add_argument("--out", help="PNG path (default: RUN_DIR/spikes.png)")
    p.set_defaults(func=cmd_spikes)
