"""The doctests of the data-building stages run their tiny models on one thread (tiny models gain
nothing from threads and lose much to their synchronisation)."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
