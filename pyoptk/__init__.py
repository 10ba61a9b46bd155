"""pyoptk: fast learned optimizers and meta-learning for PyTorch.

Fused optimizer kernels (native C++/OpenMP on CPU, CUDA C++ and Triton on GPU) behind
``torch.optim`` classes and ``torch.ops.pyoptk`` ops. Quick start::

    import pyoptk
    opt = pyoptk.optim.AdamW(model.parameters(), lr=1e-3)   # drop-in for torch's

``pyoptk.set_backend("torch"|"cpu"|"cuda"|"triton"|"auto")`` forces a backend;
``pyoptk info`` on the command line shows what this build has.
"""

__version__ = "0.1.0"

from pyoptk._backend import (  # noqa: E402
    SlowPathWarning, available_backends, get_backend, set_backend, use_backend)
from pyoptk import ops  # noqa: E402  (registers torch.ops.pyoptk.*)
from pyoptk import learned  # noqa: E402
from pyoptk import optim  # noqa: E402

__all__ = [
    "__version__", "ops", "optim", "learned", "set_backend", "get_backend", "use_backend",
    "available_backends", "SlowPathWarning",
]
