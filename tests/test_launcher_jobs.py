"""`keel submit/status/logs/stop/list` against a real `ray start --head` on loopback with token auth.

The head is started by this module (its own ports and temp dir, `--block` so that terminating that one
process stops exactly this cluster; never `ray stop`, which would stop every Ray on the machine).
"""
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("ray")
pytestmark = pytest.mark.timeout(240)
ROOT = Path(__file__).parent.parent
TOKEN = secrets.token_hex(32)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")  # no ~/.ray/auth_token of the user's is read or written
    gcs, dash = free_port(), free_port()
    env = {**os.environ, "HOME": str(home), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": TOKEN,
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "WANDB_MODE": "disabled",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    ray_bin = str(Path(sys.executable).parent / "ray")
    proc = subprocess.Popen([ray_bin, "start", "--head", "--block", "--num-cpus", "2", "--port", str(gcs),
                             "--dashboard-port", str(dash), "--dashboard-host", "127.0.0.1",
                             "--node-ip-address", "127.0.0.1", "--include-dashboard", "true",
                             "--disable-usage-stats", "--temp-dir", str(tmp_path_factory.mktemp("ray"))],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    deadline = time.time() + 60
    while time.time() < deadline:
        if keel("list", "--address", url, home=home).returncode == 0:
            break
        time.sleep(1)
    else:
        proc.kill()
        pytest.fail("the Ray head did not come up in 60 s")
    yield {"url": url, "home": home}
    # `ray start --block` stops the processes it started when it is told to stop.
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def keel(*args, home, token=TOKEN, timeout=120):
    env = {**os.environ, "HOME": str(home), "WANDB_MODE": "disabled"}
    for k in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        env.pop(k, None)
    if token is not None:
        env["RAY_AUTH_TOKEN"] = token
    return subprocess.run([sys.executable, "-m", "keel.launcher.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=timeout)


def sets(*items):
    return [a for item in items for a in ("--set", item)]


@pytest.fixture
def job_dir(tmp_path):
    wd = tmp_path / "project"
    wd.mkdir()
    shutil.copy(ROOT / "configs" / "tiny.yaml", wd / "tiny.yaml")
    return wd


def wait_for(head, job, states, timeout=150):
    deadline = time.time() + timeout
    while time.time() < deadline:
        out = keel("status", job, "--address", head["url"], home=head["home"]).stdout
        if any(f": {s}" in out for s in states):
            return out
        time.sleep(1)
    raise AssertionError(f"{job} never reached {states}: {out}")


def test_submit_runs_the_job_and_status_logs_list_report_it(head, job_dir, corpus_dir, tiny_overrides, tmp_path):
    out = tmp_path / "runs"
    sub = keel("submit", str(job_dir / "tiny.yaml"), "--working-dir", str(job_dir), "--address", head["url"], "--python",
               sys.executable, *sets(*tiny_overrides, "parallel.dp_shard=2", "train.micro_batch_size=4",
                                     "train.steps=5", f"data.path={corpus_dir}", f"train.output_dir={out}"),
               home=head["home"])
    assert sub.returncode == 0, sub.stderr
    job = sub.stdout.strip().splitlines()[-1]
    assert job.startswith("keel-tiny-")
    status = wait_for(head, job, ["SUCCEEDED", "FAILED", "STOPPED"])
    logs = keel("logs", job, "--address", head["url"], home=head["home"]).stdout
    assert f"{job}: SUCCEEDED" in status, status + logs[-3000:]
    assert "exit code 0" in status
    assert "2 workers on Ray cluster" in logs and "done: 5 steps" in logs and "(rank0 pid=" in logs
    assert (out / "tiny" / "metrics.jsonl").is_file()
    listed = keel("list", "--address", head["url"], home=head["home"]).stdout
    assert job in listed and "SUCCEEDED" in listed


def test_stop_ends_a_running_job(head, job_dir, corpus_dir, tiny_overrides, tmp_path):
    sub = keel("submit", str(job_dir / "tiny.yaml"), "--working-dir", str(job_dir), "--address", head["url"], "--python",
               sys.executable, *sets(*tiny_overrides, "train.steps=100000", f"data.path={corpus_dir}",
                                     f"train.output_dir={tmp_path}"), home=head["home"])
    assert sub.returncode == 0, sub.stderr
    job = sub.stdout.strip().splitlines()[-1]
    wait_for(head, job, ["RUNNING"])
    stopped = keel("stop", job, "--address", head["url"], home=head["home"])
    assert stopped.returncode == 0 and f"{job}: STOPPED" in stopped.stdout, stopped.stdout + stopped.stderr


@pytest.mark.parametrize("token, message", [
    ("0" * 64, "rejected the authentication token"),
    (None, "requires a token and none was found"),
])
def test_a_wrong_or_missing_token_is_one_clear_line(head, token, message):
    result = keel("list", "--address", head["url"], home=head["home"], token=token)
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr


def test_unreachable_cluster_and_unknown_job_are_one_clear_line(head):
    down = keel("status", "--address", "http://127.0.0.1:9", home=head["home"])
    assert down.returncode == 2 and "cannot reach the Ray cluster at 127.0.0.1:9" in down.stderr
    missing = keel("logs", "keel-no-such-job", "--address", head["url"], home=head["home"])
    assert missing.returncode == 2 and "no such job" in missing.stderr and "Traceback" not in missing.stderr
