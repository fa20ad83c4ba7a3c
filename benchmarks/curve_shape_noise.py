"""How well can one run's early loss curve be read off the ladder runs like it? (issue 14, the eval-curve aim)

The forecast's curve (scaling/curve_shapes.py) is the check run's ln L(f)/L(1) at each eval fraction f, read
off the ladder's runs of similar tokens per parameter with a kernel-weighted local line in ln(D/N). This
script asks the same of the ladder's own runs, after the fact: leave one run out, predict its shape from the
others, for the runs within e^±1 of the check run's D/N. That is the method's noise floor with no
extrapolation at all, to set beside the check run's own miss at the same fractions.

Reads each results folder's fit.json (`curve_shapes`), ladder.yaml and check.csv; writes nothing.

    python benchmarks/curve_shape_noise.py benchmarks/results/scaling/3e10_1e12_5 ...   # folders of ladders
"""
from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np
import yaml

from keel.scaling.curve_shapes import local_line

FRACTIONS = (0.1, 0.2, 0.5)   # the first eval (the warmup's end), the second, mid-run
NEAR = 1.0                    # in ln(D/N): the runs the check's forecast leans on most


def one_ladder(folder: Path) -> dict:
    shapes = json.loads((folder / "fit.json").read_text())["curve_shapes"]
    check = next(r for r in yaml.safe_load((folder / "ladder.yaml").read_text())["rungs"] if r["role"] == "check")
    rows = list(csv.DictReader((folder / "check.csv").read_text().splitlines()))
    at = np.array([float(r["step"]) for r in rows]) / check["steps"]
    observed = np.array([float(r["observed"]) for r in rows])
    xs, x_check = np.array(shapes["ratios"]), np.log(check["tokens"] / check["params"])
    near = [i for i in range(len(xs)) if abs(xs[i] - x_check) < NEAR]
    out = {"folder": folder.name, "runs": len(near)}
    for f in FRACTIONS:
        ys = np.array([np.interp(f, fr, v) for fr, v in zip(shapes["fractions"], shapes["log_losses"])])
        out[f"loo_{f}"] = [float(ys[i] - local_line(np.delete(xs, i), np.delete(ys, i), xs[i])) for i in near]
        out[f"check_{f}"] = float(np.interp(f, at, np.log(observed / observed[-1])) - local_line(xs, ys, x_check))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path)
    ladders = [one_ladder(folder) for folder in parser.parse_args().folders]
    print(f"{'ladder':26s}" + "".join(f"   f={f}: LOO rms  check" for f in FRACTIONS))
    for lad in ladders:
        print(f"{lad['folder']:26s}" + "".join(
            f"   {np.sqrt(np.mean(np.square(lad[f'loo_{f}']))) * 100:10.1f}%  {lad[f'check_{f}'] * 100:+5.1f}%"
            for f in FRACTIONS))
    for f in FRACTIONS:
        loo = np.concatenate([lad[f"loo_{f}"] for lad in ladders])
        misses = [lad[f"check_{f}"] for lad in ladders]
        print(f"f={f}: ladder runs left out {np.sqrt(np.mean(loo ** 2)) * 100:.2f}% rms (mean {loo.mean() * 100:+.2f}%, "
              f"{len(loo)} runs); check runs {min(misses) * 100:+.1f}% to {max(misses) * 100:+.1f}%, "
              f"{sum(m < 0 for m in misses)} of {len(misses)} below")


if __name__ == "__main__":
    main()
