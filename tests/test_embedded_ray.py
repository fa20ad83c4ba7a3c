"""The embedded Ray is lean: it runs no process the run does not use.

Every `keel train` on one machine runs beside the Ray instance that supervises it, and on a machine whose
cores all train, whatever Ray's processes take comes out of the training's tokens/s (benchmarks/RESULTS.md,
supervision cost). A real embedded instance is started the way `keel train` starts it, in a subprocess
(this test's own process may hold another Ray), with one actor, as a one-process run has.
"""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(120)
ROOT = Path(__file__).parent.parent

SCRIPT = textwrap.dedent("""
    import json, os, time
    from keel.launcher.cluster import connect
    conn = connect(None, num_cpus=2)
    import ray, psutil

    @ray.remote
    class Rank:
        def ping(self):
            print("rank says hello", flush=True)
            return os.getpid()

    rank = Rank.remote()
    ray.get(rank.ping.remote())
    time.sleep(3)  # Ray starts the workers it keeps waiting for tasks right after a driver connects
    tree = psutil.Process().children(recursive=True)
    print(json.dumps({"names": sorted(p.name() for p in tree),
                      "scripts": sorted(os.path.basename(a) for p in tree for a in p.cmdline() if a.endswith(".py"))}))
    conn.close()
""")


def test_the_embedded_ray_keeps_no_idle_worker_beside_the_run():
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # embedded, not a cluster named outside
    result = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=100)
    assert result.returncode == 0, result.stderr[-3000:]
    tree = json.loads(result.stdout.splitlines()[-1])
    names, scripts = tree["names"], tree["scripts"]
    assert "raylet" in names and "ray::Rank" in names, names  # the instance and its actor are there
    assert "rank says hello" in result.stdout + result.stderr  # the actor's output still reaches the driver
    # With Ray's defaults, one worker per CPU is started and kept waiting (ray::IDLE), 0.6% of a core each.
    assert not [n for n in names if n == "ray::IDLE"], names
    # Nor does it start what a head serves a cluster with: the autoscaler's monitor and the job/state API
    # server, both Python processes named for their script.
    assert "monitor.py" not in scripts and "dashboard.py" not in scripts, scripts
    assert "log_monitor.py" in scripts, scripts  # the psutil view does see Ray's Python processes
