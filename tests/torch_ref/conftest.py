"""Fixtures shared by the torch_ref tests."""

import pytest

torch = pytest.importorskip("torch", reason="the torch extra is not installed")


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny problems: one intra-op thread (two threads spin badly when the 2-core machine is busy)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
