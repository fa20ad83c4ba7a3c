"""`keel scale run`: every rung of a ladder as its own supervised run, several at once, resumable.

The rungs share one Ray connection (embedded here, a cluster with --address); each is an ordinary
`keel train` run under the supervisor (launcher/raylaunch.py), so a crashed rung restarts like any run. A
rung whose run directory already holds a RunRecord for its full length is finished and not run again;
one that stopped half-way resumes from its checkpoint like any run would.
"""
from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..training.record import RECORD, eval_set_fingerprint
from .plan import Ladder, Rung

QUIET = ["logging.progress=false", "logging.log_every=1000000000"]


def run_dir(ladder: Ladder, rung: Rung) -> Path:
    return Path(ladder.output_dir) / rung.name


def finished(ladder: Ladder, rung: Rung) -> bool:
    """The rung's run directory holds a record of its full length, scored on the ladder's held-out set (a
    ladder planned again with another eval set runs its rungs again)."""
    path = run_dir(ladder, rung) / RECORD
    if not path.is_file():
        return False
    try:
        record = json.loads(path.read_text())
        return (record["schedule"]["steps"] == rung.steps
                and record["eval_set"] == eval_set_fingerprint(ladder.config(rung), record["data_fingerprint"]))
    except (ValueError, KeyError):
        return False


def progress_of(ladder: Ladder, rung: Rung) -> tuple[int, float | None]:
    """(last step logged, last eval loss) from the rung's metrics.jsonl."""
    path = run_dir(ladder, rung) / "metrics.jsonl"
    step, loss = 0, None
    try:
        for line in path.read_text().splitlines()[-200:]:
            row = json.loads(line)
            step = max(step, row.get("step", 0)) if row.get("kind") == "step" else step
            loss = row["val_loss"] if row.get("kind") == "eval" else loss
    except (OSError, ValueError):
        pass
    return step, loss


def run_ladder(ladder: Ladder, roles: tuple[str, ...] = ("ladder",), address: str | None = None,
               parallel: int | None = None, show: bool = True) -> dict[str, str]:
    """Run the rungs of `roles` that are not finished; returns {rung name: done | skipped | failed: why}."""
    from ..launcher.cluster import connect  # imports Ray: only when a ladder really runs
    from ..launcher.raylaunch import train_on_ray

    rungs = [r for r in ladder.rungs if r.role in roles]
    status = {r.name: "done (earlier)" if finished(ladder, r) else "queued" for r in rungs}
    todo = sorted((r for r in rungs if status[r.name] == "queued"), key=lambda r: -r.flops)  # longest first
    if not todo:
        return status
    conn = connect(address)
    try:
        cpus = conn.cpus()
        parallel = max(1, min(parallel or int(cpus), len(todo)))
        per_run = max(1.0, cpus // parallel) if conn.embedded else 1.0
        threads = [f"train.cpu_threads={int(per_run)}"] if conn.embedded else []
        lock = threading.Lock()

        def one(rung: Rung) -> None:
            with lock:
                status[rung.name] = "running"
            try:
                train_on_ray(ladder.base, [*ladder.run_overrides(rung), *QUIET, *threads], address=address,
                             cpus_per_worker=per_run)
                result = "done" if finished(ladder, rung) else "failed: no record written"
            except Exception as e:  # noqa: BLE001 - one failed rung must not stop the others; it is reported
                result = f"failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
            with lock:
                status[rung.name] = result

        with ThreadPoolExecutor(parallel) as pool:
            futures = [pool.submit(one, r) for r in todo]
            if show:
                _watch(ladder, rungs, status, futures)
            for f in futures:
                f.result()
    finally:
        conn.close()
    return status


def _watch(ladder: Ladder, rungs: list[Rung], status: dict[str, str], futures) -> None:
    from rich.live import Live
    from rich.table import Table

    def table() -> Table:
        t = Table(title=f"ladder {ladder.output_dir}", expand=False)
        for col in ("run", "budget", "N", "tokens", "steps", "status", "val loss"):
            t.add_column(col, justify="left" if col in ("run", "status") else "right")
        for r in rungs:
            step, loss = progress_of(ladder, r)
            state = status[r.name]
            t.add_row(r.name, f"{r.budget:.2g}", f"{r.params / 1e3:.0f}k", f"{r.tokens / 1e6:.2f}M",
                      f"{step}/{r.steps}", state, "" if loss is None else f"{loss:.4f}",
                      style="green" if state.startswith("done") else "red" if state.startswith("failed") else None)
        return t

    with Live(table(), refresh_per_second=1) as live:
        while not all(f.done() for f in futures):
            time.sleep(1.0)
            live.update(table())
        live.update(table())
