import os

import pytest
import torch

# Without a GPU, Triton kernels run on CPU in its interpreter (set before anything
# imports triton). With one, they compile for it and the `gpu` tier tests them there.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _reset_backend():
    import pyoptk

    pyoptk.set_backend(None)
    yield
    pyoptk.set_backend(None)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny problems (tasks, meta-training, MAML):
    there a second thread only adds synchronization, which on a loaded 2-core machine
    costs several times the work. Use with ``pytestmark =
    pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
