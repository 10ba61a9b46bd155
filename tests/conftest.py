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
