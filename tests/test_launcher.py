"""The Ray launcher on one machine: a supervised worker group that survives a killed, hung or failing rank.

One real local Ray for the module (2 CPUs, loopback only); every run is a real 2-rank gloo group of rank
actors training the tiny model, resumed from real checkpoints. Faults are the real thing (SIGKILL, a
rank that stops stepping, an exception), injected by `fault.inject`.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# Before Ray is imported (it reads this once): bind every Ray process to 127.0.0.1 (shared/PLATFORM.md).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
import ray  # noqa: E402 - a requirement of keel: a broken install must fail, not skip

from keel.launcher.raylaunch import train_on_ray  # noqa: E402
from keel.launcher.supervisor import RunFailed  # noqa: E402

pytestmark = pytest.mark.timeout(240)
ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def local_ray(ray_session_dir):
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", logging_level="warning",
             _temp_dir=ray_session_dir)
    yield
    ray.shutdown()


@pytest.fixture
def run(local_ray, corpus_dir, tmp_path, tiny_overrides):
    """Train the tiny model on 2 ranks (dp_shard=2) through the launcher; checkpoints every 5 steps."""
    def go(name: str, *overrides: str) -> dict:
        return train_on_ray(None, [*tiny_overrides, f"data.path={corpus_dir}", f"train.output_dir={tmp_path}",
                                   f"train.name={name}", "parallel.dp_shard=2", "train.micro_batch_size=4",
                                   "checkpoint.interval=5", *overrides])
    return go


def steps(run_dir: Path) -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "step"]


def events(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference_loss(local_ray, corpus_dir, tmp_path_factory, tiny_settings):
    """The final loss of an uninterrupted 2-rank run."""
    out = tmp_path_factory.mktemp("reference")
    result = train_on_ray(None, [*tiny_settings, f"data.path={corpus_dir}", f"train.output_dir={out}", "train.name=ref",
                                 "parallel.dp_shard=2", "train.micro_batch_size=4", "checkpoint.interval=5"])
    assert result["goodput"]["restarts"] == 0
    return result["summary"]["final_loss"]


@pytest.mark.parametrize("fault, cause", [("kill:r1@12", "process_died"), ("raise:r0@8", "error")])
def test_killed_or_failing_rank_restarts_and_finishes_with_the_uninterrupted_final_loss(
        fault, cause, run, reference_loss, tmp_path):
    # Saved synchronously: the step-5 checkpoint is committed before step 6 whatever the machine's load (an
    # async save of it took 1.1 s on a busy machine, and the raise at step 8 came first).
    result = run("faulty", f"fault.inject={fault}", "checkpoint.async_save=false")
    run_dir = tmp_path / "faulty"
    assert result["summary"]["final_loss"] == pytest.approx(reference_loss, rel=1e-6)
    assert steps(run_dir)[-1]["step"] == 30
    ev = events(run_dir)
    failure = next(e for e in ev if e["kind"] == "failure")
    assert failure["cause"] == cause and failure["rank"] == int(fault.split(":r")[1][0])
    # A warm restart: new training processes in the same rank actors, which were started only once.
    assert [e.get("warm") for e in ev if e["kind"] == "restart"] == [True]
    assert [e["kind"] for e in ev].count("group_started") == 1
    resumed = next(e for e in ev if e["kind"] == "resumed")  # from the newest committed checkpoint
    assert resumed["step"] in (5, 10) and resumed["time"] > failure["time"]
    goodput = next(e for e in ev if e["kind"] == "goodput")
    assert goodput["restarts_by_cause"] == {cause: 1} and goodput["recomputed_steps"] >= 1
    assert 0 < goodput["goodput"] < 1 and goodput["recover_s"][0] > 0


def test_hung_rank_is_detected_within_the_timeout_and_the_run_finishes(run, reference_loss, tmp_path):
    result = run("hung", "fault.inject=hang:r1@12", "fault.hang_timeout_s=4")
    run_dir = tmp_path / "hung"
    assert result["summary"]["final_loss"] == pytest.approx(reference_loss, rel=1e-6)
    failure = next(e for e in events(run_dir) if e["kind"] == "failure")
    assert failure["cause"] == "hang" and failure["last_step"] == 12
    # The hang began when rank 1 wrote its fault marker; the supervisor saw it within the timeout + 10 s.
    # (Its clock starts when it saw step 12, a few ms before the marker is written: hence the slack below.)
    hung_at = float(next((run_dir / "faults").iterdir()).read_text())
    assert 4 - 0.5 <= failure["time"] - hung_at <= 4 + 10


def test_gives_up_after_max_restarts_with_the_cause_in_the_events(run, tmp_path):
    with pytest.raises(RunFailed, match=r"rank 1 failed \(process_died.*fault.max_restarts=0"):
        run("doomed", "fault.inject=kill:r1@3", "fault.max_restarts=0")
    kinds = [e["kind"] for e in events(tmp_path / "doomed")]
    assert "failure" in kinds and kinds[-1] == "goodput" and "gave_up" in kinds and "restart" not in kinds


def keel(*args, env=None, timeout=180):
    env = {**os.environ, "WANDB_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", **(env or {})}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-m", "keel.launcher.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=timeout)


def sets(*items):
    return [a for item in items for a in ("--set", item)]


def test_keel_train_with_dp_shard_2_runs_through_embedded_ray(corpus_dir, tiny_overrides, tmp_path):
    result = keel("train", "configs/tiny.yaml",
                  *sets(*tiny_overrides, "parallel.dp_shard=2", "train.micro_batch_size=4", "train.steps=5",
                        f"data.path={corpus_dir}", f"train.output_dir={tmp_path}"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 workers on embedded local Ray" in result.stderr
    assert "done: 5 steps" in result.stdout and "goodput" in result.stdout
    assert "(rank0 pid=" in result.stdout + result.stderr  # every line from a rank names its rank
    assert [e["kind"] for e in events(tmp_path / "tiny")][0] == "launch"


@pytest.mark.parametrize("args, message", [
    (["--address", "127.0.0.1:9"], "cannot reach the Ray cluster at 127.0.0.1:9"),
    (["--gpus-per-worker", "1", *sets("parallel.dp_shard=2", "train.micro_batch_size=8")], "the job asks for 2 GPUs (2 workers x 1) but the "
                                                                 "cluster has 0"),
    (sets("parallel.dp_shard=2", "optim.lerning_rate=1"), "unknown config key 'optim.lerning_rate'"),
    (sets("parallel.dp_shard=3"), "global_batch_size=16 must be a multiple of data-parallel degree 3"),
])
def test_bad_cluster_or_job_input_is_one_clear_line_before_anything_is_placed(args, message, tmp_path):
    result = keel("train", "configs/tiny.yaml", *args, *sets(f"train.output_dir={tmp_path}"), timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "tiny" / "metrics.jsonl").exists()


def test_a_run_that_stays_unstable_is_not_restarted(run, tmp_path):
    # Garbage from step 70 on and no rollback allowed: the loop stops with its report; retrying would only
    # repeat it, so the supervisor gives up at once.
    with pytest.raises(RunFailed, match=r"still unstable after 0 rollbacks.*not retried"):
        run("unstable", "train.steps=80", "fault.inject=[garbage@70-80]",
            "stability.actions=[rollback(skip_batches=5)]", "stability.max_rollbacks=0")
    ev = events(tmp_path / "unstable")
    assert [e["kind"] for e in ev].count("restart") == 0
    assert any(e["kind"] == "gave_up" and e["reason"] == "not_retryable" for e in ev)


# -- rollbacks under supervision ----------------------------------------------------------------------
# A garbage-data episode at steps 80..90 is caught, rolled back to the step-70 checkpoint and skipped. The
# replayed steps are slowed (0.25 s each, fault `slow`) so that the replay outlasts a 2 s hang timeout.
ROLLBACK = ["train.steps=120", "checkpoint.interval=10", "fault.inject=[garbage@80-90, slow@71-82]",
            "stability.actions=[skip_step, rollback(skip_batches=30)]"]


def rank0_training_process(run_dir: Path):
    """Rank 0's training process of this run: the one that holds the run's metrics.jsonl open."""
    import psutil

    for proc in psutil.process_iter(["name"]):
        if proc.info["name"] == "keel-rank0":
            try:
                if any(f.path == str(run_dir / "metrics.jsonl") for f in proc.open_files()):
                    return proc
            except psutil.Error:
                continue
    return None


@pytest.fixture(scope="module")
def rollback_runs(local_ray, corpus_dir, tmp_path_factory, tiny_settings):
    """The clean run, the rollback run, and the rollback run SIGKILLed right after its rollback."""
    import signal
    import threading
    import time

    out = tmp_path_factory.mktemp("rollbacks")

    def go(name, *extra):
        return train_on_ray(None, [*tiny_settings, f"data.path={corpus_dir}", f"train.output_dir={out}",
                                   f"train.name={name}", "parallel.dp_shard=2", "train.micro_batch_size=4", *extra])

    clean = go("clean", "train.steps=120", "checkpoint.interval=10")
    rolled = go("rolled", *ROLLBACK, "fault.hang_timeout_s=2")
    killed_at = {}

    def kill_after_rollback(run_dir: Path) -> None:
        deadline = time.time() + 180
        while time.time() < deadline:
            if (run_dir / "events.jsonl").exists() and '"rollback"' in (run_dir / "events.jsonl").read_text():
                proc = rank0_training_process(run_dir)
                if proc is not None:
                    killed_at["time"] = time.time()
                    proc.send_signal(signal.SIGKILL)
                return
            time.sleep(0.02)

    watcher = threading.Thread(target=kill_after_rollback, args=(out / "killed",), daemon=True)
    watcher.start()
    killed = go("killed", *ROLLBACK)
    watcher.join(5)
    return {"clean": clean, "rolled": rolled, "killed": killed, "killed_at": killed_at, "out": out}


def test_a_replay_longer_than_the_hang_timeout_is_progress_not_a_hang(rollback_runs):
    run_dir = rollback_runs["out"] / "rolled"
    ev = events(run_dir)
    (rollback,) = [e for e in ev if e["kind"] == "rollback"]
    assert rollback["to_step"] == 70
    # The replay from step 70 back to the step that triggered the rollback took longer than the timeout...
    replayed = [r for r in steps(run_dir) if r["time"] > rollback["time"] and r["step"] <= rollback["from_step"]]
    assert replayed[-1]["time"] - rollback["time"] > 2.0
    # ... and the supervisor did not take it for a hang.
    assert [e for e in ev if e["kind"] in ("failure", "restart")] == []
    goodput = next(e for e in ev if e["kind"] == "goodput")
    assert goodput["recomputed_by_cause"]["rollback"]["steps"] == rollback["from_step"] - 70


def test_a_restart_right_after_a_rollback_keeps_the_skip_and_finishes_as_the_uninterrupted_run(rollback_runs):
    run_dir = rollback_runs["out"] / "killed"
    assert "time" in rollback_runs["killed_at"], "the watcher never saw the rollback"
    ev = events(run_dir)
    kinds = [e["kind"] for e in ev]
    assert kinds.count("rollback") == 1 and [e["cause"] for e in ev if e["kind"] == "failure"] == ["process_died"]
    resumed = [e for e in ev if e["kind"] == "resumed"][-1]
    # Resumed from the checkpoint the rollback went back to, with the rollback's skip applied: the bad
    # batches are never served again (no second anomaly) and the run ends exactly as without the kill.
    assert resumed["step"] == 70 and resumed["rollback_applied"] == next(e for e in ev if e["kind"] == "rollback")["from_step"]
    assert kinds[kinds.index("resumed", kinds.index("failure")):].count("anomaly") == 0
    killed, rolled = rollback_runs["killed"]["summary"], rollback_runs["rolled"]["summary"]
    assert killed["final_loss"] == pytest.approx(rolled["final_loss"], rel=1e-6)
    assert killed["val_loss"] == pytest.approx(rolled["val_loss"], rel=1e-6)
    # Against the run that never saw the bad data, on the held-out set (a last training batch is noise).
    clean = rollback_runs["clean"]["summary"]["val_loss"]
    assert abs(killed["val_loss"] - clean) / clean <= 0.01


def test_a_hung_rank_in_a_default_run_is_caught_as_idle_well_within_60_seconds(run, tmp_path):
    # Rank 1 sleeps after step 12 and rank 0 waits for it in a gloo collective: both silent, neither using
    # CPU. The default limit's floor is 30 s; fault.idle_hang_s (10 s) calls it a hang first.
    result = run("hung_default", "fault.inject=hang:r1@12")
    run_dir = tmp_path / "hung_default"
    failure = next(e for e in events(run_dir) if e["kind"] == "failure")
    assert failure["cause"] == "hang" and "idle" in failure["detail"], failure["detail"]
    hung_at = float(next((run_dir / "faults").iterdir()).read_text())
    assert failure["time"] - hung_at <= 20
    assert result["summary"]["steps"] == 30


def test_a_run_whose_steps_slow_down_raises_no_alarm_and_a_later_hang_is_caught_fast(run, tmp_path):
    # Steps go from ~0.03 s to ~0.3 s (10x) at step 8; rank 1 hangs after step 25. With a 1 s floor the
    # adaptive limit is 20 x the slowest recent step: ~6 s by then, not the 30 s default floor.
    run("slowed", "fault.hang_min_s=1", "fault.inject=[slow@8-30, hang:r1@25]")
    run_dir = tmp_path / "slowed"
    failures = [e for e in events(run_dir) if e["kind"] == "failure"]
    assert [f["cause"] for f in failures] == ["hang"] and failures[0]["last_step"] == 25
    hung_at = float(next((run_dir / "faults").iterdir()).read_text())
    # Caught at the adaptive limit, 20 x the slowest recent step (~0.3 s here; more on a loaded machine).
    slowest = max(r["step_s"] for r in steps(run_dir) if r["time"] <= hung_at)
    assert failures[0]["time"] - hung_at <= 20 * slowest + 5.0


def test_a_one_process_run_is_supervised_too_and_a_killed_process_restarts_warm(local_ray, corpus_dir, tmp_path,
                                                                                  tiny_overrides):
    def go(name, *extra):
        return train_on_ray(None, [*tiny_overrides, f"data.path={corpus_dir}", f"train.output_dir={tmp_path}",
                                   f"train.name={name}", "checkpoint.interval=5", *extra])

    clean = go("one")
    killed = go("one_killed", "fault.inject=kill@12")
    assert killed["summary"]["final_loss"] == pytest.approx(clean["summary"]["final_loss"], rel=1e-6)
    ev = events(tmp_path / "one_killed")
    assert [(e["cause"], e["warm"]) for e in ev if e["kind"] == "restart"] == [("process_died", True)]
    assert clean["goodput"]["restarts"] == 0


def training_process(rank: int, ray_session_dir: str):
    """This module's Ray's `keel-rank{rank}` training process (its raylet runs under `ray_session_dir`)."""
    import psutil

    for proc in psutil.process_iter(["name"]):
        if proc.info["name"] == f"keel-rank{rank}":
            try:
                if any(ray_session_dir in " ".join(p.cmdline()) for p in proc.parents()):
                    return proc
            except psutil.Error:
                continue
    return None


def test_a_frozen_rank_is_caught_as_a_hang_and_blamed_by_name(run, reference_loss, tmp_path, ray_session_dir):
    import signal
    import threading
    import time

    run_dir = tmp_path / "frozen"
    frozen = {}

    def freeze_rank1_at_step_10():
        deadline = time.time() + 120
        while time.time() < deadline:
            if (run_dir / "metrics.jsonl").exists() and len(steps(run_dir)) >= 10:
                proc = training_process(1, ray_session_dir)
                if proc is not None:
                    frozen["time"] = time.time()
                    proc.send_signal(signal.SIGSTOP)  # alive, silent: a frozen rank
                return
            time.sleep(0.05)

    watcher = threading.Thread(target=freeze_rank1_at_step_10, daemon=True)
    watcher.start()
    # A hang limit of a minute: a stopped process is a hang as soon as its silence exceeds any step
    # (launcher/hang.py FROZEN_CHECK_MIN_S, 5 s), not once the limit has passed.
    result = run("frozen", "fault.hang_min_s=60", "fault.inject=slow@1-30")
    watcher.join(5)
    assert "time" in frozen
    (failure,) = [e for e in events(run_dir) if e["kind"] == "failure"]
    assert failure["cause"] == "hang" and failure["rank"] == 1 and "stopped" in failure["detail"]
    assert failure["time"] - frozen["time"] <= 20
    assert result["summary"]["final_loss"] == pytest.approx(reference_loss, rel=1e-6)
