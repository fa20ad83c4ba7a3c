"""Claim: `keel data prepare` tokenizes a large JSONL corpus at least as fast as one process calling the
`tokenizers` library's own batch encoder, while its memory stays flat (streaming), and it writes a
resumable, training-ready corpus as it goes.

Measured in one run, on one machine, over the same documents and the same tokenizer.json:
  keel       `keel data prepare CORPUS --tokenizer tokenizer.json --workers N`: streaming JSONL reader,
             N spawned tokenizing processes, shards + atomic progress commits, the final rename
  baseline   one process: the same JSONL read line by line, `Tokenizer.encode_batch` over batches of
             1,000 documents (tokenizers' own Rust thread pool uses every core), tokens counted, not kept
Both run as child processes; wall time includes start-up. Peak memory is the largest sum of RSS over the
process and all its children, sampled every 50 ms. The token counts must agree (keel adds one
end-of-text token per document, subtracted here).

The corpus is generated here, no download: this Python's standard-library sources (test suites excluded),
cut into documents of at most 8 KB, shuffled with a fixed seed and repeated to --mb megabytes of JSONL.
The tokenizer is a byte-level BPE (--vocab tokens) trained here on the first 20 MB and saved as
tokenizer.json. Writes benchmarks/results/data_prepare/data_prepare.csv and .png.

    python benchmarks/data_prepare.py [--mb 200] [--workers N] [--vocab 16384] [--workdir DIR]
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "data_prepare"
SKIP = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}
DOC_CHARS = 8000


def make_corpus(path: Path, mb: float, seed: int = 0) -> int:
    """Standard-library text as JSONL documents, shuffled and repeated to `mb` megabytes; returns the count."""
    import sysconfig

    pieces = []
    for root, dirs, names in os.walk(sysconfig.get_paths()["stdlib"]):
        dirs[:] = sorted(d for d in dirs if d not in SKIP)
        for name in sorted(names):
            if name.endswith((".py", ".txt", ".rst")):
                text = Path(root, name).read_text(errors="replace")
                pieces += [p for i in range(0, len(text), DOC_CHARS) if (p := text[i:i + DOC_CHARS]).strip()]
    rng, n, size = random.Random(seed), 0, 0
    with open(path, "w") as f:
        while size < mb * 1e6:
            rng.shuffle(pieces)
            for piece in pieces:
                line = json.dumps({"text": piece}) + "\n"
                f.write(line)
                size += len(line.encode())
                n += 1
                if size >= mb * 1e6:
                    break
    return n


def train_tokenizer(corpus: Path, out: Path, vocab: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    def sample():
        seen = 0
        with open(corpus) as f:
            for line in f:
                text = json.loads(line)["text"]
                seen += len(text)
                yield text
                if seen > 20e6:
                    return

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(sample(), trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok.save(str(out))


def baseline(corpus: str, tokenizer: str) -> None:
    """The single-process reference (run as this script's child): prints the tokens it produced."""
    from tokenizers import Tokenizer

    tok, tokens, batch = Tokenizer.from_file(tokenizer), 0, []
    with open(corpus, "rb") as f:
        for line in f:
            batch.append(json.loads(line)["text"])
            if len(batch) == 1000:
                tokens += sum(len(e.ids) for e in tok.encode_batch(batch, add_special_tokens=False))
                batch = []
    if batch:
        tokens += sum(len(e.ids) for e in tok.encode_batch(batch, add_special_tokens=False))
    print(json.dumps({"tokens": tokens}))


def tree_rss_bytes(pid: int) -> int:
    """RSS of `pid` and all its descendants (Linux /proc)."""
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
            for task in Path(f"/proc/{p}/task").iterdir():
                stack += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError):
            continue
    return total


def measured(cmd: list[str], env: dict | None = None) -> tuple[float, int, str]:
    """(wall seconds, peak tree RSS in bytes, stdout) of a child process."""
    peak, done = [0], threading.Event()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], tree_rss_bytes(proc.pid))
            time.sleep(0.05)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    seconds = time.perf_counter() - t0
    done.set()
    sampler.join()
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-3000:]}")
    return seconds, peak[0], out


def versions() -> dict:
    import tokenizers

    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    return {"python": platform.python_version(), "tokenizers": tokenizers.__version__, "keel": commit or "?"}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    names = [r["method"].replace(" (", "\n(") for r in rows]
    a.bar(names, [r["tokens_per_s"] / 1e6 for r in rows], color=["tab:blue", "tab:gray"])
    a.set_ylabel("million tokens / s")
    a.set_title("throughput")
    b.bar(names, [r["peak_rss_mb"] for r in rows], color=["tab:blue", "tab:gray"])
    b.set_ylabel("peak RSS, MB (all processes)")
    b.set_title("memory")
    fig.suptitle(f"{rows[0]['corpus_mb']:.0f} MB JSONL, {rows[0]['documents']:,} documents, "
                 f"{rows[0]['cores']} cores", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=200, help="corpus size in MB of JSONL (default 200)")
    parser.add_argument("--workers", type=int, help="keel's tokenizing processes (default: the cores)")
    parser.add_argument("--vocab", type=int, default=16384, help="BPE vocabulary trained for both sides")
    parser.add_argument("--workdir", help="where the corpus and outputs go (default: a temporary folder, removed)")
    parser.add_argument("--baseline", nargs=2, metavar=("CORPUS", "TOKENIZER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.baseline:
        return baseline(*args.baseline)

    from keel.training.corpus import default_workers

    workers = args.workers or default_workers()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="keel-data-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    corpus, tokenizer, out = work / "corpus.jsonl", work / "tokenizer.json", work / "prepared"
    try:
        t0 = time.perf_counter()
        documents = make_corpus(corpus, args.mb)
        train_tokenizer(corpus, tokenizer, args.vocab)
        mb = corpus.stat().st_size / 1e6
        print(f"corpus: {mb:.1f} MB, {documents:,} documents; tokenizer: {args.vocab} BPE "
              f"(made in {time.perf_counter() - t0:.0f}s)", flush=True)

        keel_s, keel_rss, _ = measured([sys.executable, "-m", "keel.launcher.cli", "data", "prepare", str(corpus),
                                        "--out", str(out), "--tokenizer", str(tokenizer), "--workers", str(workers)])
        meta = json.loads((out / "meta.json").read_text())
        keel_tokens = sum(s["tokens"] - s["documents"] for s in meta["splits"].values())
        base_s, base_rss, base_out = measured([sys.executable, __file__, "--baseline", str(corpus), str(tokenizer)])
        base_tokens = json.loads(base_out)["tokens"]
        if keel_tokens != base_tokens:
            raise SystemExit(f"token counts differ: keel {keel_tokens:,}, tokenizers {base_tokens:,}")

        common = {"corpus_mb": round(mb, 1), "documents": documents, "tokens": base_tokens,
                  "cores": default_workers(), **versions()}
        rows = [{"method": f"keel data prepare (--workers {workers})", "seconds": round(keel_s, 2),
                 "tokens_per_s": round(keel_tokens / keel_s), "peak_rss_mb": round(keel_rss / 1e6, 1), **common},
                {"method": "tokenizers encode_batch (1 process)", "seconds": round(base_s, 2),
                 "tokens_per_s": round(base_tokens / base_s), "peak_rss_mb": round(base_rss / 1e6, 1), **common}]
        for r in rows:
            print(f"{r['method']:40s} {r['seconds']:8.1f} s {r['tokens_per_s'] / 1e6:8.2f} M tok/s "
                  f"peak RSS {r['peak_rss_mb']:8.1f} MB")
        print(f"ratio keel / tokenizers: throughput {rows[0]['tokens_per_s'] / rows[1]['tokens_per_s']:.2f}x, "
              f"peak memory {rows[0]['peak_rss_mb'] / rows[1]['peak_rss_mb']:.2f}x "
              f"({base_tokens:,} tokens, counts agree)")
        RESULTS.mkdir(parents=True, exist_ok=True)
        with open(RESULTS / "data_prepare.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        plot(rows, RESULTS / "data_prepare.png")
        print(f"wrote {RESULTS / 'data_prepare.csv'} and data_prepare.png")
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
