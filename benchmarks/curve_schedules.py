"""The loss-curve law on real keel runs: two schedules' curves of one model predict a third schedule's.

Issue 14 asks that, on real runs, two fitted curves predict a third schedule's final loss within 2%.
One model is trained three times: the ladders' 33k-parameter shape (dim 32, 2 layers, 4 heads), sequence length 64,
batch 16, the same seed, length and peak learning rate. Only the schedule differs:
- cosine: to 10% of the peak;
- constant: flat after the warmup;
- WSD: warmup, stable, then the last 20% decaying to 10%.

Each is a supervised `keel train` run on the embedded Ray, on the embedded corpus. Then each schedule in turn is
held out. Tissue et al.'s law (scaling/curve.py, L = L0 + A S1^-a - C S2) is fitted to the other two runs' eval
curves, and predicts the held-out run's final loss and every eval after its first tenth. The annealing
momentum's decay lambda is fitted too (the grid scaling/curve.py DECAYS, the lowest objective); beside each
prediction the script prints what Tissue et al.'s fixed 0.999 would have given. The headline is WSD, predicted
from cosine and constant; all three are printed.

    python benchmarks/curve_schedules.py                 # 3 runs x 3000 steps, ~4 minutes on 2 cores
    python benchmarks/curve_schedules.py --steps 600     # the short version (tests/test_curve_schedules.py)

Writes curve_schedules.csv (every predicted eval) and curve_schedules.png under --out, the runs under --out/runs.
A run whose record is already there for the same length is not trained again.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCHEDULES = {"cosine": ["schedule.name=cosine"], "constant": ["schedule.name=constant"],
             "wsd": ["schedule.name=wsd", "schedule.decay_fraction=0.2"]}
HEADLINE = "wsd"


def overrides(name: str, steps: int, lr: float, seed: int, out: Path) -> list[str]:
    return ["data.seq_len=64", "model.max_seq_len=64", "model.dim=32", "model.n_layers=2", "model.n_heads=4",
            "model.n_kv_heads=4", "model.ffn_dim=null", "train.global_batch_size=16", "train.micro_batch_size=16",
            f"train.steps={steps}", f"train.eval_every={max(1, steps // 20)}", "train.eval_batches=32",
            f"schedule.warmup_steps={max(1, steps // 20)}", "schedule.min_lr_ratio=0.1", f"optim.lr={lr}",
            "checkpoint.interval=0", "logging.wandb.mode=disabled", "logging.progress=false",
            "logging.log_every=1000000000", f"train.seed={seed}", f"train.output_dir={out}", f"train.name={name}",
            *SCHEDULES[name]]


def train(names: list[str], steps: int, lr: float, seed: int, out: Path) -> dict:
    """Each schedule's RunRecord, training the ones not already recorded at this length."""
    from keel.launcher.cluster import connect
    from keel.launcher.raylaunch import train_on_ray
    from keel.training.record import RECORD, read_record

    runs = out / "runs"
    todo = [n for n in names if not ((runs / n / RECORD).is_file()
                                     and json.loads((runs / n / RECORD).read_text())["schedule"]["steps"] == steps)]
    if todo:
        conn = connect(None)  # one embedded Ray for every run (each train_on_ray finds it connected)
        try:
            for name in todo:
                train_on_ray(str(ROOT / "configs" / "tiny.yaml"), overrides(name, steps, lr, seed, runs))
        finally:
            conn.close()
    return {name: read_record(runs / name) for name in names}


def held_out_predictions(records: dict, decay) -> list[dict]:
    """For each schedule: the law fitted on the other two (at `decay`, or the best of several), its prediction
    at each of the held-out run's fitted evals (scaling/shared_curve.py fitted_evals: after the warmup and the
    first tenth)."""
    import numpy as np

    from keel.scaling.curve import fit_curve
    from keel.scaling.shared_curve import fitted_curve

    def curve(r):  # every run has the same batch: its own learning rates
        return fitted_curve(r, r.batch_tokens)

    out = []
    for held in records:
        others = [n for n in records if n != held]
        law = fit_curve([curve(records[n]) for n in others], decay=decay)
        target = curve(records[held])
        predicted = law.predict(target.lr, target.steps)
        errors = target.loss / predicted - 1
        out.append({"held_out": held, "fitted_on": others, "law": law, "steps": target.steps.tolist(),
                    "predicted": predicted.tolist(), "observed": target.loss.tolist(), "errors": errors.tolist(),
                    "final_error": float(errors[-1]), "worst_error": float(np.max(np.abs(errors)))})
    return out


def write_outputs(results: list[dict], records: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(out / "curve_schedules.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["held_out", "fitted_on", "step", "predicted", "observed", "error"])
        for r in results:
            for s, p, o, e in zip(r["steps"], r["predicted"], r["observed"], r["errors"]):
                w.writerow([r["held_out"], "+".join(r["fitted_on"]), s, f"{p:.6f}", f"{o:.6f}", f"{e:+.5f}"])
    fig, ax = plt.subplots(figsize=(8, 5))
    for k, r in enumerate(results):
        rec = records[r["held_out"]]
        steps = [e["step"] for e in rec.eval_curve if e["step"] > 0]
        ax.plot(steps, [e["loss"] for e in rec.eval_curve if e["step"] > 0], "o", ms=4, color=f"C{k}",
                label=f"{r['held_out']}: observed")
        ax.plot(r["steps"], r["predicted"], "-", color=f"C{k}",
                label=f"{r['held_out']}: predicted from {' + '.join(r['fitted_on'])}")
    ax.set(xlabel="step", ylabel="eval loss", ylim=(None, 2.6),
           title="Each schedule's curve predicted by the curve law fitted to the other two")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "curve_schedules.png", dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3000, help="every run's length (default 3000)")
    ap.add_argument("--lr", type=float, default=0.005, help="the peak learning rate of every run")
    ap.add_argument("--seed", type=int, default=0, help="every run's seed (weights and data order)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "curve_schedules"))
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records = train(list(SCHEDULES), args.steps, args.lr, args.seed, out)
    from keel.scaling.curve import DECAY, DECAYS

    results = held_out_predictions(records, DECAYS)
    fixed = {r["held_out"]: r for r in held_out_predictions(records, DECAY)}
    write_outputs(results, records, out)
    print(f"one model ({records[HEADLINE].non_embedding_params} parameters), {args.steps} steps, peak lr {args.lr}, "
          f"seed {args.seed}; the law fitted to two schedules, its annealing decay lambda chosen by the fit:")
    for r in sorted(results, key=lambda r: r["held_out"] != HEADLINE):
        law, base = r["law"], fixed[r["held_out"]]
        print(f"  {r['held_out']:>8} from {' + '.join(r['fitted_on']):<17} final: predicted {r['predicted'][-1]:.4f}, "
              f"observed {r['observed'][-1]:.4f} ({100 * r['final_error']:+.2f}%); worst of {len(r['steps'])} evals "
              f"{100 * r['worst_error']:.2f}%  [lambda {law.decay}; at Tissue et al.'s {DECAY}: final "
              f"{100 * base['final_error']:+.2f}%, worst {100 * base['worst_error']:.2f}%]")
    print(f"wrote {out}/ (curve_schedules.csv, curve_schedules.png)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
