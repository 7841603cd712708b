"""One intra-op thread for SAE tests: tiny matmuls gain nothing from two, and OpenMP barriers on a
shared, busy machine make two threads many times slower."""
import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
