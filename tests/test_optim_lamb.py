"""pyoptk.optim.LAMB: every CPU backend against an independent float64 LAMB written
here from the documented formula, against pytorch-optimizer's Lamb, low-precision
params, bit-exact resume, bad input."""

import math

import pytest
import torch

import pyoptk
from helpers import assert_close, small_for
from test_optim_adamw import (
    BACKENDS, SHAPES, SMALL_SHAPES, assert_resume_bit_exact, clone_params, fixed_grads,
    make_params, run_fixed)


class OracleLamb:
    """LAMB as documented in pyoptk.optim.LAMB, one tensor at a time in float64; ``step``
    takes the float32 params to update and the grads (None: skipped)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0,
                 bias_correction=True, adam=False, clamp_value=10.0, maximize=False,
                 centralize=False):
        self.params = params
        self.hp = dict(lr=lr, b1=betas[0], b2=betas[1], eps=eps, wd=weight_decay,
                       bc=bias_correction, adam=adam, clamp=clamp_value, maximize=maximize,
                       centralize=centralize)
        self.theta = [p.detach().double() for p in params]
        self.m = [torch.zeros_like(t) for t in self.theta]
        self.v = [torch.zeros_like(t) for t in self.theta]
        self.t = [0] * len(params)

    def step(self, grads):
        h = self.hp
        for i, g in enumerate(grads):
            if g is None:
                continue
            self.theta[i] = self.params[i].detach().double()  # follow the params given
            g = g.double() * (-1 if h["maximize"] else 1)
            if h["centralize"] and g.dim() > 1:
                g = g - g.mean(dim=tuple(range(1, g.dim())), keepdim=True)
            self.t[i] += 1
            t = self.t[i]
            self.m[i] = h["b1"] * self.m[i] + (1 - h["b1"]) * g
            self.v[i] = h["b2"] * self.v[i] + (1 - h["b2"]) * g * g
            mh = self.m[i] / (1 - h["b1"] ** t) if h["bc"] else self.m[i]
            vh = self.v[i] / (1 - h["b2"] ** t) if h["bc"] else self.v[i]
            u = mh / (vh.sqrt() + h["eps"]) + h["wd"] * self.theta[i]
            w = min(self.theta[i].norm().item(), h["clamp"])
            un = u.norm().item()
            r = 1.0 if h["adam"] or w == 0 or un == 0 else w / un
            self.theta[i] = self.theta[i] - h["lr"] * r * u
            self.params[i].data.copy_(self.theta[i])


CONFIGS = {
    "default": dict(lr=1e-2),
    "no_bias_correction_wd": dict(lr=1e-2, weight_decay=0.1, bias_correction=False),
    "adam_maximize": dict(lr=3e-3, betas=(0.8, 0.99), adam=True, maximize=True,
                          weight_decay=0.01),
    "no_clamp_eps": dict(lr=1e-2, clamp_value=math.inf, eps=1e-8, weight_decay=0.05),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config", list(CONFIGS))
def test_matches_float64_oracle_100_steps(backend, config):
    """float32 params and state against the float64 oracle: the error is float32
    rounding only (1e-5 relative after 100 steps)."""
    shapes = small_for(backend, SHAPES, SMALL_SHAPES)
    steps = 30 if backend == "triton" else 100
    params = make_params(shapes)
    ref_params = clone_params(params)
    opt = pyoptk.optim.LAMB(params, **CONFIGS[config])
    oracle = OracleLamb(ref_params, **CONFIGS[config])
    with pyoptk.use_backend(backend):
        for t in range(steps):
            grads = fixed_grads(shapes, t)
            for p, g in zip(params, grads):
                p.grad = g
            opt.step()
            oracle.step(grads)
    for i, (p, q) in enumerate(zip(params, ref_params)):
        assert_close(p, q, atol=1e-6, rtol=1e-5, what=f"{backend} {config} param {i}")
        if p.numel():
            assert_close(opt.state[p]["exp_avg"], oracle.m[i], 1e-7, 1e-5, what="exp_avg")
            assert_close(opt.state[p]["exp_avg_sq"], oracle.v[i], 1e-9, 1e-5, what="exp_avg_sq")
            assert opt.state[p]["step"].item() == steps


def test_param_groups_and_skipped_grads_match_oracle():
    shapes = [(9, 7), (7,), (4, 2, 3), (5,)]
    params = make_params(shapes)
    ref_params = clone_params(params)
    g0 = dict(lr=1e-2, weight_decay=0.1)
    g1 = dict(lr=3e-3, bias_correction=False, clamp_value=0.5)
    opt = pyoptk.optim.LAMB([{"params": params[:2], **g0}, {"params": params[2:], **g1}])
    oracles = [OracleLamb(ref_params[:2], **g0), OracleLamb(ref_params[2:], **g1)]
    for t in range(40):
        grads = fixed_grads(shapes, t, skip_every=3)
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        oracles[0].step(grads[:2])
        oracles[1].step(grads[2:])
    for i, (p, q) in enumerate(zip(params, ref_params)):
        assert_close(p, q, 1e-6, 1e-5, what=f"param {i}")


def test_matches_pytorch_optimizer_lamb():
    """pytorch-optimizer's Lamb(weight_decouple=False, max_grad_norm=0) has no bias
    correction of the moments but steps lr / (1 - beta1^t): feed ours that lr as a
    tensor, with bias_correction=False. Theirs adds eps to ||u|| in the trust ratio:
    a relative change of eps/||u|| <= 1e-6 per step here (||u|| >= 1), hence 1e-5."""
    pytorch_optimizer = pytest.importorskip("pytorch_optimizer")
    shapes = [(9, 7), (7,), (4, 2, 3)]
    params = make_params(shapes)
    ref_params = clone_params(params)
    lr = torch.tensor(1e-2)
    ours = pyoptk.optim.LAMB(params, lr=lr, weight_decay=0.1, bias_correction=False)
    theirs = pytorch_optimizer.Lamb(ref_params, lr=1e-2, weight_decay=0.1,
                                    weight_decouple=False, max_grad_norm=0.0, eps=1e-6)
    for t in range(100):
        lr.fill_(1e-2 / (1 - 0.9 ** (t + 1)))
        run_fixed(ours, params, 1, start=t)
        run_fixed(theirs, ref_params, 1, start=t)
    for i, (p, q) in enumerate(zip(params, ref_params)):
        assert_close(p, q, 1e-6, 1e-5, what=f"vs pytorch_optimizer.Lamb, param {i}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_params_round_oracle_each_step(backend, dtype):
    """Each step the float64 oracle starts from our rounded params with its own
    state; our new params must be its result rounded to the param dtype (half an ulp,
    plus 1e-5 relative for float32 math)."""
    shapes = small_for(backend, SHAPES, SMALL_SHAPES)
    steps = 10 if backend == "triton" else 30
    params = make_params(shapes, dtype)
    shadow = [torch.nn.Parameter(p.detach().double()) for p in params]
    kw = dict(lr=1e-2, weight_decay=0.1)
    opt, oracle = pyoptk.optim.LAMB(params, **kw), OracleLamb(shadow, **kw)
    rtol = torch.finfo(dtype).eps / 2 + 1e-5
    if backend == "triton" and dtype == torch.bfloat16 and not torch.cuda.is_available():
        rtol = torch.finfo(dtype).eps + 1e-5  # the interpreter truncates to bf16
    with pyoptk.use_backend(backend):
        for t in range(steps):
            grads = [g.to(dtype) for g in fixed_grads(shapes, t)]
            for p, s, g in zip(params, shadow, grads):
                p.grad = g
                s.data.copy_(p.detach())
            opt.step()
            oracle.step(grads)
            for i, (p, s) in enumerate(zip(params, shadow)):
                assert_close(p, s, atol=1e-7, rtol=rtol, what=f"step {t} param {i}")
    assert all(opt.state[p]["exp_avg"].dtype == torch.float32 for p in params)


def test_centralize_matches_oracle_and_keeps_grad():
    shapes = [(6, 4, 3, 3), (9, 7), (7,)]
    params = make_params(shapes)
    ref_params = clone_params(params)
    opt = pyoptk.optim.LAMB(params, lr=1e-2, centralize=True)
    oracle = OracleLamb(ref_params, lr=1e-2, centralize=True)
    for t in range(20):
        grads = fixed_grads(shapes, t)
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        oracle.step(grads)
        assert all(torch.equal(p.grad, g) for p, g in zip(params, grads))
    for i, (p, q) in enumerate(zip(params, ref_params)):
        assert_close(p, q, 1e-6, 1e-5, what=f"centralized param {i}")


def test_nan_grad_stays_in_its_param():
    params = make_params([(4, 3), (5,)])
    opt = pyoptk.optim.LAMB(params, lr=1e-2)
    params[0].grad, params[1].grad = torch.ones(4, 3), torch.ones(5)
    params[0].grad[1, 2] = float("nan")
    opt.step()
    assert params[0].isnan().any()
    assert torch.isfinite(params[1]).all()


def test_params_without_grad_untouched():
    params = make_params([(4, 3), (5,)])
    frozen = params[1].detach().clone()
    opt = pyoptk.optim.LAMB(params, lr=0.1)
    for _ in range(3):
        params[0].grad = torch.ones(4, 3)
        opt.step()
    assert torch.equal(params[1], frozen) and params[1] not in opt.state


@pytest.mark.parametrize("backend", BACKENDS)
def test_bit_exact_resume_from_checkpoint(backend):
    with pyoptk.use_backend(backend):
        assert_resume_bit_exact(lambda ps: pyoptk.optim.LAMB(ps, lr=1e-2, weight_decay=0.01),
                                total=20 if backend == "triton" else 100)


def test_setstate_backfills_options():
    params = make_params([(3, 2)])
    opt = pyoptk.optim.LAMB(params)
    state = opt.__getstate__()
    for d in state["param_groups"] + [state["defaults"]]:
        del d["clamp_value"], d["centralize"]
    old = pyoptk.optim.LAMB.__new__(pyoptk.optim.LAMB)
    old.__setstate__(state)
    assert old.param_groups[0]["clamp_value"] == 10.0 and old.defaults["centralize"] is False
    run_fixed(old, params, 1)


@pytest.mark.parametrize("kw,exc,msg", [
    (dict(lr=-0.1), ValueError, "^Invalid learning rate: -0.1$"),
    (dict(betas=(0.9, 2.0)), ValueError, "^Invalid beta parameter at index 1: 2.0$"),
    (dict(eps=-1.0), ValueError, "^Invalid epsilon value: -1.0$"),
    (dict(weight_decay=-1.0), ValueError, "^Invalid weight_decay value: -1.0$"),
    (dict(clamp_value=0), ValueError, "Invalid clamp_value value: 0"),
    (dict(clamp_value=math.nan), ValueError, "Invalid clamp_value value: nan"),
], ids=["lr", "beta1", "eps", "wd", "clamp0", "clamp_nan"])
def test_bad_arguments(kw, exc, msg):
    with pytest.raises(exc, match=msg):
        pyoptk.optim.LAMB(make_params([(2,)]), **kw)


def test_bad_param_group_and_sparse_grad():
    a, b = make_params([(2,), (3,)])
    with pytest.raises(ValueError, match=r"Invalid clamp_value value: -1.*\(param group 1\)"):
        pyoptk.optim.LAMB([{"params": [a]}, {"params": [b], "clamp_value": -1.0}])
    emb = torch.nn.Embedding(10, 3, sparse=True)
    opt = pyoptk.optim.LAMB(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="LAMB does not support sparse gradients"):
        opt.step()
