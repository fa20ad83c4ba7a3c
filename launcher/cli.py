"""The `keel` command: parses arguments and dispatches; the work lives in the packages it calls."""
from __future__ import annotations

import argparse
import sys

from ..training.run import add_train_args, guarded, train_from_file


def cmd_train(args) -> None:
    if args.nproc_per_node > 1:
        from .local import run_torchrun

        raise SystemExit(run_torchrun(args.config, args.overrides, args.nproc_per_node))
    train_from_file(args.config, args.overrides)


def cmd_estimate(args) -> None:
    from .estimate import print_estimate
    from ..training.config import load_config

    print_estimate(load_config(args.config, args.overrides), args.world_size)


def cmd_data_prepare(args) -> None:
    from ..training.corpus import prepare

    meta = prepare(args.sources, args.out, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
                   val_percent=args.val_percent)
    splits = ", ".join(f"{k}: {v['documents']} documents, {v['tokens']:,} tokens" for k, v in meta["splits"].items())
    print(f"wrote {args.out} ({meta['tokenizer']} tokenizer, vocab {meta['vocab_size']}; {splits}); "
          f"train on it with --set data.path={args.out}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="keel", description="Distributed LLM training that finishes.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a model in the foreground")
    add_train_args(p)
    p.add_argument("--nproc-per-node", type=int, default=1, metavar="N",
                   help="start N local processes (torchrun) for a parallel layout, e.g. --set parallel.tp=2")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("estimate", help="parameters, FLOPs per token and memory per device of a config")
    add_train_args(p)
    p.add_argument("--world-size", type=int, default=1, metavar="N",
                   help="number of devices the layout runs on (parallel degrees of -1 fill the rest)")
    p.set_defaults(func=cmd_estimate)

    from ..kernels.bench import add_bench_parser

    add_bench_parser(sub)

    data = sub.add_parser("data", help="prepare training data").add_subparsers(dest="data_command",
                                                                                 required=True, metavar="ACTION")
    p = data.add_parser("prepare", help="tokenize text files / JSONL into memory-mapped token shards")
    p.add_argument("sources", nargs="+", help="text files, JSONL files (a \"text\" field per line) or folders")
    p.add_argument("--out", required=True, help="output folder; then train with --set data.path=OUT")
    p.add_argument("--tokenizer", choices=["byte", "bpe"], default="byte")
    p.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary size (trained here)")
    p.add_argument("--val-percent", type=float, default=5.0, help="share of documents held out, by hash")
    p.add_argument("--debug", action="store_true")
    p.set_defaults(func=cmd_data_prepare)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        guarded(lambda: args.func(args), getattr(args, "debug", False))
    except KeyboardInterrupt:
        print("keel: interrupted", file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
