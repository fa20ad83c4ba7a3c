"""What `keel data prepare` reads: every supported input as a stream of documents, never all at once.

A plain text file is one document. Each line of a JSONL file (plain, .gz or .zst) is one, and so is each row
of a Parquet file or of a `datasets.save_to_disk` folder (its .arrow files are Arrow IPC streams, read with
pyarrow alone, so `datasets` need not be installed). Those take their text from one field or column
(`text` unless told otherwise). Each document has a key, stable across runs, that decides its split.
"""
from __future__ import annotations

import gzip
import io
import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator


class DataError(ValueError):
    """A data problem, reported as one line naming the problem and the fix."""


TEXT_SUFFIXES = {".txt", ".md", ".py", ".rst", ".c", ".h", ".json", ""}
# Name endings of the structured formats, longest first so that ".jsonl.gz" wins over ".gz".
FORMATS = {".jsonl.gz": "jsonl", ".jsonl.zst": "jsonl", ".jsonl": "jsonl", ".parquet": "parquet",
           ".arrow": "arrow"}
COMPRESSED = (".gz", ".zst", ".bz2", ".xz", ".zip")
READ_BYTES = 1 << 20


@dataclass(frozen=True)
class Document:
    key: str                # stable identity used for the train/validation split
    text: str | bytes       # bytes from plain text files, so the byte tokenizer keeps them exact
    file: int               # index of the input file it came from
    offset: int             # how far into that file (bytes on disk) reading has got, for the progress bar


@dataclass(frozen=True)
class InputFile:
    path: Path
    key: str                # path relative to the source it was found under
    kind: str               # "text", "jsonl", "parquet" or "arrow"
    size: int
    mtime_ns: int


def kind_of(name: str) -> str | None:
    for ending, kind in FORMATS.items():
        if name.endswith(ending):
            return kind
    return "text" if Path(name).suffix in TEXT_SUFFIXES else None


def _input(path: Path, key: str, kind: str) -> InputFile:
    st = path.stat()
    return InputFile(path, key, kind, st.st_size, st.st_mtime_ns)


def _saved_dataset(folder: Path) -> list[Path] | None:
    """The .arrow files of a `datasets.save_to_disk` folder, in order; None if it is not one."""
    if (folder / "dataset_dict.json").is_file():
        splits = json.loads((folder / "dataset_dict.json").read_text()).get("splits", [])
        raise DataError(f"{folder} is a saved DatasetDict with splits {', '.join(splits)}; pass one split's "
                        f"folder, e.g. {folder / (splits[0] if splits else 'train')}")
    state = folder / "state.json"
    if not (state.is_file() and (folder / "dataset_info.json").is_file()):
        return None
    files = json.loads(state.read_text()).get("_data_files")
    if files is None:
        return None
    missing = [f["filename"] for f in files if not (folder / f["filename"]).is_file()]
    if missing:
        raise DataError(f"{folder} is a saved dataset missing {', '.join(missing)}; save it again with "
                        f"save_to_disk, or copy the whole folder")
    return [folder / f["filename"] for f in files]


def _explicit_file(path: Path, key: str) -> InputFile:
    kind = kind_of(path.name)
    if kind is None and path.name.endswith(COMPRESSED):
        raise DataError(f"{path}: compressed inputs must be JSONL (.jsonl.gz or .jsonl.zst); decompress it or "
                        f"convert it to JSONL")
    return _input(path, key, kind or "text")


def list_inputs(sources: list[Path], skip_dirs: set[str] = frozenset()) -> list[InputFile]:
    """Every input file under `sources`, in a fixed order. Folders are walked; a saved dataset stands whole."""
    files = []
    for source in sources:
        if not source.exists():
            raise DataError(f"data source {str(source)!r} does not exist; pass existing files or folders")
        if source.is_file():
            files.append(_explicit_file(source, source.name))
            continue
        for root, dirs, names in os.walk(source):
            root = Path(root)
            arrows = _saved_dataset(root)
            if arrows is not None:
                files += [_input(a, a.relative_to(source).as_posix(), "arrow") for a in arrows]
                dirs[:] = []
                continue
            dirs[:] = sorted(d for d in dirs if d not in skip_dirs)
            for name in sorted(names):
                kind = kind_of(name)
                if kind is not None:
                    files.append(_input(root / name, (root / name).relative_to(source).as_posix(), kind))
    return files


def iter_documents(files: list[InputFile], text_column: str = "text") -> Iterator[Document]:
    for index, file in enumerate(files):
        yield from READERS[file.kind](file, index, text_column)


def _read_text(file: InputFile, index: int, column: str) -> Iterator[Document]:
    yield Document(file.key, file.path.read_bytes(), index, file.size)


class _Counted(io.RawIOBase):
    """A file that counts the bytes read from it: the progress of a decompressor reading ahead of us."""

    def __init__(self, f):
        self.f, self.n = f, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = self.f.readinto(buffer)
        self.n += n
        return n


class _Zstd(io.RawIOBase):
    """Decompresses a .zst file, every frame of it. zstandard's own stream reader ends quietly at the end of
    a truncated file, which would make a cut-off download look like a shorter corpus; this one raises."""

    def __init__(self, f):
        import zstandard

        self.f, self._zstd = f, zstandard
        self._d = zstandard.ZstdDecompressor().decompressobj()
        self._out, self._at, self._started = b"", 0, False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while self._at == len(self._out):
            chunk = self.f.read(READ_BYTES)
            if not chunk:
                if not self._started or not self._d.eof:
                    raise EOFError("the file ends inside a zstd frame")
                return 0
            self._out, self._at = self._decompress(chunk), 0
        n = min(len(buffer), len(self._out) - self._at)
        buffer[:n] = self._out[self._at:self._at + n]
        self._at += n
        return n

    def _decompress(self, data: bytes) -> bytes:
        out = []
        while data:
            if self._d.eof:  # concatenated frames: a new decompressor for the next one
                self._d = self._zstd.ZstdDecompressor().decompressobj()
            self._started = True
            out.append(self._d.decompress(data))
            data = self._d.unused_data if self._d.eof else b""
        return b"".join(out)


def _open_lines(file: InputFile, raw: _Counted):
    if file.path.name.endswith(".gz"):
        return gzip.GzipFile(fileobj=raw)
    if file.path.name.endswith(".zst"):
        return io.BufferedReader(_Zstd(raw), READ_BYTES)
    return io.BufferedReader(raw, READ_BYTES)


def _read_jsonl(file: InputFile, index: int, column: str) -> Iterator[Document]:
    import zstandard

    with open(file.path, "rb", buffering=0) as f:
        raw = _Counted(f)
        try:
            for line_no, line in enumerate(_open_lines(file, raw)):
                if line.strip():
                    yield Document(f"{file.key}:{line_no}", _json_text(file, line_no, line, column), index, raw.n)
        except (OSError, EOFError, zlib.error, zstandard.ZstdError) as e:
            if not file.path.name.endswith((".gz", ".zst")):
                raise
            kind = "gzip" if file.path.name.endswith(".gz") else "zstd"
            raise DataError(f"{file.path}: truncated or corrupt {kind} archive ({e}); re-create or re-download "
                            f"it") from e


def _json_text(file: InputFile, line_no: int, line: bytes, column: str) -> str:
    try:
        text = json.loads(line)[column]
        if not isinstance(text, str):
            raise TypeError(f"{column!r} holds {type(text).__name__}, not a string")
        return text
    except (ValueError, KeyError, TypeError) as e:  # ValueError: bad JSON or bad UTF-8
        raise DataError(f"{file.path}:{line_no + 1}: expected a JSON object with a \"{column}\" field ({e}); "
                        f"fix the line, or name the text field with --text-column") from e


def _text_column(file: InputFile, schema, column: str) -> None:
    import pyarrow as pa

    if column not in schema.names:
        raise DataError(f"{file.path} has no {column!r} column (it has {', '.join(schema.names)}); name the "
                        f"text column with --text-column")
    kind = schema.field(column).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)):
        raise DataError(f"column {column!r} of {file.path} holds {kind}, not text; name a text column with "
                        f"--text-column")


def _rows(file: InputFile, index: int, batches, column: str, offset_of) -> Iterator[Document]:
    row = 0
    for batch in batches:
        offset = offset_of()
        for text in batch.column(column).to_pylist():
            if text:  # a null or empty row is no document
                yield Document(f"{file.key}:{row}", text, index, offset)
            row += 1


def _read_parquet(file: InputFile, index: int, column: str) -> Iterator[Document]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(file.path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{file.path}: not a readable Parquet file ({e}); re-create or re-download it") from e
    with pf:
        _text_column(file, pf.schema_arrow, column)
        groups = max(pf.num_row_groups, 1)
        done = [0]

        def batches():
            for group in range(pf.num_row_groups):
                yield from pf.iter_batches(batch_size=1024, row_groups=[group], columns=[column])
                done[0] = group + 1
        try:
            yield from _rows(file, index, batches(), column, lambda: file.size * done[0] // groups)
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{file.path}: corrupt Parquet data ({e}); re-create or re-download it") from e


def _read_arrow(file: InputFile, index: int, column: str) -> Iterator[Document]:
    import pyarrow as pa

    with pa.memory_map(str(file.path)) as source:
        try:
            reader = pa.ipc.open_stream(source)
        except pa.ArrowInvalid:
            # Not a stream: perhaps the random-access file format (Feather v2) instead.
            try:
                source.seek(0)
                reader = pa.ipc.open_file(source)
            except pa.ArrowInvalid as e:
                raise DataError(f"{file.path}: not an Arrow IPC stream or file ({e}); re-save the dataset") from e
        _text_column(file, reader.schema, column)
        if isinstance(reader, pa.ipc.RecordBatchFileReader):
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
        else:
            batches = iter(reader)
        try:
            yield from _rows(file, index, batches, column, source.tell)
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{file.path}: corrupt Arrow data ({e}); re-save the dataset") from e


READERS = {"text": _read_text, "jsonl": _read_jsonl, "parquet": _read_parquet, "arrow": _read_arrow}
