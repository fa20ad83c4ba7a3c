"""The parallel layout is one validated object; impossible layouts name their numbers."""
import pytest

from keel.parallel.dims import LayoutError, ParallelDims


def test_minus_one_fills_the_rest_of_the_world():
    dims = ParallelDims.resolve(dp_replicate=2, dp_shard=-1, tp=2, pp=1, world_size=8)
    assert (dims.dp_replicate, dims.dp_shard, dims.tp, dims.pp, dims.dp) == (2, 2, 2, 1, 4)


def test_degrees_that_do_not_multiply_to_the_world_size_are_refused():
    with pytest.raises(LayoutError, match=r"dp_replicate=1 x dp_shard=2 x tp=2 x pp=1 = 4 processes, but the "
                                          r"world size is 8"):
        ParallelDims.resolve(1, 2, 2, 1, world_size=8)
    with pytest.raises(LayoutError, match=r"fixed degrees multiply to 3, which does not divide 8"):
        ParallelDims.resolve(1, -1, 3, 1, world_size=8)
