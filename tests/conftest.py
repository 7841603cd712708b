"""Shared fixtures: a fixed seed for every test, and a private SAELAB_HOME unless one is set."""
import logging
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch


_USER_HOME = os.environ.get("SAELAB_HOME")


@pytest.fixture(scope="session")
def shared_model_cache(tmp_path_factory):
    """One dequantised-model cache for the whole session (a cache, not user data: the first slow
    test that loads the embedded model fills it, the rest reuse it)."""
    return tmp_path_factory.mktemp("saelab_models")


@pytest.fixture(autouse=True)
def private_saelab_home(tmp_path_factory, monkeypatch, shared_model_cache):
    """Every test gets its own SAELAB_HOME (corpora, caches, hash cache) unless the caller set one,
    so no test reads or writes the user's ~/.cache/saelab. `models/` links to the session's cache."""
    if _USER_HOME:
        yield Path(_USER_HOME)
        return
    home = tmp_path_factory.mktemp("saelab_home")
    (home / "models").symlink_to(shared_model_cache, target_is_directory=True)
    monkeypatch.setenv("SAELAB_HOME", str(home))
    yield home


@pytest.fixture(autouse=True)
def no_stale_log_handler():
    """`saelab.cli.main` points the root logger at this test's captured stderr; later tests must not
    write there."""
    yield
    for h in list(logging.getLogger().handlers):
        if isinstance(h, logging.StreamHandler) and not type(h).__module__.startswith("_pytest"):
            logging.getLogger().removeHandler(h)


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


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    """The tiny random Llama and its tokenizer saved as a local model directory (modules may override)."""
    from tests.builders import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> Path:
    """Twelve small text documents (modules may override)."""
    from tests.builders import make_text_corpus

    return make_text_corpus(tmp_path_factory.mktemp("corpus"), n_docs=12, seed=0)
