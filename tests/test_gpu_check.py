"""The prepared GPU check (benchmarks/gpu_check.py, `make gpu-check`) works before a GPU is lent: its dry run
goes through every stage on the CPU, with the packages the GPU machine lacks made unimportable, and leaves
the 8 result files and a summary; a stage that hangs costs only its own time box."""
import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FILES = {"summary.json", "kernels.csv", "kernels.png", "step.csv", "step.png", "checkpoint.csv", "tests.txt",
         "log.txt"}


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check")
    proc = subprocess.run(["make", "-s", "gpu-check", f"GPU_PYTHON={sys.executable}", f"ARGS=--dry-run --out {out}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    return proc, out


def test_make_gpu_check_dry_run_passes_every_stage_on_the_cpu(dry_run):
    proc, out = dry_run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dry_run"] is True
    assert list(summary["stages"]) == ["env", "ceilings", "tests", "kernels", "step", "checkpoint"]
    assert all(s["status"] == "ok" for s in summary["stages"].values()), summary["stages"]
    assert summary["env"]["device"] == "cpu" and summary["ceilings"]["matmul_bf16_tflops"] > 0
    # The summary table is the last thing printed, each target named with its verdict.
    lines = proc.stdout.strip().splitlines()
    head = max(i for i, line in enumerate(lines) if line.startswith("GPU check (DRY RUN"))
    tail = lines[head + 1:]
    assert [line.split()[0] for line in tail[:6]] == list(summary["stages"])
    assert [line.split()[1] for line in tail[6:]] == ["attention", "mfu", "trainer", "checkpoint"]


def test_the_output_is_eight_flat_files(dry_run):
    _, out = dry_run
    assert {p.name for p in out.iterdir()} == FILES
    assert all(p.is_file() and p.stat().st_size > 0 for p in out.iterdir())


def test_the_gpu_tests_ran_on_the_cpu_through_the_interpreter(dry_run):
    _, out = dry_run
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tests"].get("passed", 0) > 0 and not summary["tests"].get("failed")
    assert "passed" in (out / "tests.txt").read_text()


def test_every_kernel_comparison_and_step_variant_has_its_rows(dry_run):
    _, out = dry_run
    kernels = list(csv.DictReader(open(out / "kernels.csv")))
    assert {(r["op"], r["impl"]) for r in kernels} >= {
        ("attention", "triton"), ("attention", "sdpa"), ("attention", "sdpa_flash"), ("attention", "compile"),
        ("rmsnorm", "triton"), ("swiglu", "triton"), ("rope", "triton"), ("cross_entropy", "triton"),
        ("cross_entropy", "compile")}
    assert all(r["ok"] == "True" for r in kernels), [r for r in kernels if r["ok"] != "True"]
    steps = {r["impl"]: r for r in csv.DictReader(open(out / "step.csv"))}
    assert {"keel eager", "keel compile", "keel fused", "eager: bare PyTorch loop",
            "compile: bare PyTorch loop"} <= set(steps)
    assert float(steps["keel eager"]["vs_bare"]) > 0 and float(steps["keel fused"]["tokens_per_s"]) > 0
    ckpt = list(csv.DictReader(open(out / "checkpoint.csv")))
    assert ckpt and all(r["restored_equal"] == "True" for r in ckpt)
    assert all(r["checksum"] == "sha256" for r in ckpt)  # no xxhash there: the fallback is what ran


def test_a_stage_cannot_import_what_the_gpu_machine_lacks(tmp_path, benchmark_script):
    gpu_check = benchmark_script("gpu_check")
    script = tmp_path / "needs_ray.py"
    script.write_text("import ray\n")
    proc = subprocess.run([sys.executable, "-c", gpu_check.PRELUDE, str(script)], capture_output=True, text=True)
    assert proc.returncode != 0 and "ModuleNotFoundError" in proc.stderr and "ray" in proc.stderr


def test_a_stage_that_hangs_is_stopped_at_its_time_box(tmp_path, benchmark_script):
    gpu_check = benchmark_script("gpu_check")
    with open(tmp_path / "log.txt", "w") as log:
        status, output = gpu_check._run_child([sys.executable, "-c", "print('started', flush=True)\n"
                                               "import time; time.sleep(60)"], None, 2.0, log)
    assert status == "timed out after 2 s" and "started" in output
