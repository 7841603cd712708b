"""Shared fixtures: a fixed seed for every test, and a private SAELAB_HOME unless one is set."""
import os
import random

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def reproducibility():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_thread():
    """One intra-op thread: tiny matmuls gain nothing from two, and OpenMP barriers on a shared,
    busy machine make two threads many times slower. Use with `pytestmark = usefixtures(...)`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_configure(config):
    torch.set_num_threads(min(2, os.cpu_count() or 1))
