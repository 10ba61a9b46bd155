"""Shared test helpers: per-dtype tolerances, verbose comparison, backend lists."""

from __future__ import annotations

import torch

import pyoptk

# (atol, rtol) after one fused step compared with the reference on the same inputs.
# fp32: both compute in fp32, differing only in operation order / FMA contraction.
# bf16/fp16: the parameter is rounded once per step; allow one ulp of the dtype.
STEP_TOL = {
    torch.float32: (1e-6, 1e-5),
    torch.bfloat16: (1e-2, 8e-3),
    torch.float16: (1e-3, 1e-3),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float,
                 what: str = "") -> None:
    """allclose with a message naming the worst elements (index, actual, expected)."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    if a.numel() == 0:
        return
    err = (a - e).abs() - (atol + rtol * e.abs())
    bad = (err > 0) | (a.isnan() != e.isnan())
    if bad.any():
        flat = err.flatten().nan_to_num(float("inf"))
        worst = flat.topk(min(5, flat.numel())).indices
        rows = [f"  [{tuple(int(x) for x in torch.unravel_index(i, a.shape))}] "
                f"actual={a.flatten()[i].item():.9g} expected={e.flatten()[i].item():.9g}"
                for i in worst]
        raise AssertionError(f"{what}: {int(bad.sum())}/{a.numel()} elements out of "
                             f"tolerance (atol={atol}, rtol={rtol}); worst:\n" + "\n".join(rows))


def cpu_backends(include_torch: bool = False):
    """Fused backends that can run CPU tensors here (triton only under TRITON_INTERPRET)."""
    names = [b for b in pyoptk.available_backends("cpu") if b != "torch"]
    return names + (["torch"] if include_torch else [])


def small_for(backend: str, shapes, small_shapes):
    """The Triton interpreter is slow: give it the small shape set."""
    return small_shapes if backend == "triton" else shapes
