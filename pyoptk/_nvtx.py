"""NVTX ranges named ``pyoptk::<op>`` around every op and optimizer step.

Uses the ``nvtx`` package when installed (its ranges cost ~1 µs and nothing is
recorded without a profiler attached), else ``torch.cuda.nvtx`` on CUDA builds of
torch, else nothing. Nsight Systems then shows pyoptk's work by name::

    nsys profile -t cuda,nvtx python train.py
"""

from __future__ import annotations

import contextlib
import functools
from typing import Callable, ContextManager, TypeVar

import torch

__all__ = ["nvtx_range", "annotate"]

F = TypeVar("F", bound=Callable)


def _make_range_factory() -> Callable[[str], ContextManager]:
    try:
        import nvtx  # type: ignore[import-not-found]

        domain = nvtx.get_domain("pyoptk")
        attributes = functools.lru_cache(maxsize=None)(
            lambda name: domain.get_event_attributes(message=name))

        @contextlib.contextmanager
        def _nvtx_pkg_range(name: str):
            domain.push_range(attributes(name))
            try:
                yield
            finally:
                domain.pop_range()

        return _nvtx_pkg_range
    except Exception:  # package missing or no libnvToolsExt: fall back
        pass
    if torch.cuda.is_available():
        return torch.cuda.nvtx.range
    return lambda name: contextlib.nullcontext()


_range_factory = _make_range_factory()


def _range(full_name: str) -> ContextManager:
    # Under torch.compile tracing, no range: dynamo cannot trace the nvtx package (a
    # graph break in every step), and a range opened while tracing would mark the
    # trace, not the compiled code's execution.
    if torch.compiler.is_compiling():
        return contextlib.nullcontext()
    return _range_factory(full_name)


def nvtx_range(name: str) -> ContextManager:
    """Context manager opening the NVTX range ``pyoptk::<name>`` (none while
    torch.compile traces)."""
    return _range(f"pyoptk::{name}")


def annotate(name: str) -> Callable[[F], F]:
    """Decorator wrapping a function in :func:`nvtx_range` (``pyoptk::<name>``)."""

    def deco(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            with _range(f"pyoptk::{name}"):
                return fn(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return deco
