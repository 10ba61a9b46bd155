"""``pyoptk.ops.mlp_step`` (``torch.ops.pyoptk.mlp_step``), the differentiable fused
learned-MLP step, and its fused backward (the native ``mlp_step_grad_cpu`` kernel):
gradcheck in float64 through the kernel, the kernel against autograd through the
reference in float32 on larger odd shapes, non-finite gradients, opcheck, a
meta-gradient that predicts the change of an unrolled loss, the torch fallback, and bad
inputs. Lists passed to the op are ``None``-free (``pyoptk.learned.update`` filters
``grads[i] is None`` before calling it)."""

import importlib
import warnings

import pytest
import torch

import pyoptk
from pyoptk import _backend
from pyoptk.learned import FeatureConfig, MLPConfig, init_meta_params, init_state, update
from pyoptk.learned.mlp import decays_tensor, meta_weights
from pyoptk.ops import mlp_step
from pyoptk.ops.mlp_update import mlp_update_, mlp_update_functional
from helpers import assert_close

# The module (pyoptk.ops.mlp_step is also the name of the public function).
mstep = importlib.import_module("pyoptk.ops.mlp_step")

SMALL_SHAPES = [(), (3,), (1, 7), (4, 5), (2, 3, 4)]
# (33, 4097): 3 row groups x 2 column blocks in the kernel's tiling (partials combined
# across tiles in both directions); (1, 4100): 2 column blocks; (4100, 1): one column.
LARGE_SHAPES = [(33, 65), (257,), (5, 13, 7), (1, 4100), (4100, 1), (33, 4097), (0,),
                (2, 0, 3)]
NO_FAC_MOM_NO_TIME = MLPConfig(hidden_sizes=(5, 3), features=FeatureConfig(
    fac_momentum_decay=None, time_timescales=()))


def make_case(shapes, dtype=torch.float64, config=None, seed=0, lr_tensor=True,
              out_scale=30.0, weight_decay=0.05):
    """Inputs of one call with a non-trivial state; the output layer is scaled up so the
    MLP (not weight decay) dominates the step."""
    config = config or MLPConfig()
    sdt = torch.float64 if dtype == torch.float64 else torch.float32
    meta = init_meta_params(config, seed=seed + 1, dtype=sdt)
    last = f"w{len(config.hidden_sizes)}"
    meta = {k: (v * out_scale if k == last else v) for k, v in meta.items()}
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda s: torch.randn(s, generator=gen, dtype=sdt)  # noqa: E731
    # Non-zero biases: with zero biases, an element whose previous layer is all dead has
    # a pre-activation of exactly 0, on the ReLU's kink (finite differences see half a
    # slope there).
    meta = {k: (v + 0.1 * rnd(v.shape) if k.startswith("b") else v) for k, v in meta.items()}
    params = [rnd(s).to(dtype) for s in shapes]
    grads = [rnd(s).to(dtype) for s in shapes]
    st = init_state(params, config, dtype=sdt)
    moms = [m + 0.1 * rnd(m.shape) for m in st.mom]
    rmss = [r + 0.1 * rnd(r.shape).abs() for r in st.rms]
    frs = [r + 0.1 * rnd(r.shape).abs() for r in st.fac_row]
    fcs = [r + 0.1 * rnd(r.shape).abs() for r in st.fac_col]
    steps = [s + 3 for s in st.step]
    weights = meta_weights(meta, config)
    decays = decays_tensor(config, meta, dtype=sdt)
    lr = torch.tensor([0.7], dtype=sdt) if lr_tensor else 0.7
    hp = config.op_hyper(lr, weight_decay)
    return [params, grads, moms, rmss, frs, fcs, steps], weights, decays, hp


def flat_fn(inputs, weights, decays, hp, step_fn=mlp_step):
    """(function of the differentiable leaves, the leaves) for gradcheck / autograd."""
    n = len(inputs[0])
    steps = inputs[6]
    has_lr = hp.lr_t is not None
    leaves = [t for lst in inputs[:6] for t in lst] + list(weights) + [decays]
    if has_lr:
        leaves.append(hp.lr_t)

    def fn(*xs):
        lists = [list(xs[k * n:(k + 1) * n]) for k in range(6)]
        w = list(xs[6 * n:6 * n + len(weights)])
        d = xs[6 * n + len(weights)]
        h = mstep._replace_lr(hp, xs[-1]) if has_lr else hp
        out = step_fn(*lists, steps, w, d, h)
        return tuple(t for lst in out[:5] for t in lst)

    return fn, [t.detach().clone().requires_grad_(t.numel() > 0) for t in leaves]


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts calls of the native backward (so a test can prove the kernel ran)."""
    calls = []
    real = mstep.native

    class Spy:
        def __getattr__(self, name):
            attr = getattr(real(), name)
            if name != "mlp_step_grad_cpu":
                return attr
            return lambda *a: (calls.append(1), attr(*a))[1]

    monkeypatch.setattr(mstep, "native", lambda: Spy())
    return calls


needs_native = pytest.mark.skipif("cpu" not in pyoptk.available_backends("cpu"),
                                  reason="pyoptk._C not built")


# ---- gradcheck (float64, through the kernel) ---------------------------------------------
@needs_native
@pytest.mark.parametrize("config,lr_tensor,seed", [
    (MLPConfig(), True, 0),
    (NO_FAC_MOM_NO_TIME, False, 1),
    (MLPConfig(hidden_sizes=(4,), features=FeatureConfig(momentum_decays=(0.5, 0.9),
                                                          rms_decays=(0.9, 0.99))), True, 0),
    (MLPConfig(hidden_sizes=(4,), features=FeatureConfig(
        momentum_decays=(), rms_decays=(), fac_momentum_decay=None)), True, 2),
], ids=["default-lr_tensor", "no_fac_mom-no_time", "K2_R2-one_hidden", "K0_R0"])
def test_gradcheck_op(config, lr_tensor, seed, kernel_calls):
    inputs, weights, decays, hp = make_case(SMALL_SHAPES, config=config, lr_tensor=lr_tensor,
                                            seed=seed)
    fn, leaves = flat_fn(inputs, weights, decays, hp)
    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-6, rtol=1e-4,
                                    fast_mode=True)
    assert kernel_calls, "the native backward did not run"


@needs_native
def test_gradcheck_op_full_jacobian_small_rule(kernel_calls):
    cfg = MLPConfig(hidden_sizes=(3,), features=FeatureConfig(
        momentum_decays=(0.5, 0.9), adafactor_decays=(0.9, 0.99), time_timescales=(1, 10)))
    inputs, weights, decays, hp = make_case([(), (3,), (2, 3)], config=cfg)
    fn, leaves = flat_fn(inputs, weights, decays, hp)
    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-6, rtol=1e-4)
    assert kernel_calls


@needs_native
def test_gradcheck_update_learned_decays(kernel_calls):
    """Learned decays: the gradient reaches log1m_decays through the op's decays."""
    cfg = MLPConfig(hidden_sizes=(6,), learn_decays=True)
    meta = init_meta_params(cfg, seed=3, dtype=torch.float64, output_scale=3.0)
    names = list(meta)
    inputs, _, _, _ = make_case(SMALL_SHAPES, config=cfg)
    params, grads = inputs[0], inputs[1]
    state = init_state(params, cfg, dtype=torch.float64)
    state = state._replace(mom=inputs[2], rms=inputs[3], fac_row=inputs[4], fac_col=inputs[5],
                           step=inputs[6])
    leaves = [v.clone().requires_grad_() for v in meta.values()] + \
        [g.clone().requires_grad_() for g in grads]

    def fn(*xs):
        m = dict(zip(names, xs[:len(names)]))
        new_p, new_s = update(params, list(xs[len(names):]), state, m, cfg, lr=0.5,
                              fused=True)
        return tuple(new_p) + tuple(new_s.mom) + tuple(t for t in new_s.fac_row if t.numel())

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-6, rtol=1e-4,
                                    fast_mode=True)
    assert kernel_calls


def test_gradcheck_torch_fallback_backward():
    inputs, weights, decays, hp = make_case(SMALL_SHAPES[:3], config=NO_FAC_MOM_NO_TIME)
    fn, leaves = flat_fn(inputs, weights, decays, hp)
    with pyoptk.use_backend("torch"):
        assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-6, rtol=1e-4,
                                        fast_mode=True)


# ---- the kernel against autograd through the reference (float32) -------------------------
def _grads(inputs, weights, decays, hp, step_fn, cts_seed=5):
    fn, leaves = flat_fn(inputs, weights, decays, hp, step_fn)
    outs = fn(*leaves)
    gen = torch.Generator().manual_seed(cts_seed)
    cts = [torch.randn(o.shape, generator=gen, dtype=o.dtype).to(o.device) for o in outs]
    need = [x for x in leaves if x.requires_grad]  # (empty tensors do not)
    got = iter(torch.autograd.grad([o for o in outs if o.requires_grad], need,
                                   [c for o, c in zip(outs, cts) if o.requires_grad],
                                   allow_unused=True))
    res = [next(got) if x.requires_grad else None for x in leaves]
    return [torch.zeros_like(x) if g is None else g for x, g in zip(leaves, res)]


def _compare(fused, ref, atol_scale, rtol, what):
    for i, (a, e) in enumerate(zip(fused, ref)):
        scale = e.abs().max().item() if e.numel() else 0.0
        assert_close(a, e, atol=atol_scale * scale + 1e-30, rtol=rtol, what=f"{what}[{i}]")


# fp32: the kernel sums per chunk in double and in another order than autograd's
# matmuls; gradients agree to ~2e-6 of their largest element (measured), so allow 2e-5.
FP32_GRAD_ATOL_SCALE, FP32_GRAD_RTOL = 2e-5, 1e-4


@needs_native
@pytest.mark.parametrize("config", [MLPConfig(), NO_FAC_MOM_NO_TIME], ids=["default", "small"])
def test_kernel_matches_reference_autograd_fp32(config, kernel_calls):
    inputs, weights, decays, hp = make_case(LARGE_SHAPES, dtype=torch.float32, config=config)
    fused = _grads(inputs, weights, decays, hp, mlp_step)
    ref = _grads(inputs, weights, decays, hp, mlp_update_functional)
    assert kernel_calls
    _compare(fused, ref, FP32_GRAD_ATOL_SCALE, FP32_GRAD_RTOL, "grad")


@needs_native
def test_kernel_matches_reference_autograd_bf16_params():
    inputs, weights, decays, hp = make_case([(17, 9), (33,)], dtype=torch.bfloat16)
    fused = _grads(inputs, weights, decays, hp, mlp_step)
    ref = _grads(inputs, weights, decays, hp, mlp_update_functional)
    _compare(fused, ref, 1e-2, 1e-2, "grad")  # p and g gradients are rounded to bf16


@needs_native
def test_backward_is_deterministic():
    inputs, weights, decays, hp = make_case([(300, 70), (20000,)], dtype=torch.float32)
    a = _grads(inputs, weights, decays, hp, mlp_step)
    b = _grads(inputs, weights, decays, hp, mlp_step)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_forward_matches_mlp_update_and_leaves_inputs():
    inputs, weights, decays, hp = make_case(LARGE_SHAPES, dtype=torch.float32)
    snap = [[t.clone() for t in lst] for lst in inputs]
    out = mlp_step(*inputs, weights, decays, hp)
    assert all(torch.equal(a, b) for la, lb in zip(inputs, snap) for a, b in zip(la, lb))
    ref = [[t.clone() for t in lst] for lst in inputs]
    mlp_update_(ref[0], ref[1], ref[2], ref[3], ref[4], ref[5], ref[6], weights, decays, hp)
    for got, want in zip(out, [ref[0], ref[2], ref[3], ref[4], ref[5], ref[6]]):
        for a, b in zip(got, want):
            assert torch.equal(a, b)
            assert all(a.data_ptr() != t.data_ptr() or a.numel() == 0
                       for lst in inputs for t in lst)


# ---- non-finite gradients ------------------------------------------------------------------
@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nonfinite_gradient_tensors_pass_cotangents_through(dtype, kernel_calls):
    shapes = [(6, 5), (7,), (4, 3)]
    inputs, weights, decays, hp = make_case(shapes, dtype=dtype)
    inputs[1][0].view(-1)[3] = float("nan")
    inputs[1][1][2] = float("inf")
    fused = _grads(inputs, weights, decays, hp, mlp_step)
    ref = _grads(inputs, weights, decays, hp, mlp_update_functional)
    assert kernel_calls
    assert all(torch.isfinite(g).all() for g in fused)
    n = len(shapes)
    gen = torch.Generator().manual_seed(5)  # the cotangents _grads drew, in output order
    outs = flat_fn(inputs, weights, decays, hp)[0](*[t for lst in inputs[:6] for t in lst],
                                                   *weights, decays, hp.lr_t)
    cts = [torch.randn(o.shape, generator=gen, dtype=o.dtype) for o in outs]
    for i in (0, 1):  # skipped: identity for p and state, zero for g
        assert torch.equal(fused[i], cts[i])                      # d params
        assert torch.equal(fused[n + i], torch.zeros_like(fused[n + i]))  # d grads
        assert torch.equal(fused[2 * n + i], cts[n + i])          # d moms
        assert torch.equal(fused[3 * n + i], cts[2 * n + i])      # d rmss
        assert torch.equal(fused[4 * n + i], cts[3 * n + i])      # d fac_rows
    tol = (1e-10, 1e-8) if dtype == torch.float64 else (FP32_GRAD_ATOL_SCALE, FP32_GRAD_RTOL)
    _compare(fused, ref, *tol, "grad")


# ---- opcheck -------------------------------------------------------------------------------
@pytest.mark.parametrize("lr_tensor", [True, False], ids=["lr_tensor", "lr_float"])
def test_opcheck(lr_tensor):
    inputs, weights, decays, hp = make_case([(3, 4), (5,)], dtype=torch.float32,
                                            config=NO_FAC_MOM_NO_TIME, lr_tensor=lr_tensor)
    for lst in inputs[:6]:
        for t in lst:
            t.requires_grad_(True)
    args = (*inputs, weights, decays, hp.n_mom, hp.n_rms, hp.n_fac, hp.fac_mom_index,
            hp.log_sign_k, list(hp.timescales), hp.eps, hp.norm_eps, hp.fac_eps, hp.exp_mult,
            hp.step_mult, hp.lr, hp.lr_t, hp.weight_decay)
    torch.library.opcheck(torch.ops.pyoptk.mlp_step.default, args)


# ---- meta-gradient -------------------------------------------------------------------------
def _quadratic_unroll(meta, cfg, fused, steps=2, lr=20.0):
    gen = torch.Generator().manual_seed(11)
    shapes = [(4, 3), (5,), ()]
    a = [torch.rand(s, generator=gen, dtype=torch.float64) + 0.5 for s in shapes]
    theta = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    state = init_state(theta, cfg)
    for _ in range(steps):
        grads = [ai * th for ai, th in zip(a, theta)]
        theta, state = update(theta, grads, state, meta, cfg, lr=lr, fused=fused)
    return sum((0.5 * ai * th * th).sum() for ai, th in zip(a, theta))


@needs_native
def test_meta_gradient_two_step_unroll(kernel_calls):
    cfg = MLPConfig(learn_decays=True)
    meta = {k: v.requires_grad_() for k, v in
            init_meta_params(cfg, seed=4, dtype=torch.float64).items()}
    loss0 = _quadratic_unroll(meta, cfg, fused=True)
    grads = torch.autograd.grad(loss0, list(meta.values()))
    assert kernel_calls
    ref = torch.autograd.grad(_quadratic_unroll(meta, cfg, fused=False), list(meta.values()))
    for g, r in zip(grads, ref):
        assert_close(g, r, atol=1e-12, rtol=1e-9, what="meta-gradient")
    gnorm2 = sum((g * g).sum() for g in grads)
    assert gnorm2 > 0 and all(g.abs().sum() > 0 for g in grads)
    eta = 1e-2 / gnorm2.sqrt()
    with torch.no_grad():
        moved = {k: v - eta * g for (k, v), g in zip(meta.items(), grads)}
        loss1 = _quadratic_unroll(moved, cfg, fused=True)
    actual, predicted = (loss1 - loss0).item(), -(eta * gnorm2).item()
    assert actual < 0, f"loss went up: {actual}"
    assert abs(actual - predicted) <= 0.05 * abs(predicted), (actual, predicted)


def test_second_order_gradients_match_reference():
    """create_graph=True takes the differentiable path: grad-of-grad as the reference."""
    cfg = MLPConfig(hidden_sizes=(4,))
    meta = {k: v.requires_grad_() for k, v in
            init_meta_params(cfg, seed=4, dtype=torch.float64, output_scale=3.0).items()}

    def hvp(fused):
        loss = _quadratic_unroll(meta, cfg, fused=fused)
        g = torch.autograd.grad(loss, list(meta.values()), create_graph=True)
        s = sum((x * x).sum() for x in g)
        return torch.autograd.grad(s, list(meta.values()))

    for a, b in zip(hvp(True), hvp(False)):
        assert_close(a, b, atol=1e-12, rtol=1e-8, what="second order")


# ---- the eager fast path (torch.autograd.Function, no torch.library dispatch) ----------------
def _op_step(params, grads, moms, rmss, fac_rows, fac_cols, steps, weights, decays, hp):
    """The step through torch.ops.pyoptk.mlp_step (the torch.library path)."""
    lr_f = 0.0 if hp.lr_t is not None else float(hp.lr)
    out = torch.ops.pyoptk.mlp_step(params, grads, moms, rmss, fac_rows, fac_cols, steps,
                                    list(weights), decays, *mstep.rule_op_args(hp), lr_f,
                                    hp.lr_t, float(hp.weight_decay))
    return tuple(list(o) for o in out)


@pytest.fixture
def fast_calls(monkeypatch):
    """Counts forwards run by the eager fast path (the op path never calls it)."""
    calls = []
    real = mstep._forward_impl
    monkeypatch.setattr(mstep, "_forward_impl", lambda *a: (calls.append(1), real(*a))[1])
    return calls


def _outs_and_grads(inputs, weights, decays, hp, step_fn, need=None, drop=()):
    """Outputs and the gradients of a random cotangent on the outputs not in ``drop``
    (indices into the flat outputs: those get no cotangent), w.r.t. the leaves chosen
    by ``need`` (a predicate on the leaf index; default all)."""
    fn, leaves = flat_fn(inputs, weights, decays, hp, step_fn)
    if need is not None:
        for i, x in enumerate(leaves):
            x.requires_grad_(x.requires_grad and need(i, len(leaves)))
    outs = fn(*leaves)
    gen = torch.Generator().manual_seed(7)
    cts = [torch.randn(o.shape, generator=gen, dtype=o.dtype) for o in outs]
    pairs = [(o, c) for i, (o, c) in enumerate(zip(outs, cts)) if o.requires_grad and i not in drop]
    want = [x for x in leaves if x.requires_grad]
    got = torch.autograd.grad([o for o, _ in pairs], want, [c for _, c in pairs],
                              allow_unused=True)
    return [o.detach() for o in outs], list(got)


def _bitwise_equal(a, b):
    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.nan_to_num(), b.nan_to_num()) and torch.equal(a.isnan(), b.isnan()))


@needs_native
@pytest.mark.parametrize("case", ["fp32", "fp32-lr_float-small", "bf16", "fp64", "nonfinite",
                                  "weights_only", "params_out_only"])
def test_fast_path_bit_identical_to_op(case, fast_calls, kernel_calls):
    shapes = [(), (3,), (1, 7), (4, 5), (2, 3, 4), (33, 65), (257,), (0,), (2, 0, 3)]
    kw, need, drop = {"dtype": torch.float32}, None, ()
    if case == "fp32-lr_float-small":
        kw.update(config=NO_FAC_MOM_NO_TIME, lr_tensor=False)
    elif case == "bf16":
        kw["dtype"], shapes = torch.bfloat16, [(17, 9), (33,)]
    elif case == "fp64":
        kw["dtype"], shapes = torch.float64, SMALL_SHAPES
    elif case == "weights_only":  # meta-training's first step: only the rule needs grads
        need = lambda i, n: i >= n - 7  # noqa: E731  (w0..b2, decays, lr)
    inputs, weights, decays, hp = make_case(shapes, **kw)
    if case == "nonfinite":
        inputs[1][3].view(-1)[2] = float("nan")
        inputs[1][6][5] = float("inf")
    if case == "params_out_only":  # the state outputs get no cotangent (None in backward)
        drop = set(range(len(shapes), 5 * len(shapes)))
    fast = _outs_and_grads(inputs, weights, decays, hp, mlp_step, need, drop)
    assert fast_calls, "the eager fast path was not taken"
    n_fast_kernel = len(kernel_calls)
    op = _outs_and_grads(inputs, weights, decays, hp, _op_step, need, drop)
    assert len(fast_calls) == 1 and len(kernel_calls) == 2 * n_fast_kernel == 2
    for what, xs, ys in (("output", fast[0], op[0]), ("grad", fast[1], op[1])):
        assert len(xs) == len(ys)
        for i, (x, y) in enumerate(zip(xs, ys)):
            assert (x is None) == (y is None), f"{what}[{i}]"
            assert x is None or _bitwise_equal(x, y), f"{what}[{i}] differs"


@needs_native
def test_fast_path_taken_in_eager_mode(fast_calls):
    inputs, weights, decays, hp = make_case([(3, 4), (5,)], dtype=torch.float32)
    out = mlp_step(*inputs, weights, decays, hp)  # nothing needs a gradient
    assert len(fast_calls) == 1 and out[0][0].grad_fn is None
    ws = [w.requires_grad_() for w in weights]
    out = mlp_step(*inputs, ws, decays, hp)
    assert len(fast_calls) == 2
    assert type(out[0][0].grad_fn).__name__ == "_MLPStepFunctionBackward"
    with torch.no_grad():
        mlp_step(*inputs, ws, decays, hp)
    assert len(fast_calls) == 3


def test_fast_path_not_taken_under_torch_compile(fast_calls):
    inputs, weights, decays, hp = make_case([(3, 4), (5,)], dtype=torch.float32,
                                            config=NO_FAC_MOM_NO_TIME)
    ws = [w.requires_grad_() for w in weights]
    targets = []

    def backend(gm, example_inputs):
        targets.extend(node.target for node in gm.graph.nodes)
        return gm.forward

    def loss(ws):
        out = mlp_step(*inputs, ws, decays, hp)
        return sum((p * p).sum() for p in out[0])

    torch._dynamo.reset()
    try:
        got = torch.autograd.grad(torch.compile(loss, backend=backend)(ws), ws)
    finally:
        torch._dynamo.reset()
    assert any(t in (torch.ops.pyoptk.mlp_step, torch.ops.pyoptk.mlp_step.default)
               for t in targets), targets
    assert not fast_calls
    want = torch.autograd.grad(loss(ws), ws)
    assert len(fast_calls) == 1
    assert all(_bitwise_equal(a, b) for a, b in zip(got, want))


def test_fast_path_not_taken_under_vmap_or_dispatch_modes(fast_calls):
    from torch.utils._python_dispatch import TorchDispatchMode

    inputs, weights, decays, hp = make_case([(3, 4), (5,)], dtype=torch.float32)

    def step(w0):
        return mlp_step(*inputs, [w0] + weights[1:], decays, hp)[0][0]

    # functorch transforms see the op (which has no batching rule: vmap raises there)
    with pytest.raises(RuntimeError, match="pyoptk::mlp_step"):
        torch.func.vmap(step)(torch.stack([weights[0]] * 2))
    assert not fast_calls

    class Seen(TorchDispatchMode):
        ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(func)
            return func(*args, **(kwargs or {}))

    with Seen():
        step(weights[0])
    assert torch.ops.pyoptk.mlp_step.default in Seen.ops
    assert not fast_calls


@needs_native
def test_fast_path_double_backward_takes_the_differentiable_fallback(fast_calls):
    """create_graph=True through the fast path: the op's differentiable backward (autograd
    over the reference), bit for bit the op path's second-order gradients."""
    cfg = MLPConfig(hidden_sizes=(4,))
    inputs, weights, decays, hp = make_case([(3, 2), (4,)], config=cfg)
    ws = [w.clone().requires_grad_() for w in weights]

    def second(step_fn):
        out = step_fn(*inputs, ws, decays, hp)
        loss = sum((p * p * p).sum() for p in out[0]) + sum(m.sum() for m in out[1])
        g = torch.autograd.grad(loss, ws, create_graph=True)
        return torch.autograd.grad(sum((x * x).sum() for x in g), ws)

    fast = second(mlp_step)
    assert fast_calls
    for a, b in zip(fast, second(_op_step)):
        assert _bitwise_equal(a, b)


# ---- fallbacks and configuration ---------------------------------------------------------
def test_declined_config_warns_and_falls_back(monkeypatch):
    cfg = MLPConfig(hidden_sizes=(mstep.MAX_WIDTH + 1,))
    inputs, weights, decays, hp = make_case([(3, 2)], dtype=torch.float32, config=cfg)
    monkeypatch.setattr(_backend, "_warned", set())
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        fused = _grads(inputs, weights, decays, hp, mlp_step)
    assert any(issubclass(w.category, pyoptk.SlowPathWarning) for w in rec)
    ref = _grads(inputs, weights, decays, hp, mlp_update_functional)
    _compare(fused, ref, 1e-6, 1e-5, "grad")


def test_update_fused_and_reference_agree_and_none_grads():
    cfg = MLPConfig()
    meta = init_meta_params(cfg, seed=0)
    params = [torch.randn(3, 4), torch.randn(5)]
    state = init_state(params, cfg)
    grads = [None, torch.randn(5)]
    a_p, a_s = update(params, grads, state, meta, cfg, fused=True)
    b_p, b_s = update(params, grads, state, meta, cfg, fused=False)
    assert a_p[0] is params[0] and a_s.step[0] is state.step[0]
    assert torch.equal(a_p[1], b_p[1]) and a_s.step[1].item() == 1
    for fa, fb in zip(a_s, b_s):
        assert all(torch.equal(x, y) for x, y in zip(fa, fb))


def test_update_fused_true_rejects_noncontiguous():
    cfg = MLPConfig()
    meta = init_meta_params(cfg)
    params = [torch.randn(4, 3).t()]
    state = init_state(params, cfg)
    with pytest.raises(ValueError, match="fused=True"):
        update(params, [torch.randn(3, 4)], state, meta, cfg, fused=True)
    new_p, _ = update(params, [torch.randn(3, 4)], state, meta, cfg)  # auto: the reference
    assert new_p[0].shape == (3, 4)


# ---- bad inputs ------------------------------------------------------------------------------
def _bad(mutate, exc, match):
    inputs, weights, decays, hp = make_case([(3, 4), (5,)], dtype=torch.float32)
    args = [inputs, weights, decays, hp]
    mutate(args)
    inputs, weights, decays, hp = args
    with pytest.raises(exc, match=match):
        mlp_step(*inputs, weights, decays, hp)


def test_bad_none_in_lists():
    _bad(lambda a: a[0][1].__setitem__(0, None), TypeError, r"grads\[0\] must be a torch.Tensor")


def test_bad_list_lengths():
    _bad(lambda a: a[0][2].pop(), ValueError, "moms has 1 tensors but params has 2")


def test_bad_state_dtype():
    _bad(lambda a: a[0][3].__setitem__(0, a[0][3][0].double()), TypeError,
         r"rmss\[0\] must be float32")


def test_bad_noncontiguous():
    _bad(lambda a: a[0][0].__setitem__(0, torch.randn(4, 3).t()), ValueError, "not contiguous")


def test_bad_lr_tensor_dtype():
    import dataclasses

    _bad(lambda a: a.__setitem__(3, dataclasses.replace(a[3], lr_t=torch.ones(1).double())),
         TypeError, "lr_t must be a torch.float32 tensor")


def test_bad_weights_shape():
    _bad(lambda a: a[1].__setitem__(0, torch.zeros(38, 32)), ValueError, "w0 has shape")


def test_bad_steps_dtype():
    _bad(lambda a: a[0][6].__setitem__(0, torch.zeros((), dtype=torch.int64)), TypeError,
         r"steps\[0\] must be a torch.float32 tensor")


def test_empty_lists():
    inputs, weights, decays, hp = make_case([], dtype=torch.float32)
    assert mlp_step(*inputs, weights, decays, hp) == ([], [], [], [], [], [])


_THREADS_SCRIPT = """
import sys, torch
sys.path.insert(0, {tests!r})
from test_mlp_step import make_case, _grads
from pyoptk.ops import mlp_step
inputs, weights, decays, hp = make_case([(300, 70), (20000,), (33, 4097)], dtype=torch.float32)
torch.save(_grads(inputs, weights, decays, hp, mlp_step), {out!r})
"""


@needs_native
def test_backward_does_not_depend_on_thread_count(tmp_path):
    import os
    import pathlib
    import subprocess
    import sys

    tests = str(pathlib.Path(__file__).parent)
    res = []
    for threads in (1, 2):
        out = str(tmp_path / f"g{threads}.pt")
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        subprocess.run([sys.executable, "-c", _THREADS_SCRIPT.format(tests=tests, out=out)],
                       env=env, check=True)
        res.append(torch.load(out))
    assert all(torch.equal(a, b) for a, b in zip(*res))


@pytest.mark.gpu
def test_cuda_backward_falls_back_to_reference_with_a_warning(monkeypatch):
    """When the Triton backward declines a call, CUDA runs autograd over the reference,
    warned once, with the CPU kernel's gradients (the default Triton path itself:
    tests/test_mlp_step_triton.py)."""
    inputs, weights, decays, hp = make_case([(33, 65), (257,)], dtype=torch.float32)
    cpu = _grads(inputs, weights, decays, hp, mlp_step)
    dev = torch.device("cuda")
    to = lambda t: t.to(dev)  # noqa: E731
    g_inputs = [[to(t) for t in lst] for lst in inputs]
    g_hp = mstep._replace_lr(hp, to(hp.lr_t))
    monkeypatch.setattr(_backend, "_warned", set())
    triton_fn = mstep._mlp_step_backward_triton
    monkeypatch.setitem(mstep._FUSED, triton_fn,
                        (mstep._FUSED[triton_fn][0], lambda *a: "a test's decline"))
    with pytest.warns(pyoptk.SlowPathWarning, match="does not support a test's decline"):
        gpu = _grads(g_inputs, [to(w) for w in weights], to(decays), g_hp, mlp_step)
    _compare([g.cpu() for g in gpu], cpu, 1e-4, 1e-3, "cuda grad")
