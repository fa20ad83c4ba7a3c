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
    from ..checkpoints.export import export_safetensors

    path = Path(args.path)
    out = Path(args.out) if args.out else path.parent.parent / "export" / path.name
    try:
        export_safetensors(path, out)
    except ValueError as e:
        raise SystemExit(f"keel: error: {e}") from None
    print(f"wrote {out}/model.safetensors and {out}/config.json")


def add_ckpt_parser(sub: argparse._SubParsersAction) -> None:
    ckpt = sub.add_parser("ckpt", help="list, verify and export checkpoints").add_subparsers(
        dest="ckpt_command", required=True, metavar="ACTION")
    p = ckpt.add_parser("ls", help="table of a run's checkpoints: step, tokens, size, layout, committed or not")
    p.add_argument("run_dir", help="a run folder (runs/NAME) or its checkpoints/ folder")
    p.set_defaults(func=cmd_ls)
    p = ckpt.add_parser("verify", help="check every file of a checkpoint against its manifest; exit 1 if bad")
    p.add_argument("path", help="a checkpoint folder (…/checkpoints/step_0000100), or a run folder for all")
    p.add_argument("--deep", action="store_true",
                   help="re-read every byte against its sha256 checksum (default: presence and sizes, instant)")
    p.set_defaults(func=cmd_verify)
    p = ckpt.add_parser("export", help="consolidated weights for inference")
    p.add_argument("path", help="a committed checkpoint folder")
    p.add_argument("--to", choices=["safetensors"], default="safetensors")
    p.add_argument("--out", help="output folder (default: RUN/export/step_XXXXXXX)")
    p.set_defaults(func=cmd_export)
