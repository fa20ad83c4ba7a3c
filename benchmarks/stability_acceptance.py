"""Issue 7's acceptance runs on configs/tiny.yaml itself (the CI tests use the test-sized model):

    python benchmarks/stability_acceptance.py garbage   # clean 300 steps, garbage at steps 150-160, lr x100 at 200-205
    python benchmarks/stability_acceptance.py clean     # three clean 500-step runs (seeds 1-3): no alarm expected

Default stability policy, a checkpoint every 10 steps; prints one RESULT line per run (final validation
loss and the incidents) and, for garbage, the relative difference from the clean run (target <= 2%).
"""
import sys
import tempfile
import time
from pathlib import Path

from keel.training.config import load_config
from keel.training.loop import train

ROOT = Path(__file__).resolve().parent.parent
OUT = tempfile.mkdtemp(prefix="keel-stability-acceptance-")


def run(name, *overrides):
    cfg = load_config(ROOT / "configs" / "tiny.yaml",
                      ["logging.wandb.mode=disabled", "logging.progress=false", f"train.output_dir={OUT}",
                       f"train.name={name}", "checkpoint.resume=never", "checkpoint.interval=10", *overrides])
    t = time.time()
    summary = train(cfg)
    print(f"RESULT {name}: val {summary.val_loss:.4f} incidents {summary.incidents} ({time.time() - t:.0f}s)",
          flush=True)
    return summary


if __name__ == "__main__":
    if sys.argv[1:] == ["garbage"]:
        clean = run("clean")
        bad = run("garbage", "fault.inject=[garbage@150-160]")
        print(f"RESULT garbage vs clean: {abs(bad.val_loss - clean.val_loss) / clean.val_loss:.4f} relative "
              f"(target <= 0.02)", flush=True)
        run("lr_spike", "fault.inject=[lr_spike@200-205]")
    elif sys.argv[1:] == ["clean"]:
        for seed in (1, 2, 3):
            run(f"clean500_{seed}", "train.steps=500", f"train.seed={seed}")
    else:
        raise SystemExit(__doc__)
