"""What makes a checkpoint folder trustworthy: its manifest, and the checks made against it.

A checkpoint is written to `step_XXXXXXX.tmp/`; when every shard is on disk, `manifest.json` (file list
with sizes and checksums, step, layout, versions) is written into it and the folder is renamed to
`step_XXXXXXX/` in one step. Only a renamed folder whose manifest reads and whose files match it is
ever loaded, so a save interrupted at any point leaves the earlier checkpoints as they were.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

MANIFEST = "manifest.json"
FORMAT = 1
NAME = re.compile(r"^step_(\d{7,})(\.tmp)?$")
CHECKSUM = "sha256"


def folder_name(step: int) -> str:
    return f"step_{step:07d}"


def checksum(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, CHECKSUM).hexdigest()


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


def commit(tmp: Path, info: dict) -> Path:
    """Checksum every file in `tmp`, write the manifest, and rename the folder to its final name."""
    files = [{"name": p.name, "bytes": p.stat().st_size, CHECKSUM: checksum(p)}
             for p in sorted(tmp.iterdir()) if p.is_file()]
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
    byte against its checksum; otherwise only presence and sizes are checked."""
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
    found = []
    for entry in files:
        f = path / entry["name"]
        if not f.is_file():
            found.append(f"{entry['name']} is missing")
        elif f.stat().st_size != entry["bytes"]:
            found.append(f"{entry['name']} has {f.stat().st_size:,} bytes, the manifest says {entry['bytes']:,} "
                         f"(truncated or overwritten)")
        elif deep and checksum(f) != entry[CHECKSUM]:
            found.append(f"{entry['name']} fails its {CHECKSUM} checksum (corrupted)")
    return found


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
