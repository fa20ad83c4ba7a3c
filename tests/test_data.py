"""Data: prepared shards, a deterministic resumable loader sharded by data-parallel rank."""
import json

import numpy as np
import pytest
import torch

from keel.training.corpus import DataError, is_validation, prepare, read_meta
from keel.training.data import BatchLoader, TokenWindows


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
