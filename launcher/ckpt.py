"""`keel ckpt ls | verify | export`: look at, check and convert the checkpoints of a run."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..checkpoints import manifest as mf


def _folder(path: Path) -> Path:
    """Accept a run folder (holding checkpoints/) or the checkpoints folder itself."""
    return path / "checkpoints" if (path / "checkpoints").is_dir() else path


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


def cmd_ls(args) -> None:
    folder = _folder(Path(args.run_dir))
    found = mf.entries(folder)
    if not found:
        print(f"no checkpoints under {folder}")
        return
    # Only with a table to draw: an empty folder is answered without loading rich.
    from rich.console import Console
    from rich.table import Table

    table = Table(title=str(folder), title_justify="left")
    for col in ("step", "tokens", "size", "layout", "ranks", "status"):
        table.add_column(col, justify="right" if col in ("step", "tokens", "size", "ranks") else "left")
    for e in found:
        status = "committed" if e.committed else "not committed"
        tokens = layout = ranks = "-"
        if e.committed:
            try:
                m = mf.read_manifest(e.path)
                tokens, ranks = f"{m['tokens']:,}", str(m["world_size"])
                layout = " ".join(f"{k}={v}" for k, v in m["layout"].items() if v != 1) or "single"
            except (ValueError, KeyError) as err:
                status = f"bad manifest ({err})"
            if problems := mf.problems(e.path, deep=False):
                status = f"damaged: {problems[0]}"
        table.add_row(str(e.step), tokens, f"{_size(e.path) / 1e6:,.1f} MB", layout, ranks, status)
    Console(highlight=False).print(table, soft_wrap=True)


def cmd_verify(args) -> None:
    path = Path(args.path)
    # A checkpoint folder is checked alone; a run folder has each of its checkpoints checked.
    targets = [path] if mf.NAME.match(path.name) else [e.path for e in mf.entries(_folder(path))] or [path]
    bad = 0
    checked = "size and checksum" if args.deep else "size (--deep to re-read the checksums)"
    for target in targets:
        problems = mf.problems(target, deep=args.deep)
        bad += bool(problems)
        print(f"{target}: " + (f"ok (every file matches its {checked})" if not problems
                               else "BAD: " + "; ".join(problems)))
    raise SystemExit(1 if bad else 0)


def cmd_export(args) -> None:
    from ..checkpoints.export import export_hf, export_keel

    fmt, *to_out = args.to
    if fmt not in ("hf", "keel") or len(to_out) > 1:
        raise SystemExit(f"keel: error: --to expects hf or keel, then optionally OUT; got {' '.join(args.to)}")
    path = Path(args.path)
    given = to_out[0] if to_out else args.out_dir or args.out
    out = Path(given) if given else path.parent.parent / "export" / path.name
    try:
        if fmt == "keel":
            export_keel(path, out)
        else:
            eot, tokenizer_file = _run_tokenizer(path)
            export_hf(path, out, dtype=args.dtype, eot=eot, tokenizer_file=tokenizer_file)
    except ValueError as e:
        raise SystemExit(f"keel: error: {e}") from None
    print(f"wrote {out} ({'a Hugging Face Llama: from_pretrained() loads it' if fmt == 'hf' else 'keel names'})")


def _run_tokenizer(path: Path) -> tuple[int | None, Path | None]:
    """The end-of-text id and the `tokenizers` file of the corpus the checkpoint's run trained on."""
    from ..checkpoints import manifest as mf
    from ..training.config import config_from_dict
    from ..training.corpus import DataError
    from ..training.generate import run_corpus
    from ..training.tasks import corpus_tokenizer

    try:
        data_dir = run_corpus(config_from_dict(mf.read_manifest(path)["config"]))
        _, meta = corpus_tokenizer(data_dir)
    except (DataError, ValueError) as e:
        print(f"keel: warning: the run's corpus is not readable ({e}); exporting the weights without a "
              f"tokenizer")
        return None, None
    file = data_dir / "tokenizer.json"
    return meta["eot"], file if file.is_file() else None


def add_ckpt_parser(sub: argparse._SubParsersAction) -> None:
    ckpt = sub.add_parser("ckpt", help="list, verify and export checkpoints").add_subparsers(
        dest="ckpt_command", required=True, metavar="ACTION")
    p = ckpt.add_parser("ls", help="table of a run's checkpoints: step, tokens, size, layout, committed or not")
    p.add_argument("run_dir", help="a run folder (runs/NAME) or its checkpoints/ folder")
    p.set_defaults(func=cmd_ls)
    p = ckpt.add_parser("verify", help="check every file of a checkpoint against its manifest; exit 1 if bad")
    p.add_argument("path", help="a checkpoint folder (…/checkpoints/step_0000100), or a run folder for all")
    p.add_argument("--deep", action="store_true",
                   help="re-read every byte against its checksum (default: presence and sizes, instant)")
    p.set_defaults(func=cmd_verify)
    p = ckpt.add_parser("export", help="consolidated weights: a Hugging Face Llama folder, or keel's own names")
    p.add_argument("path", metavar="CKPT", help="a committed checkpoint folder")
    p.add_argument("out_dir", nargs="?", metavar="OUT", help="output folder (default: RUN/export/step_XXXXXXX)")
    # OUT may follow the format (`--to hf OUT`, as users write it): argparse would not take a positional there.
    p.add_argument("--to", nargs="+", default=["hf"], metavar="FORMAT [OUT]",
                   help="hf: config.json + model.safetensors + tokenizer that transformers loads as "
                        "LlamaForCausalLM (default); keel: keel's parameter names and model section")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="weights' dtype in the hf export (training keeps fp32 masters; default float32)")
    p.add_argument("--out", help=argparse.SUPPRESS)  # the older spelling of OUT
    p.set_defaults(func=cmd_export)
