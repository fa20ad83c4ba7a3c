"""The prepared GPU check (issue 17): every GPU path keel has, verified and measured in one command.

    make gpu-check                         # on the GPU machine, with its own python3 as it is
    make gpu-check ARGS="--out DIR"        # where the 8 result files go (default runs/gpu-check)
    make gpu-check ARGS=--dry-run          # on a CPU: every stage's plumbing at tiny sizes (CI runs this)

A GPU is lent to this project rarely and for minutes, on a bare machine (no ray, wandb, deepspeed or
megatron-core, nor xxhash; its own torch and triton). So this script assumes nothing of it: keel runs from
this tree (nothing is installed), those five packages are made unimportable in every stage (on a CPU too, so
the dry run proves nothing checked here needs them; checkpoints fall back to sha256 checksums), and the
stages run in order, each in a process of its own with its own time box, so that a CUDA fault or a hang in
one costs only that stage. A stage that runs out of time keeps the rows it finished.

  env         python, torch, triton, CUDA, the device, nvcc; two steps of `keel train --launcher inline`
  ceilings    a large bf16 matmul (TFLOP/s) and a device-to-device copy (GB/s, bytes read + written)
  tests       pytest -m gpu tests/gpu: each Triton and CUDA kernel, forward and backward, against an
              fp64/fp32 reference with its outputs poisoned; the all-Triton model against the torch one
  kernels     keel bench: attention fwd+bwd, causal, d=128, 1k-16k tokens (Triton against each SDPA backend
              and torch.compile of the plain math); rmsnorm, swiglu, rope and the fused cross-entropy
              against torch and torch.compile
  step        keel bench step on configs/llama-1b.yaml's model, bf16, compile off/on, fused ops off/on,
              against a bare PyTorch loop of the same model: tokens/s, MFU, peak memory
  checkpoint  a save and a restore of that model and its AdamW state to local disk, against dd of the bytes

Output, flat (8 files): summary.json, kernels.csv, kernels.png, step.csv, step.png, checkpoint.csv,
tests.txt, log.txt. The last lines printed are the summary: each stage and each target, passed or not.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BLOCKED = ("ray", "wandb", "deepspeed", "megatron", "xxhash")  # xxhash: checkpoints then hash with sha256
# Run before a stage's own code: the packages the GPU machine lacks cannot be imported here either.
PRELUDE = ("import sys, runpy\n"
           f"for name in {BLOCKED!r}:\n"
           "    sys.modules[name] = None  # 'import name' now raises ModuleNotFoundError\n"
           "sys.argv = sys.argv[1:]\n"
           "if sys.argv[0] == 'pytest':\n"
           "    import pytest\n"
           "    sys.exit(pytest.main(sys.argv[1:]))\n"
           "runpy.run_path(sys.argv[0], run_name='__main__')\n")
# Seconds each stage may take on an H100/H200; their sum, 8 minutes, is the default --budget-s.
TIME_BOX = {"env": 25, "ceilings": 20, "tests": 130, "kernels": 100, "step": 140, "checkpoint": 65}
STAGES = tuple(TIME_BOX)
# The dry run has no GPU minutes to save, and a busy 2-core CI machine is slow: generous boxes.
DRY_RUN_TIME_BOX, DRY_RUN_BUDGET_S = 300, 1500
TARGETS = {  # name: (what, threshold), all "at least"
    "attention": ("Triton attention fwd+bwd / best SDPA backend, T >= 4k (worst T)", 1.0),
    "mfu": ("~1B bf16 training step MFU, best keel variant (%)", 50.0),
    "trainer": ("keel trainer tokens/s / bare PyTorch loop (worst of compile off/on)", 0.98),
    "checkpoint": ("checkpoint save throughput / dd", 0.8),
}


# ---------------------------------------------------------------------------------------------------
# The stages (each runs in its own process: `gpu_check.py --stage NAME --work DIR`)

def stage_env(args) -> dict:
    import torch
    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "cuda_available": torch.cuda.is_available(), "nvcc": shutil.which("nvcc"),
            "cpu_count": os.cpu_count()}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError as exc:
        info["triton"] = f"missing: {exc}"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(device=props.name, capability=f"sm_{props.major}{props.minor}",
                    memory_gib=round(props.total_memory / 2**30, 1), multiprocessors=props.multi_processor_count)
    else:
        info["device"] = "cpu"
    for name in BLOCKED:
        try:
            __import__(name)
            raise SystemExit(f"{name} could be imported: the stage prelude must block it")
        except ImportError:
            pass
    from keel.launcher.cli import main as keel
    info["keel"] = str(ROOT)
    print(json.dumps(info, indent=1))
    # The user's one-process path, through the CLI: `keel train --launcher inline`, wandb off.
    keel(["train", str(ROOT / "configs" / "tiny.yaml"), "--launcher", "inline", *(
        a for s in ["train.steps=2", "train.eval_every=0", "train.eval_batches=1", "logging.progress=false",
                    "logging.wandb.mode=disabled", f"data.path={_corpus(args)}", f"train.output_dir={args.work}/runs",
                    "train.name=inline"] for a in ("--set", s))])
    return {"env": info, "headline": f"{info['device']}, torch {info['torch']}, triton {info['triton']}; "
                                     "keel train --launcher inline ran"}


def _sig(x: float) -> float:
    """Three significant figures: an emulated bf16 matmul on a CPU is 0.00194 TFLOP/s, not 0.0."""
    return float(f"{x:.3g}")


def stage_ceilings(args) -> dict:
    import torch
    from keel.kernels.peaks import measure_copy_bandwidth, measure_matmul_peak, peak_bandwidth, peak_flops
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    n, nbytes = (8192, 2 << 30) if not args.dry_run else (256, 16 << 20)
    matmul = measure_matmul_peak(device, torch.bfloat16, n)
    copy = measure_copy_bandwidth(device, nbytes)
    published_flops, flops_source = peak_flops(device, "bf16")
    published_bw, bw_source = peak_bandwidth(device)
    out = {"matmul_bf16_tflops": _sig(matmul / 1e12), "copy_gbps": _sig(copy / 1e9),
           "matmul_n": n, "copy_bytes": nbytes, "peak_bf16_tflops": round(published_flops / 1e12, 1),
           "peak_source": flops_source,
           "peak_gbps": None if published_bw is None else round(published_bw / 1e9),
           "peak_gbps_source": bw_source}
    print(json.dumps(out, indent=1))
    return {"ceilings": out, "headline": f"bf16 matmul {out['matmul_bf16_tflops']} TFLOP/s (n={n}); "
                                         f"copy {out['copy_gbps']} GB/s"}


def _bench_argv(args) -> list[list[str]]:
    """The `keel bench OP` command lines this check runs (fwd+bwd only: what training does)."""
    if args.dry_run:
        # The interpreter runs one program at a time: tiny shapes, one timed call. CPU Inductor takes ~10 s a
        # compile, so `compile` runs for two ops only (the path is one function, bench_ops._compiled_fn).
        common = ["--mode", "fwd+bwd", "--warmup", "0", "--reps", "1", "--dtype", "fp32"]
        return [["attention", "--seqlen", "32", "--heads", "2/1", "--head-dim", "16",
                 "--impl", "sdpa,triton,sdpa_flash,sdpa_cudnn,compile", *common],
                ["rmsnorm", "--seqlen", "16", "--dim", "32", "--impl", "torch,triton", *common],
                ["swiglu", "--seqlen", "16", "--ffn-dim", "32", "--impl", "torch,triton", *common],
                ["rope", "--seqlen", "16", "--heads", "2/1", "--head-dim", "16", "--impl", "torch,triton", *common],
                ["cross_entropy", "--seqlen", "16", "--dim", "32", "--vocab", "64",
                 "--impl", "unfused,chunked,triton,compile", *common]]
    common = ["--mode", "fwd+bwd", "--dtype", "bf16", "--warmup", "3", "--reps", "10"]
    return [["attention", "--seqlen", "1k,2k,4k,8k,16k", "--heads", "32/8", "--head-dim", "128", "--causal",
             "--impl", "triton,sdpa,sdpa_flash,sdpa_cudnn,sdpa_efficient,compile,flash_attn", *common],
            ["rmsnorm", "--seqlen", "4k,16k", "--dim", "4096", "--impl", "torch,triton,cuda,compile,liger", *common],
            ["swiglu", "--seqlen", "4k,16k", "--ffn-dim", "14336", "--impl", "torch,triton,compile,liger", *common],
            ["rope", "--seqlen", "4k,16k", "--heads", "32/8", "--head-dim", "128", "--impl", "torch,triton,compile",
             *common],
            ["cross_entropy", "--seqlen", "4k,16k", "--dim", "2048", "--vocab", "128256",
             "--impl", "unfused,chunked,triton,compile,liger", *common]]


def stage_kernels(args) -> dict:
    from keel.kernels.bench import add_bench_parser
    parser = argparse.ArgumentParser(prog="keel")
    add_bench_parser(parser.add_subparsers(dest="command", required=True))
    n_rows = 0
    for argv in _bench_argv(args):
        bench_args = parser.parse_args(["bench", *argv, "--out", str(args.work / "bench")])
        rows = bench_args.func(bench_args)
        _append_rows(args.work / "kernels.rows.jsonl", rows)  # kept if a later op runs out of time
        n_rows += len(rows)
    return {"headline": f"{n_rows} rows"}


def _step_settings(args, corpus: Path) -> list[str]:
    """configs/llama-1b.yaml's model, on a small byte-level corpus, one micro-batch per step, no z-loss (the
    bare loop has none); in a dry run, the same layer types at toy sizes on the CPU."""
    common = [f"data.path={corpus}", "model.z_loss=0", "checkpoint.interval=0"]
    if args.dry_run:
        return [*common, "model.dim=32", "model.n_layers=1", "model.n_heads=2", "model.n_kv_heads=1",
                "model.ffn_dim=64", "model.vocab_size=256", "model.max_seq_len=16", "data.seq_len=8",
                "train.global_batch_size=2", "train.micro_batch_size=2", "train.device=cpu"]
    return [*common, "data.seq_len=4096", "train.global_batch_size=4", "train.micro_batch_size=4",
            "train.device=cuda"]


FUSED = ["model.attention.impl=triton", "model.rmsnorm.impl=triton", "model.swiglu.impl=triton",
         "model.rope.impl=triton", "model.cross_entropy.impl=triton"]


def _corpus(args) -> Path:
    from keel.training.corpus import prepare, stdlib_path
    out = args.work / "corpus"
    if not (out / "meta.json").is_file():  # ~1.5 MB of Python source, byte tokens: no tokenizer to train
        prepare([stdlib_path() / p for p in ("email", "json", "asyncio")], out, tokenizer="byte", val_percent=5,
                progress=False)
    return out


def stage_step(args) -> dict:
    from keel.launcher.bench_step import run_step
    settings = _step_settings(args, _corpus(args))
    steps, warmup = (3, 1) if args.dry_run else (10, 3)
    # Most telling first: a variant cut off by the time box loses only what comes after it.
    variants = [("eager", [], True), ("fused", FUSED, False), ("compile", ["parallel.compile=true"], True)]
    if not args.dry_run:  # dynamo cannot trace the Triton interpreter (plain Python over numpy)
        variants.append(("fused+compile", [*FUSED, "parallel.compile=true"], False))
    for name, extra, baseline in variants:
        step_args = argparse.Namespace(config=str(ROOT / "configs" / "llama-1b.yaml"), overrides=[*settings, *extra],
                                       steps=steps, warmup=warmup, seqlen=None, baseline=baseline,
                                       out=str(args.work / "bench"))
        rows = run_step(step_args)
        for row in rows:
            row["impl"] = row["impl"].replace("llama-1b", f"keel {name}" if "bare" not in row["impl"]
                                              else f"{name}:")
        _append_rows(args.work / "step.rows.jsonl", rows)
    best = max((r for r in _read_rows(args.work / "step.rows.jsonl") if "bare" not in r["impl"]),
               key=lambda r: r["tokens_per_s"])
    return {"headline": f"{len(variants)} keel variants, 2 bare loops; best {best['impl']}: "
                        f"{best['tokens_per_s']:,.0f} tok/s, MFU {best['pct_peak']}%"}


def stage_checkpoint(args) -> dict:
    import torch
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from checkpoint import one_step, raw_write_seconds  # benchmarks/checkpoint.py, the CPU benchmark
    from keel.checkpoints.manager import Checkpointer
    from keel.checkpoints.manifest import CHECKSUM
    from keel.parallel.local import LocalEngine
    from keel.training.config import config_to_dict, load_config
    from keel.training.flops import count_params
    cfg = load_config(str(ROOT / "configs" / "llama-1b.yaml"),
                      [*_step_settings(args, _corpus(args)), f"train.output_dir={args.work / 'runs'}",
                       "checkpoint.async_save=false", "checkpoint.keep_last=1", "logging.wandb.mode=disabled"])
    device = torch.device(cfg.train.device)
    engine = LocalEngine(cfg, device)
    one_step(engine, cfg)
    folder = Path(tempfile.mkdtemp(prefix="keel-gpu-ckpt-", dir=args.work))
    layout = {"dp_replicate": 1, "dp_shard": 1, "tp": 1, "pp": 1}
    trainer = {"step": 1, "tokens": 0, "first_val_loss": 0.0, "loader": {}, "stability": {}}
    saver = Checkpointer(config_to_dict(cfg), folder / "ckpt", 0, 1, layout)
    rows, rows_file = [], args.work / "checkpoint.rows.jsonl"
    try:
        # One save: the 1B model with its AdamW state is ~20 GB, and this disk also holds dd's copy meanwhile.
        for repeat in range(1):
            t0 = time.perf_counter()
            saver.save(repeat + 1, engine, {**trainer, "step": repeat + 1})
            save_s = time.perf_counter() - t0
            n_bytes = sum(p.stat().st_size for p in saver.last_committed.iterdir())
            dd_s = raw_write_seconds(folder, n_bytes)
            row = {"repeat": repeat, "params": count_params(cfg.model).total, "bytes": n_bytes, "checksum": CHECKSUM,
                   "save_s": round(save_s, 3), "dd_s": round(dd_s, 3), "save_gbps": round(n_bytes / save_s / 1e9, 3),
                   "dd_gbps": round(n_bytes / dd_s / 1e9, 3), "save_vs_dd": round(dd_s / save_s, 3)}
            print(row, flush=True)
            _append_rows(rows_file, [row])  # kept if the restore runs out of time
            fresh = LocalEngine(cfg, device)
            loader = Checkpointer(config_to_dict(cfg), folder / "ckpt", 0, 1, layout)
            t0 = time.perf_counter()
            loader.restore(fresh, loader.choose("auto"))
            if device.type == "cuda":
                torch.cuda.synchronize()
            restore_s = time.perf_counter() - t0
            loader.close()
            same = all(torch.equal(a, b) for a, b in zip(engine.model.state_dict().values(),
                                                         fresh.model.state_dict().values()))
            del fresh
            rows.append({**row, "restore_s": round(restore_s, 3), "restored_equal": same})
            print(rows[-1])
            rows_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
            if not same:
                raise SystemExit("the restored model differs from the saved one")
    finally:
        saver.close()
        shutil.rmtree(folder, ignore_errors=True)
    last = rows[-1]
    return {"headline": f"{last['bytes'] / 1e9:.2f} GB: save {last['save_gbps']} GB/s, dd {last['dd_gbps']} GB/s, "
                        f"restore {last['restore_s']} s"}


def _append_rows(path: Path, rows: list[dict]) -> None:
    with open(path, "a") as f:
        for row in rows:
            f.write(json.dumps(row, default=str) + "\n")


def run_stage(args) -> None:
    result = {"env": stage_env, "ceilings": stage_ceilings, "kernels": stage_kernels, "step": stage_step,
              "checkpoint": stage_checkpoint}[args.stage](args)
    (args.work / f"{args.stage}.json").write_text(json.dumps(result, indent=1, default=str))


# ---------------------------------------------------------------------------------------------------
# The driver: stages in child processes, time boxes, the output folder and the summary

def _child_env(args, pkgroot: Path) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", WANDB_MODE="disabled", KEEL_CACHE=str(args.work / "cache"),
               PYTHONPATH=os.pathsep.join(filter(None, [str(pkgroot), os.environ.get("PYTHONPATH")])))
    if args.dry_run:
        env.update(CUDA_VISIBLE_DEVICES="", TRITON_INTERPRET="1", KEEL_GPU_DRY_RUN="1")
    return env


def _stage_command(args, stage: str) -> list[str]:
    if stage == "tests":
        # One line per test as it ends (a stage cut off by its time box keeps them); the CUDA extension's
        # tests last, as their first use builds it with nvcc.
        files = [str(ROOT / "tests" / "gpu" / f) for f in ("test_kernels_gpu.py", "test_model_gpu.py",
                                                             "test_cuda_gpu.py")]
        return [sys.executable, "-c", PRELUDE, "pytest", "-m", "gpu", *files, "-v", "-rs",
                "-o", "addopts=", "-p", "no:cacheprovider", "--rootdir", str(ROOT), "-c", str(ROOT / "pytest.ini")]
    return [sys.executable, "-c", PRELUDE, str(Path(__file__).resolve()), "--stage", stage, "--work", str(args.work)] \
        + (["--dry-run"] if args.dry_run else [])


def _run_child(command, env, timeout: float, log) -> tuple[str, str]:
    """Run one stage, streaming its output to the console and the log; (status, its output)."""
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, errors="replace", start_new_session=True)
    lines: list[str] = []

    def pump():
        for line in proc.stdout:
            lines.append(line)
            sys.stdout.write(line)
            log.write(line)
    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout=timeout)
        status = "ok" if rc == 0 else f"failed (exit {rc})"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)  # the stage and anything it started (compile workers)
        proc.wait()
        status = f"timed out after {timeout:.0f} s"
    reader.join(timeout=10)
    log.flush()
    return status, "".join(lines)


def _read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _write_csv(path: Path, rows: list[dict]) -> None:
    fields = list(dict.fromkeys(k for r in rows for k in r)) or ["note"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def _test_counts(output: str) -> dict:
    tail = output.strip().splitlines()[-1] if output.strip() else ""
    return {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed)", tail)}


def evaluate_targets(kernels: list[dict], steps: list[dict], ckpt: list[dict]) -> list[dict]:
    """Each target of the issue with the value measured here (None where its stage gave nothing)."""
    def value_of(name):
        if name == "attention":
            ratios = []
            for T in sorted({r["seqlen"] for r in kernels if r.get("op") == "attention" and r["seqlen"] >= 4096}):
                at_T = {r["impl"]: r.get("tflops") for r in kernels
                        if r.get("op") == "attention" and r["seqlen"] == T and r.get("mode") == "fwd+bwd"}
                sdpa = [v for k, v in at_T.items() if k.startswith("sdpa") and v]
                if at_T.get("triton") and sdpa:
                    ratios.append(at_T["triton"] / max(sdpa))
            return min(ratios) if ratios else None
        if name == "mfu":
            keel = [r["pct_peak"] for r in steps if "bare" not in r["impl"] and r.get("pct_peak") is not None]
            return max(keel) if keel else None
        if name == "trainer":
            ratios = [r["vs_bare"] for r in steps if r.get("vs_bare") is not None]
            return min(ratios) if ratios else None
        return ckpt[-1]["save_vs_dd"] if ckpt else None
    out = []
    for name, (what, threshold) in TARGETS.items():
        value = value_of(name)
        out.append({"target": name, "what": what, "at_least": threshold,
                    "value": None if value is None else round(value, 3),
                    "passed": None if value is None else value >= threshold})
    return out


def _plot(kernels: list[dict], steps: list[dict], out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ops = list(dict.fromkeys(r["op"] for r in kernels))
    fig, axes = plt.subplots(1, max(1, len(ops)), figsize=(4.5 * max(1, len(ops)), 4), squeeze=False)
    for ax, op in zip(axes[0], ops):
        rows = [r for r in kernels if r["op"] == op]
        metric = "tflops" if any(r.get("gbps") is None and r.get("tflops") for r in rows) or op in (
            "attention", "cross_entropy") else "gbps"
        if not any(r.get(metric) for r in rows):
            metric = "ms"  # the CPU dry run: no rates
        for impl in dict.fromkeys(r["impl"] for r in rows):
            pts = sorted((r["seqlen"], r[metric]) for r in rows if r["impl"] == impl and r.get(metric))
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=impl)
        ax.set_xscale("log", base=2)
        if metric == "ms":
            ax.set_yscale("log")  # the interpreter is orders of magnitude slower than the CPU reference
        ax.set_xlabel("tokens T")
        ax.set_ylabel({"tflops": "TFLOP/s", "gbps": "GB/s", "ms": "ms (CPU)"}[metric])
        ax.set_title(f"{op} fwd+bwd")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "kernels.png", dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(8, 0.5 + 0.45 * max(1, len(steps))))
    labels = [r["impl"] for r in steps]
    ax.barh(labels, [r.get("tokens_per_s") or 0 for r in steps], color=["grey" if "bare" in lab else "C0"
                                                                       for lab in labels])
    for i, r in enumerate(steps):
        ax.text(r.get("tokens_per_s") or 0, i, f"  MFU {r.get('pct_peak')}%", va="center", fontsize=8)
    ax.set_xlabel("tokens/s (training step)")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(out / "step.png", dpi=110)
    plt.close(fig)


def summary_lines(summary: dict) -> list[str]:
    lines = [f"GPU check{' (DRY RUN on CPU: no figure below is a GPU measurement)' if summary['dry_run'] else ''}: "
             f"{summary['env'].get('device', '?')}, torch {summary['env'].get('torch', '?')}, "
             f"triton {summary['env'].get('triton', '?')}"]
    for name, s in summary["stages"].items():
        lines.append(f"  {name:<11} {s['status']:<26} {s['seconds']:>6.1f} s  {s.get('headline', '')}")
    for t in summary["targets"]:
        verdict = "n/a" if t["passed"] is None else ("PASS" if t["passed"] else "FAIL")
        lines.append(f"  target {t['target']:<11} {verdict:<5} {t['value']!s:>8} (>= {t['at_least']}): {t['what']}")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU: the plumbing of every stage")
    parser.add_argument("--out", default="runs/gpu-check", help="folder for the 8 result files")
    parser.add_argument("--budget-s", type=float, default=None,
                        help=f"the whole check's time limit (default {sum(TIME_BOX.values())} s; dry run "
                             f"{DRY_RUN_BUDGET_S} s)")
    parser.add_argument("--stages", default=",".join(STAGES), help="a subset, in order (default: all)")
    parser.add_argument("--stage", help=argparse.SUPPRESS)  # internal: run one stage in this process
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.stage:
        run_stage(args)
        return 0

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stages = [s for s in args.stages.split(",") if s]
    unknown = set(stages) - set(STAGES)
    if unknown:
        parser.error(f"unknown stage(s) {', '.join(sorted(unknown))}; choose from {', '.join(STAGES)}")
    budget = args.budget_s or (DRY_RUN_BUDGET_S if args.dry_run else sum(TIME_BOX.values()))
    boxes = {s: DRY_RUN_TIME_BOX for s in STAGES} if args.dry_run else TIME_BOX
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="keel-gpu-check-") as tmp, open(out / "log.txt", "w") as log:
        args.work = Path(tmp)
        pkgroot = args.work / "pkgroot"
        pkgroot.mkdir()
        (pkgroot / "keel").symlink_to(ROOT)  # `import keel.kernels` reads this tree: nothing to install
        env = _child_env(args, pkgroot)
        summary = {"dry_run": args.dry_run, "blocked_imports": list(BLOCKED), "budget_s": budget,
                   "env": {}, "ceilings": {}, "tests": {}, "stages": {}}
        for stage in stages:
            left = budget - (time.perf_counter() - start)
            if left < 5:
                summary["stages"][stage] = {"status": "skipped: out of time", "seconds": 0.0}
                continue
            banner = f"\n===== {stage} (time box {min(boxes[stage], left):.0f} s) ====="
            print(banner, flush=True)
            log.write(banner + "\n")
            t0 = time.perf_counter()
            status, output = _run_child(_stage_command(args, stage), env, min(boxes[stage], left), log)
            result = {}
            if stage == "tests":
                (out / "tests.txt").write_text(output)
                counts = _test_counts(output)
                summary["tests"] = counts
                if status == "ok" and not counts.get("passed"):
                    status = "ok (nothing ran)"
                result["headline"] = ", ".join(f"{n} {w}" for w, n in counts.items())
            elif (args.work / f"{stage}.json").is_file():
                result = json.loads((args.work / f"{stage}.json").read_text())
            if stage in ("env", "ceilings"):
                summary[stage] = result.get(stage, {})
            summary["stages"][stage] = {"status": status, "seconds": round(time.perf_counter() - t0, 1),
                                        "headline": result.get("headline", "")}
        kernels = _read_rows(args.work / "kernels.rows.jsonl")
        steps = _read_rows(args.work / "step.rows.jsonl")
        ckpt = _read_rows(args.work / "checkpoint.rows.jsonl")
        for name, rows in (("kernels.csv", kernels), ("step.csv", steps), ("checkpoint.csv", ckpt)):
            _write_csv(out / name, rows)
        _plot(kernels, steps, out)
        summary["targets"] = evaluate_targets(kernels, steps, ckpt)
        summary["seconds"] = round(time.perf_counter() - start, 1)
        (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
        lines = summary_lines(summary)
        log.write("\n".join(lines) + "\n")
    print("\n" + "\n".join(lines))
    return 0 if all(s["status"].startswith("ok") for s in summary["stages"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
