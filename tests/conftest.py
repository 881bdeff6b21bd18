import os

import pytest
import torch

if not torch.cuda.is_available():
    # No GPU: the triton backend joins the CPU tests through Triton's interpreter (slow; tests stay small).
    # Set before anything jit-decorates a Triton kernel (triton.jit picks its mode at decoration time).
    os.environ.setdefault("TRITON_INTERPRET", "1")

import csgd_ext  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped with a reason when none is present)")
    config.addinivalue_line("markers", "slow: longer-running test (still part of CI)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device: this torch build or machine has no GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def cpu_backends():
    """Backends that can run on CPU tensors in this environment (reference always)."""
    return [name for name, why in csgd_ext.available_backends().items() if why is None]


@pytest.fixture(params=cpu_backends())
def backend(request):
    return request.param


@pytest.fixture
def one_thread():
    """One intra-op thread for tests of tiny tensors: on a busy 2-core machine OpenMP barriers cost 10-50x
    the compute with 2 threads. Restores the previous count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
