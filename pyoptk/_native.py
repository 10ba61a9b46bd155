"""Loading of the native library ``pyoptk._C``.

``pyoptk._C`` is built from ``csrc/`` by scikit-build-core. It links only pybind11 (and,
when built with nvcc, the static CUDA runtime), so it never depends on torch's ABI.
If it is missing or fails to load, ``import pyoptk`` still works: the ``torch``
backend runs instead, and :func:`native` raises a message saying how to fix it.
"""

from __future__ import annotations

import functools
from types import ModuleType
from typing import Optional

__all__ = ["native", "native_or_none", "native_load_error", "DTYPE_CODES"]

# dtype codes understood by pyoptk._C (see csrc/include/pyoptk/common.h).
DTYPE_CODES = {"float32": 0, "bfloat16": 1, "float16": 2}


@functools.lru_cache(maxsize=None)
def _load() -> tuple[Optional[ModuleType], Optional[str]]:
    import torch  # noqa: F401  (first: _C uses the libgomp.so.1 that torch loads)

    try:
        from pyoptk import _C  # type: ignore[attr-defined]
    except ImportError as exc:  # not built, or built for another platform
        return None, f"{type(exc).__name__}: {exc}"
    return _C, None


def native_or_none() -> Optional[ModuleType]:
    """The native module, or None when it is not available."""
    return _load()[0]


def native_load_error() -> Optional[str]:
    """Why the native module could not be loaded (None when it loaded)."""
    return _load()[1]


def native() -> ModuleType:
    """The native module; raises RuntimeError explaining how to build it when missing."""
    mod, err = _load()
    if mod is None:
        raise RuntimeError(
            "pyoptk's native library pyoptk._C is not available "
            f"({err}). Reinstall pyoptk from a wheel for this platform, or build it from "
            "source: `pip install --no-build-isolation -e .` with a C++17 compiler, "
            "cmake, pybind11 and scikit-build-core (nvcc on PATH for the CUDA kernels)."
        )
    return mod
