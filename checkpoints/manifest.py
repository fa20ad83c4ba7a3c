"""What makes a checkpoint folder trustworthy: its manifest, and the checks made against it.

A checkpoint is written to `step_XXXXXXX.tmp/`; when every shard is on disk, `manifest.json` (file list
with sizes and checksums, step, layout, versions) is written into it and the folder is renamed to
`step_XXXXXXX/` in one step. Only a renamed folder whose manifest reads and whose files match it is
ever loaded, so a save interrupted at any point leaves the earlier checkpoints as they were.

Checksums are computed by the rank that wrote each file, as it writes it, and checked at resume by all
ranks, each re-reading its share: no single rank ever reads a whole checkpoint back. They guard against
torn, truncated and bit-flipped files, not against an adversary, so the hash is XXH3-128 (xxhash, ~12 GB/s
here) rather than sha256 (~1.6 GB/s): on 2 cores sha256 took 1.0 CPU-second of a 1.6 GB save. Each entry
names its hash, so manifests written before (sha256) are still checked with theirs.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

try:
    import xxhash
except ModuleNotFoundError:  # keel run from its tree on a bare machine (benchmarks/gpu_check.py): sha256
    xxhash = None

MANIFEST = "manifest.json"
FORMAT = 1
NAME = re.compile(r"^step_(\d{7,})(\.tmp)?$")
CHECKSUM = "xxh3_128" if xxhash is not None else "sha256"  # what new manifests record
ALGORITHMS = ("xxh3_128", "sha256")  # what a manifest entry may name (sha256: keel before 2026-12-07)
# Files hashed at once: both hashes release the GIL, so several shard files hash side by side.
HASH_THREADS = 4


def folder_name(step: int) -> str:
    return f"step_{step:07d}"


def new_hash(algorithm: str = CHECKSUM):
    if algorithm != "xxh3_128":
        return hashlib.new(algorithm)
    if xxhash is None:
        raise ModuleNotFoundError("this checkpoint's checksums are XXH3: pip install xxhash (a dependency of keel)")
    return xxhash.xxh3_128()


def checksum(path: Path, algorithm: str = CHECKSUM) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, lambda: new_hash(algorithm)).hexdigest()


def algorithm_of(entry: dict) -> str | None:
    """The hash a manifest entry's checksum was made with; None when it names none that keel knows."""
    return next((algorithm for algorithm in ALGORITHMS if algorithm in entry), None)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_durably(path: Path, data: dict) -> None:
    """Write, fsync, then rename over `path`: a reader sees the old file or the whole new one."""
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def describe(folder: Path, names: list[str]) -> dict[str, dict]:
    """{name: manifest entry} for the files `names` of `folder`, hashed in parallel."""
    def entry(name: str) -> dict:
        f = Path(folder) / name
        return {"name": name, "bytes": f.stat().st_size, CHECKSUM: checksum(f)}

    with concurrent.futures.ThreadPoolExecutor(max(1, min(HASH_THREADS, len(names)))) as pool:
        return {e["name"]: e for e in pool.map(entry, names)}


def commit(tmp: Path, info: dict, described: dict[str, dict] | None = None) -> Path:
    """Write the manifest of `tmp` and rename the folder to its final name. `described`: the entries the
    writing ranks already hashed; any other file found in the folder is hashed here."""
    described = dict(described or {})
    present = sorted(p.name for p in tmp.iterdir() if p.is_file())
    described.update(describe(tmp, [n for n in present if n not in described]))
    files = [described[n] for n in present]
    write_json_durably(tmp / MANIFEST, {"format": FORMAT, **info, "files": files})
    fsync_dir(tmp)
    final = tmp.with_name(tmp.name.removesuffix(".tmp"))
    replaced = None
    if final.exists():
        # The same step saved again (a run restarted with --resume never, or replayed after a rollback):
        # move the old one aside first, since a rename cannot replace a non-empty folder.
        replaced = final.with_name(final.name + ".replaced")
        shutil.rmtree(replaced, ignore_errors=True)
        os.rename(final, replaced)
    os.rename(tmp, final)  # the commit: atomic within one filesystem
    fsync_dir(final.parent)
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)
    return final


def read_manifest(path: Path) -> dict:
    return json.loads((Path(path) / MANIFEST).read_text())


def problems(path: Path, deep: bool = True) -> list[str]:
    """Why the checkpoint at `path` must not be loaded; empty when it is sound. `deep` re-reads every
    byte against its checksum; otherwise only presence and sizes are checked (`corrupted` checks a share)."""
    path = Path(path)
    if not path.is_dir():
        return [f"{path} is not a checkpoint folder"]
    if path.name.endswith(".tmp"):
        return ["not committed: the save never finished (a crash or kill while it was written)"]
    try:
        manifest = read_manifest(path)
        files = manifest["files"]
    except FileNotFoundError:
        return [f"no {MANIFEST}: not a committed keel checkpoint"]
    except (ValueError, KeyError) as e:
        return [f"{MANIFEST} is unreadable ({e})"]
    found, intact = [], []
    for entry in files:
        f = path / entry["name"]
        if not f.is_file():
            found.append(f"{entry['name']} is missing")
        elif f.stat().st_size != entry["bytes"]:
            found.append(f"{entry['name']} has {f.stat().st_size:,} bytes, the manifest says {entry['bytes']:,} "
                         f"(truncated or overwritten)")
        else:
            intact.append(entry)
    return found + (corrupted(path, intact) if deep else [])


def corrupted(path: Path, files: list[dict]) -> list[str]:
    """Which of the manifest entries `files` fail their checksum (or can no longer be read)."""
    def check(entry: dict) -> str | None:
        try:
            algorithm = algorithm_of(entry)
            if algorithm is None:
                return f"{entry['name']}: no checksum of a known kind ({', '.join(ALGORITHMS)})"
            if checksum(Path(path) / entry["name"], algorithm) == entry[algorithm]:
                return None
            return f"{entry['name']} fails its {algorithm} checksum (corrupted)"
        except OSError as e:
            return f"{entry['name']} cannot be read ({e})"

    with concurrent.futures.ThreadPoolExecutor(max(1, min(HASH_THREADS, len(files)))) as pool:
        return [p for p in pool.map(check, files) if p]


def share(files: list[dict], rank: int, world_size: int) -> list[dict]:
    """This rank's part of the checksum work: biggest files first, dealt round-robin, so the ranks read
    about as many bytes each."""
    ordered = sorted(files, key=lambda e: (-e["bytes"], e["name"]))
    return ordered[rank::world_size]


@dataclass
class Entry:
    path: Path
    step: int
    committed: bool


def entries(folder: Path) -> list[Entry]:
    """Every checkpoint-like folder under `folder`, oldest step first (committed or not)."""
    found = []
    if Path(folder).is_dir():
        for p in Path(folder).iterdir():
            m = NAME.match(p.name)
            if m and p.is_dir():
                found.append(Entry(p, int(m[1]), committed=m[2] is None and (p / MANIFEST).is_file()))
    return sorted(found, key=lambda e: (e.step, e.committed))
