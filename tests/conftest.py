"""Test set-up: CPU by default, every backend that can run here.

Without a GPU, Triton kernels run through Triton's interpreter, which must be switched on before
the kernels are first imported: this file does it before anything imports lowrank_kernels.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from lowrank_kernels.backends import available_backends  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; none is available here")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def device():
    return DEVICE


@pytest.fixture(params=available_backends(DEVICE))
def backend(request):
    """Every backend that can run on this machine's test device."""
    return request.param
