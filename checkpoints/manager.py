"""Save and restore the whole training state: sharded, asynchronous, atomically committed, retained.

Every rank writes its own shards with torch.distributed.checkpoint (no gather to rank 0) into
`step_XXXXXXX.tmp/`, plus its RNG state; rank 0 adds `trainer.json` (step, tokens, data position, the
spike detector's state) and, once every shard is on disk, commits the folder (manifest.manifest.commit).
Each rank checksums the files it wrote itself; rank 0 only merges the lists. An asynchronous save copies
the state to CPU memory, returns to training, and writes and commits in the background; at most one save
is in flight. A save that fails, on any rank and at any point, is reported (`checkpoint_failed`) and
given up by every rank together; training goes on and the earlier checkpoints stay as they were.
Restoring picks the newest checkpoint that verifies (every rank re-hashing a share of its files) and says
which ones it skipped and why. The folders assume a filesystem every rank sees (as DCP does to reshard).
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import json
import os
import re
import shutil
import time
import warnings
import weakref
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

from . import manifest as mf
from . import rollbacks
from .compat import changed_settings
from .hashing import writer
from .state import rng_state, set_rng_state

TRAINER = "trainer.json"
# Suffix of a checkpoint folder that retention has set aside for deletion (no resume chooses it).
DELETING = ".deleting"
# A single-process run saves and loads with no_dist=True on purpose; DCP warns about it all the same.
warnings.filterwarnings("ignore", message=r"torch\.distributed is (disabled, )?unavailable or uninitialized")


_GROUP: tuple[weakref.ref, weakref.ref] | None = None  # (the default group, the checkpoint group)


def checkpoint_group():
    """The gloo group for checkpoint collectives, created once per process (every Checkpointer of the
    process shares it; creating a group is a collective of its own)."""
    global _GROUP
    world = dist.group.WORLD
    cached = _GROUP[1]() if _GROUP is not None and _GROUP[0]() is world else None
    if cached is None:  # none yet, or the process group was destroyed or started anew
        cached = dist.new_group(backend="gloo")
        # Weak references, so that destroy_process_group frees both groups and stops their gloo threads.
        # Held here, they lived on into interpreter exit, where freeing gloo's work is what aborts a process
        # in pytorch/pytorch#179291 (in CI, two torchrun ranks aborted right after finishing cleanly).
        _GROUP = (weakref.ref(world), weakref.ref(cached))
    return cached


def rng_file(rank: int) -> str:
    return f"rng_rank{rank:05d}.pt"


def own_files(names: list[str], rank: int) -> list[str]:
    """The files of a checkpoint folder that `rank` wrote: its RNG state and its DCP shards, which
    FileSystemWriter names __{rank}_{k}.distcp (rank in the checkpoint group, the global rank here)."""
    shard = re.compile(rf"^__{rank}_\d+\.distcp$")
    return [n for n in names if n == rng_file(rank) or shard.match(n)]


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


@contextlib.contextmanager
def _without_zip_crc32():
    """DCP stores each tensor with torch.save, whose zip container computes a CRC32 of every byte by
    default; the manifest's checksum already covers every byte, so the CRC only costs write time. Loading
    does not need it. The setting is process-wide: the training thread saves nothing meanwhile."""
    before = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        yield
    finally:
        torch.serialization.set_crc32_options(before)


# Which kernel runs an op is not the architecture: a run saved with one may resume with another (and
# checkpoints from before a kernel section existed still resume). Nor is where the first weights came from.
NOT_ARCHITECTURE = ("attention", "rmsnorm", "swiglu", "rope", "cross_entropy", "init_from")


def architecture(model_section: dict) -> dict:
    return {k: v for k, v in model_section.items() if k not in NOT_ARCHITECTURE}


def _fingerprint(model_section: dict) -> str:
    return hashlib.sha256(json.dumps(architecture(model_section), sort_keys=True).encode()).hexdigest()[:16]


def model_fingerprint(config: dict) -> str:
    """What must match for weights to load: the model section (the architecture), kernel choices aside."""
    return _fingerprint(config["model"])


def config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used (asked for by path, or saved by another model or other settings);
    names the path, the reason and the way out."""


class Checkpointer:
    """`config` is the run's whole config as a plain dict (training.config.config_to_dict): it goes into
    every manifest, and its checkpoint section steers saving, retention and resuming."""

    def __init__(self, config: dict, folder: Path, rank: int, world_size: int, layout: dict,
                 event: Callable[..., None] = lambda kind, **f: None,
                 before_commit: Callable[[int], None] = lambda step: None):
        self.config, self.folder, self.rank, self.world_size = config, Path(folder), rank, world_size
        self.settings = config["checkpoint"]
        self.layout, self.event, self.before_commit = layout, event, before_commit
        self.distributed = world_size > 1 and dist.is_initialized()
        # Checkpoint collectives run on their own gloo group: an async save's run in a background thread
        # while training's run on the default group, and they must not interleave on one communicator.
        self.pg = checkpoint_group() if self.distributed else None
        self.group_rank = dist.get_rank(self.pg) if self.distributed else 0  # the rank DCP names shards by
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="keel-ckpt")
        # One stager for the whole run: it keeps its CPU copy of the state between saves, so only the
        # first async save pays for allocating (and page-faulting) that memory. Costs one state's worth
        # of host memory; pinned on GPU so the device-to-host copy runs at full speed.
        cuda = torch.cuda.is_available()
        self._stager = DefaultStager(StagingOptions(use_pinned_memory=cuda, use_shared_memory=False,
                                                    use_async_staging=False, use_non_blocking_copy=cuda))
        self._in_flight: tuple[int, concurrent.futures.Future] | None = None  # (step, its write)
        self.last_committed: Path | None = None

    # -- saving ------------------------------------------------------------------------------------
    def save(self, step: int, engine, trainer_state: dict) -> float:
        """Checkpoint the state after `step`. Returns how long training was blocked, in seconds. Never
        raises for a failed save: it reports `checkpoint_failed` and the run goes on."""
        t0 = time.perf_counter()
        self.wait()  # at most one save in flight
        tmp = self.folder / (mf.folder_name(step) + ".tmp")
        state, error = None, None
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # a leftover of an earlier, interrupted attempt
            try:
                tmp.mkdir(parents=True)
            except OSError as e:
                error = _error(e)
        self._barrier()  # no rank writes into the folder before it exists
        native = getattr(engine, "native_checkpoint", False)
        try:
            if error is None:
                state = None if native else engine.state_dict()
                torch.save(rng_state(), tmp / rng_file(self.rank))
                if self.rank == 0:
                    mf.write_json_durably(tmp / TRAINER, trainer_state)
                if self.settings["async_save"] and not native:
                    # The copy to CPU memory: once it is done, training may change the live tensors.
                    state = self._stager.stage(state)
        except Exception as e:  # noqa: BLE001 - a full disk, out of host memory: the run must go on
            error = _error(e)
        # Every rank says how its local part went before any enters DCP's collectives: a rank that failed
        # here would otherwise leave its peers waiting in DCP's planning until the group's timeout. All
        # give the save up together instead, and the .tmp folder is left for retention to remove.
        if errors := self._errors(self._gather(error)):
            self._failed(step, errors)
        elif native:
            # The engine's library writes its own files, synchronously, with its own collectives.
            self._write(step, tmp, lambda: self._native_files(tmp, engine), t0, False)
        elif self.settings["async_save"]:
            # Written in this Checkpointer's one background thread, as dcp.async_save would in its own.
            self._in_flight = (step, self._pool.submit(self._write, step, tmp, lambda: self._dcp_files(tmp, state),
                                                       t0, True))
        else:
            self._write(step, tmp, lambda: self._dcp_files(tmp, state), t0, False)
        return time.perf_counter() - t0

    def _dcp_files(self, tmp: Path, state: dict) -> dict[str, dict]:
        """Write this rank's DCP shards of `state`; returns the manifest entries of the files it wrote."""
        shards = writer(tmp)
        with _without_zip_crc32():
            dcp.save(state, storage_writer=shards, process_group=self.pg, no_dist=not self.distributed)
        # DCP's save ends with a collective after every rank's write, so every shard (and the RNG files
        # and trainer.json, written before) is on disk now. Each rank's shards were hashed as they were
        # written; only its small RNG file is read back here. Rank 0 reads no other rank's files.
        present = sorted(p.name for p in tmp.iterdir())
        mine = own_files(present, self.group_rank)
        described = {n: shards.fs.entries[n] for n in mine if n in shards.fs.entries}
        described.update(mf.describe(tmp, [n for n in mine if n not in described]))
        return described

    def _native_files(self, tmp: Path, engine) -> dict[str, dict]:
        """Let the engine write its own checkpoint files into `tmp` (every rank, together); each rank then
        hashes the files the engine names as its own, and its RNG file."""
        mine = engine.save_native(tmp)
        return mf.describe(tmp, [rng_file(self.rank), *mine])

    def _write(self, step: int, tmp: Path, write: Callable[[], dict], t0: float, in_background: bool) -> None:
        """Write the files (`write`: this rank's, returning their manifest entries), and (rank 0) commit once
        every rank succeeded. Runs on every rank; its collectives are the same on all, whatever failed where."""
        error, described = None, {}
        try:
            described = write()
            self.before_commit(step)
        except Exception as e:  # noqa: BLE001 - DCP raises the same on every rank; the rest is local
            error = _error(e)
        results = self._gather((error, described))
        errors = self._errors([err for err, _ in results])
        if self.rank != 0:
            return
        if errors:
            self._failed(step, errors)
            return
        info = {"step": step, "tokens": step * self.config["train"]["global_batch_size"] * self.config["data"]["seq_len"],
                "world_size": self.world_size, "layout": self.layout, "model_fingerprint": model_fingerprint(self.config),
                "config_hash": config_hash(self.config), "config": self.config, "keel_version": _keel_version(),
                "torch_version": torch.__version__, "created": time.time()}
        try:
            final = mf.commit(tmp, info, {n: e for _, d in results for n, e in d.items()})
        except Exception as e:  # noqa: BLE001 - e.g. no room left for the manifest
            self._failed(step, [_error(e)])
            return
        self.last_committed = final
        size = sum(p.stat().st_size for p in final.iterdir())
        self.event("checkpoint_saved", step=step, path=str(final), bytes=size,
                   seconds=round(time.perf_counter() - t0, 3), async_save=in_background)
        self._retain()

    def _failed(self, step: int, errors: list[str]) -> None:
        if self.rank == 0:
            self.event("checkpoint_failed", step=step, error="; ".join(errors),
                       kept=str(self.last_committed) if self.last_committed else None)

    def _gather(self, item) -> list:
        """Every rank's `item`, in rank order, on every rank (over the checkpoint group)."""
        if not self.distributed:
            return [item]
        items = [None] * self.world_size
        dist.all_gather_object(items, item, group=self.pg)
        return items

    def _errors(self, errors: list[str | None]) -> list[str]:
        """The errors of a gather, named by rank when there are several."""
        return [f"rank {r}: {e}" if self.distributed else e for r, e in enumerate(errors) if e]

    def wait(self) -> None:
        """Finish the save in flight, if any. _write reports its own failures; this is the last guard,
        for anything that escaped it (any failure to write must not end the run)."""
        if self._in_flight is None:
            return
        step, future = self._in_flight
        try:
            future.result()
        except Exception as e:  # noqa: BLE001
            self.event("checkpoint_failed", step=step, error=_error(e))
        finally:
            self._in_flight = None

    def close(self) -> None:
        self.wait()
        self._pool.shutdown()
        self._stager.close()
        self.pg = None  # so that destroy_process_group frees the group (see checkpoint_group)

    def _retain(self) -> None:
        """Keep the newest keep_last, and every keep_every-th step; drop stale uncommitted folders."""
        keep_last, keep_every = self.settings["keep_last"], self.settings["keep_every"]
        found = mf.entries(self.folder)
        committed = [e for e in found if e.committed]
        keep = {e.step for e in committed[-keep_last:]}
        keep |= {e.step for e in committed if keep_every and e.step % keep_every == 0}
        newest = committed[-1].step if committed else -1
        doomed = [e.path for e in found
                  if (e.committed and e.step not in keep) or (not e.committed and e.step < newest)]
        # Renamed now (instant, and no resume can choose a folder by that name), deleted behind training:
        # removing a 1.6 GB checkpoint took 0.3 s of every save (benchmarks/checkpoint.py).
        for path in doomed:
            try:
                os.rename(path, path.with_name(path.name + DELETING))
            except OSError:  # gone already, or another process's; the next retention tries again
                pass
        self._pool.submit(self._delete_set_aside)

    def _delete_set_aside(self) -> None:
        for p in self.folder.glob(f"step_*{DELETING}"):
            shutil.rmtree(p, ignore_errors=True)
        rollbacks.remove_retired(self.folder)  # a commit after a rollback: its abandoned trajectory can go

    # -- restoring ---------------------------------------------------------------------------------
    def choose(self, resume: str, before: int | None = None) -> Path | None:
        """The checkpoint to resume from (the same on every rank), or None. `before`: only a checkpoint of
        an earlier step (a rollback to before a loss spike). Rank 0 picks the newest whose files are all
        there at their sizes; then every rank re-hashes a share of its files, and a corrupted one is
        skipped (and the next older one tried) on every rank alike."""
        rejected: set[Path] = set()
        while True:
            path = self._choose_present(resume, before, rejected)
            if path is None:
                return None
            bad = self._corrupted(path)
            if not bad:
                return path
            if resume != "auto":
                raise CheckpointError(f"checkpoint.resume={resume}: cannot resume from it: {'; '.join(bad)}")
            if self.rank == 0:
                self.event("checkpoint_skipped", path=str(path), reason="; ".join(bad))
            rejected.add(path)

    def _choose_present(self, resume: str, before: int | None, rejected: set[Path]) -> Path | None:
        """Rank 0's pick among the checkpoints not yet rejected, checking presence and sizes only."""
        path, error = None, None
        if self.rank == 0 and resume != "never":
            try:
                path = self._pick(resume, before, rejected)
            except CheckpointError as e:
                error = str(e)
        if self.distributed:
            # Every rank learns the choice, or the error: none is left waiting for a peer that gave up.
            box = [(str(path) if path else None, error)]
            dist.broadcast_object_list(box, src=0, group=self.pg)
            path, error = (Path(box[0][0]) if box[0][0] else None), box[0][1]
        if error:
            raise CheckpointError(error)
        return path

    def _corrupted(self, path: Path) -> list[str]:
        """Every rank checksums its share of the files of `path`; all learn every rank's findings."""
        try:
            files = mf.read_manifest(path)["files"]
            ranks = self.world_size if self.distributed else 1
            found = mf.corrupted(path, mf.share(files, self.group_rank, ranks))
        except Exception as e:  # noqa: BLE001 - a rank that cannot check must still join the gather below
            found = [f"rank {self.rank} could not check it ({_error(e)})"]
        return sorted(p for part in self._gather(found) for p in part)

    def set_aside(self) -> Path | None:
        """Starting afresh (--resume never) where checkpoints exist: move them out of the way, so the
        new run's retention and resumes never mix with them. Nothing is deleted. Rank 0 only."""
        if self.rank != 0 or not mf.entries(self.folder):
            return None
        aside = self.folder.with_name(f"{self.folder.name}.before-{time.strftime('%Y%m%dT%H%M%S')}")
        self.folder.rename(aside)
        self.event("checkpoints_set_aside", path=str(aside), reason="checkpoint.resume=never")
        return aside

    def _pick(self, resume: str, before: int | None, rejected: set[Path] = frozenset()) -> Path | None:
        if resume != "auto":
            path = Path(resume)
            if problems := mf.problems(path, deep=False):
                raise CheckpointError(f"checkpoint.resume={resume}: cannot resume from it: {'; '.join(problems)}")
            return path
        for e in reversed(mf.entries(self.folder)):
            if (before is not None and e.step >= before) or e.path in rejected:
                continue
            if problems := mf.problems(e.path, deep=False):
                self.event("checkpoint_skipped", path=str(e.path), reason="; ".join(problems))
                continue
            return e.path
        return None

    def restore(self, engine, path: Path) -> dict:
        """Load `path` into the engine and this process's RNG; returns trainer.json's state."""
        manifest = mf.read_manifest(path)
        # Recomputed from the saved config rather than read from the manifest: older manifests hashed the
        # kernel choices too.
        if _fingerprint(manifest["config"]["model"]) != model_fingerprint(self.config):
            saved, now = architecture(manifest["config"]["model"]), architecture(self.config["model"])
            diff = ", ".join(f"model.{k}: {saved.get(k)} there, {now.get(k)} here"
                             for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k))
            raise CheckpointError(f"checkpoint {path} holds a different model ({diff}); use its model settings, "
                              f"or start afresh with --resume never or another train.name")
        self._check_settings(path, manifest["config"])
        saved_engine = manifest["config"].get("parallel", {}).get("engine", "native")
        native = getattr(engine, "native_checkpoint", False)
        if saved_engine != self.config["parallel"]["engine"] and (native or saved_engine != "native"):
            raise CheckpointError(f"checkpoint {path} was written by the {saved_engine} engine and this run uses "
                                  f"parallel.engine={self.config['parallel']['engine']}; resume with "
                                  f"parallel.engine={saved_engine}, or start afresh with --resume never")
        if native:
            if manifest["world_size"] != self.world_size:
                raise CheckpointError(f"checkpoint {path} was saved by {manifest['world_size']} ranks and this run "
                                      f"has {self.world_size}; the {saved_engine} engine resumes on as many ranks "
                                      f"as it saved with (set the world size to {manifest['world_size']})")
            engine.load_native(path)
        else:
            state = engine.state_dict()
            dcp.load(state, checkpoint_id=path, process_group=self.pg, no_dist=not self.distributed)
            engine.load_state_dict(state)
        rng = path / rng_file(self.rank)
        if manifest["world_size"] == self.world_size and rng.is_file():
            set_rng_state(torch.load(rng, weights_only=False))
        else:
            self.event("rng_not_restored", reason=f"saved on {manifest['world_size']} ranks, resumed on "
                       f"{self.world_size}: random streams restart from the seed")
        self.last_committed = path
        return json.loads((path / TRAINER).read_text())

    def _check_settings(self, path: Path, saved: dict) -> None:
        """Refuse to resume with other data-order or optimizer settings unless the user accepted them."""
        changed = changed_settings(saved, self.config)
        if not changed:
            return
        diff = ", ".join(f"{k}: {before} -> {now}" for k, before, now in changed)
        if not self.settings["resume_changed"]:
            raise CheckpointError(f"checkpoint {path} was saved with other data or optimizer settings ({diff}); to "
                              f"resume with them anyway pass --resume-changed (or --set checkpoint.resume_changed="
                              f"true), or start afresh with --resume never or another train.name")
        self.event("resume_changed", path=str(path), changed=diff, keys=[k for k, _, _ in changed])

    def _barrier(self) -> None:
        if self.distributed:
            dist.barrier(group=self.pg)


def _keel_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("keel")
    except PackageNotFoundError:
        return "unknown"
