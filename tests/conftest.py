"""Shared fixtures: a small real corpus and a tiny model config that trains in seconds on a CPU."""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

# Ray finds "the" instance of a machine through $RAY_TMPDIR/ray_current_cluster (/tmp/ray by default),
# which any earlier `ray start` may have left pointing at a cluster long gone; a test that connects by
# auto-detection would wait on it. The suite's Ray processes look in a folder of their own instead (set
# before any test module imports Ray; subprocesses inherit it).
os.environ.setdefault("RAY_TMPDIR", tempfile.mkdtemp(prefix="keel-rt-"))
# Ray reads this once, at its first import, and whichever test module is collected first imports it: without
# it Ray swaps a loopback GCS address for the primary interface's, and a fake cluster started on 127.0.0.1
# waits for a GCS on that other address until the test times out (shared/PLATFORM.md).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import pytest

from keel.training.config import load_config
from keel.training.corpus import prepare, stdlib_path
from keel.training.presets import TEST_MODEL


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    # Tests must not read or write the user's ~/.cache/keel (peak FLOP/s, prepared corpora).
    os.environ["KEEL_CACHE"] = str(tmp_path_factory.mktemp("keel-cache"))
    os.environ["WANDB_MODE"] = "disabled"


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    """The standard library's `email` package (real Python text, ~0.4 MB), byte-tokenized."""
    out = tmp_path_factory.mktemp("corpus") / "email-byte"
    prepare([stdlib_path() / "email"], out, tokenizer="byte", val_percent=20, progress=False)
    return out


TINY = TEST_MODEL


@pytest.fixture
def tiny_overrides() -> list[str]:
    """The tiny model's settings as `a.b=v` strings, for runs started as subprocesses."""
    return list(TINY)


@pytest.fixture(scope="session")
def tiny_settings() -> tuple[str, ...]:
    """The same, for module- and session-scoped fixtures (`from conftest import` is ambiguous: there are
    two conftest modules)."""
    return tuple(TINY)


@pytest.fixture
def tiny_config(corpus_dir, tmp_path):
    """Build a tiny config on the test corpus; extra `a.b=v` overrides win."""
    def make(*overrides: str):
        return load_config(None, [*TINY, f"data.path={corpus_dir}", f"train.output_dir={tmp_path}",
                                  "train.name=test", *overrides])
    return make


@pytest.fixture
def benchmark_script():
    """Import a script of benchmarks/ by name ("gpu_check"): they are files, not a package."""
    def load(name: str):
        spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parent.parent / "benchmarks"
                                                      / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    return load


@pytest.fixture(scope="module")
def ray_session_dir():
    """A short folder for one Ray instance's session files, removed after the module. Ray's Unix sockets live
    under it and their paths may not pass 107 bytes: under pytest-xdist, pytest's own temp folders are a level
    deeper, and a raylet's socket there came to 106 bytes, a dashboard's to more (it then fails to start)."""
    folder = tempfile.mkdtemp(prefix="keel-ray-")
    yield folder
    shutil.rmtree(folder, ignore_errors=True)
