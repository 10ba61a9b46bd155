"""pyoptk.optim.Lookahead: the update by hand, which params synchronize, schedulers,
param groups, state_dict and bit-exact resume."""

import copy

import pytest
import torch

import pyoptk
from helpers import assert_close
from test_optim_adamw import (
    clone_params, fixed_grads, make_model, make_params, run_fixed, save_load, train)


def sgd_lookahead(params, k, alpha, lr=0.1):
    return pyoptk.optim.Lookahead(torch.optim.SGD(params, lr=lr), k=k, alpha=alpha)


def test_two_windows_by_hand():
    """Inner SGD; after each k steps slow = slow_prev + alpha * (fast_k - slow_prev) and
    fast == slow exactly; in between, the fast weights are plain SGD."""
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
    k, alpha, lr = 3, 0.25, 0.1
    opt = sgd_lookahead([p], k, alpha, lr)
    slow = p.detach().clone()
    fast = slow.clone()
    for t in range(2 * k):
        g = fixed_grads([(3,)], t)[0]
        p.grad = g.clone()
        opt.step()
        fast -= lr * g
        if (t + 1) % k:
            assert_close(p, fast, 1e-7, 1e-7, what=f"fast after inner step {t + 1}")
        else:
            slow = slow + alpha * (fast - slow)
            fast = slow.clone()
            assert_close(opt.state[p]["slow_param"], slow, 1e-7, 1e-7, what=f"slow at {t + 1}")
            assert torch.equal(p.detach(), opt.state[p]["slow_param"]), "fast must equal slow"


def test_around_fused_adamw_by_hand():
    """Lookahead(AdamW) after k steps == lerp(theta_0, k AdamW steps, alpha), the
    AdamW steps computed by a separate plain AdamW."""
    shapes = [(9, 7), (7,)]
    params = make_params(shapes)
    plain = clone_params(params)
    theta0 = [p.detach().clone() for p in params]
    opt = pyoptk.optim.Lookahead(pyoptk.optim.AdamW(params, lr=1e-2), k=4, alpha=0.3)
    run_fixed(opt, params, 4)
    run_fixed(pyoptk.optim.AdamW(plain, lr=1e-2), plain, 4)
    for p, q, s0 in zip(params, plain, theta0):
        assert_close(p, s0 + 0.3 * (q - s0), 1e-7, 1e-6, what="after sync")
    assert opt.optimizer.state[params[0]]["step"].item() == 4, "inner state is kept"


def test_frozen_params_are_never_written():
    """A param that never has a grad gets no slow weight and is not moved; one frozen
    for a whole window and edited by hand keeps the edit."""
    never, trained, frozen_later = make_params([(3,), (4,), (2,)])
    opt = sgd_lookahead([never, trained, frozen_later], k=2, alpha=0.5)
    never0 = never.detach().clone()
    for t in range(2):
        trained.grad, frozen_later.grad = torch.ones(4), torch.ones(2)
        opt.step()
    assert never not in opt.state and torch.equal(never, never0)
    frozen_later.grad = None  # frozen from step 3 on
    with torch.no_grad():
        frozen_later.copy_(torch.tensor([7.0, 8.0]))  # edited by hand
    for t in range(4):
        trained.grad = torch.ones(4)
        opt.step()
    assert torch.equal(frozen_later.detach(), torch.tensor([7.0, 8.0]))
    assert frozen_later not in opt.state, "the slow weight of an idle param is dropped"
    assert torch.equal(never, never0)


def test_param_joining_mid_window_and_after_idle_window():
    """A param's slow weight starts at its value before its first step with a grad; one
    with a grad in part of a window is synchronized at its end."""
    a, b = make_params([(3,), (3,)])
    opt = sgd_lookahead([a, b], k=3, alpha=0.5, lr=1.0)
    b0 = b.detach().clone()
    a.grad = torch.ones(3)
    opt.step()                    # step 1: only a
    b.grad = torch.ones(3)
    opt.step()                    # step 2: both; b's slow weight starts at b0
    b.grad = None
    opt.step()                    # step 3: only a; sync moves b (it had a grad at step 2)
    assert_close(b, b0 - 0.5, 1e-7, 1e-6, what="b after sync")
    # b idle through steps 4-6: dropped at 6; rejoins at 7 from its value then.
    for _ in range(3):
        opt.step()
    assert b not in opt.state
    b_before = b.detach().clone()
    b.grad = torch.ones(3)
    for _ in range(3):           # steps 7-9, sync at 9
        opt.step()
    assert_close(b, b_before - 1.5, 1e-7, 1e-6, what="b after rejoining")


def test_closure_grads_are_tracked():
    """With a closure (which zeroes grads to None and runs backward inside the inner
    step), slow weights are still created from the pre-step values."""
    m_ref, m = make_model(), make_model()
    ref = sgd_lookahead(m_ref.parameters(), k=2, alpha=0.5)
    opt = sgd_lookahead(m.parameters(), k=2, alpha=0.5)
    for x in [torch.randn(4, 13) for _ in range(4)]:
        ref.zero_grad()
        m_ref(x).square().mean().backward()
        ref.step()

        def closure():
            opt.zero_grad(set_to_none=True)
            loss = m(x).square().mean()
            loss.backward()
            return loss

        opt.zero_grad(set_to_none=True)
        assert isinstance(opt.step(closure), torch.Tensor)
    for p, q in zip(m.parameters(), m_ref.parameters()):
        assert torch.equal(p, q)


def test_scheduler_grad_scaler_views_and_zero_grad_reach_inner():
    m = make_model()
    inner = pyoptk.optim.AdamW(m.parameters(), lr=1e-2)
    opt = pyoptk.optim.Lookahead(inner, k=2)
    assert isinstance(opt, torch.optim.Optimizer)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    train(m, opt, 3)
    for _ in range(3):
        sched.step()
    assert inner.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.5 ** 3)
    assert opt.param_groups is inner.param_groups and opt.defaults is inner.defaults
    inner.load_state_dict(inner.state_dict())  # torch rebinds the inner's list
    assert opt.param_groups is inner.param_groups
    opt.zero_grad(set_to_none=False)
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in m.parameters())
    opt.zero_grad()
    assert all(p.grad is None for p in m.parameters())


def test_add_param_group_goes_to_inner_and_synchronizes():
    a, b = make_params([(3,), (2,)])
    inner = torch.optim.SGD([a], lr=0.1)
    opt = pyoptk.optim.Lookahead(inner, k=2, alpha=0.5)
    opt.add_param_group({"params": [b], "lr": 1.0})
    assert len(inner.param_groups) == 2 and inner.param_groups[1]["lr"] == 1.0
    b0 = b.detach().clone()
    for _ in range(2):
        a.grad, b.grad = torch.ones(3), torch.ones(2)
        opt.step()
    assert_close(b, b0 - 1.0, 1e-7, 1e-6, what="b synchronized (lr 1, 2 steps, alpha 0.5)")


def test_low_precision_params_keep_float32_slow_weights():
    p = torch.nn.Parameter(torch.randn(5).to(torch.bfloat16))
    opt = sgd_lookahead([p], k=2, alpha=0.5, lr=1e-3)
    slow0 = p.detach().float()
    for t in range(2):
        p.grad = torch.full((5,), 0.7, dtype=torch.bfloat16)
        opt.step()
    slow = opt.state[p]["slow_param"]
    assert slow.dtype == torch.float32 and p.dtype == torch.bfloat16
    assert torch.equal(p.detach(), slow.to(torch.bfloat16))
    fast = slow0.to(torch.bfloat16)
    for _ in range(2):  # SGD on bf16: each step rounds to bf16
        fast = (fast.float() - 1e-3 * torch.tensor(0.7, dtype=torch.bfloat16).float()).to(
            torch.bfloat16)
    assert_close(slow, slow0 + 0.5 * (fast.float() - slow0), 1e-7, 1e-6, what="fp32 slow")


def test_state_dict_has_everything_and_resume_is_bit_exact():
    full = make_model()
    train(full, pyoptk.optim.Lookahead(pyoptk.optim.AdamW(full.parameters(), lr=1e-2), k=4,
                                       alpha=0.6), 100)
    part = make_model()
    opt = pyoptk.optim.Lookahead(pyoptk.optim.AdamW(part.parameters(), lr=1e-2), k=4, alpha=0.6)
    train(part, opt, 50)  # 50 % 4 == 2: stops mid-window, the counter must come back
    sd = opt.state_dict()
    la = sd["lookahead"]
    assert (la["k"], la["alpha"], la["inner_steps"]) == (4, 0.6, 50)
    assert sorted(la["state"]) == list(range(len(list(part.parameters()))))
    assert all(s["slow_param"].dtype == torch.float32 for s in la["state"].values())
    assert sd["inner"]["state"] and sd["inner"]["param_groups"][0]["lr"] == 1e-2
    ckpt = save_load({"model": part.state_dict(), "opt": sd})
    resumed = make_model(seed=5)
    resumed.load_state_dict(ckpt["model"])
    opt2 = pyoptk.optim.Lookahead(pyoptk.optim.AdamW(resumed.parameters(), lr=0.5), k=1,
                                  alpha=0.1)
    opt2.load_state_dict(ckpt["opt"])
    assert (opt2.k, opt2.alpha) == (4, 0.6) and opt2.param_groups[0]["lr"] == 1e-2
    train(resumed, opt2, 50, start=50)
    for (name, p), q in zip(resumed.named_parameters(), full.parameters()):
        assert torch.equal(p, q), f"{name}: resume is not bit-exact"


def test_deepcopy_is_independent():
    params = make_params([(3,)])
    opt = sgd_lookahead(params, k=2, alpha=0.5)
    run_fixed(opt, params, 1)
    twin = copy.deepcopy(opt)
    assert twin.param_groups is twin.optimizer.param_groups
    assert twin.param_groups[0]["params"][0] is not params[0]
    assert (twin.k, twin.alpha, twin._inner_steps) == (2, 0.5, 1)
    twin_params = twin.param_groups[0]["params"]
    run_fixed(twin, twin_params, 1, start=1)
    run_fixed(opt, params, 1, start=1)
    assert torch.equal(twin_params[0], params[0])


@pytest.mark.parametrize("kw,msg", [
    (dict(k=0), "Invalid k"), (dict(k=2.0), "Invalid k"),
    (dict(alpha=1.5), "Invalid alpha"), (dict(alpha=-0.1), "Invalid alpha"),
])
def test_bad_arguments(kw, msg):
    with pytest.raises(ValueError, match=msg):
        pyoptk.optim.Lookahead(torch.optim.SGD(make_params([(2,)]), lr=0.1), **kw)


def test_not_an_optimizer():
    with pytest.raises(TypeError, match="must be a torch.optim.Optimizer, got object"):
        pyoptk.optim.Lookahead(object())


def test_bad_state_dicts():
    params = make_params([(2,)])
    opt = sgd_lookahead(params, k=2, alpha=0.5)
    with pytest.raises(ValueError, match="expected a dict with keys 'inner' and 'lookahead'"):
        opt.load_state_dict(torch.optim.SGD(params, lr=0.1).state_dict())
    run_fixed(opt, params, 1)
    sd = opt.state_dict()
    sd["lookahead"]["state"][3] = sd["lookahead"]["state"][0]
    with pytest.raises(ValueError, match=r"state for params \[3\] but the optimizer has 1"):
        opt.load_state_dict(sd)
