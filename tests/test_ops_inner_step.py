"""Differentiable inner steps (pyoptk.ops.inner_step): every backend of the forward and
backward ops against the reference, gradcheck / gradgradcheck in float64, opcheck,
zero-moment Adam, bad inputs, torch.compile.

Tolerances (atol, rtol) of a backend against the reference on the same inputs:

=========  ==================  ===========================================================
dtype      forward / VJPs      why
=========  ==================  ===========================================================
float32    (1e-6, 1e-5)        same fp32 math, operation order / division rounding differ
float64    (1e-12, 1e-10)      same math in fp64
bfloat16   (1e-2, 8e-3)        the result is rounded once to bf16 (one ulp)
float16    (1e-3, 1e-3)        one fp16 ulp
=========  ==================  ===========================================================

``d_lr`` (a sum over all elements) gets rtol 1e-4 in float32: the backends sum in a
different order than ``torch.sum``.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

import pyoptk
from pyoptk import SlowPathWarning
from pyoptk import _backend
from pyoptk._backend import registered_backends
from pyoptk.ops import inner_step as ist
from pyoptk.ops.inner_step import (
    inner_adam, inner_adam_reference, inner_adam_vjp_reference, inner_metasgd,
    inner_metasgd_reference, inner_metasgd_vjp_reference, inner_sgd, inner_sgd_reference,
    inner_sgd_vjp_reference)

from helpers import assert_close

TOL = {
    torch.float32: (1e-6, 1e-5),
    torch.float64: (1e-12, 1e-10),
    torch.bfloat16: (1e-2, 8e-3),
    torch.float16: (1e-3, 1e-3),
}
# 0-dim, 1 element, empty, odd 2-d, 1000+ and (20000: two native chunks of 16384).
SHAPES = [(), (1,), (0,), (5, 123), (1031,), (2, 3, 7), (20000,)]
# The Triton interpreter is slow; 4500 spans two of its 4096-element chunks.
SMALL = [(), (1,), (0,), (5, 13), (4500,)]


def _backends():
    ops = (ist.OP_SGD, ist.OP_METASGD, ist.OP_ADAM, ist.BWD_SGD, ist.BWD_METASGD,
           ist.BWD_ADAM)
    return [b for b in pyoptk.available_backends("cpu")
            if all(b in registered_backends(op) for op in ops)]


BACKENDS = _backends()


def _shapes(backend):
    return SMALL if backend == "triton" else SHAPES


def _rand(shapes, dtype, seed, positive=False, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for s in shapes:
        t = torch.rand(s, generator=g) if positive else torch.randn(s, generator=g)
        out.append((t * scale).to(dtype))
    return out


def _adam_inputs(shapes, dtype, seed=0):
    sdt = ist.compute_dtype(dtype)
    p = _rand(shapes, dtype, seed)
    g = _rand(shapes, dtype, seed + 1)
    m = _rand(shapes, sdt, seed + 2, scale=0.1)
    v = _rand(shapes, sdt, seed + 3, positive=True, scale=0.1)
    return p, g, m, v


def _amax(t):
    return t.detach().abs().max().item() if t.numel() else 0.0


def _close_lists(actual, expected, dtype, what):
    atol, rtol = TOL[dtype]
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert a.dtype == e.dtype, f"{what}[{i}]: dtype {a.dtype} != {e.dtype}"
        assert_close(a, e, atol, rtol, f"{what}[{i}]")


# ----------------------------------------------------------------------------------
# Forward and VJPs of every backend against the reference.
# ----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16,
                                   torch.float16], ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_matches_reference(backend, dtype):
    shapes = _shapes(backend)
    p, g, m, v = _adam_inputs(shapes, dtype)
    lrs = _rand(shapes, ist.compute_dtype(dtype), 7, positive=True, scale=0.1)
    lr_t = torch.tensor(0.05)
    with pyoptk.use_backend(backend):
        out_sgd = inner_sgd(p, g, 0.1)
        out_sgd_t = inner_sgd(p, g, lr_t)
        out_meta = inner_metasgd(p, g, lrs)
        out_adam = inner_adam(p, g, m, v, 3, 1e-2, 0.8, 0.99, 1e-6)
        out_adam_t = inner_adam(p, g, m, v, 1, lr_t)
    _close_lists(out_sgd, inner_sgd_reference(p, g, 0.1), dtype, "sgd")
    _close_lists(out_sgd_t, inner_sgd_reference(p, g, lr_t), dtype, "sgd lr_t")
    _close_lists(out_meta, inner_metasgd_reference(p, g, lrs), dtype, "metasgd")
    ref = inner_adam_reference(p, g, m, v, 3, 1e-2, 0.8, 0.99, 1e-6)
    ref_t = inner_adam_reference(p, g, m, v, 1, lr_t)
    for k, name in enumerate(("params", "exp_avg", "exp_avg_sq")):
        sdt = dtype if k == 0 else ist.compute_dtype(dtype)
        _close_lists(out_adam[k], ref[k], sdt, f"adam {name}")
        _close_lists(out_adam_t[k], ref_t[k], sdt, f"adam lr_t {name}")


def _leaves(lists):
    return [[t.detach().clone().requires_grad_(True) for t in lst] for lst in lists]


def _vjp(fn, lists, lr_t, cts):
    """Gradients of sum(<out_k, ct_k>) w.r.t. every list and lr_t, by autograd."""
    leaves = _leaves(lists)
    lr = lr_t.detach().clone().requires_grad_(True) if lr_t is not None else None
    outs = fn(*leaves, lr)
    loss = sum((o.to(torch.float64) * c.to(torch.float64)).sum()
               for lst, clst in zip(outs, cts) for o, c in zip(lst, clst))
    grads = torch.autograd.grad(loss, [t for lst in leaves for t in lst] +
                                ([lr] if lr is not None else []), allow_unused=True)
    grads = [torch.zeros_like(t) if gr is None else gr
             for t, gr in zip([t for lst in leaves for t in lst] + ([lr] if lr is not None else []),
                              grads)]
    res, k = [], 0
    for lst in leaves:
        res.append(grads[k:k + len(lst)])
        k += len(lst)
    return res, (grads[k] if lr is not None else None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16],
                         ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("backend", BACKENDS)
def test_vjps_match_reference(backend, dtype):
    """The fused backward (through autograd of the public op) vs autograd through the
    reference forward, for every input, with random output cotangents."""
    shapes = _shapes(backend)
    p, g, m, v = _adam_inputs(shapes, dtype)
    sdt = ist.compute_dtype(dtype)
    lrs = _rand(shapes, sdt, 7, positive=True, scale=0.1)
    lr_t = torch.tensor(0.05, dtype=sdt)
    cp, cm, cv = (_rand(shapes, t, 20 + k) for k, t in enumerate((dtype, sdt, sdt)))
    cases = [
        ("sgd", lambda P, G, lr: [inner_sgd(P, G, lr)],
         lambda P, G, lr: [inner_sgd_reference(P, G, lr)], [p, g], [cp]),
        ("metasgd", lambda P, G, A, lr: [inner_metasgd(P, G, A)],
         lambda P, G, A, lr: [inner_metasgd_reference(P, G, A)], [p, g, lrs], [cp]),
        ("adam", lambda P, G, M, V, lr: inner_adam(P, G, M, V, 2, lr, 0.9, 0.99, 1e-6),
         lambda P, G, M, V, lr: inner_adam_reference(P, G, M, V, 2, lr, 0.9, 0.99, 1e-6),
         [p, g, m, v], [cp, cm, cv]),
    ]
    atol, rtol = TOL[dtype]
    for name, fn, ref_fn, lists, cts in cases:
        with pyoptk.use_backend(backend):
            got, got_lr = _vjp(fn, lists, lr_t, cts)
        exp, exp_lr = _vjp(ref_fn, lists, lr_t, cts)
        for k, (ga, ea) in enumerate(zip(got, exp)):
            for i, (a, e) in enumerate(zip(ga, ea)):
                # d params / d grads scale with 1/eps in Adam: relative tolerance.
                assert_close(a, e, atol * max(1.0, _amax(e)), rtol,
                             f"{name} d input {k} [{i}]")
        if exp_lr is not None:
            assert_close(got_lr, exp_lr, atol * 10, rtol * 10, f"{name} d_lr")


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_op_matches_closed_form(backend):
    """The backward ops of a backend against the closed-form reference VJPs directly."""
    shapes = _shapes(backend)
    p, g, m, v = _adam_inputs(shapes, torch.float32)
    cp, cm, cv = (_rand(shapes, torch.float32, 30 + k) for k in range(3))
    lr_t = torch.tensor(0.3)
    with pyoptk.use_backend(backend):
        got = torch.ops.pyoptk.inner_adam_backward(g, m, v, cp, cm, cv, 4, 0.0, lr_t,
                                                   0.9, 0.999, 1e-8)
        got_sgd = torch.ops.pyoptk.inner_sgd_backward(g, cp, 0.0, lr_t)
        got_meta = torch.ops.pyoptk.inner_metasgd_backward(g, m, cp)
    exp = inner_adam_vjp_reference(g, m, v, cp, cm, cv, 4, 0.0, lr_t, 0.9, 0.999, 1e-8)
    for k in range(3):
        for i, (a, e) in enumerate(zip(got[k], exp[k])):
            assert_close(a, e, 1e-6 * max(1.0, _amax(e)), 1e-5, f"adam out {k}[{i}]")
    assert_close(got[3], exp[3], 1e-4, 1e-4, "adam d_lr")
    # Absent moment cotangents (empty lists) are zeros.
    with pyoptk.use_backend(backend):
        got0 = torch.ops.pyoptk.inner_adam_backward(g, m, v, cp, [], [], 4, 0.0, lr_t,
                                                    0.9, 0.999, 1e-8)
    zeros = [torch.zeros_like(t) for t in m]
    exp0 = inner_adam_vjp_reference(g, m, v, cp, zeros, zeros, 4, 0.0, lr_t, 0.9, 0.999, 1e-8)
    for k in range(3):
        for i, (a, e) in enumerate(zip(got0[k], exp0[k])):
            assert_close(a, e, 1e-6 * max(1.0, _amax(e)), 1e-5, f"adam no-moment out {k}[{i}]")
    assert_close(got0[3], exp0[3], 1e-4, 1e-4, "adam no-moment d_lr")
    exp_sgd = inner_sgd_vjp_reference(g, cp, 0.0, lr_t)
    _close_lists(got_sgd[0], exp_sgd[0], torch.float32, "sgd d_g")
    assert_close(got_sgd[1], exp_sgd[1], 1e-4, 1e-4, "sgd d_lr")
    exp_meta = inner_metasgd_vjp_reference(g, m, cp)
    _close_lists(got_meta[0], exp_meta[0], torch.float32, "metasgd d_g")
    _close_lists(got_meta[1], exp_meta[1], torch.float32, "metasgd d_lrs")


# ----------------------------------------------------------------------------------
# gradcheck / gradgradcheck (float64) through the ops, every backend.
# ----------------------------------------------------------------------------------
_GC_SHAPES = [(), (1,), (2, 3)]


def _gc_inputs(shapes=_GC_SHAPES):
    p, g, m, v = _adam_inputs(shapes, torch.float64, seed=5)
    lrs = _rand(shapes, torch.float64, 9, positive=True)
    lr = torch.tensor(0.3, dtype=torch.float64)
    req = lambda ts: [t.requires_grad_(True) for t in ts]  # noqa: E731
    return req(p), req(g), req(m), req(v), req(lrs), lr.requires_grad_(True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_gradgradcheck(backend):
    # The Triton interpreter costs ~15 ms a launch: two tensors, and fast_mode (one random
    # direction per input instead of one perturbation per element).
    fast = backend == "triton"
    p, g, m, v, lrs, lr = _gc_inputs([(), (2, 3)] if fast else _GC_SHAPES)
    n = len(p)
    sgd = lambda *x: tuple(inner_sgd(list(x[:n]), list(x[n:2 * n]), x[-1]))  # noqa: E731
    meta = lambda *x: tuple(inner_metasgd(  # noqa: E731
        list(x[:n]), list(x[n:2 * n]), list(x[2 * n:])))

    def adam(*x):
        out = inner_adam(list(x[:n]), list(x[n:2 * n]), list(x[2 * n:3 * n]),
                         list(x[3 * n:4 * n]), 3, x[-1], 0.9, 0.99, 1e-3)
        return tuple(t for lst in out for t in lst)

    with pyoptk.use_backend(backend), warnings.catch_warnings():
        warnings.simplefilter("ignore", SlowPathWarning)
        for fn, args in ((sgd, (*p, *g, lr)), (meta, (*p, *g, *lrs)),
                         (adam, (*p, *g, *m, *v, lr))):
            assert gradcheck(fn, args, fast_mode=fast)
            assert gradgradcheck(fn, args, fast_mode=fast)


def test_gradgradcheck_adam_params_output_only():
    """Only the new params used (the moments' cotangents are absent: the empty-list path
    of the fused backward and of its double backward)."""
    p, g, m, v, lrs, lr = _gc_inputs()
    n = len(p)

    def adam(*x):
        return tuple(inner_adam(list(x[:n]), list(x[n:2 * n]), list(x[2 * n:3 * n]),
                                list(x[3 * n:4 * n]), 2, x[-1], 0.9, 0.99, 1e-3)[0])

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SlowPathWarning)
        assert gradcheck(adam, (*p, *g, *m, *v, lr))
        assert gradgradcheck(adam, (*p, *g, *m, *v, lr))


def test_sgd_with_float_lr_saves_nothing_and_is_twice_differentiable():
    """With a float lr the backward is d_g = -lr * d_p: the op saves nothing (a saved
    copy of the grads would keep every inner step's [T, *shape] gradients alive through
    an unrolled loop; a tensor lr saves them for d_lr), and its backward is
    differentiable again, also when only some outputs are used (None cotangents)."""
    p, g, *_ = _gc_inputs()
    n, saved = len(p), []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t,
                                                  lambda t: t):
        inner_sgd(p, g, 0.3)
        assert saved == []
        inner_sgd(p, g, torch.tensor(0.3, dtype=torch.float64, requires_grad=True))
    assert saved == [x.shape for x in g] + [()]  # the grads and lr: d_lr = -sum(d_p * g)

    def sgd(*x):
        return tuple(inner_sgd(list(x[:n]), list(x[n:]), 0.3))

    for fn in (sgd, lambda *x: sgd(*x)[1]):  # the second: None cotangents for the others
        assert gradcheck(fn, (*p, *g))
        assert gradgradcheck(fn, (*p, *g))


def test_double_backward_of_adam_warns_once():
    p, g, m, v, lrs, lr = _gc_inputs()
    _backend._warned.discard((ist.BWD_ADAM, "double"))
    out = inner_adam(p, g, m, v, 1, lr)
    (dg,) = torch.autograd.grad(out[0][1].sum(), [g[1]], create_graph=True)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        torch.autograd.grad(dg.sum(), [v[1]], retain_graph=True)
        torch.autograd.grad(dg.sum(), [v[1]])
    slow = [r for r in rec if issubclass(r.category, SlowPathWarning)]
    assert len(slow) == 1 and "double backward" in str(slow[0].message)


# ----------------------------------------------------------------------------------
# Safe sqrt: zero gradients on zero moments.
# ----------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_adam_zero_moments_finite_gradients(backend):
    shapes = _shapes(backend)
    p = _rand(shapes, torch.float32, 0)
    leaves = _leaves([p, [torch.zeros(s) for s in shapes], [torch.zeros(s) for s in shapes],
                      [torch.zeros(s) for s in shapes]])
    lr = torch.tensor(1e-3, requires_grad=True)
    with pyoptk.use_backend(backend):
        new_p, new_m, new_v = inner_adam(*leaves, 1, lr)
        loss = sum((t * t).sum() for t in new_p) + sum(t.sum() for t in new_m + new_v)
        gs = torch.autograd.grad(loss, [t for lst in leaves for t in lst] + [lr])
    for gr in gs:
        assert torch.isfinite(gr).all()
    # Forward equals torch.optim.Adam's: zero grads leave the params unchanged.
    for a, b in zip(new_p, p):
        assert torch.equal(a, b)
    # Where the function is smooth (v' > 0) the derivative is the exact one: compare
    # with finite differences on tiny but nonzero moments, float64.
    pd = [torch.randn(4, dtype=torch.float64, requires_grad=True)]
    gd = [torch.zeros(4, dtype=torch.float64, requires_grad=True)]
    md = [torch.zeros(4, dtype=torch.float64, requires_grad=True)]
    vd = [torch.full((4,), 1e-6, dtype=torch.float64, requires_grad=True)]
    with pyoptk.use_backend(backend):
        assert gradcheck(lambda a, b, c, d: inner_adam([a], [b], [c], [d], 1, 1e-3)[0][0],
                         (pd[0], gd[0], md[0], vd[0]), eps=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nonfinite_gradients_propagate_elementwise(backend):
    """As torch.optim's functional steps: a NaN/Inf gradient element makes that output
    element non-finite and leaves every other element (and tensor) exact — no skip, no
    crash, no contamination across elements (docs/inner-steps.md)."""
    pyoptk.set_backend(backend)
    p = [torch.ones(7), torch.full((3, 5), 2.0)]
    g = [torch.full((7,), 0.5), torch.full((3, 5), 0.25)]
    g[0][2], g[1][1, 4] = float("nan"), float("inf")
    lrs = [torch.full_like(t, 0.1) for t in p]
    m = [torch.zeros_like(t) for t in p]
    v = [torch.zeros_like(t) for t in p]
    outs = {"sgd": (inner_sgd(p, g, 0.1), inner_sgd_reference(p, g, 0.1)),
            "metasgd": (inner_metasgd(p, g, lrs), inner_metasgd_reference(p, g, lrs)),
            "adam": (inner_adam(p, g, m, v, 1, 0.1)[0],
                     inner_adam_reference(p, g, m, v, 1, 0.1)[0])}
    for name, (out, ref) in outs.items():
        ok = [torch.isfinite(o) for o in out]
        assert (~ok[0]).nonzero().tolist() == [[2]], name
        assert (~ok[1]).nonzero().tolist() == [[1, 4]], name
        for o, r, k in zip(out, ref, ok):
            torch.testing.assert_close(o[k], r[k], rtol=0, atol=0, msg=name)


def test_safe_sqrt_zero_derivative_all_orders():
    x = torch.tensor([0.0, 4.0], dtype=torch.float64, requires_grad=True)
    y = ist.safe_sqrt(x)
    (d1,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    (d2,) = torch.autograd.grad(d1.sum(), x)
    assert d1.tolist() == [0.0, 0.25]
    assert d2[0].item() == 0.0 and d2[1].item() == pytest.approx(-1 / 32)
    assert ist.safe_sqrt(torch.tensor([float("nan"), -1.0])).isnan().all()


def test_adam_forward_matches_torch_optim():
    torch.manual_seed(0)
    w = torch.randn(7, 5)
    w_opt = torch.nn.Parameter(w.clone())
    opt = torch.optim.Adam([w_opt], lr=1e-2)
    p, m, v = [w.clone()], [torch.zeros_like(w)], [torch.zeros_like(w)]
    for step in range(1, 4):
        g = torch.randn(7, 5)
        w_opt.grad = g.clone()
        opt.step()
        p, m, v = inner_adam(p, [g], m, v, step, 1e-2)
    assert_close(p[0], w_opt.detach(), 1e-6, 1e-5, "params vs torch.optim.Adam")
    st = opt.state[w_opt]
    assert_close(m[0], st["exp_avg"], 1e-7, 1e-6, "exp_avg")
    assert_close(v[0], st["exp_avg_sq"], 1e-7, 1e-6, "exp_avg_sq")


@pytest.mark.parametrize("which", ["sgd", "adam"])
def test_meta_gradient_matches_higher(which):
    """Two inner steps and a query loss: the meta-gradient w.r.t. the initial weights
    equals the one from ``higher`` (an independent implementation, the MAML benchmark
    baseline). higher's Adam puts eps outside the bias correction (the pre-1.x torch
    form, ``lr*sqrt(bc2)/bc1 * m/(sqrt(v) + eps)``); with eps = 0 both forms coincide."""
    higher = pytest.importorskip("higher")
    torch.manual_seed(3)
    dt = torch.float64
    x, y, xq, yq = (torch.randn(8, k, dtype=dt) for k in (5, 3, 5, 3))
    w0 = torch.randn(3, 5, dtype=dt) * 0.1

    model = torch.nn.Linear(5, 3, bias=False).to(dt)
    with torch.no_grad():
        model.weight.copy_(w0)
    opt = (torch.optim.SGD(model.parameters(), lr=0.1) if which == "sgd" else
           torch.optim.Adam(model.parameters(), lr=0.1, eps=0.0))
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, dopt):
        for _ in range(2):
            dopt.step(((fmodel(x) - y) ** 2).mean())
        expected = torch.autograd.grad(((fmodel(xq) - yq) ** 2).mean(), model.weight)[0]

    w = w0.clone().requires_grad_(True)
    params, m, v = [w], [torch.zeros_like(w)], [torch.zeros_like(w)]
    for step in (1, 2):
        (g,) = torch.autograd.grad(((x @ params[0].t() - y) ** 2).mean(), params,
                                   create_graph=True)
        if which == "sgd":
            params = inner_sgd(params, [g], 0.1)
        else:
            params, m, v = inner_adam(params, [g], m, v, step, 0.1, eps=0.0)
    got = torch.autograd.grad(((xq @ params[0].t() - yq) ** 2).mean(), w)[0]
    assert_close(got, expected, 1e-12, 1e-9, f"{which} meta-gradient vs higher")


# ----------------------------------------------------------------------------------
# opcheck
# ----------------------------------------------------------------------------------
def test_opcheck():
    p, g, m, v = _adam_inputs([(3,), (2, 2)], torch.float32)
    lr_t = torch.tensor(0.1)
    req = lambda ts: [t.clone().requires_grad_(True) for t in ts]  # noqa: E731
    ops = torch.ops.pyoptk
    torch.library.opcheck(ops.inner_sgd, (req(p), req(g), 0.1, None))
    torch.library.opcheck(ops.inner_sgd, (req(p), req(g), 0.0, lr_t.clone().requires_grad_()))
    torch.library.opcheck(ops.inner_metasgd, (req(p), req(g), req(v)))
    torch.library.opcheck(ops.inner_adam, (req(p), req(g), req(m), req(v), 2, 0.0,
                                           lr_t.clone().requires_grad_(), 0.9, 0.999, 1e-8))
    torch.library.opcheck(ops.inner_sgd_backward, (req(g), req(p), 0.0,
                                                   lr_t.clone().requires_grad_()))
    torch.library.opcheck(ops.inner_metasgd_backward, (req(g), req(v), req(p)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SlowPathWarning)
        torch.library.opcheck(ops.inner_adam_backward,
                              (req(g), req(m), req(v), req(p), req(m), req(v), 2, 1e-3, None,
                               0.9, 0.999, 1e-8))
        torch.library.opcheck(ops.inner_adam_backward,
                              (req(g), req(m), req(v), req(p), [], [], 2, 0.0,
                               lr_t.clone().requires_grad_(), 0.9, 0.999, 1e-8))


# ----------------------------------------------------------------------------------
# Bad inputs
# ----------------------------------------------------------------------------------
def test_bad_inputs():
    p, g, m, v = _adam_inputs([(3,), (2, 2)], torch.float32)
    with pytest.raises(ValueError, match="grads has 1 tensors but params has 2"):
        inner_sgd(p, g[:1], 0.1)
    with pytest.raises(ValueError, match=r"grads\[1\] has shape \(4,\), expected \(2, 2\)"):
        inner_sgd(p, [g[0], g[1].reshape(4)], 0.1)
    with pytest.raises(TypeError, match=r"grads\[0\] has dtype torch.float64"):
        inner_sgd(p, [g[0].double(), g[1]], 0.1)
    with pytest.raises(ValueError, match=r"params\[1\] is not contiguous"):
        inner_sgd([p[0], p[1].t()], g, 0.1)
    with pytest.raises(TypeError, match="params must be a list of tensors"):
        inner_sgd(p[0], g[0], 0.1)
    with pytest.raises(TypeError, match=r"params must be float32, float64, bfloat16"):
        inner_sgd([torch.zeros(3, dtype=torch.int64)], [torch.zeros(3, dtype=torch.int64)], 0.1)
    with pytest.raises(ValueError, match="lr tensor must have one element"):
        inner_sgd(p, g, torch.ones(2))
    with pytest.raises(TypeError, match="lr must be a float or a tensor"):
        inner_sgd(p, g, "0.1")
    with pytest.raises(TypeError, match=r"lrs\[0\] must be float32"):
        inner_metasgd(p, g, [v[0].double(), v[1]])
    with pytest.raises(TypeError, match=r"exp_avg_sq\[0\] must be float32"):
        inner_adam(p, g, m, [v[0].half(), v[1]], 1, 1e-3)
    with pytest.raises(ValueError, match="step must be an int >= 1"):
        inner_adam(p, g, m, v, 0, 1e-3)
    with pytest.raises(ValueError, match="Invalid beta parameter at index 1"):
        inner_adam(p, g, m, v, 1, 1e-3, 0.9, 1.0)
    with pytest.raises(ValueError, match="Invalid epsilon value"):
        inner_adam(p, g, m, v, 1, 1e-3, eps=-1.0)
    with pytest.raises(ValueError, match=r"exp_avg\[1\] is on meta but params\[0\] is on cpu"):
        inner_adam(p, g, [m[0], m[1].to("meta")], v, 1, 1e-3)
    assert inner_sgd([], [], 0.1) == []
    assert inner_adam([], [], [], [], 1, 0.1) == ([], [], [])


# ----------------------------------------------------------------------------------
# torch.compile: a small MAML meta-gradient.
# ----------------------------------------------------------------------------------
def _maml_meta_grad(which, w, lr, x, y, xq, yq):
    """Two inner steps on (x, y), loss on (xq, yq), gradient w.r.t. the initial w and lr."""
    params = [w]
    m = [torch.zeros_like(w)]
    v = [torch.zeros_like(w)]
    for step in (1, 2):
        loss = ((x @ params[0] - y) ** 2).mean()
        grads = list(torch.autograd.grad(loss, params, create_graph=True))
        if which == "sgd":
            params = inner_sgd(params, grads, lr)
        elif which == "metasgd":
            params = inner_metasgd(params, grads, [lr.expand_as(w).contiguous()])
        else:
            params, m, v = inner_adam(params, grads, m, v, step, lr)
    return ((xq @ params[0] - yq) ** 2).mean()


@pytest.mark.parametrize("which", ["sgd", "metasgd", "adam"])
def test_torch_compile_meta_gradient(which):
    torch.manual_seed(0)
    x, y, xq, yq = torch.randn(8, 5), torch.randn(8, 3), torch.randn(8, 5), torch.randn(8, 3)
    w0, lr0 = torch.randn(5, 3) * 0.1, torch.tensor(0.1)

    def run(fn):
        w, lr = w0.clone().requires_grad_(True), lr0.clone().requires_grad_(True)
        loss = fn(which, w, lr, x, y, xq, yq)
        return (loss.detach(), *torch.autograd.grad(loss, [w, lr]))

    eager = run(_maml_meta_grad)
    torch._dynamo.reset()
    try:
        compiled = run(torch.compile(_maml_meta_grad, backend="aot_eager", fullgraph=False))
    except Exception as exc:  # a clear error is acceptable, a wrong result is not
        pytest.fail(f"torch.compile raised instead of matching eager: {exc!r}")
    for a, e, what in zip(compiled, eager, ("loss", "d w", "d lr")):
        assert_close(a, e, 1e-6, 1e-5, f"compiled {what}")


# ----------------------------------------------------------------------------------
# The forced backend is the one that runs.
# ----------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
def test_forced_backend_runs_its_kernels(backend, monkeypatch):
    calls = []
    if backend == "cpu":
        from pyoptk._native import native

        mod, names = native(), ["inner_sgd_cpu", "inner_sgd_backward_cpu", "inner_adam_cpu",
                                "inner_adam_backward_cpu"]
    else:
        from pyoptk.kernels import inner_step as mod

        names = ["sgd", "sgd_backward", "adam", "adam_backward"]
    for name in names:
        orig = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, _o=orig, _n=name: (calls.append(_n), _o(*a))[1])
    p, g, m, v = _leaves(_adam_inputs([(3,), (130,)], torch.float32))
    lr = torch.tensor(0.1, requires_grad=True)
    with pyoptk.use_backend(backend):
        out = inner_adam(p, g, m, v, 1, lr)
        out2 = inner_sgd(out[0], g, lr)
        out3 = inner_metasgd(out2, g, [x.detach().abs() for x in m])
        sum(t.sum() for t in out3).backward()
    assert sorted(set(calls)) == sorted(names), calls


def _query_loss(which, w, g, lr, xq, yq):
    """The traced part of a MAML step: inner update (grads given) and the query loss."""
    if which == "sgd":
        p = inner_sgd([w], [g], lr)
    elif which == "metasgd":
        p = inner_metasgd([w], [g], [lr * torch.ones_like(w)])
    else:
        p, _, _ = inner_adam([w], [g], [torch.zeros_like(w)], [torch.zeros_like(w)], 1, lr)
    return ((xq @ p[0] - yq) ** 2).mean()


@pytest.mark.parametrize("which", ["sgd", "metasgd", "adam"])
def test_torch_compile_fullgraph_step_meta_gradient(which):
    """The inner step and query loss compiled as one graph (fullgraph: the custom ops
    and their autograd are traced, no graph break); the support-loss gradient is taken
    outside with create_graph=True. The meta-gradient equals eager."""
    torch.manual_seed(1)
    x, y, xq, yq = torch.randn(8, 5), torch.randn(8, 3), torch.randn(8, 5), torch.randn(8, 3)
    w0 = torch.randn(5, 3) * 0.1

    def run(fn):
        w = w0.clone().requires_grad_(True)
        lr = torch.tensor(0.1, requires_grad=True)
        (g,) = torch.autograd.grad(((x @ w - y) ** 2).mean(), [w], create_graph=True)
        loss = fn(which, w, g, lr, xq, yq)
        return (loss.detach(), *torch.autograd.grad(loss, [w, lr]))

    eager = run(_query_loss)
    torch._dynamo.reset()
    compiled = run(torch.compile(_query_loss, backend="aot_eager", fullgraph=True))
    for a, e, what in zip(compiled, eager, ("loss", "d w", "d lr")):
        assert_close(a, e, 1e-6, 1e-5, f"compiled {what}")


def test_torch_compile_double_backward_raises():
    """Differentiating the compiled step's backward again is not supported by
    torch.compile: it raises (it must never return a silently wrong value)."""
    torch.manual_seed(2)
    xq, yq = torch.randn(8, 5), torch.randn(8, 3)
    w = torch.randn(5, 3, requires_grad=True)
    g = torch.randn(5, 3, requires_grad=True)
    lr = torch.tensor(0.1, requires_grad=True)
    torch._dynamo.reset()
    fn = torch.compile(_query_loss, backend="aot_eager", fullgraph=True)
    loss = fn("sgd", w, g, lr, xq, yq)
    (dg,) = torch.autograd.grad(loss, [g], create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(dg.sum(), [w, lr], allow_unused=True)


# ----------------------------------------------------------------------------------
# Native CPU: the baseline / AVX2 / AVX-512 copies of the loops agree bit for bit.
# ----------------------------------------------------------------------------------
_ISA_SCRIPT = """
import sys, torch, pyoptk
from pyoptk.ops.inner_step import inner_adam, inner_sgd, inner_metasgd
torch.manual_seed(0)
shapes = [(3,), (17, 33), (40000,)]
mk = lambda s=1.0: [(torch.randn(x) * s).requires_grad_(True) for x in shapes]
p, g, m = mk(), mk(), mk(0.1)
v = [(torch.rand(x) * 0.1).requires_grad_(True) for x in shapes]
lr = torch.tensor(0.1, requires_grad=True)
with pyoptk.use_backend("cpu"):
    a, b, c = inner_adam(p, g, m, v, 2, lr)
    q = inner_metasgd(inner_sgd(a, g, lr), g, [x.detach().abs() for x in m])
    loss = sum((t * t).sum() for t in q + b + c)
    grads = torch.autograd.grad(loss, p + g + m + v + [lr])
    outs = [t.detach() for t in a + b + c + q] + list(grads)
torch.save(outs, OUT)
"""


@pytest.mark.skipif("cpu" not in BACKENDS, reason="pyoptk._C not built")
def test_native_isa_copies_bit_identical(tmp_path):
    """The baseline copy (a subprocess with PYOPTK_CPU_ISA=baseline) against the best
    copy this CPU has (this process)."""
    import os
    import subprocess
    import sys

    from pyoptk._native import native

    base = tmp_path / "baseline.pt"
    env = dict(os.environ, PYOPTK_CPU_ISA="baseline")
    subprocess.run([sys.executable, "-c", f"OUT = {str(base)!r}\n" + _ISA_SCRIPT],
                   check=True, env=env, timeout=120)
    best = tmp_path / "best.pt"
    exec(compile(_ISA_SCRIPT, "<isa>", "exec"), {"OUT": str(best)})
    isa = native().build_info()["cpu_isa"]
    for i, (a, b) in enumerate(zip(torch.load(base), torch.load(best))):
        assert torch.equal(a, b), f"output {i} differs between the baseline and {isa} loops"


# ----------------------------------------------------------------------------------
# GPU tier (skipped without CUDA): the CUDA and Triton kernels on the device.
# ----------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16],
                         ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_backends_match_reference(backend, dtype):
    if backend not in pyoptk.available_backends("cuda"):
        pytest.skip(f"{backend} backend not available")
    dev = torch.device("cuda")
    shapes = SHAPES + [(70000,)]
    p, g, m, v = ([t.to(dev) for t in lst] for lst in _adam_inputs(shapes, dtype))
    sdt = ist.compute_dtype(dtype)
    lrs = [t.to(dev) for t in _rand(shapes, sdt, 7, positive=True, scale=0.1)]
    lr_t = torch.tensor(0.05, dtype=sdt, device=dev)
    cp, cm, cv = ([t.to(dev) for t in _rand(shapes, dt, 20 + k)]
                  for k, dt in enumerate((dtype, sdt, sdt)))
    cases = [
        (lambda P, G, lr: [inner_sgd(P, G, lr)], lambda P, G, lr: [inner_sgd_reference(P, G, lr)],
         [p, g], [cp]),
        (lambda P, G, A, lr: [inner_metasgd(P, G, A)],
         lambda P, G, A, lr: [inner_metasgd_reference(P, G, A)], [p, g, lrs], [cp]),
        (lambda P, G, M, V, lr: inner_adam(P, G, M, V, 2, lr, 0.9, 0.99, 1e-6),
         lambda P, G, M, V, lr: inner_adam_reference(P, G, M, V, 2, lr, 0.9, 0.99, 1e-6),
         [p, g, m, v], [cp, cm, cv]),
    ]
    atol, rtol = TOL[dtype]
    for k, (fn, ref_fn, lists, cts) in enumerate(cases):
        with pyoptk.use_backend(backend):
            outs = fn(*lists, lr_t)
            got, got_lr = _vjp(fn, lists, lr_t, cts)
        for a, e in zip([t for o in outs for t in o], [t for o in ref_fn(*lists, lr_t) for t in o]):
            assert_close(a, e, atol, rtol, f"case {k} forward")
        exp, exp_lr = _vjp(ref_fn, lists, lr_t, cts)
        for ga, ea in zip(got, exp):
            for a, e in zip(ga, ea):
                assert_close(a, e, atol * max(1.0, _amax(e)), rtol, f"case {k} vjp")
        assert_close(got_lr, exp_lr, atol * 10, rtol * 10, f"case {k} d_lr")
    if dtype == torch.float64:
        pp, gg, mm, vv, _, lr = _gc_inputs()
        args = [t.detach().to(dev).requires_grad_(True) for t in pp + gg + mm + vv + [lr]]
        n = len(pp)

        def adam(*x):
            out = inner_adam(list(x[:n]), list(x[n:2 * n]), list(x[2 * n:3 * n]),
                             list(x[3 * n:4 * n]), 3, x[-1], 0.9, 0.99, 1e-3)
            return tuple(t for lst in out for t in lst)

        with pyoptk.use_backend(backend):
            assert gradcheck(adam, tuple(args))
