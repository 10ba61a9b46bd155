"""pyoptk.optim.Lookahead: semantics by hand, schedulers, state_dict, resume."""

import io

import pytest
import torch

import pyoptk
from helpers import assert_close
from test_optim_adamw import make_model, train


def test_semantics_by_hand():
    """After k inner SGD steps: slow = slow0 + alpha*(fast_k - slow0), fast = slow."""
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = pyoptk.optim.Lookahead(torch.optim.SGD([p], lr=0.1), k=3, alpha=0.25)
    grads = [torch.tensor([1.0, 1.0]), torch.tensor([2.0, -1.0]), torch.tensor([0.5, 3.0])]
    slow0 = p.detach().clone()
    fast = slow0.clone()
    for i, g in enumerate(grads):
        p.grad = g.clone()
        opt.step()
        fast -= 0.1 * g
        if i < 2:
            assert_close(p, fast, 1e-7, 1e-7, what=f"fast after inner step {i}")
    expected = slow0 + 0.25 * (fast - slow0)
    assert_close(p, expected, 1e-7, 1e-7, what="synchronized fast")
    assert_close(opt.state[p]["slow_param"], expected, 1e-7, 1e-7, what="slow")


def test_param_without_grad_untouched_and_scheduler_reaches_inner():
    m = make_model()
    frozen = m[3].weight
    frozen.requires_grad_(False)
    before = frozen.clone()
    inner = pyoptk.optim.AdamW(m.parameters(), lr=1e-2)
    opt = pyoptk.optim.Lookahead(inner, k=2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    train(m, opt, 6)
    for _ in range(3):
        sched.step()
    assert torch.equal(frozen, before)
    assert frozen not in opt.state
    assert inner.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.5 ** 3)
    assert opt.param_groups is inner.param_groups


def test_state_dict_has_everything_and_resume_is_bit_exact():
    full = make_model()
    opt = pyoptk.optim.Lookahead(pyoptk.optim.AdamW(full.parameters(), lr=1e-2), k=4, alpha=0.6)
    train(full, opt, 30)

    part = make_model()
    opt1 = pyoptk.optim.Lookahead(pyoptk.optim.AdamW(part.parameters(), lr=1e-2), k=4, alpha=0.6)
    train(part, opt1, 15)  # stops mid-window: the counter must be restored
    sd = opt1.state_dict()
    assert sd["lookahead"]["inner_steps"] == 15
    assert len(sd["lookahead"]["slow_params"]) == len(list(part.parameters()))
    assert sd["inner"]["state"], "inner optimizer state must be included"
    buf = io.BytesIO()
    torch.save({"model": part.state_dict(), "opt": sd}, buf)
    buf.seek(0)
    ckpt = torch.load(buf)
    resumed = make_model(seed=5)
    resumed.load_state_dict(ckpt["model"])
    opt2 = pyoptk.optim.Lookahead(pyoptk.optim.AdamW(resumed.parameters(), lr=1e-2), k=1, alpha=0.1)
    opt2.load_state_dict(ckpt["opt"])
    assert (opt2.k, opt2.alpha) == (4, 0.6)
    train(resumed, opt2, 15, start=15)
    for p, q in zip(resumed.parameters(), full.parameters()):
        assert torch.equal(p, q)


def test_add_param_group_goes_to_inner():
    m = make_model()
    inner = torch.optim.SGD(m[0].parameters(), lr=0.1)
    opt = pyoptk.optim.Lookahead(inner, k=2)
    opt.add_param_group({"params": m[2].parameters()})
    assert len(inner.param_groups) == 2
    train(m, opt, 4)
    assert m[2].weight in opt.state


@pytest.mark.parametrize("kw,exc,msg", [
    (dict(k=0), ValueError, "Invalid k"),
    (dict(alpha=1.5), ValueError, "Invalid alpha"),
])
def test_bad_arguments(kw, exc, msg):
    with pytest.raises(exc, match=msg):
        pyoptk.optim.Lookahead(torch.optim.SGD(make_model().parameters(), lr=0.1), **kw)


def test_not_an_optimizer():
    with pytest.raises(TypeError, match="must be a torch.optim.Optimizer"):
        pyoptk.optim.Lookahead(object())


def test_bad_state_dict():
    opt = pyoptk.optim.Lookahead(torch.optim.SGD(make_model().parameters(), lr=0.1))
    with pytest.raises(ValueError, match="expected a dict with keys 'inner' and 'lookahead'"):
        opt.load_state_dict({"state": {}, "param_groups": []})
