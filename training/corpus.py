"""`keel data prepare`: text files / JSONL -> memory-mapped token shards, split by hash.

A prepared directory holds `meta.json` (tokenizer, vocab size, token dtype, shards per split),
`{split}_{i:05d}.bin` flat token arrays with one end-of-text token after each document, and the
tokenizer's own files (BPE only). Writing goes to a temporary folder renamed into place at the end, so a
half-written corpus is never mistaken for a finished one.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from .tokenizer import BPETokenizer, ByteTokenizer

META = "meta.json"
TEXT_SUFFIXES = {".txt", ".md", ".py", ".rst", ".c", ".h", ".json", ".jsonl", ""}
# Test suites of the standard library hold deliberately odd files (encodings, huge literals); skip them.
STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}


class DataError(ValueError):
    """A data problem, reported as one line naming the problem and the fix."""


@dataclass(frozen=True)
class Document:
    key: str      # stable identity used for the train/validation split
    text: bytes


def _token_dtype(vocab_size: int):
    return np.uint8 if vocab_size <= 256 else np.uint16 if vocab_size <= 65536 else np.uint32


def is_validation(key: str, val_percent: float) -> bool:
    """Deterministic split: the first 8 hex digits of sha256(key), as a fraction, below val_percent%."""
    h = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16)
    return h / 0x1_0000_0000 < val_percent / 100


def _files_under(path: Path, skip_dirs: set[str] = frozenset()) -> list[Path]:
    if path.is_file():
        return [path]
    files = []
    for root, dirs, names in os.walk(path):
        dirs[:] = sorted(d for d in dirs if d not in skip_dirs)
        files += [Path(root) / n for n in sorted(names) if Path(n).suffix in TEXT_SUFFIXES]
    return files


def iter_documents(sources: list[Path], skip_dirs: set[str] = frozenset()) -> Iterator[Document]:
    """Each text file is one document; each line of a .jsonl file is one (its "text" field)."""
    for source in sources:
        if not source.exists():
            raise DataError(f"data source {str(source)!r} does not exist; pass existing files or folders")
        for file in _files_under(source, skip_dirs):
            rel = file.relative_to(source).as_posix() if source.is_dir() else file.name
            if file.suffix == ".jsonl":
                with open(file, "rb") as f:
                    for line_no, line in enumerate(f):
                        if not line.strip():
                            continue
                        try:
                            text = json.loads(line)["text"]
                        except (json.JSONDecodeError, KeyError, TypeError) as e:
                            raise DataError(f"{file}:{line_no + 1}: expected a JSON object with a \"text\" "
                                            f"field ({e})") from e
                        yield Document(f"{rel}:{line_no}", text.encode("utf-8"))
            else:
                yield Document(rel, file.read_bytes())


def prepare(sources: list[str | Path], out_dir: str | Path, tokenizer: str = "byte", vocab_size: int = 4096,
            val_percent: float = 5.0, shard_tokens: int = 100_000_000, skip_dirs: set[str] = frozenset(),
            progress: bool = True) -> dict:
    """Tokenize `sources` into `out_dir`; returns the meta dict written to meta.json."""
    from rich.progress import Progress

    sources = [Path(s) for s in sources]
    out_dir = Path(out_dir)
    docs = list(iter_documents(sources, skip_dirs))
    if not docs:
        raise DataError(f"no text files found under {', '.join(map(str, sources))}; "
                        f"expected {', '.join(sorted(s for s in TEXT_SUFFIXES if s))} files")
    splits = {"train": [d for d in docs if not is_validation(d.key, val_percent)],
              "val": [d for d in docs if is_validation(d.key, val_percent)]}
    if not splits["val"] or not splits["train"]:
        # Too few documents for a hash split to fill both sides: hold out the last one instead.
        splits = {"train": docs[:-1] or docs, "val": docs[-1:]}

    tok = ByteTokenizer() if tokenizer == "byte" else BPETokenizer.train(
        (d.text.decode("utf-8", errors="replace") for d in splits["train"]), vocab_size)
    dtype = _token_dtype(tok.vocab_size)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    meta = {"tokenizer": tok.name, "vocab_size": tok.vocab_size, "eot": tok.eot,
            "dtype": np.dtype(dtype).name, "val_percent": val_percent,
            "sources": [str(s) for s in sources], "splits": {}}
    try:
        with Progress(disable=not progress, transient=True) as bar:
            for split, split_docs in splits.items():
                task = bar.add_task(f"tokenizing {split}", total=len(split_docs))
                shards, buffer, n_tokens = [], [], 0

                def flush():
                    name = f"{split}_{len(shards):05d}.bin"
                    np.concatenate(buffer).astype(dtype).tofile(tmp / name)
                    shards.append({"file": name, "tokens": int(sum(len(b) for b in buffer))})
                    buffer.clear()

                buffered = 0
                for doc in split_docs:
                    ids = np.append(tok.encode(doc.text), tok.eot)
                    buffer.append(ids)
                    buffered += len(ids)
                    n_tokens += len(ids)
                    if buffered >= shard_tokens:
                        flush()
                        buffered = 0
                    bar.advance(task)
                if buffer:
                    flush()
                meta["splits"][split] = {"documents": len(split_docs), "tokens": n_tokens, "shards": shards}
        tok.save(tmp)
        (tmp / META).write_text(json.dumps(meta, indent=2))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return meta


def stdlib_path() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def cache_dir() -> Path:
    return Path(os.environ.get("KEEL_CACHE", Path.home() / ".cache" / "keel"))


def default_corpus(tokenizer: str = "byte", vocab_size: int = 4096, progress: bool = True) -> Path:
    """The embedded corpus: this Python's standard-library sources, prepared once and cached."""
    import platform

    tag = f"stdlib-py{platform.python_version()}-{tokenizer}" + (f"{vocab_size}" if tokenizer == "bpe" else "")
    out = cache_dir() / "data" / tag
    if not (out / META).is_file():
        prepare([stdlib_path()], out, tokenizer=tokenizer, vocab_size=vocab_size,
                skip_dirs=STDLIB_SKIP_DIRS, progress=progress)
    return out


def read_meta(data_dir: str | Path) -> dict:
    data_dir = Path(data_dir)
    if not data_dir.exists():
        raise DataError(f"data.path {str(data_dir)!r} does not exist; point it at a folder written by "
                        f"`keel data prepare`, or leave it unset for the built-in corpus")
    if not (data_dir / META).is_file():
        raise DataError(f"data.path {str(data_dir)!r} has no {META}; tokenize it first with "
                        f"`keel data prepare {data_dir} --out DIR` and set data.path=DIR")
    return json.loads((data_dir / META).read_text())
