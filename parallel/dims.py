"""The parallel layout as one validated object: degrees that multiply to the world size."""
from __future__ import annotations

from dataclasses import dataclass


class LayoutError(ValueError):
    """A parallel layout that cannot run on this world size or model."""


@dataclass(frozen=True)
class ParallelDims:
    dp_replicate: int
    dp_shard: int
    tp: int
    pp: int
    world_size: int

    @classmethod
    def resolve(cls, dp_replicate: int, dp_shard: int, tp: int, pp: int, world_size: int) -> "ParallelDims":
        """Fill the one degree given as -1 with what the others leave of the world size, then check."""
        degrees = {"dp_replicate": dp_replicate, "dp_shard": dp_shard, "tp": tp, "pp": pp}
        fixed = 1
        for d in degrees.values():
            fixed *= d if d != -1 else 1
        rest = [name for name, d in degrees.items() if d == -1]
        layout = " x ".join(f"{k}={v}" for k, v in degrees.items())
        if rest:
            if world_size % fixed:
                raise LayoutError(f"parallel layout {layout} does not fit world size {world_size}: the fixed "
                                  f"degrees multiply to {fixed}, which does not divide {world_size}; change "
                                  f"the degrees or the number of processes")
            degrees[rest[0]] = world_size // fixed
        product = degrees["dp_replicate"] * degrees["dp_shard"] * degrees["tp"] * degrees["pp"]
        if product != world_size:
            shown = " x ".join(f"{k}={v}" for k, v in degrees.items())
            raise LayoutError(f"parallel layout {shown} = {product} processes, but the world size is "
                              f"{world_size}; make the degrees multiply to {world_size} or set one to -1")
        return cls(world_size=world_size, **degrees)

    @property
    def dp(self) -> int:
        """Data-parallel replicas in total: how many slices the global batch is cut into."""
        return self.dp_replicate * self.dp_shard
