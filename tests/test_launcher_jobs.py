"""`keel submit/status/logs/stop/list` against a real `ray start --head` on loopback with token auth.

The head is started by this module (its own ports and temp dir, `--block` so that terminating that one
process stops exactly this cluster; never `ray stop`, which would stop every Ray on the machine).
"""
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray  # noqa: F401 - a requirement of keel: a broken install must fail, not skip

from keel.launcher.cluster import free_port

pytestmark = pytest.mark.timeout(240)
ROOT = Path(__file__).parent.parent
TOKEN = secrets.token_hex(32)


@pytest.fixture(scope="module")
def head(tmp_path_factory, ray_session_dir):
    home = tmp_path_factory.mktemp("home")  # no ~/.ray/auth_token of the user's is read or written
    gcs, dash, agent = free_port(), free_port(), free_port()
    env = {**os.environ, "HOME": str(home), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": TOKEN,
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "WANDB_MODE": "disabled",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    ray_bin = str(Path(sys.executable).parent / "ray")
    proc = subprocess.Popen([ray_bin, "start", "--head", "--block", "--num-cpus", "2", "--port", str(gcs),
                             "--dashboard-port", str(dash), "--dashboard-host", "127.0.0.1",
                             # Not the fixed default (52365): another Ray on the machine must not take our job agent.
                             "--dashboard-agent-listen-port", str(agent),
                             "--node-ip-address", "127.0.0.1", "--include-dashboard", "true",
                             "--disable-usage-stats", "--temp-dir", ray_session_dir],
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
    yield {"url": url, "home": home, "gcs": f"127.0.0.1:{gcs}", "pid": proc.pid}
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
    # --follow streams the log as it grows and returns when the job ends.
    followed = keel("logs", job, "--follow", "--address", head["url"], home=head["home"], timeout=300)
    assert followed.returncode == 0 and "done: 5 steps" in followed.stdout, followed.stderr[-2000:]
    status = wait_for(head, job, ["SUCCEEDED", "FAILED", "STOPPED"])
    logs = keel("logs", job, "--address", head["url"], home=head["home"]).stdout
    assert f"{job}: SUCCEEDED" in status, status + logs[-3000:]
    assert "exit code 0" in status
    assert "2 workers on Ray cluster" in logs and "done: 5 steps" in logs and "(rank0 pid=" in logs
    assert (out / "tiny" / "metrics.jsonl").is_file()
    listed = keel("list", "--address", head["url"], home=head["home"]).stdout
    assert job in listed and "SUCCEEDED" in listed


def training_processes(head) -> set[int]:
    """The keel-rankN training processes under this module's Ray head (launcher/group.py names them)."""
    def parent(pid):
        try:
            return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return 0

    found = set()
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and (entry / "comm").read_text().startswith("keel-rank"):
                pid = int(entry.name)
                while pid > 1 and pid != head["pid"]:
                    pid = parent(pid)
                if pid == head["pid"]:
                    found.add(int(entry.name))
        except OSError:
            continue
    return found


def step_reached(run_dir: Path, step: int, after: float = 0.0) -> bool:
    """Whether the run logged step `step` at or past time `after` (a record being written is skipped)."""
    metrics = run_dir / "metrics.jsonl"
    for line in metrics.read_text().splitlines() if metrics.exists() else []:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record["kind"] == "step" and record["step"] >= step and record["time"] > after:
            return True
    return False


def test_stop_ends_a_running_job_and_its_training_processes(head, job_dir, corpus_dir, tiny_overrides, tmp_path):
    sub = keel("submit", str(job_dir / "tiny.yaml"), "--working-dir", str(job_dir), "--address", head["url"], "--python",
               sys.executable, *sets(*tiny_overrides, "parallel.dp_shard=2", "train.micro_batch_size=4",
                                     "train.steps=100000", f"data.path={corpus_dir}", f"train.output_dir={tmp_path}"),
               home=head["home"])
    assert sub.returncode == 0, sub.stderr
    job = sub.stdout.strip().splitlines()[-1]
    wait_for(head, job, ["RUNNING"])
    deadline = time.time() + 120
    while time.time() < deadline and not step_reached(tmp_path / "tiny", 2):
        time.sleep(0.5)
    training = training_processes(head)
    assert len(training) == 2
    stopped = keel("stop", job, "--address", head["url"], home=head["home"])
    assert stopped.returncode == 0 and f"{job}: STOPPED" in stopped.stdout, stopped.stdout + stopped.stderr
    # Nothing trains on behind a stopped job: each training process dies with its actor.
    deadline = time.time() + 30
    while time.time() < deadline and any(Path(f"/proc/{pid}").exists() for pid in training):
        time.sleep(0.5)
    assert not [pid for pid in training if Path(f"/proc/{pid}").exists()]


def test_chaos_kills_a_training_process_then_an_actor_and_the_job_trains_on(
        head, job_dir, corpus_dir, tiny_overrides, tmp_path):
    run_dir = tmp_path / "tiny"
    sub = keel("submit", str(job_dir / "tiny.yaml"), "--working-dir", str(job_dir), "--address", head["url"], "--python",
               sys.executable, *sets(*tiny_overrides, "parallel.dp_shard=2", "train.micro_batch_size=4",
                                     "train.steps=100000", "checkpoint.interval=5", f"data.path={corpus_dir}",
                                     f"train.output_dir={tmp_path}"), home=head["home"])
    assert sub.returncode == 0, sub.stderr
    job = sub.stdout.strip().splitlines()[-1]
    since = 0.0
    for flags, what in (([], "training process"), (["--actor"], "actor"), ([], None)):
        deadline = time.time() + 120
        while time.time() < deadline and not step_reached(run_dir, 8, after=since):
            time.sleep(0.2)
        assert step_reached(run_dir, 8, after=since), "the job did not (re)start training"
        if what is None:
            break
        drill = keel("chaos", "--address", head["gcs"], "--seed", "0", *flags, home=head["home"])
        assert drill.returncode == 0 and f"killed the {what} of" in drill.stdout, \
            drill.stdout + drill.stderr + keel("logs", job, "--address", head["url"], home=head["home"]).stdout[-3000:]
        since = time.time()
    keel("stop", job, "--address", head["url"], home=head["home"])
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    assert [e["cause"] for e in events if e["kind"] == "failure"] == ["process_died", "process_died"]
    # The killed training process is restarted inside the same actors; a killed actor gets a new group.
    assert [e["warm"] for e in events if e["kind"] == "restart"] == [True, False]


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
