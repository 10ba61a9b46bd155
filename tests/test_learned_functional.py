"""pyoptk.learned.update: purity, gradcheck in float64 (meta-parameters, grads, params,
state, lr), and meta-gradients that predict the change of an unrolled loss."""

import pytest
import torch

from pyoptk.learned import MLPConfig, MLPRule, MLPState, init_meta_params, init_state, update

SHAPES = [(2, 3), (3,), ()]


def warm_state(cfg, meta, seed=0, dtype=torch.float64, steps=2):
    """Params and a non-trivial state after a few steps (all float64)."""
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen, dtype=dtype) for s in SHAPES]
    state = init_state(params, cfg)
    for _ in range(steps):
        grads = [torch.randn(s, generator=gen, dtype=dtype) for s in SHAPES]
        params, state = update(params, grads, state, meta, cfg)
    grads = [torch.randn(s, generator=gen, dtype=dtype) for s in SHAPES]
    return params, grads, state


def test_update_is_pure():
    cfg = MLPConfig(hidden_sizes=(8,))
    meta = init_meta_params(cfg, dtype=torch.float64)
    params, grads, state = warm_state(cfg, meta)
    snap = [t.clone() for t in params + grads + [x for f in state for x in f] + list(meta.values())]
    new_params, new_state = update(params, grads, state, meta, cfg, weight_decay=0.1)
    after = params + grads + [x for f in state for x in f] + list(meta.values())
    assert all(torch.equal(a, b) for a, b in zip(snap, after))
    assert all(a is not b for a, b in zip(new_params, params))
    assert isinstance(new_state, MLPState)


def _gradcheck(cfg, fast_mode, with_lr=False):
    meta = init_meta_params(cfg, seed=2, dtype=torch.float64, output_scale=1.0)
    params, grads, state = warm_state(cfg, meta)
    names = list(meta)
    n = len(SHAPES)
    state_fields = ("mom", "rms", "fac_row", "fac_col")
    inputs = (list(meta.values()) + params + grads
              + [t for f in state_fields for t in getattr(state, f)])
    if with_lr:
        inputs.append(torch.tensor(0.7, dtype=torch.float64))
    inputs = [t.detach().clone().requires_grad_(t.numel() > 0) for t in inputs]

    def fn(*xs):
        xs = list(xs)
        m = dict(zip(names, xs[:len(names)]))
        rest = xs[len(names):]
        ps, gs = rest[:n], rest[n:2 * n]
        st = [rest[2 * n + i * n: 2 * n + (i + 1) * n] for i in range(len(state_fields))]
        lr = rest[-1] if with_lr else 1.0
        s = MLPState(list(state.step), *st)
        new_p, new_s = update(ps, gs, s, m, cfg, lr=lr, weight_decay=0.05)
        # scale the params' change up so it dominates the numerical-jacobian error
        outs = [(a - b) * 1e3 for a, b in zip(new_p, ps)]
        outs += [t for f in state_fields for t in getattr(new_s, f) if t.numel()]
        return tuple(outs)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-4,
                                     fast_mode=fast_mode)


def test_gradcheck_small_rule():
    _gradcheck(MLPConfig(hidden_sizes=(4,)), fast_mode=False)


def test_gradcheck_learned_decays_and_lr():
    _gradcheck(MLPConfig(hidden_sizes=(3,), learn_decays=True), fast_mode=False, with_lr=True)


def test_gradcheck_default_rule_fast():
    _gradcheck(MLPConfig(), fast_mode=True)


def quadratic_unroll(meta, cfg, steps=2, lr=20.0):
    """Loss of sum(a/2 · θ²) after ``steps`` learned-rule steps from a fixed start."""
    gen = torch.Generator().manual_seed(11)
    shapes = [(4, 3), (5,)]
    a = [torch.rand(s, generator=gen, dtype=torch.float64) + 0.5 for s in shapes]
    theta = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    state = init_state(theta, cfg)
    for _ in range(steps):
        grads = [ai * th for ai, th in zip(a, theta)]
        theta, state = update(theta, grads, state, meta, cfg, lr=lr)
    return sum((0.5 * ai * th * th).sum() for ai, th in zip(a, theta))


@pytest.mark.parametrize("cfg", [MLPConfig(), MLPConfig(hidden_sizes=(8,), learn_decays=True)],
                         ids=["default", "learn_decays"])
def test_meta_gradient_predicts_loss_change(cfg):
    meta = init_meta_params(cfg, seed=4, dtype=torch.float64)
    meta = {k: v.requires_grad_() for k, v in meta.items()}
    loss0 = quadratic_unroll(meta, cfg)
    grads = torch.autograd.grad(loss0, list(meta.values()))
    gnorm2 = sum((g * g).sum() for g in grads)
    assert gnorm2 > 0 and all(torch.isfinite(g).all() for g in grads)
    assert all(g.abs().sum() > 0 for g in grads), "every meta-parameter gets a gradient"
    eta = 1e-2 / gnorm2.sqrt()                # a meta-step of norm 1e-2
    with torch.no_grad():
        moved = {k: v - eta * g for (k, v), g in zip(meta.items(), grads)}
        loss1 = quadratic_unroll(moved, cfg)
    actual = (loss1 - loss0).item()
    predicted = -(eta * gnorm2).item()
    assert actual < 0, f"loss went up: {actual}"
    assert abs(actual - predicted) <= 0.05 * abs(predicted), (actual, predicted)


def test_meta_training_with_torch_optimizer_reduces_unrolled_loss():
    cfg = MLPConfig(hidden_sizes=(8,))
    rule = MLPRule(cfg, seed=0).double()
    meta_opt = torch.optim.Adam(rule.parameters(), lr=3e-2)
    with torch.no_grad():
        start = quadratic_unroll(rule.meta_params(), cfg, steps=4).item()
    for _ in range(15):
        meta_opt.zero_grad()
        quadratic_unroll(rule.meta_params(), cfg, steps=4).backward()
        meta_opt.step()
    with torch.no_grad():
        end = quadratic_unroll(rule.meta_params(), cfg, steps=4).item()
    assert end < start, (start, end)
    assert len(rule.identity()["hash"]) == 64


def test_grads_none_leave_tensor_untouched():
    cfg = MLPConfig(hidden_sizes=(4,))
    meta = init_meta_params(cfg)
    params = [torch.randn(3), torch.randn(2, 2)]
    state = init_state(params, cfg)
    new_p, new_s = update(params, [None, torch.randn(2, 2)], state, meta, cfg)
    assert new_p[0] is params[0] and new_s.step[0].item() == 0
    assert new_s.step[1].item() == 1
