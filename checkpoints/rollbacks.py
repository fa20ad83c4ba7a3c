"""Rollbacks made durable at once: the ledger of what a rollback decided, and the retired checkpoints.

A loss-spike rollback restores an older checkpoint and tells the data loader to skip the batches that led
to the trouble. Until the next save that decision lived only in memory: a restart in between resumed as if
nothing had happened and served the bad batches again. And the checkpoints saved on the abandoned
trajectory (after the one rolled back to) stayed committed, so `--resume auto` would pick one of them.

So at the moment of a rollback, rank 0 (1) appends an entry to `rollbacks.json` in the checkpoint folder
(written durably: a reader sees the old list or the whole new one) holding the step rolled back to, the
loader's skip ranges and the spike detector's state as the uninterrupted run carries on with them, and
(2) renames every committed checkpoint after that step to `step_XXXXXXX.retired`: never chosen by a
resume, removed by retention at the next commit. A resume from a checkpoint no newer than the last
rollback's target applies that entry, so it continues exactly as the run did.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from . import manifest as mf

LEDGER = "rollbacks.json"
RETIRED = ".retired"


def record(folder: Path, entry: dict) -> None:
    """Append `entry` (to_step, from_step, skip_ranges, stability, ...) to the folder's ledger."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    mf.write_json_durably(folder / LEDGER, {"rollbacks": [*read(folder), entry]})


def read(folder: Path) -> list[dict]:
    path = Path(folder) / LEDGER
    return json.loads(path.read_text())["rollbacks"] if path.is_file() else []


def pending(folder: Path, resumed_step: int) -> dict | None:
    """The ledger entry a resume from `resumed_step` must apply: the last rollback, if it went back to
    this step or earlier (a checkpoint saved after it already holds its decisions)."""
    entries = read(folder)
    return entries[-1] if entries and entries[-1]["to_step"] >= resumed_step else None


def retire_after(folder: Path, step: int) -> list[Path]:
    """Set aside the committed checkpoints of steps after `step` (the abandoned trajectory)."""
    retired = []
    for e in mf.entries(folder):
        if e.committed and e.step > step:
            target = e.path.with_name(e.path.name + RETIRED)
            shutil.rmtree(target, ignore_errors=True)  # one retired earlier at the same step
            os.rename(e.path, target)
            retired.append(target)
    if retired:
        mf.fsync_dir(Path(folder))
    return retired


def remove_retired(folder: Path) -> None:
    for p in Path(folder).glob(f"step_*{RETIRED}"):
        shutil.rmtree(p, ignore_errors=True)
