"""Node failure on a fake two-node cluster (`ray.cluster_utils.Cluster`: real raylets, one machine).

Each of two worker nodes holds one rank (the group is spread with STRICT_SPREAD). Mid-run one node is
removed without warning and a replacement joins: the supervisor sees the node go, tears the group down,
waits for room for both ranks, starts again and the run finishes with the uninterrupted run's loss. With
fault.elastic and no replacement, the run goes on with one replica on the node that is left.
"""
import json
import os
import threading
import time

import pytest

# Before Ray is imported (it reads this once): bind every Ray process to 127.0.0.1 (shared/PLATFORM.md).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
import ray  # noqa: E402 - a requirement of keel: a broken install must fail, not skip

from ray.cluster_utils import Cluster  # noqa: E402

from keel.launcher.raylaunch import train_on_ray  # noqa: E402

pytestmark = pytest.mark.timeout(240)

# Fast health checks: an ungracefully removed node is declared dead in ~1.5 s instead of ~13 s.
HEALTH = {"health_check_period_ms": 500, "health_check_failure_threshold": 3, "health_check_initial_delay_ms": 0,
          "health_check_timeout_ms": 500}


@pytest.fixture(scope="module")
def cluster():
    # Ray's "current cluster" file, in a folder of this module's own: an earlier test's `ray start --head`
    # leaves one behind in the suite's RAY_TMPDIR, and the fake cluster's head would connect to that
    # (dead) address instead of its own.
    import tempfile

    before = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="keel-rn-")
    # The head runs only the driver (no CPUs): every rank lands on a worker node.
    c = Cluster(initialize_head=True, connect=True,
                head_node_args={"num_cpus": 0, "node_ip_address": "127.0.0.1", "_system_config": HEALTH,
                                "include_dashboard": False})
    for _ in range(2):
        c.add_node(num_cpus=1, node_ip_address="127.0.0.1")
    c.wait_for_nodes()
    yield c
    ray.shutdown()
    c.shutdown()
    if before is None:
        os.environ.pop("RAY_TMPDIR", None)
    else:
        os.environ["RAY_TMPDIR"] = before


def overrides(corpus_dir, out, name, tiny):
    return [*tiny, f"data.path={corpus_dir}", f"train.output_dir={out}", f"train.name={name}", "train.steps=40",
            "parallel.dp_shard=2", "train.micro_batch_size=4", "checkpoint.interval=5", "fault.capacity_timeout_s=60"]


def test_losing_a_node_mid_run_restarts_on_a_replacement_and_matches_the_uninterrupted_loss(
        cluster, corpus_dir, tmp_path, tiny_overrides):
    reference = train_on_ray(None, overrides(corpus_dir, tmp_path, "reference", tiny_overrides),
                             nproc_per_node=1, nnodes=2)
    assert reference["goodput"]["restarts"] == 0

    result = {}
    runner = threading.Thread(target=lambda: result.update(train_on_ray(
        None, overrides(corpus_dir, tmp_path, "lossy", tiny_overrides), nproc_per_node=1, nnodes=2)))
    runner.start()
    metrics = tmp_path / "lossy" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and '"step": 12,' in metrics.read_text()):
        time.sleep(0.05)
    victim = [n for n in cluster.worker_nodes][-1]
    cluster.remove_node(victim, allow_graceful=False)
    cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")  # the replacement the restart waits for
    runner.join(timeout=180)
    assert not runner.is_alive()

    assert result["summary"]["final_loss"] == pytest.approx(reference["summary"]["final_loss"], rel=1e-6)
    events = [json.loads(line) for line in (tmp_path / "lossy" / "events.jsonl").read_text().splitlines()]
    failure = next(e for e in events if e["kind"] == "failure")
    assert failure["cause"] == "node_lost" and failure["last_step"] >= 12
    assert [e["kind"] for e in events].count("restart") == 1
    started = [e for e in events if e["kind"] == "group_started"]
    assert len(started) == 2 and result["goodput"]["restarts_by_cause"] == {"node_lost": 1}


def test_with_fault_elastic_the_run_goes_on_with_fewer_replicas_when_the_node_does_not_come_back(
        cluster, corpus_dir, tmp_path, tiny_overrides):
    reference = train_on_ray(None, overrides(corpus_dir, tmp_path, "reference", tiny_overrides),
                             nproc_per_node=1, nnodes=2)
    result = {}
    elastic = [*overrides(corpus_dir, tmp_path, "elastic", tiny_overrides), "fault.elastic=true",
               "fault.capacity_timeout_s=3"]
    runner = threading.Thread(target=lambda: result.update(train_on_ray(None, elastic, nproc_per_node=1, nnodes=2)))
    runner.start()
    metrics = tmp_path / "elastic" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and '"step": 12,' in metrics.read_text()):
        time.sleep(0.05)
    cluster.remove_node(list(cluster.worker_nodes)[-1], allow_graceful=False)  # and no replacement comes
    try:
        runner.join(timeout=180)
        assert not runner.is_alive()
    finally:
        cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")  # back to two for whatever runs next

    events = [json.loads(line) for line in (tmp_path / "elastic" / "events.jsonl").read_text().splitlines()]
    shrink = next(e for e in events if e["kind"] == "elastic_shrink")
    assert (shrink["from_world_size"], shrink["to_world_size"], shrink["dp_shard"]) == (2, 1, 1)
    resumed = [e for e in events if e["kind"] == "resumed"]
    assert resumed and resumed[-1]["time"] > shrink["time"]  # from the checkpoint saved by two replicas
    steps = [json.loads(line) for line in metrics.read_text().splitlines() if '"kind": "step"' in line]
    assert steps[-1]["step"] == 40
    # One replica accumulating two micro-batches takes the same steps as two replicas of one: only the
    # order of the fp32 sums differs.
    assert result["summary"]["final_loss"] == pytest.approx(reference["summary"]["final_loss"], rel=1e-4)
