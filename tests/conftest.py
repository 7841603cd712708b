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


def pytest_configure(config):
    torch.set_num_threads(min(2, os.cpu_count() or 1))
