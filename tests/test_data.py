"""Data: prepared shards (split without overlap, resumable, the same for any worker count), a deterministic
resumable loader sharded by data-parallel rank."""
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from keel.training import corpus
from keel.training.corpus import DataError, is_validation, prepare, read_meta, stdlib_path
from keel.training.data import BatchLoader, TokenWindows
from keel.training.tokenizer import load_tokenizer


def take(loader, n):
    return [next(loader) for _ in range(n)]


def test_prepare_splits_documents_by_hash_of_their_path(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(40):
        (src / f"f{i}.txt").write_text(f"document {i}\n" * 5)
    meta = prepare([src], tmp_path / "out", val_percent=25, progress=False)
    expected_val = sum(is_validation(f"f{i}.txt", 25) for i in range(40))
    assert meta["splits"]["val"]["documents"] == expected_val > 0
    assert meta["splits"]["train"]["documents"] == 40 - expected_val
    # Every document is followed by the end-of-text token: tokens = bytes + documents.
    train_bytes = sum(len(f"document {i}\n".encode()) * 5 for i in range(40) if not is_validation(f"f{i}.txt", 25))
    assert meta["splits"]["train"]["tokens"] == train_bytes + 40 - expected_val
    tokens = np.fromfile(tmp_path / "out" / meta["splits"]["train"]["shards"][0]["file"], dtype=meta["dtype"])
    assert len(tokens) == meta["splits"]["train"]["tokens"] and (tokens == 0).sum() == 40 - expected_val


def test_prepare_reads_jsonl_text_fields_and_rejects_bad_lines(tmp_path):
    good = tmp_path / "docs.jsonl"
    good.write_text("\n".join(json.dumps({"text": f"doc {i}"}) for i in range(30)) + "\n")
    meta = prepare([good], tmp_path / "out", progress=False)
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == 30
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text field"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: expected a JSON object with a \"text\" field"):
        prepare([bad], tmp_path / "out2", progress=False)


def test_shards_are_cut_at_the_size_limit_and_read_back_as_one_stream(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(30):
        (src / f"f{i}.txt").write_text("x" * 100)
    meta = prepare([src], tmp_path / "out", val_percent=10, shard_tokens=500, progress=False)
    assert len(meta["splits"]["train"]["shards"]) > 1
    windows = TokenWindows(tmp_path / "out", "train", seq_len=16)
    per_shard = sum((s["tokens"] - 1) // 16 for s in meta["splits"]["train"]["shards"])
    assert len(windows) == per_shard and all(len(windows[i]) == 17 for i in range(len(windows)))


def test_missing_or_unprepared_data_path_names_the_fix(tmp_path):
    with pytest.raises(DataError, match=r"does not exist.*keel data prepare"):
        read_meta(tmp_path / "missing")
    with pytest.raises(DataError, match=r"has no meta\.json.*keel data prepare"):
        read_meta(tmp_path)


def test_loader_resumes_exactly_from_its_state(corpus_dir):
    windows = TokenWindows(corpus_dir, "train", 32)
    straight = BatchLoader(windows, 8, seed=3)
    take(straight, 5)
    state = straight.state_dict()
    expected = take(straight, 4)
    resumed = BatchLoader(windows, 8, seed=3)
    resumed.load_state_dict(state)
    for (x, y), (x2, y2) in zip(expected, take(resumed, 4)):
        assert torch.equal(x, x2) and torch.equal(y, y2)


def test_targets_are_inputs_shifted_by_one(corpus_dir):
    x, y = next(BatchLoader(TokenWindows(corpus_dir, "train", 32), 4))
    assert x.shape == y.shape == (4, 32) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])


def test_data_parallel_ranks_split_the_same_global_batch(corpus_dir):
    windows = TokenWindows(corpus_dir, "train", 32)
    whole = take(BatchLoader(windows, 8, seed=1), 3)
    parts = [take(BatchLoader(windows, 8, dp_rank=r, dp_size=4, seed=1), 3) for r in range(4)]
    for step in range(3):
        assert torch.equal(torch.cat([p[step][0] for p in parts]), whole[step][0])


def test_skipped_batches_are_never_served_and_the_skip_survives_resume(corpus_dir):
    windows = TokenWindows(corpus_dir, "train", 32)
    reference = take(BatchLoader(windows, 4, seed=0), 10)
    loader = BatchLoader(windows, 4, seed=0)
    take(loader, 2)
    loader.skip(3, 6)
    state = loader.state_dict()
    served = take(loader, 3)  # batches 2, 6, 7
    assert [torch.equal(a[0], b[0]) for a, b in zip(served, [reference[2], reference[6], reference[7]])] == [True] * 3
    resumed = BatchLoader(windows, 4, seed=0)
    resumed.load_state_dict(state)
    assert torch.equal(take(resumed, 2)[1][0], reference[6][0])


def test_epochs_reshuffle_and_cover_every_window(corpus_dir):
    windows = TokenWindows(corpus_dir, "val", 32)
    n = len(windows)
    loader = BatchLoader(windows, 1, seed=0)
    first = [loader.window_ids(b)[0] for b in range(n)]
    second = [loader.window_ids(b)[0] for b in range(n, 2 * n)]
    assert sorted(first) == sorted(second) == list(range(n))
    assert first != second


def split_tokens(out, split):
    meta = read_meta(out)
    return np.concatenate([np.fromfile(out / s["file"], dtype=meta["dtype"]) for s in meta["splits"][split]["shards"]])


def same_files(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir())
    return names == sorted(p.name for p in b.iterdir()) and all((a / n).read_bytes() == (b / n).read_bytes()
                                                                for n in names)


@pytest.mark.parametrize("shard_tokens", [100_000_000, 3000])
def test_a_single_file_is_split_by_position_into_disjoint_parts_that_add_up_to_the_file(tmp_path, shard_tokens):
    text = (stdlib_path() / "email" / "message.py").read_bytes()
    (tmp_path / "input.txt").write_bytes(text)
    notes = []
    meta = prepare([tmp_path / "input.txt"], tmp_path / "out", val_percent=10, shard_tokens=shard_tokens,
                   progress=False, say=notes.append)
    train, val = split_tokens(tmp_path / "out", "train"), split_tokens(tmp_path / "out", "val")
    # The file's bytes and its one end-of-text token, each in exactly one split: train the head, val the tail.
    assert np.array_equal(np.concatenate([train, val]), np.append(np.frombuffer(text, np.uint8), 0))
    assert len(val) == round(0.1 * (len(text) + 1)) and (train == 0).sum() == 0
    assert meta["splits"]["train"]["tokens"] + meta["splits"]["val"]["tokens"] == len(text) + 1
    assert meta["split_by"] == "position" and notes == [meta["split_note"]]
    assert "only 1 document" in notes[0] and "last 10% of the tokens" in notes[0]
    assert len(TokenWindows(tmp_path / "out", "val", 32)) > 0


def test_a_few_documents_with_a_bpe_tokenizer_split_by_position_too(tmp_path):
    texts = {f"{i}.txt": (stdlib_path() / "email" / name).read_text()
             for i, name in enumerate(("utils.py", "errors.py", "charset.py"))}
    (tmp_path / "src").mkdir()
    for key, text in texts.items():
        (tmp_path / "src" / key).write_text(text)
    meta = prepare([tmp_path / "src"], tmp_path / "out", tokenizer="bpe", vocab_size=400, progress=False)
    assert meta["split_by"] == "position"  # 3 documents: not even one expected in a 5% validation split
    tok = load_tokenizer("bpe", tmp_path / "out")
    # The documents the hash put in train, then those it put in val, cut once: no token on both sides.
    order = sorted(texts, key=lambda key: is_validation(key, 5))
    stream = np.concatenate([np.append(tok.encode(texts[key]), tok.eot) for key in order])
    train, val = split_tokens(tmp_path / "out", "train"), split_tokens(tmp_path / "out", "val")
    assert np.array_equal(np.concatenate([train, val]), stream) and len(val) == round(0.05 * len(stream))


def test_the_output_does_not_depend_on_the_number_of_workers(tmp_path):
    kw = dict(tokenizer="bpe", vocab_size=500, val_percent=20, shard_tokens=20_000, batch_bytes=30_000, progress=False)
    prepare([stdlib_path() / "email"], tmp_path / "one", workers=1, **kw)
    prepare([stdlib_path() / "email"], tmp_path / "two", workers=2, **kw)
    assert len(read_meta(tmp_path / "one")["splits"]["train"]["shards"]) > 2
    assert same_files(tmp_path / "one", tmp_path / "two")


def big_jsonl(path: Path, megabytes: float) -> int:
    """Real Python source as JSONL documents (stdlib files cut into ~2 KB pieces), about `megabytes` big."""
    pieces = []
    for file in sorted((stdlib_path() / "email").glob("*.py")) + sorted((stdlib_path() / "json").glob("*.py")):
        text = file.read_text()
        pieces += [text[i:i + 2000] for i in range(0, len(text), 2000)]
    n, size = 0, 0
    with open(path, "w") as f:
        while size < megabytes * 1e6:
            line = json.dumps({"text": f"# {n}\n" + pieces[n % len(pieces)]}) + "\n"
            f.write(line)
            size += len(line)
            n += 1
    return n


def committed(partial: Path) -> dict:
    try:
        return json.loads((partial / "progress.json").read_text())
    except (OSError, ValueError):
        return {"chunks": 0}


def pool_workers(pid: int) -> list[int]:
    """The spawned pool processes among `pid`'s children (not multiprocessing's resource tracker)."""
    kids = [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    return [k for k in kids if b"spawn_main" in Path(f"/proc/{k}/cmdline").read_bytes()]


def running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_prepare_killed_midway_resumes_without_redoing_committed_chunks_and_matches_an_uninterrupted_run(
        tmp_path, monkeypatch):
    n_docs = big_jsonl(tmp_path / "docs.jsonl", 4)
    kw = dict(tokenizer="bpe", vocab_size=600, shard_tokens=300_000, batch_bytes=1 << 16, progress=False)
    out, partial = tmp_path / "out", tmp_path / ".out.partial"
    code = (f"from keel.training.corpus import prepare; prepare([{str(tmp_path / 'docs.jsonl')!r}], {str(out)!r}, "
            f"workers=2, **{kw!r})")
    proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        while committed(partial)["chunks"] < 5:
            assert proc.poll() is None, "prepare finished before it could be interrupted"
            time.sleep(0.005)
        workers = pool_workers(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        proc.kill()
    assert len(workers) == 2 and not out.exists()  # killed half-way: nothing claims to be finished
    deadline = time.time() + 10
    while any(running(w) for w in workers) and time.time() < deadline:
        time.sleep(0.1)
    assert time.time() < deadline, "the pool's workers outlived their killed parent"
    at_kill = committed(partial)
    assert 0 < at_kill["documents"] < n_docs

    encoded, notes = [], []
    real_encode = corpus._encode_batch
    monkeypatch.setattr(corpus, "_encode_batch", lambda tok, texts, dtype: (encoded.extend(texts),
                                                                          real_encode(tok, texts, dtype))[1])
    prepare([tmp_path / "docs.jsonl"], out, workers=1, say=notes.append, **kw)
    assert len(encoded) == n_docs - at_kill["documents"]  # the committed chunks were not tokenized again
    assert notes[0].startswith(f"resuming {out}: {at_kill['documents']:,} documents in {at_kill['chunks']} committed")
    assert not partial.exists()

    monkeypatch.undo()
    prepare([tmp_path / "docs.jsonl"], tmp_path / "straight", workers=2, **kw)
    assert same_files(out, tmp_path / "straight")


def test_an_interrupted_prepare_run_again_with_other_arguments_starts_over(tmp_path, monkeypatch):
    n_docs = big_jsonl(tmp_path / "docs.jsonl", 0.5)
    calls, real_encode = [], corpus._encode_batch

    def interrupt_on_the_third_batch(tok, texts, dtype):
        calls.append(len(texts))
        if len(calls) == 3:
            raise KeyboardInterrupt  # as Ctrl-C would, in the middle of the run
        return real_encode(tok, texts, dtype)

    monkeypatch.setattr(corpus, "_encode_batch", interrupt_on_the_third_batch)
    with pytest.raises(KeyboardInterrupt):
        prepare([tmp_path / "docs.jsonl"], tmp_path / "out", batch_bytes=1 << 15, progress=False)
    assert committed(tmp_path / ".out.partial")["chunks"] == 2 and not (tmp_path / "out").exists()
    calls[:] = [0, 0, 0, 0]  # past the third call: no more interruptions
    notes = []
    meta = prepare([tmp_path / "docs.jsonl"], tmp_path / "out", val_percent=10, batch_bytes=1 << 15,
                   progress=False, say=notes.append)
    assert sum(calls) == n_docs and not notes  # every document again, no "resuming"
    assert meta["val_percent"] == 10
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == n_docs


def peak_rss_mb(tmp_path: Path, source: Path) -> float:
    # VmHWM, not getrusage's ru_maxrss: that one starts at the parent's peak (pytest's, with torch loaded).
    code = (f"import re; from keel.training.corpus import prepare; prepare([{str(source)!r}], "
            f"{str(tmp_path / source.stem)!r}, workers=1, progress=False); "
            f"print(int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read())[1]) / 1024)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(result.stdout)


def test_memory_stays_flat_as_the_corpus_grows(tmp_path):
    big_jsonl(tmp_path / "small.jsonl", 2)
    big_jsonl(tmp_path / "large.jsonl", 60)
    # Holding the documents would cost well over their 60 MB as Python strings; streaming costs a few batches.
    assert peak_rss_mb(tmp_path, tmp_path / "large.jsonl") - peak_rss_mb(tmp_path, tmp_path / "small.jsonl") < 25


def test_processes_preparing_one_folder_at_once_take_turns_and_the_later_ones_reuse_the_result(tmp_path):
    # A ladder's runs, or a job's ranks, starting together on an empty cache all ask for the embedded corpus.
    big_jsonl(tmp_path / "docs.jsonl", 1)
    out = tmp_path / "out"
    code = (f"from keel.training.corpus import prepare; meta = prepare([{str(tmp_path / 'docs.jsonl')!r}], "
            f"{str(out)!r}, progress=False, reuse=True, say=lambda line: print(line, flush=True)); "
            f"print(meta['splits']['train']['documents'])")
    with open(tmp_path / ".out.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another preparation is under way
        procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) for _ in range(3)]
        assert [p.stdout.readline() for p in procs] == [f"waiting for another process that is preparing {out}\n"] * 3
        assert not out.exists() and not (tmp_path / ".out.partial").exists()
    documents = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs) and len(set(documents)) == 1
    prepare([tmp_path / "docs.jsonl"], tmp_path / "alone", progress=False)
    assert same_files(out, tmp_path / "alone")
