import pytest
import torch


@pytest.fixture
def one_torch_thread():
    """For tests on tiny tensors: a second intra-op thread gains nothing, and on a busy
    2-core machine it made each small op wait for a descheduled thread (100x slower steps)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
