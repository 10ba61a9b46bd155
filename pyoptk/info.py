"""``pyoptk info``: version, native build, available backends and which one each op
uses on each device."""

from __future__ import annotations

import os
import platform

import torch

import pyoptk
from pyoptk import _backend
from pyoptk._native import native_load_error, native_or_none

OPS = ("adamw_", "lamb_", "clip_grad_norm_", "grad_norm", "centralize_gradients_",
       "mlp_update_", "mlp_step_backward")


def report() -> str:
    lines = [f"pyoptk {pyoptk.__version__}",
             f"python {platform.python_version()}, torch {torch.__version__}, "
             f"triton {_triton_version()}"]
    mod = native_or_none()
    if mod is None:
        lines.append(f"native library: NOT LOADED ({native_load_error()})")
    else:
        b = mod.build_info()
        lines.append(f"native library: {b['version']}, OpenMP "
                     f"{'on' if b['openmp'] else 'off'} ({b['omp_max_threads']} threads), "
                     f"CPU loops {b['cpu_isa']} (PYOPTK_CPU_ISA caps it), "
                     f"CUDA {'on, archs ' + b['cuda_archs'] if b['cuda'] else 'off'}")
    lines.append(f"CUDA devices visible to torch: {torch.cuda.device_count()}")
    lines.append(f"backend setting: {pyoptk.get_backend()} (PYOPTK_BACKEND="
                 f"{os.environ.get('PYOPTK_BACKEND', '')!r}, TRITON_INTERPRET="
                 f"{os.environ.get('TRITON_INTERPRET', '')!r})")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for dev in devices:
        lines.append(f"{dev}: available backends {_backend.available_backends(dev)}")
        for b in ("cuda", "triton", "cpu"):
            why = _backend.backend_unavailable_reason(b, dev)
            if why and not why.startswith(f"the '{b}' backend runs"):
                lines.append(f"  {b}: unavailable: {why}")
        for op in OPS:
            try:
                lines.append(f"  {op:<24} -> {_backend.resolve_backend(op, dev)}")
            except RuntimeError as exc:
                lines.append(f"  {op:<24} -> error: {exc}")
    return "\n".join(lines)


def _triton_version() -> str:
    if _backend._triton_import_error() is not None:
        return "not installed"
    import triton

    return triton.__version__
