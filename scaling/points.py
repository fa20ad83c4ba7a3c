"""What the fits are fitted to: one point per finished run, from run directories, a ladder or a CSV.

Runs are only comparable when they were measured alike, so loading refuses (one line, with the fix):
runs on different data or tokenizers, runs scored on different held-out sets, and final losses taken
where the schedule had not finished decaying (a cosine whose horizon is more than 25% off the run's
length, or a WSD run evaluated in its stable phase: Hoffmann et al. 2022, Appendix B; Hägele et al. 2024).
A CSV of published points (columns params, tokens, loss; optional flops, budget, name) lets a user refit
a paper's data.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

from ..training.record import RECORD, RunRecord, read_record
from .plan import Ladder, LadderError

HORIZON_TOLERANCE = 0.25


@dataclass
class Point:
    name: str
    params: float          # N (non-embedding)
    tokens: float          # D
    flops: float           # C (exact when known, else 6ND)
    loss: float            # final held-out loss
    budget: float | None = None   # the IsoFLOP budget it was planned for, when known
    record: RunRecord | None = field(default=None, repr=False)


def load_points(sources: list[str | Path], roles: tuple[str, ...] = ("ladder",)) -> list[Point]:
    """Points from run directories (record.json), ladder files (their finished rungs of `roles`) and CSVs."""
    points: list[Point] = []
    for source in map(Path, sources):
        if source.is_dir():
            if (source / RECORD).is_file():
                points.append(from_record(read_record(source)))
            else:  # a folder of runs
                found = sorted(p.parent for p in source.glob(f"*/{RECORD}"))
                if not found:
                    raise LadderError(f"{source} holds no {RECORD}: point at finished runs, a ladder file or a CSV")
                points += [from_record(read_record(p)) for p in found]
        elif source.suffix == ".csv":
            points += read_csv(source)
        elif source.suffix in (".yaml", ".yml"):
            ladder = Ladder.load(source)
            for rung in ladder.rungs:
                path = Path(ladder.output_dir) / rung.name
                if rung.role in roles and (path / RECORD).is_file():
                    points.append(from_record(read_record(path), budget=rung.budget))
        else:
            raise LadderError(f"{source}: not a run directory, a ladder (.yaml) or a CSV (.csv)")
    if not points:
        raise LadderError(f"no finished runs in {', '.join(map(str, sources))}; run the ladder first "
                          f"(keel scale run LADDER)")
    check_comparable([p.record for p in points if p.record is not None])
    return points


def from_record(r: RunRecord, budget: float | None = None) -> Point:
    check_endpoint(r)
    return Point(r.name, r.non_embedding_params, r.tokens, r.flops, r.final_loss, budget, r)


def read_csv(path: Path) -> list[Point]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    need = {"params", "tokens", "loss"}
    if not rows or not need <= set(rows[0]):
        raise LadderError(f"{path}: a CSV of points needs the columns params, tokens and loss (optional: flops, "
                          f"budget, name); it has {', '.join(rows[0]) if rows else 'no rows'}")
    out = []
    for i, row in enumerate(rows):
        try:
            n, d, loss = float(row["params"]), float(row["tokens"]), float(row["loss"])
            c = float(row["flops"]) if row.get("flops") else 6 * n * d
            b = float(row["budget"]) if row.get("budget") else None
        except ValueError:
            raise LadderError(f"{path} row {i + 2}: params, tokens, loss (and flops, budget) must be numbers") from None
        out.append(Point(row.get("name") or f"{path.stem}-{i}", n, d, c, loss, b))
    return out


def check_endpoint(r: RunRecord) -> None:
    """A final loss taken before the schedule finished decaying understates what the run would reach."""
    s = r.schedule
    last = r.eval_curve[-1]["step"] if r.eval_curve else 0
    if s["name"] == "cosine" and abs(s["steps"] - last) > HORIZON_TOLERANCE * s["steps"]:
        raise LadderError(f"{r.name}: its loss was taken at step {last} of a cosine schedule {s['steps']} steps "
                          f"long (> {HORIZON_TOLERANCE:.0%} off): set the horizon to the run length")
    if s["name"] == "wsd" and last < s["steps"]:
        raise LadderError(f"{r.name}: evaluated at step {last}, in the stable phase of its WSD schedule; fit the "
                          f"end of a cool-down (a run that decays to its last step)")
    if r.final_loss != r.final_loss:  # NaN: the run did not finish
        raise LadderError(f"{r.name}: no final eval loss (the run did not finish); re-run it or leave it out")


def check_comparable(records: list[RunRecord]) -> None:
    for what, key in (("data", "data_fingerprint"), ("tokenizers", "tokenizer"), ("held-out sets", "eval_set"),
                      ("sequence lengths", "seq_len")):
        values = {getattr(r, key) for r in records}
        if len(values) > 1:
            names = {v: next(r.name for r in records if getattr(r, key) == v) for v in values}
            raise LadderError(f"the runs mix {len(values)} {what} ({', '.join(f'{k} in {n}' for k, n in names.items())}): "
                              f"fit runs measured alike, or fit each group separately")
