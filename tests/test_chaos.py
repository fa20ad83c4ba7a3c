"""The chaos soak, short version: a supervised 2-rank run survives four faults of different kinds (a killed
training process, a corrupted checkpoint shard, an exception, a kill while a checkpoint is written), each
detected and recovered from, ends with the clean run's final loss, bit for bit, and loses no committed
checkpoint (benchmarks/chaos.py)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import ray  # noqa: F401 - a requirement of keel: a broken install must fail, not skip

ROOT = Path(__file__).parent.parent


@pytest.mark.timeout(600)
def test_short_chaos_soak_detects_and_recovers_every_fault_and_ends_with_the_clean_final_loss(tmp_path):
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", WANDB_MODE="disabled")
    # The prepared corpus comes from the test session's own cache (conftest sets KEEL_CACHE).
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "chaos.py"), "--short", "--out", str(tmp_path),
                           "--workdir", str(tmp_path / "runs")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    tail = (proc.stdout + proc.stderr)[-4000:]
    assert proc.returncode == 0, tail
    assert "every fault detected and recovered" in proc.stdout, tail
    summary = json.loads((tmp_path / "chaos.json").read_text())
    assert summary["ok"] and summary["problems"] == []
    assert summary["run_finished"] and summary["all_detected"] and summary["all_recovered"]
    assert summary["loss"]["ok"] and summary["checkpoints"]["ok"]
    # Infrastructure faults only: the strict rule applies (identical to rel 1e-6), not the data-fault 1%.
    assert "identical" in summary["loss"]["rule"]
    assert summary["loss"]["chaos_final"] == pytest.approx(summary["loss"]["clean_final"], rel=1e-6)
    faults = summary["faults"]
    assert len(faults) == 4 and len({f["kind"] for f in faults}) == 4
    assert all(f["injected"] and f["detected"] and f["recovered"] for f in faults)
    assert (tmp_path / "chaos.csv").read_text().count("\n") == 5
    assert (tmp_path / "chaos.png").stat().st_size > 0
