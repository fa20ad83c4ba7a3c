"""The supervisor's judgement, without a cluster: when silence is a hang, and how lost work is accounted.

The same rules run inside every supervised run (launcher/hang.py, Supervisor.goodput); the Ray tests
(test_launcher.py) show them end to end.
"""
import json

import pytest

from keel.launcher.group import GroupPlan, _descendants, _stat
from keel.launcher.hang import HangClock, IdleWatch
from keel.launcher.supervisor import Attempt, EventLog, Failure, Supervisor
from keel.training.config import load_config


def clock(*sets: str, ranks: int = 2) -> HangClock:
    return HangClock.for_run(load_config(None, list(sets)).fault, started=0.0, ranks=ranks)


def steps(c: HangClock, rank: int, seconds: list[float], t0: float = 0.0, first: int = 1) -> float:
    t = t0
    for i, s in enumerate(seconds):
        t += s
        c.observe(rank, {"phase": "step", "step": first + i, "step_s": s}, t)
    return t


def test_before_the_first_step_the_startup_allowance_applies():
    c = clock()
    assert c.limit(0)[0] == 600.0
    assert c.stalled(599.0, set()) is None
    assert c.stalled(601.0, set())[0] == 0


def test_default_limit_is_twenty_slowest_recent_steps_with_a_thirty_second_floor():
    c = clock()
    t = steps(c, 0, [0.1] * 10)
    steps(c, 1, [0.1] * 10)
    assert c.limit(0)[0] == 30.0                      # 20 x 0.1 s is below the floor
    assert c.stalled(t + 29.0, set()) is None
    assert c.stalled(t + 31.0, set())[0] in (0, 1)    # a hung rank is caught within ~30 s
    c = clock()
    steps(c, 0, [0.1] * 10 + [4.0])
    steps(c, 1, [4.0])
    assert c.limit(1)[0] == pytest.approx(80.0)       # slow steps raise the limit with them


def test_a_several_fold_slowdown_is_not_a_hang():
    c = clock("fault.hang_min_s=1")
    t = steps(c, 0, [0.1] * 30)
    assert c.limit(0)[0] == pytest.approx(2.0)
    # Steps turn 8x slower: each one arrives well inside the limit that held before it.
    for i in range(20):
        assert c.stalled(t + 0.8, set()) is None
        t = steps(c, 0, [0.8], t0=t, first=31 + i)
    assert c.limit(0)[0] == pytest.approx(16.0)


def test_an_explicit_timeout_wins_for_steps():
    c = clock("fault.hang_timeout_s=4")
    t = steps(c, 0, [10.0])
    assert c.limit(0)[0] == 4.0 and "fault.hang_timeout_s=4" in c.limit(0)[1]
    assert c.stalled(t + 4.5, {1})[0] == 0


def test_evaluations_and_saves_get_their_own_allowance():
    c = clock("fault.hang_min_s=1")
    t = steps(c, 0, [0.05] * 5)
    c.observe(0, {"phase": "eval", "step": 5}, t)
    assert c.limit(0)[0] == 600.0                      # the first evaluation: the start-up allowance
    c.observe(0, {"phase": "eval_end", "step": 5, "seconds": 3.0}, t + 3.0)
    t = steps(c, 0, [0.05], t0=t + 3.0, first=6)
    c.observe(0, {"phase": "eval", "step": 6}, t)
    assert c.limit(0)[0] == pytest.approx(60.0)       # 20 x the longest evaluation seen
    assert c.stalled(t + 30.0, {1}) is None
    c.observe(0, {"phase": "eval_end", "step": 6, "seconds": 2.0}, t + 2.0)
    assert c.limit(0)[0] == pytest.approx(1.0)        # back to steps
    c.observe(0, {"phase": "save", "step": 6}, t + 2.0)
    assert "first save" in c.limit(0)[1]


def test_replayed_steps_after_a_rollback_are_progress():
    c = clock("fault.hang_min_s=1")
    t = steps(c, 0, [0.05] * 40)
    # Rolled back to step 20 and replaying: the step numbers go down, but every beat is progress.
    c.observe(0, {"phase": "restore", "step": 40}, t)
    c.observe(0, {"phase": "restore_end", "step": 40, "seconds": 0.3}, t + 0.3)
    t = steps(c, 0, [0.5] * 20, t0=t + 0.3, first=21)
    assert c.stalled(t + 0.5, {1}) is None and c.clocks[0].step == 40


def test_an_attempt_inherits_what_the_previous_one_learned():
    fault = load_config(None, ["fault.hang_min_s=1"]).fault
    first = HangClock.for_run(fault, 0.0, 1)
    steps(first, 0, [2.0])
    second = HangClock.for_run(fault, 10.0, 1, history=first)
    steps(second, 0, [0.1], t0=10.0)
    assert second.limit(0)[0] == pytest.approx(40.0)


def sleeping(cpu_s: float) -> dict:
    return {"state": "S", "cpu_s": cpu_s}


def test_a_group_silent_mid_step_whose_processes_sleep_is_hung_after_idle_hang_s():
    c = clock()
    t = steps(c, 0, [0.4] * 10)
    steps(c, 1, [0.4] * 10)
    assert c.silent_mid_step(t + 4.0, set()) is None          # not yet longer than any step (5 s)
    watch = IdleWatch(after_s=10.0)
    verdicts = {}
    for s in range(6, 15):                                    # probed once a second while silent
        verdicts[s] = watch.observe(t + s, c.silent_mid_step(t + s, set()), [sleeping(3.0), sleeping(3.01)])
    assert [s for s, v in verdicts.items() if v] == [10, 11, 12, 13, 14]
    assert "idle" in verdicts[10] and "fault.idle_hang_s=10" in verdicts[10]
    assert c.stalled(t + 10, set()) is None                   # long before the 30 s limit


def test_a_slow_step_that_keeps_a_core_busy_is_never_called_idle():
    watch = IdleWatch(after_s=10.0)
    # One rank computes (a core's worth of CPU a second) while its peer waits on it in a collective.
    for s in range(60):
        assert watch.observe(float(s), 5.0 + s, [sleeping(0.0), {"state": "R", "cpu_s": 1.0 * s}]) is None
    # A process that sleeps but still uses 10% of a core (a busy helper thread) is not idle either.
    for s in range(60):
        assert watch.observe(100.0 + s, 70.0 + s, [sleeping(0.1 * s), sleeping(0.0)]) is None


def test_idle_needs_every_process_asleep_and_every_probe_answered():
    for probes in ([sleeping(1.0), {"state": "R", "cpu_s": 1.0}],   # runnable but starved: a loaded machine
                   [sleeping(1.0), {"state": "D", "cpu_s": 1.0}],   # waiting on a disk
                   [sleeping(1.0), None]):                          # an actor that did not answer
        watch = IdleWatch(after_s=10.0)
        assert all(watch.observe(float(s), 20.0 + s, probes) is None for s in range(30))
    off = IdleWatch(after_s=0.0)
    assert all(off.observe(float(s), 20.0 + s, [sleeping(1.0)]) is None for s in range(30))


def test_a_group_in_an_eval_or_save_or_not_all_silent_is_not_watched_for_idleness():
    c = clock()
    t = steps(c, 0, [0.4] * 10)
    steps(c, 1, [0.4] * 10)
    c.observe(1, {"phase": "save", "step": 10}, t)
    assert c.silent_mid_step(t + 20, set()) is None
    c.observe(1, {"phase": "save_end", "step": 10, "seconds": 1.0}, t + 19)
    assert c.silent_mid_step(t + 20, set()) is None           # rank 1 spoke a second ago
    assert c.silent_mid_step(t + 30, set()) == pytest.approx(11.0)


def test_idleness_is_judged_only_on_cpu_runs_with_the_adaptive_limit(tmp_path):
    def idle_s(plan, *sets):
        return Supervisor(load_config(None, list(sets)), plan=plan, cwd=str(tmp_path)).idle_hang_s()

    cpu, gpu = GroupPlan(1, 2, 1.0, 0.0), GroupPlan(1, 2, 1.0, 1.0)
    assert idle_s(cpu) == 10.0
    assert idle_s(cpu, "fault.idle_hang_s=25") == 25.0
    assert idle_s(gpu) == 0.0                                 # a rank waiting on its GPU uses no CPU either
    assert idle_s(cpu, "fault.hang_timeout_s=60") == 0.0      # a set limit is the one rule


def test_a_probe_counts_the_cpu_time_of_the_process_and_its_children():
    import subprocess
    import sys
    import time

    # A sleeping parent whose child spins: the parent sleeps, and the tree's CPU time grows by the child's.
    parent = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time; "
                               "subprocess.Popen([sys.executable, '-c', 'while True: pass']); time.sleep(60)"])
    try:
        deadline = time.time() + 20
        while not _descendants(parent.pid) and time.time() < deadline:
            time.sleep(0.05)
        (child,) = _descendants(parent.pid)
        time.sleep(1.0)
        state, own = _stat(parent.pid)
        assert state == "S" and own < 0.5
        before = _stat(child)[1]
        time.sleep(1.0)
        assert _stat(child)[1] - before > 0.3                   # the spinning child shows its CPU time
    finally:
        for pid in _descendants(parent.pid):
            subprocess.run(["kill", "-9", str(pid)])
        parent.kill()
        parent.wait()


def beat(step: int, seconds: float = 1.0) -> dict:
    return {"step": step, "step_s": seconds, "time": float(step)}


def test_goodput_charges_re_executed_steps_to_the_failure_or_rollback_that_caused_them(tmp_path):
    sup = Supervisor(load_config(None, []), plan=None, cwd=str(tmp_path))
    # Attempt 0: steps 1..6, a rollback to step 3 replays 4..6, then steps to 8 and a crash.
    a0 = Attempt(started=0.0, steps=[beat(s) for s in [1, 2, 3, 4, 5, 6, 4, 5, 6, 7, 8]])
    a0.failure = Failure("process_died", "killed", 1, detected=9.0, last_step=8)
    # Attempt 1 resumes from the step-5 checkpoint: 6, 7, 8 again, then on to 10.
    a1 = Attempt(started=10.0, steps=[beat(s) for s in [6, 7, 8, 9, 10]])
    sup.attempts = [a0, a1]
    g = sup.goodput(t0=0.0)
    assert g["recomputed_by_cause"] == {"rollback": {"steps": 3, "seconds": 3.0},
                                        "process_died": {"steps": 3, "seconds": 3.0}}
    assert g["recomputed_steps"] == 6 and g["productive_s"] == 10.0
    assert g["restarts_by_cause"] == {"process_died": 1}


def test_a_hang_in_a_collective_silences_every_rank_and_the_clock_says_which():
    c = clock()
    t = steps(c, 0, [0.1] * 10)
    steps(c, 1, [0.1] * 10)
    c.observe(1, {"phase": "step", "step": 11, "step_s": 0.1}, t + 0.1)  # rank 1 did one more step
    assert c.silent(t + 20.0, set()) == [0, 1]
    assert c.silent(t + 15.05, set()) == [0]


def test_the_supervisor_writes_events_jsonl_and_a_fresh_start_drops_only_what_came_before_the_launch(tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_text(json.dumps({"kind": "run_end", "time": 1.0}) + "\n")  # an earlier run's
    log = EventLog(path)
    log.write("launch", world_size=2)
    log.append({"kind": "checkpoints_set_aside", "time": 2.0})  # rank 0's, relayed before its run_start
    log.append({"kind": "run_start", "time": 3.0, "fresh": True})
    kinds = lambda: [json.loads(line)["kind"] for line in path.read_text().splitlines()]  # noqa: E731
    assert kinds() == ["launch", "checkpoints_set_aside", "run_start"]
    # A restart before the first checkpoint starts from step 0 again: this launch's events stay.
    log.write("failure", cause="error")
    log.append({"kind": "run_start", "time": 4.0, "fresh": True})
    log.append({"kind": "resumed", "time": 5.0})
    assert kinds() == ["launch", "checkpoints_set_aside", "run_start", "failure", "run_start", "resumed"]
    assert json.loads(path.read_text().splitlines()[0])["source"] == "launcher"
