"""Save and restore the whole training state: sharded, asynchronous, atomically committed, retained.

Every rank writes its own shards with torch.distributed.checkpoint (no gather to rank 0) into
`step_XXXXXXX.tmp/`, plus its RNG state; rank 0 adds `trainer.json` (step, tokens, data position, the
spike detector's state) and, once every shard is on disk, commits the folder (manifest.manifest.commit).
An asynchronous save copies the state to CPU memory, returns to training, and writes and commits in the
background; at most one save is in flight. Restoring picks the newest checkpoint that verifies and says
which ones it skipped and why. The folders assume a filesystem every rank sees (as DCP does to reshard).
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import json
import shutil
import time
import warnings
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

from ..training.config import Config, ConfigError, config_to_dict
from . import manifest as mf
from .state import rng_state, set_rng_state

TRAINER = "trainer.json"
# A single-process run saves and loads with no_dist=True on purpose; DCP warns about it all the same.
warnings.filterwarnings("ignore", message=r"torch\.distributed is (disabled, )?unavailable or uninitialized")


_GROUP = None


def checkpoint_group():
    """The gloo group for checkpoint collectives, created once per process (every Checkpointer of the
    process shares it; creating a group is a collective of its own)."""
    global _GROUP
    world = dist.group.WORLD
    if _GROUP is None or _GROUP[0] is not world:  # none yet, or the process group was started anew
        _GROUP = (world, dist.new_group(backend="gloo"))
    return _GROUP[1]


def writer(folder: Path) -> FileSystemWriter:
    # Several writer threads per rank: measured 2.9 s instead of 4.9 s for a 1.6 GB state on 2 cores
    # (benchmarks/checkpoint.py); DCP's default is one.
    return FileSystemWriter(folder, thread_count=4, sync_files=True)


def rng_file(rank: int) -> str:
    return f"rng_rank{rank:05d}.pt"


# Which kernel runs an op is not the architecture: a run saved with one may resume with another (and
# checkpoints from before a kernel section existed still resume).
KERNEL_SECTIONS = ("attention", "rmsnorm", "swiglu", "rope", "cross_entropy")


def architecture(model_section: dict) -> dict:
    return {k: v for k, v in model_section.items() if k not in KERNEL_SECTIONS}


def _fingerprint(model_section: dict) -> str:
    return hashlib.sha256(json.dumps(architecture(model_section), sort_keys=True).encode()).hexdigest()[:16]


def model_fingerprint(cfg: Config) -> str:
    """What must match for weights to load: the model section (the architecture), kernel choices aside."""
    return _fingerprint(config_to_dict(cfg)["model"])


def config_hash(cfg: Config) -> str:
    return hashlib.sha256(json.dumps(config_to_dict(cfg), sort_keys=True).encode()).hexdigest()[:16]


class CheckpointError(RuntimeError):
    """A checkpoint that was asked for by path cannot be used; names the path and the reason."""


class Checkpointer:
    def __init__(self, cfg: Config, folder: Path, rank: int, world_size: int, layout: dict,
                 event: Callable[..., None] = lambda kind, **f: None,
                 before_commit: Callable[[int], None] = lambda step: None):
        self.cfg, self.folder, self.rank, self.world_size = cfg, Path(folder), rank, world_size
        self.layout, self.event, self.before_commit = layout, event, before_commit
        self.distributed = world_size > 1 and dist.is_initialized()
        # Checkpoint collectives run on their own gloo group: an async save's run in a background thread
        # while training's run on the default group, and they must not interleave on one communicator.
        self.pg = checkpoint_group() if self.distributed else None
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="keel-ckpt")
        # One stager for the whole run: it keeps its CPU copy of the state between saves, so only the
        # first async save pays for allocating (and page-faulting) that memory. Costs one state's worth
        # of host memory; pinned on GPU so the device-to-host copy runs at full speed.
        cuda = torch.cuda.is_available()
        self._stager = DefaultStager(StagingOptions(use_pinned_memory=cuda, use_shared_memory=False,
                                                    use_async_staging=False, use_non_blocking_copy=cuda))
        self._in_flight: concurrent.futures.Future | None = None
        self.last_committed: Path | None = None

    # -- saving ------------------------------------------------------------------------------------
    def save(self, step: int, engine, trainer_state: dict) -> float:
        """Checkpoint the state after `step`. Returns how long training was blocked, in seconds."""
        t0 = time.perf_counter()
        self.wait()  # at most one save in flight
        tmp = self.folder / (mf.folder_name(step) + ".tmp")
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # a leftover of an earlier, interrupted attempt
            tmp.mkdir(parents=True)
        self._barrier()
        torch.save(rng_state(), tmp / rng_file(self.rank))
        if self.rank == 0:
            mf.write_json_durably(tmp / TRAINER, trainer_state)
        state = engine.state_dict()
        if self.cfg.checkpoint.async_save:
            # async_save returns once the state is copied to CPU memory; the writing happens behind.
            written = dcp.async_save(state, storage_writer=writer(tmp), process_group=self.pg,
                                     async_stager=self._stager, no_dist=not self.distributed)
            self._in_flight = self._pool.submit(self._finish, step, tmp, written, t0)
        else:
            try:
                dcp.save(state, storage_writer=writer(tmp), process_group=self.pg, no_dist=not self.distributed)
                self._finish(step, tmp, None, t0)
            except Exception as e:  # noqa: BLE001 - see wait()
                self.event("checkpoint_failed", step=step, error=f"{type(e).__name__}: {e}")
        return time.perf_counter() - t0

    def _finish(self, step: int, tmp: Path, written, t0: float) -> None:
        if written is not None:
            written.result()
        # DCP's save ends with rank 0 gathering every rank's write results, so once rank 0 is here all
        # shards (and the RNG files written before them) are on disk.
        self.before_commit(step)
        if self.rank != 0:
            return
        info = {"step": step, "tokens": step * self.cfg.train.global_batch_size * self.cfg.data.seq_len,
                "world_size": self.world_size, "layout": self.layout, "model_fingerprint": model_fingerprint(self.cfg),
                "config_hash": config_hash(self.cfg), "config": config_to_dict(self.cfg), "keel_version": _keel_version(),
                "torch_version": torch.__version__, "created": time.time()}
        final = mf.commit(tmp, info)
        self.last_committed = final
        size = sum(p.stat().st_size for p in final.iterdir())
        self.event("checkpoint_saved", step=step, path=str(final), bytes=size,
                   seconds=round(time.perf_counter() - t0, 3), async_save=written is not None)
        self._retain()

    def wait(self) -> None:
        """Finish the save in flight, if any. A failed save is reported and training goes on: the
        previous committed checkpoint is untouched, which is the point of the commit protocol."""
        if self._in_flight is None:
            return
        try:
            self._in_flight.result()
        except Exception as e:  # noqa: BLE001 - any failure to write must not end the run
            self.event("checkpoint_failed", error=f"{type(e).__name__}: {e}")
        finally:
            self._in_flight = None

    def close(self) -> None:
        self.wait()
        self._pool.shutdown()
        self._stager.close()

    def _retain(self) -> None:
        """Keep the newest keep_last, and every keep_every-th step; drop stale uncommitted folders."""
        c = self.cfg.checkpoint
        found = mf.entries(self.folder)
        committed = [e for e in found if e.committed]
        keep = {e.step for e in committed[-c.keep_last:]}
        keep |= {e.step for e in committed if c.keep_every and e.step % c.keep_every == 0}
        newest = committed[-1].step if committed else -1
        for e in found:
            if (e.committed and e.step not in keep) or (not e.committed and e.step < newest):
                shutil.rmtree(e.path, ignore_errors=True)

    # -- restoring ---------------------------------------------------------------------------------
    def choose(self, resume: str, before: int | None = None) -> Path | None:
        """The checkpoint to resume from (decided on rank 0, the same on every rank), or None. `before`:
        only a checkpoint of an earlier step (a rollback to before a loss spike)."""
        path, error = None, None
        if self.rank == 0 and resume != "never":
            try:
                path = self._pick(resume, before)
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

    def set_aside(self) -> Path | None:
        """Starting afresh (--resume never) where checkpoints exist: move them out of the way, so the
        new run's retention and resumes never mix with them. Nothing is deleted. Rank 0 only."""
        if self.rank != 0 or not mf.entries(self.folder):
            return None
        aside = self.folder.with_name(f"{self.folder.name}.before-{time.strftime('%Y%m%dT%H%M%S')}")
        self.folder.rename(aside)
        self.event("checkpoints_set_aside", path=str(aside), reason="checkpoint.resume=never")
        return aside

    def _pick(self, resume: str, before: int | None) -> Path | None:
        if resume != "auto":
            path = Path(resume)
            if problems := mf.problems(path):
                raise CheckpointError(f"checkpoint.resume={resume}: cannot resume from it: {'; '.join(problems)}")
            return path
        for e in reversed(mf.entries(self.folder)):
            if before is not None and e.step >= before:
                continue
            if problems := mf.problems(e.path):
                self.event("checkpoint_skipped", path=str(e.path), reason="; ".join(problems))
                continue
            return e.path
        return None

    def restore(self, engine, path: Path) -> dict:
        """Load `path` into the engine and this process's RNG; returns trainer.json's state."""
        manifest = mf.read_manifest(path)
        # Recomputed from the saved config rather than read from the manifest: older manifests hashed the
        # kernel choices too.
        if _fingerprint(manifest["config"]["model"]) != model_fingerprint(self.cfg):
            saved, now = architecture(manifest["config"]["model"]), architecture(config_to_dict(self.cfg)["model"])
            diff = ", ".join(f"model.{k}: {saved.get(k)} there, {now.get(k)} here"
                             for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k))
            raise ConfigError(f"checkpoint {path} holds a different model ({diff}); use its model settings, "
                              f"or start afresh with --resume never or another train.name")
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

    def _barrier(self) -> None:
        if self.distributed:
            dist.barrier(group=self.pg)


def _keel_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("keel")
    except PackageNotFoundError:
        return "unknown"
