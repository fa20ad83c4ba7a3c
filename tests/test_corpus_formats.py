"""`keel data prepare` reads JSONL (plain, .gz, .zst), Parquet and `datasets.save_to_disk` folders into the
same documents, and refuses bad input with one line, leaving nothing that looks finished."""
import gzip
import json
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from keel.training.corpus import DataError, prepare, read_meta
from keel.training.sources import list_inputs

DOCS = [f"document {i}: ünïcödé ✓ 你好\n" + "lorem ipsum dolor sit amet\n" * (i % 7 + 1) for i in range(60)]


def jsonl_bytes(docs, column="text") -> bytes:
    return "".join(json.dumps({column: d, "id": i}) + "\n" for i, d in enumerate(docs)).encode()


def write(fmt: str, folder: Path, docs=DOCS, column="text") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if fmt == "jsonl":
        (path := folder / "docs.jsonl").write_bytes(jsonl_bytes(docs, column))
    elif fmt == "jsonl.gz":
        (path := folder / "docs.jsonl.gz").write_bytes(gzip.compress(jsonl_bytes(docs, column)))
    elif fmt == "jsonl.zst":
        # Two frames, as concatenated or parallel-compressed files have: both must be read.
        half = len(docs) // 2
        c = zstandard.ZstdCompressor()
        (path := folder / "docs.jsonl.zst").write_bytes(c.compress(jsonl_bytes(docs[:half], column))
                                                        + c.compress(jsonl_bytes(docs[half:], column)))
    elif fmt == "parquet":
        # Small row groups: the reader must stream across them; a null row is no document.
        table = pa.table({"id": list(range(len(docs) + 1)), column: [*docs, None]})
        pq.write_table(table, path := folder / "docs.parquet", row_group_size=7)
    elif fmt == "save_to_disk":
        ds = datasets.Dataset.from_dict({column: docs, "id": list(range(len(docs)))})
        ds.save_to_disk(str(path := folder / "saved"), num_shards=3)
    return path


def documents(out: Path) -> dict[str, list[str]]:
    """The documents of each split, decoded (byte tokenizer: split at the 0 after each)."""
    meta = read_meta(out)
    found = {}
    for split, info in meta["splits"].items():
        tokens = np.concatenate([np.fromfile(out / s["file"], dtype=np.uint8) for s in info["shards"]])
        found[split] = [t.decode() for t in tokens.tobytes().split(b"\0")[:-1]]
    return found


@pytest.mark.parametrize("fmt", ["jsonl", "jsonl.gz", "jsonl.zst", "parquet", "save_to_disk"])
def test_every_format_yields_the_same_documents_split_without_overlap(tmp_path, fmt):
    source = write(fmt, tmp_path / "in")
    meta = prepare([source], tmp_path / "out", val_percent=20, progress=False)
    found = documents(tmp_path / "out")
    assert sorted(found["train"] + found["val"]) == sorted(DOCS)
    assert found["val"] and found["train"] and not set(found["train"]) & set(found["val"])
    assert meta["split_by"] == "document"
    assert meta["splits"]["val"]["documents"] == len(found["val"])


def test_a_saved_dataset_is_read_from_its_arrow_files_in_order_without_datasets(tmp_path):
    saved = write("save_to_disk", tmp_path)
    inputs = list_inputs([saved])
    assert [f.kind for f in inputs] == ["arrow"] * 3
    assert [f.key for f in inputs] == [f"data-0000{i}-of-00003.arrow" for i in range(3)]
    # A folder holding the saved dataset among other files finds it too.
    (tmp_path / "notes.txt").write_text("a note\n")
    assert [f.key for f in list_inputs([tmp_path])] == ["notes.txt"] + [f"saved/{f.key}" for f in inputs]
    code = ("import sys, keel.training.sources as s, keel.training.corpus as c; "
            f"c.prepare([{str(saved)!r}], {str(tmp_path / 'out')!r}, progress=False); "
            "print('datasets' in sys.modules, 'pyarrow' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", "True"]


def test_a_saved_dataset_dict_names_its_splits(tmp_path):
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": DOCS[:5]}),
                               "test": datasets.Dataset.from_dict({"text": DOCS[5:8]})})
    dd.save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match=r"is a saved DatasetDict with splits train, test; pass one split's folder, "
                                        r"e.g. .*dd/train"):
        prepare([tmp_path / "dd"], tmp_path / "out", progress=False)
    meta = prepare([tmp_path / "dd" / "train"], tmp_path / "out", progress=False)
    assert sum(s["tokens"] for s in meta["splits"].values()) == sum(len(d.encode()) + 1 for d in DOCS[:5])


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "save_to_disk"])
def test_the_text_column_is_chosen_and_a_missing_one_names_the_fix(tmp_path, fmt):
    source = write(fmt, tmp_path / "in", column="body")
    with pytest.raises(DataError, match=r"(no 'text' column \(it has .*body.*\)|\"text\" field).*--text-column"):
        prepare([source], tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.partial").exists()
    meta = prepare([source], tmp_path / "out", text_column="body", val_percent=20, progress=False)
    assert meta["text_column"] == "body"
    assert sorted(sum(documents(tmp_path / "out").values(), [])) == sorted(DOCS)
    with pytest.raises(DataError, match=r"(column 'id' .* holds int64, not text|'id' holds int).*--text-column"):
        prepare([source], tmp_path / "out2", text_column="id", progress=False)


def corrupt(kind: str, folder: Path) -> Path:
    folder.mkdir()
    if kind == "gz truncated":
        data = gzip.compress(jsonl_bytes(DOCS * 20))
        (path := folder / "docs.jsonl.gz").write_bytes(data[:len(data) // 2])
    elif kind == "gz garbage":
        (path := folder / "docs.jsonl.gz").write_bytes(b"this is not gzip at all\n" * 100)
    elif kind == "zst truncated":
        data = zstandard.ZstdCompressor().compress(jsonl_bytes(DOCS * 20))
        (path := folder / "docs.jsonl.zst").write_bytes(data[:len(data) // 2])
    elif kind == "zst garbage":
        (path := folder / "docs.jsonl.zst").write_bytes(b"this is not zstd at all\n" * 100)
    elif kind == "parquet garbage":
        (path := folder / "docs.parquet").write_bytes(b"PAR1 but not really" * 100)
    return path


@pytest.mark.parametrize("kind", ["gz truncated", "gz garbage", "zst truncated", "zst garbage", "parquet garbage"])
def test_a_corrupt_archive_is_one_line_and_leaves_nothing_that_looks_finished(tmp_path, kind):
    path = corrupt(kind, tmp_path / "in")
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "keel.launcher.cli", "data", "prepare", str(path), "--out",
                             str(out), "--workers", "2"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("keel: error: ") and result.stderr.count("\n") == 1, result.stderr
    assert str(path) in result.stderr
    assert ("truncated or corrupt" in result.stderr and "re-create or re-download" in result.stderr) or \
        ("not a readable Parquet file" in result.stderr)
    assert not out.exists() and not (tmp_path / ".out.partial").exists()


def test_the_cli_reads_a_parquet_file_and_says_how_the_split_was_made(tmp_path):
    source = write("parquet", tmp_path / "in")
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "keel.launcher.cli", "data", "prepare", str(source), "--out",
                             str(out), "--val-percent", "20", "--workers", "2"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"wrote {out} (byte tokenizer" in result.stdout and f"--set data.path={out}" in result.stdout
    one = tmp_path / "one.txt"
    one.write_text(DOCS[0] * 50)
    result = subprocess.run([sys.executable, "-m", "keel.launcher.cli", "data", "prepare", str(one), "--out",
                             str(tmp_path / "one")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "keel: only 1 document, too few to hold out 5% by document: validation is the last 5% of the tokens" \
        in result.stderr
