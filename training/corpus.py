"""`keel data prepare`: documents (training/sources.py) -> memory-mapped token shards for training/data.py.

A prepared directory holds `meta.json` (tokenizer, vocab size, token dtype, how the split was made, shards
per split), `{split}_{i:05d}.bin` flat token arrays with one end-of-text token after each document, and the
tokenizer's tokenizer.json (all but the byte tokenizer).

The split. Each document goes to train or validation by a hash of its key (its path, plus line or row), so
the split is stable and no document is on both sides. When the documents are too few for that (fewer than
100 / val_percent, so not even one is expected in validation, or the hash leaves a side empty; one big
text file, say) the split is by position instead: validation is the last val_percent of the tokens, cut
inside a document, as nanoGPT does for one file. Either way train and validation share no token.

Streaming and resuming. Documents are read as a stream, tokenized in batches (across worker processes
when `workers` > 1; results are used in input order, so the output does not depend on the count) and
appended to the open shard of their split. After each batch the shards are synced and `progress.json`
(the documents consumed, each shard's length) is replaced atomically: one committed chunk. All of this
happens in `.NAME.partial` beside the output folder; running the same preparation again truncates the
shards to the last commit and continues after its documents, while different arguments or changed input
files start over. Only a finished corpus is renamed to NAME, so a half-written one is never taken as done.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import sysconfig
from collections import deque
from contextlib import ExitStack, closing, contextmanager
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from .sources import DataError, Document, InputFile, iter_documents, list_inputs
from .tokenizer import BPETokenizer, ByteTokenizer, HFTokenizer, TokenizerError, tokenizer_from_spec

META = "meta.json"
PROGRESS = "progress.json"
SPLITS = ("train", "val")
# Text per batch handed to a worker: large enough to amortise the hand-over, small enough that the
# batches in flight (two per worker) keep memory flat.
BATCH_BYTES = 1 << 20
# Test suites of the standard library hold deliberately odd files (encodings, huge literals); skip them.
STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}

__all__ = ["DataError", "prepare", "read_meta", "default_corpus", "default_workers", "is_validation",
           "cache_dir", "stdlib_path"]


def _token_dtype(vocab_size: int):
    return np.uint8 if vocab_size <= 256 else np.uint16 if vocab_size <= 65536 else np.uint32


def default_workers() -> int:
    """The cores this process may run on (fewer than the machine's under taskset or in a container)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def is_validation(key: str, val_percent: float) -> bool:
    """Deterministic split: the first 8 hex digits of sha256(key), as a fraction, below val_percent%."""
    h = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16)
    return h / 0x1_0000_0000 < val_percent / 100


def prepare(sources: list[str | Path], out_dir: str | Path, tokenizer: str = "byte", vocab_size: int = 4096,
            val_percent: float = 5.0, shard_tokens: int = 100_000_000, skip_dirs: set[str] = frozenset(),
            progress: bool = True, text_column: str = "text", eot: str | None = None, workers: int = 1,
            batch_bytes: int = BATCH_BYTES, say: Callable[[str], None] = lambda line: None,
            reuse: bool = False) -> dict:
    """Tokenize `sources` into `out_dir` and return the meta dict written to meta.json.

    `tokenizer` is "byte", "bpe" (trained here on the training split, `vocab_size` tokens) or the path of a
    Hugging Face tokenizer.json (or of a folder holding one); `eot` names its end-of-text token when it
    cannot be found. `workers` > 1 tokenizes in that many spawned processes: a script calling this must
    guard its top level with `if __name__ == "__main__":`, as multiprocessing requires. `say` receives
    one-line notes (a resumed run, a split by position, a wait for another process).

    One process at a time prepares a given out_dir: the others wait on a lock file beside it (`.NAME.lock`,
    released by the kernel if its holder dies). With `reuse`, a finished out_dir found once the lock is held
    is returned as it is, so runs that start together on an empty cache prepare the corpus once."""
    sources, out_dir = [Path(s) for s in sources], Path(out_dir)
    if not 0 < val_percent < 100:
        raise DataError(f"val_percent must be in (0, 100), got {val_percent:g}; pass e.g. --val-percent 5")
    if workers < 1:
        raise DataError(f"workers must be at least 1, got {workers}; pass e.g. --workers {default_workers()}")
    files = list_inputs(sources, skip_dirs)
    if not files:
        raise DataError(f"no input files found under {', '.join(map(str, sources))}; expected text, .jsonl, "
                        f".jsonl.gz, .jsonl.zst or .parquet files, or a datasets.save_to_disk folder")
    user_tok = _user_tokenizer(tokenizer, eot)
    job = Job(files, tokenizer, vocab_size, val_percent, shard_tokens, text_column,
              user_tok.json_text if isinstance(user_tok, HFTokenizer) else None, eot)
    with _exclusive(out_dir, say):
        if reuse and (out_dir / META).is_file():
            return read_meta(out_dir)
        return _prepare(files, out_dir, user_tok, job, workers, batch_bytes, progress, say, sources)


@contextmanager
def _exclusive(out_dir: Path, say: Callable[[str], None]) -> Iterator[None]:
    # Two preparations of one folder share its `.partial` directory: each would truncate the other's shards.
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(out_dir.parent / f".{out_dir.name}.lock", "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"waiting for another process that is preparing {out_dir}")
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _prepare(files: list[InputFile], out_dir: Path, user_tok, job: Job, workers: int, batch_bytes: int,
             progress: bool, say: Callable[[str], None], sources: list[Path]) -> dict:
    partial = out_dir.parent / f".{out_dir.name}.partial"
    try:
        state = _resumable(partial, job.fingerprint())
        if state is None:
            tok = user_tok or _train_bpe(files, job.text_column, job.vocab_size, job.val_percent)
            state = _start(partial, job, tok)
        else:
            tok = _tokenizer_of(partial, state)
            say(f"resuming {out_dir}: {state['documents']:,} documents in {state['chunks']} committed chunks "
                f"are kept; tokenizing the rest")
        _tokenize(files, tok, state, partial, job, workers, batch_bytes, progress)
        meta = _finish(partial, state, tok, job, sources)
    except DataError:
        shutil.rmtree(partial, ignore_errors=True)  # bad input: nothing worth resuming
        raise
    if meta["split_by"] == "position":
        say(meta["split_note"])
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(partial, out_dir)
    return meta


@dataclass(frozen=True)
class Job:
    """Everything that decides the output: a resumed run must match it exactly, or it starts over."""
    files: list[InputFile]
    tokenizer: str
    vocab_size: int
    val_percent: float
    shard_tokens: int
    text_column: str
    tokenizer_json: str | None
    eot: str | None

    def fingerprint(self) -> str:
        fields = {"files": [(str(f.path.resolve()), f.key, f.size, f.mtime_ns) for f in self.files],
                  "tokenizer": self.tokenizer if self.tokenizer_json is None
                  else hashlib.sha256(self.tokenizer_json.encode()).hexdigest(),
                  "vocab_size": self.vocab_size if self.tokenizer == "bpe" else None, "eot": self.eot,
                  "val_percent": self.val_percent, "shard_tokens": self.shard_tokens,
                  "text_column": self.text_column}
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def _user_tokenizer(tokenizer: str, eot: str | None):
    """The byte tokenizer or the user's file; None for "bpe", which is trained once the inputs are read."""
    if tokenizer == "byte":
        return ByteTokenizer()
    if tokenizer == "bpe":
        return None
    if not Path(tokenizer).exists():
        raise DataError(f"tokenizer {tokenizer!r} is neither 'byte', 'bpe' nor an existing path; pass a Hugging "
                        f"Face tokenizer.json file or a folder holding one")
    try:
        return HFTokenizer.from_path(tokenizer, eot)
    except TokenizerError as e:
        raise DataError(str(e)) from e


def _train_bpe(files: list[InputFile], text_column: str, vocab_size: int, val_percent: float) -> BPETokenizer:
    """Trained on the documents the hash puts in train; on all of them when it puts none there (too few
    documents, split by position later)."""
    def texts(train_only: bool) -> Iterator[str]:
        for doc in iter_documents(files, text_column):
            if not (train_only and is_validation(doc.key, val_percent)):
                yield doc.text.decode("utf-8", errors="replace") if isinstance(doc.text, bytes) else doc.text
                seen[0] += 1

    seen = [0]
    tok = BPETokenizer.train(texts(train_only=True), vocab_size)
    return tok if seen[0] else BPETokenizer.train(texts(train_only=False), vocab_size)


# ---- the progress record -------------------------------------------------------------------------------

def _commit(partial: Path, state: dict) -> None:
    tmp = partial / f"{PROGRESS}.tmp"
    with open(tmp, "w") as f:
        json.dump(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, partial / PROGRESS)


def _start(partial: Path, job: Job, tok) -> dict:
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    tok.save(partial)
    state = {"fingerprint": job.fingerprint(), "tokenizer": tok.name, "eot_token": tok.eot_text,
             "documents": 0, "chunks": 0, "splits": {s: {"documents": 0, "tokens": 0, "shards": []} for s in SPLITS}}
    _commit(partial, state)
    return state


def _resumable(partial: Path, fingerprint: str) -> dict | None:
    """The committed state of an earlier run of this same job, its shards cut back to it; else None."""
    try:
        state = json.loads((partial / PROGRESS).read_text())
    except (OSError, ValueError):
        return None
    if state.get("fingerprint") != fingerprint:
        return None
    kept = {PROGRESS}
    for split in state["splits"].values():
        for shard in split["shards"]:
            path = partial / shard["file"]
            if not path.is_file() or path.stat().st_size < shard["bytes"]:
                return None
            os.truncate(path, shard["bytes"])  # drop what was appended after the last commit
            kept.add(shard["file"])
    for path in partial.glob("*.bin"):
        if path.name not in kept:
            path.unlink()
    return state


def _tokenizer_of(partial: Path, state: dict):
    if state["tokenizer"] == "byte":
        return ByteTokenizer()
    return BPETokenizer.load(partial) if state["tokenizer"] == "bpe" else HFTokenizer(
        (partial / "tokenizer.json").read_text(), state["tokenizer"], state["eot_token"])


# ---- tokenizing ----------------------------------------------------------------------------------------

class ShardWriter:
    """Appends one split's documents to its shards, starting a new shard after the document that brings the
    open one to `shard_tokens` tokens (shards end at document ends, except after a split by position)."""

    def __init__(self, partial: Path, split: str, record: dict, dtype, shard_tokens: int):
        self.partial, self.split, self.record = partial, split, record
        self.dtype, self.shard_tokens = np.dtype(dtype), shard_tokens
        self._file = None

    def write(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        ends, start = np.cumsum(lengths), 0
        while start < len(tokens):
            shards = self.record["shards"]
            if not shards or shards[-1]["tokens"] >= self.shard_tokens:
                self._open_new()
            room = self.shard_tokens - self.record["shards"][-1]["tokens"]
            i = int(np.searchsorted(ends, start + room))  # the document that fills the shard
            stop = int(ends[i]) if i < len(ends) else len(tokens)
            self._append(tokens[start:stop], int(np.sum((ends > start) & (ends <= stop))))
            start = stop
        self.record["documents"] += len(lengths)

    def _open_new(self) -> None:
        self.close()
        name = f"{self.split}_{len(self.record['shards']):05d}.bin"
        self.record["shards"].append({"file": name, "tokens": 0, "bytes": 0, "documents": 0})

    def _append(self, tokens: np.ndarray, documents: int) -> None:
        shard = self.record["shards"][-1]
        if self._file is None:
            self._file = open(self.partial / shard["file"], "ab")
        data = tokens.astype(self.dtype, copy=False).tobytes()
        self._file.write(data)
        shard["tokens"] += len(tokens)
        shard["bytes"] += len(data)
        shard["documents"] += documents
        self.record["tokens"] += len(tokens)

    def sync(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self.sync()
            self._file.close()
            self._file = None


def _batches(docs: Iterator[Document], batch_bytes: int) -> Iterator[list[Document]]:
    batch, size = [], 0
    for doc in docs:
        batch.append(doc)
        size += len(doc.text)
        if size >= batch_bytes:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _encode_batch(tok, texts: list, dtype) -> tuple[np.ndarray, np.ndarray]:
    tokens, lengths = tok.encode_documents(texts)
    return tokens.astype(dtype, copy=False), lengths


_worker_tok = None


def _worker_init(spec: tuple, parent: int) -> None:
    import signal
    import threading
    import time

    global _worker_tok
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    # One core per worker: the workers are the parallelism, tokenizers' own threads would oversubscribe.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker_tok = tokenizer_from_spec(spec)

    def exit_with_parent():  # a SIGKILLed parent cannot stop its pool; don't outlive it
        while os.getppid() == parent:
            time.sleep(1)
        os._exit(1)
    threading.Thread(target=exit_with_parent, daemon=True).start()


def _worker_encode(texts: list, dtype) -> tuple[np.ndarray, np.ndarray]:
    return _encode_batch(_worker_tok, texts, dtype)


def _encoded(tok, batches: Iterator[list[Document]], workers: int, dtype):
    """(batch, (tokens, lengths)) in input order, with at most two batches per worker in flight."""
    if workers <= 1:
        for batch in batches:
            yield batch, _encode_batch(tok, [d.text for d in batch], dtype)
        return
    import multiprocessing

    # spawn, not fork: the parent may have used tokenizers' thread pool (training BPE), which does not
    # survive a fork, and rich's progress thread is running.
    with multiprocessing.get_context("spawn").Pool(workers, _worker_init, (tok.spec(), os.getpid())) as pool:
        pending = deque()
        for batch in batches:
            pending.append((batch, pool.apply_async(_worker_encode, ([d.text for d in batch], dtype))))
            if len(pending) >= 2 * workers:
                batch, result = pending.popleft()
                yield batch, result.get()
        while pending:
            batch, result = pending.popleft()
            yield batch, result.get()


def _tokenize(files: list[InputFile], tok, state: dict, partial: Path, job: Job, workers: int,
              batch_bytes: int, progress: bool) -> None:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    dtype = _token_dtype(tok.vocab_size)
    writers = {s: ShardWriter(partial, s, state["splits"][s], dtype, job.shard_tokens) for s in SPLITS}
    file_starts = np.concatenate([[0], np.cumsum([f.size for f in files])])
    docs = islice(iter_documents(files, job.text_column), state["documents"], None)
    columns = (TextColumn("tokenizing"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
               TextColumn("{task.fields[docs]:,} documents, {task.fields[tokens]:,} tokens"),
               TimeElapsedColumn(), TimeRemainingColumn())
    try:
        # closing(): an interruption stops the worker pool now, not when the generator is collected.
        # On stderr, and only on a terminal: rich leaves a blank line behind even when transient.
        console = Console(stderr=True)
        with Progress(*columns, console=console, disable=not (progress and console.is_terminal), transient=True) \
                as bar, ExitStack() as stack:
            task = bar.add_task("", total=int(file_starts[-1]), docs=0, tokens=0)
            encoded = stack.enter_context(closing(_encoded(tok, _batches(docs, batch_bytes), workers, dtype)))
            for batch, (tokens, lengths) in encoded:
                val = np.array([is_validation(d.key, job.val_percent) for d in batch])
                in_val = np.repeat(val, lengths)
                writers["val"].write(tokens[in_val], lengths[val])
                writers["train"].write(tokens[~in_val], lengths[~val])
                for w in writers.values():
                    w.sync()
                state["documents"] += len(batch)
                state["chunks"] += 1
                _commit(partial, state)
                last = batch[-1]
                bar.update(task, completed=int(file_starts[last.file]) + last.offset, docs=state["documents"],
                           tokens=sum(s["tokens"] for s in state["splits"].values()))
    finally:
        for w in writers.values():
            w.close()


# ---- finishing -----------------------------------------------------------------------------------------

def _finish(partial: Path, state: dict, tok, job: Job, sources: list[Path]) -> dict:
    splits = state["splits"]
    n_docs = state["documents"]
    if n_docs == 0:
        raise DataError(f"the inputs ({', '.join(str(f.path) for f in job.files[:3])}...) hold no documents; "
                        f"check the files, or the text field with --text-column")
    by_document = min(splits[s]["documents"] for s in SPLITS) > 0 and n_docs * job.val_percent / 100 >= 1
    note = None
    if not by_document:
        _split_by_position(partial, splits, job.val_percent, tok.eot, np.dtype(_token_dtype(tok.vocab_size)))
        note = (f"only {n_docs} document{'s' if n_docs > 1 else ''}, too few to hold out {job.val_percent:g}% by "
                f"document: validation is the last {job.val_percent:g}% of the tokens "
                f"({splits['val']['tokens']:,}), split inside documents by position")
    meta = {"tokenizer": tok.name, "vocab_size": tok.vocab_size, "eot": tok.eot, "eot_token": tok.eot_text,
            "dtype": np.dtype(_token_dtype(tok.vocab_size)).name, "val_percent": job.val_percent,
            "split_by": "document" if by_document else "position", "split_note": note,
            "text_column": job.text_column, "sources": [str(s) for s in sources],
            "splits": {s: {"documents": splits[s]["documents"], "tokens": splits[s]["tokens"],
                           "shards": [{"file": sh["file"], "tokens": sh["tokens"]} for sh in splits[s]["shards"]]}
                       for s in SPLITS}}
    if isinstance(tok, HFTokenizer) and tok.name != "bpe":
        meta["tokenizer_source"] = job.tokenizer
    (partial / META).write_text(json.dumps(meta, indent=2))
    (partial / PROGRESS).unlink()
    return meta


def _split_by_position(partial: Path, splits: dict, val_percent: float, eot: int, dtype: np.dtype) -> None:
    """Re-cut all tokens, train's then val's, into train = the first (100 - val_percent)% and val = the rest.
    Whole shards are renamed, only the shard holding the cut is copied in part."""
    stream = [sh for s in SPLITS for sh in splits[s]["shards"]]
    total = sum(sh["tokens"] for sh in stream)
    if total < 2:
        raise DataError(f"the corpus holds {total} token(s), too few to split; add text")
    cut = total - max(1, round(total * val_percent / 100))
    for k, sh in enumerate(stream):
        os.replace(partial / sh["file"], partial / f"stream_{k:05d}.bin")
    new = {s: {"documents": 0, "tokens": 0, "shards": []} for s in SPLITS}

    def add(split: str, path: Path, tokens: int, eots: int, ends_with_eot: bool) -> None:
        name = f"{split}_{len(new[split]['shards']):05d}.bin"
        os.replace(path, partial / name)
        new[split]["shards"].append({"file": name, "tokens": tokens})
        new[split]["tokens"] += tokens
        # A document cut in two counts on both sides.
        new[split]["documents"] += eots + (0 if ends_with_eot else 1)

    at = 0
    for k, sh in enumerate(stream):
        path, n = partial / f"stream_{k:05d}.bin", sh["tokens"]
        tokens = np.memmap(path, dtype=dtype, mode="r")
        if at + n <= cut:
            add("train", path, n, sh["documents"], tokens[-1] == eot)
        elif at >= cut:
            add("val", path, n, sh["documents"], tokens[-1] == eot)
        else:
            head = cut - at
            tail_path = partial / f"stream_{k:05d}.tail.bin"
            tokens[head:].tofile(tail_path)
            head_eots = int(np.count_nonzero(tokens[:head] == eot))
            ends_with_eot = bool(tokens[head - 1] == eot)
            del tokens
            os.truncate(path, head * dtype.itemsize)
            add("train", path, head, head_eots, ends_with_eot)
            add("val", tail_path, n - head, sh["documents"] - head_eots, True)
        at += n
    splits.update(new)


# ---- the default corpus and reading a prepared one ------------------------------------------------------

def stdlib_path() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def cache_dir() -> Path:
    return Path(os.environ.get("KEEL_CACHE", Path.home() / ".cache" / "keel"))


def default_corpus(tokenizer: str = "byte", vocab_size: int = 4096, progress: bool = True) -> Path:
    """The embedded corpus: this Python's standard-library sources, prepared once and cached."""
    import platform

    tag = f"stdlib-py{platform.python_version()}-{tokenizer}" + (f"{vocab_size}" if tokenizer == "bpe" else "")
    out = cache_dir() / "data" / tag
    if not (out / META).is_file():  # runs that start together (a ladder's, a job's ranks) prepare it once
        prepare([stdlib_path()], out, tokenizer=tokenizer, vocab_size=vocab_size,
                skip_dirs=STDLIB_SKIP_DIRS, progress=progress, reuse=True)
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
