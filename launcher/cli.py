"""The `keel` command: parses arguments and dispatches; the work lives in the packages it calls."""
from __future__ import annotations

import argparse
import sys

from ..training.run import add_train_args, guarded, train_from_file


def cmd_train(args) -> None:
    if args.resume is not None:
        args.overrides.append(f"checkpoint.resume={args.resume}")
    if args.resume_changed:
        args.overrides.append("checkpoint.resume_changed=true")
    if args.forecast:
        args.overrides.append(f"train.forecast={forecast_file(args.config, args.overrides, args.forecast)}")
    if args.launcher == "torchrun":
        from .local import run_torchrun

        raise SystemExit(run_torchrun(args.config, args.overrides, args.nproc_per_node or 1))
    if args.launcher == "inline":
        if (args.nproc_per_node or 1) > 1:
            raise SystemExit("keel: error: --launcher inline runs one process; use ray or torchrun for more")
        print("keel: --launcher inline: training in this process with no supervisor; a crash or a hang ends the "
              "run (resume it with the same command)", file=sys.stderr, flush=True)
        train_from_file(args.config, args.overrides)
        return
    # Every run is supervised, one process included: a crash, a hang or a lost node restarts it.
    from .raylaunch import train_on_ray

    train_on_ray(args.config, args.overrides, args.nproc_per_node, args.nnodes, args.address,
                 args.cpus_per_worker, args.gpus_per_worker)


def forecast_file(config: str, overrides: list[str], fit_path: str) -> str:
    """Predict this run from fit.json now, before anything starts; the loop watches it against the file."""
    from pathlib import Path

    from ..scaling.fit import ScalingFit
    from ..scaling.forecast import forecast_for, write_forecast
    from ..training.config import load_config

    cfg = load_config(config, overrides)
    forecast = forecast_for(ScalingFit.load(fit_path), cfg, fit_path)
    path = write_forecast(forecast, Path(cfg.train.output_dir) / cfg.train.name / "forecast.json")
    return str(path.resolve())


def cmd_submit(args) -> None:
    from .jobs import submit

    extra = []
    if args.nproc_per_node:
        extra += ["--nproc-per-node", str(args.nproc_per_node)]
    if args.nnodes != 1:
        extra += ["--nnodes", str(args.nnodes)]
    if args.resume:
        extra += ["--resume", args.resume]
    if args.resume_changed:
        extra += ["--resume-changed"]
    job_id = submit(args.config, args.overrides, args.address, extra, args.working_dir, args.python,
                    args.nproc_per_node, args.nnodes)
    print(job_id)


def cmd_status(args) -> None:
    from .jobs import status

    print("\n".join(status(args.address, args.job)))


def cmd_logs(args) -> None:
    from .jobs import logs

    logs(args.address, args.job, args.follow)


def cmd_stop(args) -> None:
    from .jobs import stop

    print(f"{args.job}: {stop(args.address, args.job)}")


def cmd_list(args) -> None:
    from .jobs import list_jobs

    print("\n".join(list_jobs(args.address)))


def cmd_chaos(args) -> None:
    from .jobs import chaos

    v = chaos(args.address, args.seed, actor=args.actor)
    print(f"killed the {v['what']} of {v['name'] or 'a rank worker'} (pid {v['pid']}, actor {v['actor_id'][:12]}, "
          f"node {v['node_id'][:12]})")


def cmd_estimate(args) -> None:
    from .estimate import print_estimate
    from ..training.config import load_config

    print_estimate(load_config(args.config, args.overrides), args.world_size)


def cmd_generate(args) -> None:
    from ..training.generate import complete

    text, _ = complete(args.ckpt, args.prompt, args.max_new_tokens, args.temperature, args.top_k, args.seed)
    print(args.prompt + text)


def cmd_data_prepare(args) -> None:
    from ..training.corpus import default_workers, prepare

    def say(line: str) -> None:
        print(f"keel: {line}", file=sys.stderr, flush=True)

    try:
        meta = prepare(args.sources, args.out, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
                       val_percent=args.val_percent, text_column=args.text_column, eot=args.eot,
                       workers=default_workers() if args.workers is None else args.workers, say=say)
    except KeyboardInterrupt:
        print("keel: interrupted; run the same command again to continue after the last committed chunk",
              file=sys.stderr)
        raise SystemExit(130) from None
    splits = ", ".join(f"{k}: {v['documents']} documents, {v['tokens']:,} tokens" for k, v in meta["splits"].items())
    print(f"wrote {args.out} ({meta['tokenizer']} tokenizer, vocab {meta['vocab_size']}; {splits}); "
          f"train on it with --set data.path={args.out}")


def add_layout_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nproc-per-node", type=int, metavar="N",
                   help="processes (ranks) per node; default: the product of the parallel degrees when none is "
                        "-1 (so --set parallel.dp_shard=2 alone runs two), else 1")
    p.add_argument("--nnodes", type=int, default=1, metavar="M", help="nodes to spread over (Ray cluster)")
    p.add_argument("--resume", metavar="auto|never|PATH",
                   help="resume from the newest committed checkpoint of the run (auto, the default), start "
                        "afresh (never), or from a checkpoint folder (PATH); same as --set checkpoint.resume=...")
    p.add_argument("--resume-changed", action="store_true",
                   help="resume although the config changed the data order or the optimisation (batch, sequence "
                        "length, data, schedule, seed...); same as --set checkpoint.resume_changed=true")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole parser; `command` (the first word of the command line) spares loading the heavy ones."""
    parser = argparse.ArgumentParser(prog="keel", description="Distributed LLM training that finishes.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a model in the foreground")
    add_train_args(p)
    add_layout_args(p)
    p.add_argument("--launcher", choices=["ray", "torchrun", "inline"], default="ray",
                   help="ray (default): every rank, one included, under the supervisor on an embedded Ray (or the "
                        "cluster at --address), restarted on a crash, a hang or a lost node; torchrun: plain "
                        "torchrun (Slurm); inline: one process in this one, no supervision (debugging)")
    p.add_argument("--address", help="Ray cluster to run on (HOST:PORT of the head, or RAY_ADDRESS); "
                                     "default: an embedded Ray on this machine")
    p.add_argument("--cpus-per-worker", type=float, metavar="N",
                   help="CPUs reserved per rank (default: 1 on a cluster; the machine's cores shared out locally)")
    p.add_argument("--gpus-per-worker", type=float, metavar="N",
                   help="GPUs per rank (default: 1 when the cluster has GPUs and train.device allows, else 0)")
    p.add_argument("--forecast", metavar="FIT_JSON",
                   help="predict this run's loss from a scaling fit (keel scale fit) before it starts, show every "
                        "eval beside the prediction, and report when the run leaves the forecast")
    p.set_defaults(func=cmd_train)

    jobs_help = "the cluster's job API, http://HOST:8265 (default: RAY_ADDRESS)"
    p = sub.add_parser("submit", help="run a config on a Ray cluster as a job (Ray Jobs API); prints the job id")
    add_train_args(p)
    add_layout_args(p)
    p.add_argument("--address", help=jobs_help)
    p.add_argument("--working-dir", default=".", help="folder sent with the job (holds the config); default .")
    p.add_argument("--python", default="python", help="the cluster's Python with keel installed (default python)")
    p.set_defaults(func=cmd_submit)
    for name, fn, help_ in (("status", cmd_status, "state of a job (or the latest jobs)"),
                            ("logs", cmd_logs, "a job's output"), ("stop", cmd_stop, "stop a job"),
                            ("list", cmd_list, "jobs on the cluster, newest first")):
        p = sub.add_parser(name, help=help_)
        if name == "status":
            p.add_argument("job", nargs="?")
        elif name != "list":
            p.add_argument("job")
        if name == "logs":
            p.add_argument("--follow", "-f", action="store_true", help="keep printing until the job ends")
        p.add_argument("--address", help=jobs_help)
        p.add_argument("--debug", action="store_true")
        p.set_defaults(func=fn)
    p = sub.add_parser("chaos", help="SIGKILL a random rank worker of a running job (a supervision drill)")
    p.add_argument("--address", help="the cluster, HOST:PORT of the head's GCS (default: RAY_ADDRESS)")
    p.add_argument("--seed", type=int, help="make the choice of victim repeatable")
    p.add_argument("--actor", action="store_true",
                   help="kill the rank's actor (the agent around its training process) rather than the training "
                        "process: the supervisor then replaces the actors instead of restarting in place")
    p.add_argument("--debug", action="store_true")
    p.set_defaults(func=cmd_chaos)

    p = sub.add_parser("estimate", help="parameters, FLOPs per token and memory per device of a config")
    add_train_args(p)
    p.add_argument("--world-size", type=int, default=1, metavar="N",
                   help="number of devices the layout runs on (parallel degrees of -1 fill the rest)")
    p.set_defaults(func=cmd_estimate)

    p = sub.add_parser("generate", help="text from a checkpoint, greedy or sampled")
    p.add_argument("ckpt", help="a checkpoint folder, or a run folder for its newest checkpoint")
    p.add_argument("--prompt", default="", help="the text to continue (read as the start of a document)")
    p.add_argument("--max-new-tokens", type=int, default=200, metavar="N")
    p.add_argument("--temperature", type=float, default=0.0, help="0 (the default) = greedy")
    p.add_argument("--top-k", type=int, metavar="K", help="sample from the K likeliest tokens only")
    p.add_argument("--seed", type=int, default=0, help="the sampling seed")
    p.add_argument("--debug", action="store_true")
    p.set_defaults(func=cmd_generate)

    from .ckpt import add_ckpt_parser
    from .scale import add_scale_parser
    from .spikes import add_spikes_parser

    if command == "bench":
        from ..kernels.bench import add_bench_parser  # torch and the kernels: only when benchmarking
        from .bench_step import add_step_parser

        add_step_parser(add_bench_parser(sub))
    else:
        sub.add_parser("bench", help="benchmark kernels per op, or whole training steps (keel bench --help)")
    add_ckpt_parser(sub)
    add_spikes_parser(sub)
    add_scale_parser(sub)

    data = sub.add_parser("data", help="prepare training data").add_subparsers(dest="data_command",
                                                                                 required=True, metavar="ACTION")
    p = data.add_parser("prepare", help="tokenize text, JSONL, Parquet or saved datasets into memory-mapped "
                                        "token shards (resumable: run it again after an interruption)")
    p.add_argument("sources", nargs="+",
                   help="text files (one document each), JSONL (.jsonl, .jsonl.gz, .jsonl.zst; a document a line), "
                        "Parquet files (a document a row), folders written by datasets' save_to_disk, or folders "
                        "of any of these")
    p.add_argument("--out", required=True, help="output folder; then train with --set data.path=OUT")
    p.add_argument("--tokenizer", default="byte", metavar="byte|bpe|PATH",
                   help="byte (default, 256 tokens), bpe (trained here on the training split, --vocab-size "
                        "tokens), or a Hugging Face tokenizer.json file or a folder holding one")
    p.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary size (trained here)")
    p.add_argument("--val-percent", type=float, default=5.0,
                   help="share held out for validation: whole documents, by a hash of their path and line/row; "
                        "with too few documents, the last share of the tokens (default 5)")
    p.add_argument("--text-column", default="text", metavar="NAME",
                   help="the JSONL field or Parquet/Arrow column holding the text (default text)")
    p.add_argument("--eot", metavar="TOKEN",
                   help="the end-of-text token of a tokenizer.json, when it is none of <|endoftext|>, </s>, "
                        "<|end_of_text|>, <eos> nor the eos_token of a tokenizer_config.json beside it")
    p.add_argument("--workers", type=int, metavar="N",
                   help="tokenizing processes (default: the machine's cores)")
    p.add_argument("--debug", action="store_true")
    p.set_defaults(func=cmd_data_prepare)
    return parser


# Packages keel can run without, and what installs each (setup.py's extras; ray is a requirement, but an
# environment can still lack it).
EXTRAS = {"ray": "keel[ray]", "deepspeed": "keel[deepspeed]", "megatron": "keel[megatron]",
          "triton": "keel[triton]", "transformers": "transformers"}


def main(argv: list[str] | None = None) -> None:
    from .cluster import LauncherError

    words = sys.argv[1:] if argv is None else argv
    args = build_parser(next((w for w in words if not w.startswith("-")), None)).parse_args(argv)
    debug = getattr(args, "debug", False)
    try:
        guarded(lambda: args.func(args), debug)
    except LauncherError as e:  # the cluster's or the job's problem, told like a config error
        if debug:
            raise
        print(f"keel: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except ModuleNotFoundError as e:
        extra = EXTRAS.get((e.name or "").split(".")[0])
        if debug or extra is None:
            raise
        print(f"keel: error: this needs {e.name}, which is not installed here; install it with "
              f"pip install '{extra}' (or `make install`)", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("keel: interrupted", file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
