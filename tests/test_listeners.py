"""Servers listen only where they must: a local run opens no socket on any interface but loopback.

A real two-rank `keel train` through the embedded Ray runs as a subprocess while this test samples the
machine's listening sockets every 0.2 s. Every listener that the run's processes open (Ray's servers,
the torch rendezvous store of rank 0, gloo's pairs) must be on 127.0.0.0/8 or ::1 (shared/DESIGN.md).
"""
import ipaddress
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

# Before Ray is imported (it reads this once), as in test_launcher.py; importing Ray puts its bundled
# psutil on sys.path.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
import ray  # noqa: E402,F401 - a requirement of keel: a broken install must fail, not skip
import psutil  # noqa: E402

pytestmark = pytest.mark.timeout(300)
ROOT = Path(__file__).parent.parent


def listeners() -> dict[tuple[str, int], int | None]:
    """Every TCP socket in LISTEN state on this machine: (address, port) -> owning pid."""
    return {(c.laddr.ip, c.laddr.port): c.pid for c in psutil.net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN}


def is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip.split("%")[0])
    # Ray's gRPC servers listen on IPv4-mapped IPv6 addresses (::ffff:127.0.0.1): loopback too.
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


def process_tree(root: psutil.Process) -> set[int]:
    try:
        return {root.pid, *(p.pid for p in root.children(recursive=True))}
    except psutil.NoSuchProcess:
        return set()


def describe(pid: int) -> str:
    try:
        return f"pid {pid} {psutil.Process(pid).name()}"
    except psutil.NoSuchProcess:
        return f"pid {pid} (gone)"


def test_local_two_rank_run_listens_on_loopback_only(corpus_dir, tiny_overrides, tmp_path):
    sets = [a for o in [*tiny_overrides, "parallel.dp_shard=2", "train.micro_batch_size=4", "train.steps=60",
                        f"data.path={corpus_dir}", f"train.output_dir={tmp_path}"] for a in ("--set", o)]
    env = {**os.environ, "WANDB_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    env.pop("RAY_ADDRESS", None)
    log = tmp_path / "run.log"  # a file, not a pipe: nobody reads a pipe while we sample
    before = set(listeners())
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "keel.launcher.cli", "train", "configs/tiny.yaml", *sets],
                                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    run = psutil.Process(proc.pid)
    seen: dict[tuple[str, int], str] = {}
    deadline = time.monotonic() + 240
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            # Only the run's own processes: other tests on this machine may open listeners of their own. A
            # socket psutil could not tie to a process this time (pid None) is judged at a later sample.
            ours = process_tree(run)
            for address, pid in listeners().items():
                if address not in before and address not in seen and pid in ours:
                    seen[address] = describe(pid)
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    output = log.read_text()
    assert proc.returncode == 0, output[-3000:]
    assert "done: 60 steps" in output, output[-3000:]
    # Ray's GCS, raylet, agents and workers, the rank-0 store, gloo: far more than one.
    assert len(seen) >= 5, f"only {len(seen)} new listeners seen: {seen}"
    wide = {f"{ip}:{port}": who for (ip, port), who in seen.items() if not is_loopback(ip)}
    assert not wide, f"listening beyond loopback: {wide}"
    print(f"{len(seen)} new listeners, all on loopback:", *(f"{ip}:{port} {who}" for (ip, port), who in seen.items()),
          sep="\n  ")


def test_the_rendezvous_port_is_chosen_where_the_kernel_hands_out_no_ports_of_its_own():
    # A port taken from the kernel's ephemeral range is free only until the next process asks for any port
    # (gloo's pairs, Ray's workers, client sockets): in CI one did between the launcher's choice and rank 0's
    # bind. Below that range, and above Ray's worker ports, nothing takes it unasked.
    from keel.launcher.cluster import PORT_FLOOR, free_port

    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = [free_port("127.0.0.1") for _ in range(20)]
    assert all(PORT_FLOOR <= p < low for p in ports), (ports, low)
    assert len(set(ports)) > 1  # drawn at random: two launches at once rarely pick the same one
    import socket

    with socket.socket() as s:  # and it is free: rank 0 binds it
        s.bind(("127.0.0.1", ports[-1]))
