"""The GPU tests' poisoning (tests/gpu/conftest.py) really fills fresh memory: checked on any machine."""
import torch


def test_memory_allocated_inside_poisoned_is_nan_and_integers_their_maximum(poison):
    with poison():
        floats = torch.empty(1000, dtype=torch.float32)
        halves = torch.empty(1000, dtype=torch.bfloat16)
        ints = torch.empty(1000, dtype=torch.int32)
    assert floats.isnan().all() and halves.isnan().all()
    assert (ints == torch.iinfo(torch.int32).max).all()


def test_the_settings_are_restored_afterwards(poison):
    import torch.utils.deterministic
    before = torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory
    with poison():
        pass
    assert (torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory) == before
