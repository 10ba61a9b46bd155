"""Backend selection for pyoptk's ops.

Every op has up to four implementations:

========  ===============================================  =====================
name      what                                             runs tensors on
========  ===============================================  =====================
cuda      native CUDA C++ in ``pyoptk._C``                 CUDA devices
triton    Triton kernels in ``pyoptk.kernels``             CUDA devices; CPU only
                                                           with TRITON_INTERPRET=1
cpu       native C++ (OpenMP) in ``pyoptk._C``             CPU
torch     the pure-PyTorch reference (``pyoptk/ops``)      any device
========  ===============================================  =====================

``auto`` (the default) picks the fastest available for the tensors' device: ``cuda``
then ``triton`` then ``torch`` on GPU, ``cpu`` then ``torch`` on CPU. When ``auto``
falls back to ``torch`` because a fused backend is missing, a :class:`SlowPathWarning`
says once what is missing and how to get it. A backend forced with
:func:`set_backend`, :func:`use_backend` or the ``PYOPTK_BACKEND`` environment
variable is used for every op that has it; if it cannot run (not built, not
installed, wrong device) the op raises a RuntimeError naming what is missing.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import threading
import warnings
from typing import Callable, Dict, Iterator, Optional

from pyoptk._native import native_load_error, native_or_none

__all__ = [
    "BACKENDS",
    "SlowPathWarning",
    "set_backend",
    "get_backend",
    "use_backend",
    "available_backends",
    "register_backend",
    "registered_backends",
    "resolve_backend",
    "backend_unavailable_reason",
    "implementation_for",
    "warn_fallback",
    "warn_once",
]

BACKENDS = ("auto", "cuda", "triton", "cpu", "torch")
_AUTO_ORDER = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpu", "torch")}


class SlowPathWarning(UserWarning):
    """A fused backend is unavailable and the slower PyTorch reference runs instead."""


_global_backend: Optional[str] = None
_local = threading.local()
# op name -> backend name -> implementation
_registry: Dict[str, Dict[str, Callable]] = {}
_warned: set = set()


def _check_name(name: str) -> str:
    if not isinstance(name, str) or name.lower() not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name.lower()


def set_backend(name: Optional[str]) -> None:
    """Force a backend for all ops (``None`` or ``"auto"`` restores automatic choice)."""
    global _global_backend
    _global_backend = None if name is None else _check_name(name)


def get_backend() -> str:
    """The backend in force: :func:`use_backend`, else :func:`set_backend`, else
    ``PYOPTK_BACKEND``, else ``"auto"``."""
    local = getattr(_local, "backend", None)
    if local is not None:
        return local
    if _global_backend is not None:
        return _global_backend
    env = os.environ.get("PYOPTK_BACKEND")
    if env:
        try:
            return _check_name(env)
        except ValueError as exc:
            raise ValueError(f"PYOPTK_BACKEND: {exc}") from None
    return "auto"


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force a backend inside a ``with`` block (this thread only)."""
    name = _check_name(name)
    prev = getattr(_local, "backend", None)
    _local.backend = name
    try:
        yield
    finally:
        _local.backend = prev


def register_backend(op: str, backend: str) -> Callable[[Callable], Callable]:
    """Decorator registering ``fn`` as ``op``'s implementation for ``backend``."""
    if backend not in BACKENDS[1:]:
        raise ValueError(f"cannot register backend {backend!r}")

    def deco(fn: Callable) -> Callable:
        _registry.setdefault(op, {})[backend] = fn
        return fn

    return deco


def registered_backends(op: str) -> list:
    """Backends ``op`` has an implementation for (whether or not they can run here;
    :func:`available_backends` says which can)."""
    return [b for b in BACKENDS[1:] if b in _registry.get(op, {})]


@functools.lru_cache(maxsize=None)
def _triton_import_error() -> Optional[str]:
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed (pip install triton)"
    try:
        import triton  # noqa: F401
    except Exception as exc:  # broken install
        return f"Triton failed to import: {exc}"
    return None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def backend_unavailable_reason(backend: str, device_type: str) -> Optional[str]:
    """None if ``backend`` can run tensors on ``device_type``, else why not."""
    if backend == "torch":
        return None
    if backend == "cpu":
        if device_type != "cpu":
            return f"the 'cpu' backend runs CPU tensors only, got {device_type} tensors"
        if native_or_none() is None:
            return f"the native library pyoptk._C did not load ({native_load_error()})"
        return None
    if backend == "cuda":
        if device_type != "cuda":
            return f"the 'cuda' backend runs CUDA tensors only, got {device_type} tensors"
        mod = native_or_none()
        if mod is None:
            return f"the native library pyoptk._C did not load ({native_load_error()})"
        if not mod.build_info()["cuda"]:
            return ("pyoptk._C was built without CUDA (no nvcc found at build time); "
                    "rebuild with nvcc on PATH and PYOPTK_CUDA=ON")
        return None
    if backend == "triton":
        err = _triton_import_error()
        if err:
            return err
        if device_type == "cpu" and not _interpreting():
            return "Triton runs CPU tensors only in its interpreter: set TRITON_INTERPRET=1"
        if device_type not in ("cpu", "cuda"):
            return f"the 'triton' backend runs CUDA tensors, got {device_type} tensors"
        return None
    raise ValueError(f"unknown backend {backend!r}")


def available_backends(device_type: str) -> list:
    """Backends that can run tensors on ``device_type`` in this process."""
    return [b for b in BACKENDS[1:] if backend_unavailable_reason(b, device_type) is None]


def resolve_backend(op: str, device_type: str) -> str:
    """The backend ``op`` will use for tensors on ``device_type``."""
    impls = _registry.get(op, {})
    chosen = get_backend()
    if chosen != "auto":
        if chosen not in impls:
            raise RuntimeError(
                f"pyoptk::{op} has no {chosen!r} backend (it has {sorted(impls)}); "
                "use pyoptk.set_backend('auto')")
        why = backend_unavailable_reason(chosen, device_type)
        if why is not None:
            raise RuntimeError(f"pyoptk::{op}: backend {chosen!r} was forced but {why}")
        return chosen
    order = _AUTO_ORDER.get(device_type, ("torch",))
    missing = []
    for b in order:
        if b not in impls:
            continue
        why = backend_unavailable_reason(b, device_type)
        if why is None:
            if b == "torch" and missing:
                _warn_slow_path(op, device_type, missing)
            return b
        missing.append(f"{b}: {why}")
    return "torch"


def warn_once(key: tuple, message: str, stacklevel: int = 3) -> None:
    """A :class:`SlowPathWarning` with ``message`` the first time ``key`` is seen in this
    process (``stacklevel`` counted from the caller of ``warn_once``)."""
    if key in _warned:
        return
    _warned.add(key)
    warnings.warn(message, SlowPathWarning, stacklevel=stacklevel + 1)


def _warn_slow_path(op: str, device_type: str, missing: list) -> None:
    warn_once((op, device_type),
              f"pyoptk::{op} on {device_type} runs the PyTorch reference, slower than the "
              f"fused kernels, because no fused backend is available "
              f"({'; '.join(missing)}). `pyoptk info` shows the build.", stacklevel=4)


def implementation(op: str, device_type: str) -> Callable:
    """The registered implementation of ``op`` for ``device_type``'s resolved backend."""
    return _registry[op][resolve_backend(op, device_type)]


def implementation_for(op: str, backend: str) -> Callable:
    """The registered implementation of ``op`` for ``backend`` (see :func:`resolve_backend`)."""
    return _registry[op][backend]


def warn_fallback(op: str, device_type: str, backend: str, reason: str) -> None:
    """One-time :class:`SlowPathWarning` (per op, device type, backend and reason) when a
    backend declines a call's configuration (NotImplementedError raised before any
    tensor was touched) and the op runs its PyTorch reference instead."""
    warn_once((op, device_type, backend, reason),
              f"pyoptk::{op} on {device_type}: the {backend!r} backend does not support this "
              f"configuration ({reason}); running the PyTorch reference instead (slower).",
              stacklevel=4)
