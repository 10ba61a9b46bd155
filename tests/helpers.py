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


def mlp_setup(shapes, dtype=torch.float32, config=None, seed=0, out_scale=30.0,
              wdtype=torch.float32):
    """One ``mlp_update_`` call's inputs: ``(config, state, weights, decays)`` with
    ``state = [params, moms, rmss, fac_rows, fac_cols, steps]`` (fresh state, random
    params of ``dtype``). The fresh rule's output layer is tiny by design; it is scaled
    by ``out_scale`` so the MLP (not just weight decay) dominates the update compared."""
    from pyoptk.learned import MLPConfig, init_meta_params, init_state
    from pyoptk.learned.mlp import decays_tensor, meta_weights

    config = config or MLPConfig()
    meta = init_meta_params(config, seed=3)
    last = f"w{len(config.hidden_sizes)}"
    meta = {k: (v * out_scale if k == last else v) for k, v in meta.items()}
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g).to(dtype) for s in shapes]
    st = init_state(params, config, dtype=torch.float32)
    state = [list(params), st.mom, st.rms, st.fac_row, st.fac_col, st.step]
    weights = [w.to(wdtype) for w in meta_weights(meta, config)]
    decays = decays_tensor(config, meta).to(wdtype)
    return config, state, weights, decays


def clone_lists(state):
    """A deep copy of a list of tensor lists."""
    return [[t.clone() for t in role] for role in state]


def random_grads(shapes, dtype, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(s, generator=g) * scale).to(dtype) for s in shapes]
