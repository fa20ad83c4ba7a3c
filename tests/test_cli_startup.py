"""The light `keel` verbs start fast (issue 18): parsing and answering them imports neither torch nor Ray.

Each case runs `python -X importtime -m keel.launcher.cli ...` and reads the import log it writes to stderr.
"""
import os
import socket
import subprocess
import sys

import pytest

HEAVY = ("torch", "ray", "numpy")
# Budget for everything the command imports beyond a bare interpreter. Absolute rather than a ratio to
# `python -c pass`: that baseline's own imports take ~10 ms, so a ratio swings with any jitter on a shared
# 2-core machine, while 0.5 s leaves the light verbs (~50 ms) ten times their cost and torch alone (1-3 s)
# still breaks it.
BUDGET_S = 0.5


def import_log(*args: str) -> tuple[subprocess.CompletedProcess, list[tuple[int, int, str]]]:
    """The run and its import log: (depth, cumulative microseconds, module) per import, in order."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_JOBS_ADDRESS")}
    result = subprocess.run([sys.executable, "-X", "importtime", *args], capture_output=True, text=True,
                            env=env, timeout=120)
    log = []
    for line in result.stderr.splitlines():
        if line.startswith("import time:") and "|" in line and "cumulative" not in line:
            _, cumulative, name = line.split("|")
            log.append(((len(name) - len(name.lstrip()) - 1) // 2, int(cumulative), name.strip()))
    result.stderr = "\n".join(line for line in result.stderr.splitlines() if not line.startswith("import time:"))
    return result, log


def heavy_in(log: list[tuple[int, int, str]]) -> list[str]:
    return sorted({name.split(".")[0] for _, _, name in log} & set(HEAVY))


@pytest.fixture(scope="module")
def startup() -> set[str]:
    """What every interpreter imports before running anything (encodings, site and the editable keel finder)."""
    return {name for depth, _, name in import_log("-c", "pass")[1] if depth == 0}


def unreachable_address() -> str:
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


EMPTY_FOLDER = "EMPTY_FOLDER"
CASES = {
    "--help": (0, "COMMAND"),
    "list --help": (0, "usage: keel list"),
    "status --help": (0, "usage: keel status"),
    "logs --help": (0, "usage: keel logs"),
    "stop --help": (0, "usage: keel stop"),
    "ckpt ls --help": (0, "usage: keel ckpt ls"),
    f"ckpt ls {EMPTY_FOLDER}": (0, "no checkpoints under"),
    # Dispatched for real: with no cluster given, each says so, exit 2.
    "list": (2, "keel: error: no cluster given"),
    "status": (2, "keel: error: no cluster given"),
    "status some-job": (2, "keel: error: no cluster given"),
    "logs some-job": (2, "keel: error: no cluster given"),
    "stop some-job": (2, "keel: error: no cluster given"),
}


@pytest.mark.parametrize("command", CASES)
def test_light_verbs_import_no_torch_nor_ray_and_take_under_half_a_second_to_import(command, startup, tmp_path):
    code, said = CASES[command]
    args = [str(tmp_path) if word == EMPTY_FOLDER else word for word in command.split()]
    result, log = import_log("-m", "keel.launcher.cli", *args)
    assert result.returncode == code, result.stderr
    assert said in result.stdout + result.stderr
    assert not heavy_in(log), f"`keel {command}` imported {heavy_in(log)}"
    # The top-level imports made after start-up are everything `-m keel.launcher.cli` and the verb cost.
    seconds = sum(us for depth, us, name in log if depth == 0 and name not in startup) / 1e6
    assert seconds < BUDGET_S, f"`keel {command}` spent {seconds:.2f} s importing"


def test_an_unreachable_cluster_is_said_before_importing_ray():
    address = unreachable_address()
    result, log = import_log("-m", "keel.launcher.cli", "list", "--address", address)
    assert result.returncode == 2 and f"keel: error: cannot reach the Ray cluster at {address}" in result.stderr
    assert not heavy_in(log), f"`keel list --address {address}` imported {heavy_in(log)}"


def test_every_user_error_is_known_once_its_module_is_loaded():
    # user_errors() names only loaded modules' classes; with all of them loaded it must find each one,
    # so a renamed or moved error class fails here rather than turning a one-line error into a traceback.
    import keel.checkpoints.hf_config  # noqa: F401
    import keel.checkpoints.manager  # noqa: F401
    import keel.parallel.dims  # noqa: F401
    import keel.training.config  # noqa: F401
    import keel.training.corpus  # noqa: F401
    import keel.training.stability  # noqa: F401
    from keel.training.run import USER_ERRORS, user_errors

    assert [e.__name__ for e in user_errors()] == [name for _, name in USER_ERRORS]
