"""Connecting to Ray: an embedded single-machine instance by default, an existing cluster when asked.

Security defaults (see launcher/README.md): the embedded instance listens on 127.0.0.1 only, asks for no
dashboard UI, and uses Ray's token authentication with a token made for this process.
Connecting to a cluster uses the token from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token.
"""
from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse


class LauncherError(RuntimeError):
    """Something about the cluster or the job that the user has to fix: shown as one line, exit 2."""


@dataclass
class Connection:
    address: str | None   # None: the embedded instance this process started
    embedded: bool
    owned: bool = True     # False when the caller had already connected (a test, a notebook)
    temp_dir: str | None = None  # the embedded instance's session files, removed with it
    dashboard_url: str | None = None  # http://HOST:PORT when the cluster has a dashboard listening

    def cpus(self) -> float:
        """The CPUs the cluster has in all (what a ladder divides among its concurrent runs)."""
        import ray

        return ray.cluster_resources().get("CPU", 1.0)

    def close(self) -> None:
        """Disconnect (and stop the embedded instance); a connection someone else made is left alone."""
        import ray

        if self.owned and ray.is_initialized():
            ray.shutdown()
        if self.temp_dir:
            shutil.rmtree(self.temp_dir, ignore_errors=True)


def token_available() -> bool:
    if os.environ.get("RAY_AUTH_TOKEN"):
        return True
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if path:
        return Path(path).is_file()
    return (Path.home() / ".ray" / "auth_token").is_file()


def use_token_if_available() -> None:
    """A client talks token auth whenever it has a token, unless the user chose a mode explicitly."""
    if "RAY_AUTH_MODE" not in os.environ and token_available():
        os.environ["RAY_AUTH_MODE"] = "token"
    _refresh_ray_config()


def _refresh_ray_config() -> None:
    # Ray reads RAY_AUTH_MODE once, when it is imported; re-read it as ray's own token set-up does
    # (ray._private.authentication.authentication_token_setup._enable_token_auth).
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    try:
        AuthenticationTokenLoader.instance().reset_cache()
    except AttributeError:
        pass


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds, with the address in the message, rather than let ray.init retry for minutes."""
    if address == "auto" or ("://" in address and not address.startswith("ray://")):
        return
    hostport = address[len("ray://"):] if address.startswith("ray://") else address
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise LauncherError(f"--address {address!r}: expected HOST:PORT (the head's GCS port, 6379 by default) "
                            f"or ray://HOST:10001")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            pass
    except OSError as e:
        raise LauncherError(f"cannot reach the Ray cluster at {address} ({e.strerror or e}); start one with "
                            f"`ray start --head` (launcher/examples/) or fix --address / RAY_ADDRESS") from None


# Where free_port looks: below the kernel's ephemeral range (Linux: 32768-60999 by default) and above Ray's
# worker ports (10002-19999). A port the kernel handed out for "any free port" is free only until the next
# process asks: gloo's pairs, Ray's workers and every client socket draw from the ephemeral range, and one of
# them took a rendezvous port between its choice and rank 0's bind (CI, two test workers at once:
# "cannot bind the rendezvous store ... Address already in use"). Nothing takes a port from below it unasked.
PORT_FLOOR = 20000


def _ephemeral_floor() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):  # not Linux: the IANA dynamic range's start
        return 49152


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on `host` now, outside the range the kernel hands out for ephemeral ports: found by
    binding there, and no wider (never on every interface)."""
    import random

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    top = _ephemeral_floor()
    candidates = random.sample(range(PORT_FLOOR, top), min(64, top - PORT_FLOOR)) if top > PORT_FLOOR else []
    for port in [*candidates, 0]:  # 0: the kernel's choice, when the range below is full or absent
        with socket.socket(family) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise LauncherError(f"no free TCP port on {host}")


# The embedded instance serves one run on this machine: nothing scrapes its metrics, and nothing waits for a
# worker it could have started ahead (the rank actors are all there is). With these off, an idle embedded
# Ray with one actor took 3.2% of a core instead of 4.2% (20 s windows, Ray 2.60, 2 cores): one idle worker
# per CPU and the metrics and event-stat timers gone. That CPU comes out of training: on 2 cores, a
# supervised run trained 2% faster than with Ray's defaults, in the same interleaved runs (benchmarks/
# RESULTS.md, supervision cost).
EMBEDDED_SYSTEM_CONFIG = {"enable_worker_prestart": False, "prestart_worker_first_driver": False,
                          "enable_metrics_collection": False, "event_stats": False}


@contextlib.contextmanager
def without_head_services():
    """While it is held, a Ray head starts no autoscaler monitor and no headless API server.

    Ray starts both for every head it brings up, and `ray.init` offers no way to leave them out. The embedded
    instance is one machine running one job: nothing autoscales it, and nobody submits jobs to it or queries
    its state API (`keel submit`, `status` and `chaos` talk to a cluster started with `ray start`). Left in,
    they are on start-up's critical path: `ray.init` waits for the API server to register before it starts
    the raylet, while the monitor's imports compete for the same cores. Measured on 2 cores (Ray 2.60, 4
    alternating runs each): `connect` took 2.44 s without them against 3.94 s with them (benchmarks/
    RESULTS.md, supervision cost). Ray is pinned (setup.py) and tests/test_embedded_ray.py checks that
    the two are gone while the instance still runs actors and streams their output: a Ray that renames these
    methods starts both again, and fails that test."""
    from ray._private.node import Node

    if not (hasattr(Node, "start_monitor") and hasattr(Node, "start_api_server")):
        yield  # another Ray: start what it starts (and the test says so)
        return
    saved = Node.start_monitor, Node.start_api_server
    Node.start_monitor = lambda self: None
    Node.start_api_server = lambda self, **kwargs: None
    try:
        yield
    finally:
        Node.start_monitor, Node.start_api_server = saved


def connect(address: str | None, num_cpus: int | None = None, num_gpus: int | None = None,
            system_config: dict | None = None) -> Connection:
    """Join `address` (or RAY_ADDRESS); with neither, start a Ray instance on this machine only."""
    address = address or os.environ.get("RAY_ADDRESS") or None
    if not address or address.split("://")[-1].startswith(("127.", "localhost")):
        # Before Ray is first imported (it reads this once): without it Ray advertises the primary
        # interface's address even when told 127.0.0.1, and swaps a loopback GCS address for that
        # interface's (shared/PLATFORM.md); the embedded instance, or a cluster on loopback, is one
        # machine, so loopback is all it needs.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    def http(url: str | None) -> str | None:  # Ray reports the dashboard as HOST:PORT, "" when there is none
        return (url if "://" in url else f"http://{url}") if url else None

    if ray.is_initialized():  # a caller (a test, a notebook) already connected: use that cluster
        try:  # the URL its head registered in the GCS (a private Ray API: the caller holds ray.init's answer)
            from ray._private.services import get_webui_url_from_internal_kv

            dashboard_url = http(get_webui_url_from_internal_kv())
        except Exception:  # noqa: BLE001 - a Ray client connection or a changed internal API: no URL to show
            dashboard_url = None
        return Connection(address, embedded=False, owned=False, dashboard_url=dashboard_url)
    quiet = {"log_to_driver": True, "logging_level": "warning"}
    if address:
        check_reachable(address)
        use_token_if_available()
        try:
            context = ray.init(address=address, **quiet)
        except ray.exceptions.AuthenticationError as e:
            raise LauncherError(f"the Ray cluster at {address} refused this client's token: "
                                f"{str(e).splitlines()[0]}") from None
        except (ConnectionError, RuntimeError) as e:
            raise LauncherError(f"cannot connect to the Ray cluster at {address}: {str(e).splitlines()[0]}") from None
        return Connection(address, embedded=False, dashboard_url=http(context.dashboard_url))

    # A private token for a private cluster: nothing is written to ~/.ray, and it dies with us.
    if "RAY_AUTH_MODE" not in os.environ:
        os.environ["RAY_AUTH_MODE"] = "token"
    if os.environ["RAY_AUTH_MODE"] == "token" and not token_available():
        os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    _refresh_ray_config()
    # num_gpus None: Ray counts this machine's GPUs itself, without the driver importing torch.
    own_temp = not os.environ.get("KEEL_RAY_TMPDIR")
    temp_dir = os.environ.get("KEEL_RAY_TMPDIR") or tempfile.mkdtemp(prefix="keel-ray-")
    # No dashboard UI (so nothing on :8265, and dashboard_url is None). Measured on 2 cores, Ray 2.60, 3 runs
    # each: the UI (include_dashboard=True, dashboard_host="127.0.0.1") added 1.5 CPU-seconds to ray.init
    # (5.9 against 4.4, summed over Ray's processes; +0.6 s and +2.7 s wall in the two pairs timed before the
    # machine got busy), 11 processes (21 against 10) and ~145 MB of unique memory (~600 against ~450 MB):
    # over our 1 s budget for it.
    with without_head_services():
        context = ray.init(num_cpus=num_cpus or os.cpu_count(), num_gpus=num_gpus, include_dashboard=False,
                           _node_ip_address="127.0.0.1", _temp_dir=temp_dir,
                           _system_config={**EMBEDDED_SYSTEM_CONFIG, **(system_config or {})}, **quiet)
    return Connection(None, embedded=True, temp_dir=temp_dir if own_temp else None,
                      dashboard_url=http(context.dashboard_url))


def job_client(address: str | None):
    """A Ray Jobs client for the dashboard at `address` (http://HOST:8265), with a clear error if it
    cannot be reached or refuses our token."""
    address = address or os.environ.get("RAY_JOBS_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not address:
        raise LauncherError("no cluster given: pass --address http://HOST:8265 (the head's dashboard) or set "
                            "RAY_ADDRESS; see launcher/examples/ to start one")
    if "://" not in address:
        address = f"http://{address}"
    parsed = urlparse(address)
    if parsed.scheme in ("http", "https"):
        check_reachable(f"{parsed.hostname}:{parsed.port or 8265}")
    # Ray only now, past the checks: a missing or unreachable cluster is said without its ~0.6 s import.
    use_token_if_available()
    import ray
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except ray.exceptions.AuthenticationError:
        raise LauncherError(auth_message(address)) from None
    except (ConnectionError, RuntimeError, ValueError) as e:
        text = str(e)
        if "401" in text or "403" in text or "token" in text.lower():
            raise LauncherError(auth_message(address)) from None
        raise LauncherError(f"cannot talk to the Ray job API at {address}: {text.splitlines()[0]}") from None


def auth_message(address: str) -> str:
    if not token_available():
        return (f"the Ray cluster at {address} requires a token and none was found: set RAY_AUTH_TOKEN, "
                f"RAY_AUTH_TOKEN_PATH, or copy the head's ~/.ray/auth_token here")
    return (f"the Ray cluster at {address} rejected the authentication token (RAY_AUTH_TOKEN / "
            f"RAY_AUTH_TOKEN_PATH / ~/.ray/auth_token): use the head node's token")
