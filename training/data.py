"""Deterministic, resumable batches from prepared token shards.

The token stream of a split is cut into non-overlapping windows of seq_len + 1 tokens (inputs and the
targets shifted by one). Each epoch visits the windows in a permutation drawn from (seed, epoch), and global
batch k is windows [k*G, (k+1)*G) of that endless sequence. A data-parallel rank takes its contiguous slice
of the global batch, so the data order and the global batch do not depend on the parallel layout. The
loader's whole position is the next batch index plus the ranges it was told to skip.
"""
from __future__ import annotations

import bisect
from pathlib import Path

import numpy as np
import torch

from .corpus import DataError, read_meta


class TokenWindows:
    """Random access to the seq_len + 1 token windows of one split."""

    def __init__(self, data_dir: str | Path, split: str, seq_len: int):
        data_dir = Path(data_dir)
        meta = read_meta(data_dir)
        if split not in meta["splits"]:
            raise DataError(f"{data_dir} has no {split!r} split; re-run `keel data prepare`")
        self.seq_len = seq_len
        self.shards, self.starts = [], [0]
        for shard in meta["splits"][split]["shards"]:
            tokens = np.memmap(data_dir / shard["file"], dtype=meta["dtype"], mode="r")
            n = (len(tokens) - 1) // seq_len
            if n > 0:
                self.shards.append(tokens)
                self.starts.append(self.starts[-1] + n)
        if len(self) == 0:
            raise DataError(f"the {split!r} split of {data_dir} has fewer than seq_len + 1 = {seq_len + 1} "
                            f"tokens per shard; lower data.seq_len or add data")

    def __len__(self) -> int:
        return self.starts[-1]

    def __getitem__(self, i: int) -> np.ndarray:
        shard = bisect.bisect_right(self.starts, i) - 1
        offset = (i - self.starts[shard]) * self.seq_len
        return self.shards[shard][offset:offset + self.seq_len + 1]


# The permutation the held-out batches are drawn from: fixed, so that a run's seed changes its training data
# order and its initial weights but not the tokens its eval loss is measured on.
HELD_OUT_SEED = 0


class BatchLoader:
    """Serves this rank's share of global batch 0, 1, 2, ... as (inputs, targets) [b, T] int64 tensors."""

    def __init__(self, windows: TokenWindows, global_batch_size: int, dp_rank: int = 0, dp_size: int = 1,
                 seed: int = 0):
        if global_batch_size % dp_size:
            raise ValueError(f"global batch {global_batch_size} does not split over {dp_size} data-parallel ranks")
        self.windows, self.global_batch_size, self.seed = windows, global_batch_size, seed
        self.local_batch_size = global_batch_size // dp_size
        self.dp_rank = dp_rank
        self.batch = 0                        # index of the next global batch to serve
        self.skip_ranges: list[tuple[int, int]] = []  # [start, stop) global batch indices never served
        self._perm_epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.windows))
            self._perm_epoch = epoch
        return self._perm

    def window_ids(self, batch: int) -> list[int]:
        """Window indices of this rank's slice of global batch `batch`."""
        first = batch * self.global_batch_size + self.dp_rank * self.local_batch_size
        n = len(self.windows)
        return [int(self._permutation(p // n)[p % n]) for p in range(first, first + self.local_batch_size)]

    def skip(self, start: int, stop: int) -> None:
        """Never serve global batches start..stop-1 (e.g. the data window that led to a loss spike)."""
        self.skip_ranges.append((int(start), int(stop)))

    def _skipped(self, batch: int) -> int | None:
        return next((stop for start, stop in self.skip_ranges if start <= batch < stop), None)

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        while (stop := self._skipped(self.batch)) is not None:
            self.batch = stop
        rows = np.stack([self.windows[i] for i in self.window_ids(self.batch)]).astype(np.int64)
        self.batch += 1
        tokens = torch.from_numpy(rows)
        return tokens[:, :-1], tokens[:, 1:]

    def state_dict(self) -> dict:
        return {"batch": self.batch, "skip_ranges": [list(r) for r in self.skip_ranges], "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state.get("seed", self.seed) != self.seed:
            raise ValueError(f"loader state was saved with seed {state['seed']}, this run uses {self.seed}")
        self.batch = int(state["batch"])
        self.skip_ranges = [tuple(r) for r in state["skip_ranges"]]
