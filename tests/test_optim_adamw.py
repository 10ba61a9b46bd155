"""pyoptk.optim.AdamW against torch.optim.AdamW: conformance, state_dict both ways,
resume, param groups, bad input."""

import copy
import io

import pytest
import torch

import pyoptk
from helpers import assert_close

BACKENDS = ["cpu", "triton", "torch"]


def make_model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(13, 31), torch.nn.Tanh(), torch.nn.Linear(31, 5),
                            torch.nn.LayerNorm(5))
    return m.to(dtype)


def feed_fixed_grads(model, opt, steps, seed=1):
    """Steps with gradients that do not depend on the params: differences between two
    optimizers then show their own error, not the loss landscape's amplification."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in model.parameters():
            if p.requires_grad:
                p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
        opt.step()


def train(model, opt, steps, seed=1, start=0):
    gen = torch.Generator().manual_seed(seed)
    xs = [torch.randn(17, 13, generator=gen) for _ in range(start + steps)]
    for x in xs[start:]:
        opt.zero_grad()
        model(x.to(next(model.parameters()).dtype)).float().square().mean().backward()
        opt.step()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kw", [
    dict(lr=1e-2), dict(lr=3e-3, weight_decay=0.1, amsgrad=True),
    dict(lr=1e-3, betas=(0.5, 0.9), maximize=True, eps=1e-6)],
    ids=["default", "amsgrad", "maximize"])
def test_matches_torch_adamw(backend, kw):
    steps = 15 if backend == "triton" else 100
    a, b = make_model(), make_model()
    ours = pyoptk.optim.AdamW(a.parameters(), **kw)
    theirs = torch.optim.AdamW(b.parameters(), **kw)
    with pyoptk.use_backend(backend):
        feed_fixed_grads(a, ours, steps)
    feed_fixed_grads(b, theirs, steps)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert_close(p, q, atol=1e-6, rtol=1e-6, what=f"{backend} {name}")
    for p, q in zip(a.parameters(), b.parameters()):
        for key in ("exp_avg", "exp_avg_sq"):
            assert_close(ours.state[p][key], theirs.state[q][key], 1e-7, 1e-5, what=key)


def test_param_groups_and_params_without_grad():
    a, b = make_model(), make_model()
    groups = lambda m: [  # noqa: E731
        {"params": m[0].parameters(), "lr": 1e-2, "weight_decay": 0.0},
        {"params": list(m[2].parameters()) + list(m[3].parameters()), "betas": (0.8, 0.95)}]
    a[3].weight.requires_grad_(False)
    b[3].weight.requires_grad_(False)
    ours, theirs = pyoptk.optim.AdamW(groups(a), lr=1e-3), torch.optim.AdamW(groups(b), lr=1e-3)
    frozen = a[3].weight.clone()
    train(a, ours, 30)
    train(b, theirs, 30)
    for p, q in zip(a.parameters(), b.parameters()):
        # Trained (not fed fixed grads): rounding differences grow through the loss.
        assert_close(p, q, 1e-5, 1e-4, what="grouped")
    assert torch.equal(a[3].weight, frozen), "a param without grad must not move"
    assert a[3].weight not in ours.state


def test_state_dict_into_torch_and_back():
    """Ours -> torch -> ours, continuing training each time, equals an uninterrupted run."""
    ref_model = make_model()
    ref = pyoptk.optim.AdamW(ref_model.parameters(), lr=1e-2, amsgrad=True)
    train(ref_model, ref, 60)

    m = make_model()
    ours = pyoptk.optim.AdamW(m.parameters(), lr=1e-2, amsgrad=True)
    train(m, ours, 20)
    theirs = torch.optim.AdamW(m.parameters(), lr=1e-2, amsgrad=True)
    theirs.load_state_dict(ours.state_dict())
    train(m, theirs, 20, start=20)
    ours2 = pyoptk.optim.AdamW(m.parameters(), lr=1e-2, amsgrad=True)
    ours2.load_state_dict(theirs.state_dict())
    st = ours2.state[next(m.parameters())]
    assert st["step"].dtype == torch.float32 and st["step"].item() == 40
    train(m, ours2, 20, start=40)
    for p, q in zip(m.parameters(), ref_model.parameters()):
        assert_close(p, q, 1e-5, 1e-4, what="round trip through torch")


def test_bit_exact_resume():
    full = make_model()
    opt = pyoptk.optim.AdamW(full.parameters(), lr=1e-2, weight_decay=0.05)
    train(full, opt, 100)

    part = make_model()
    opt1 = pyoptk.optim.AdamW(part.parameters(), lr=1e-2, weight_decay=0.05)
    train(part, opt1, 50)
    buf = io.BytesIO()
    torch.save({"model": part.state_dict(), "opt": opt1.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf)
    resumed = make_model(seed=123)
    resumed.load_state_dict(ckpt["model"])
    opt2 = pyoptk.optim.AdamW(resumed.parameters(), lr=1e-2, weight_decay=0.05)
    opt2.load_state_dict(ckpt["opt"])
    train(resumed, opt2, 50, start=50)
    for p, q in zip(resumed.parameters(), full.parameters()):
        assert torch.equal(p, q), "resume must be bit-exact"


def test_bf16_params_keep_fp32_state():
    m = make_model(dtype=torch.bfloat16)
    opt = pyoptk.optim.AdamW(m.parameters(), lr=1e-2)
    train(m, opt, 5)
    for p in m.parameters():
        assert p.dtype == torch.bfloat16
        assert opt.state[p]["exp_avg"].dtype == torch.float32
        assert opt.state[p]["step"].dtype == torch.float32


def test_centralize_equals_torch_on_centralized_grads():
    a, b = make_model(), make_model()
    ours = pyoptk.optim.AdamW(a.parameters(), lr=1e-2, centralize=True)
    theirs = torch.optim.AdamW(b.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(9)
    for _ in range(10):
        x = torch.randn(17, 13, generator=gen)
        for m, o in ((a, ours), (b, theirs)):
            o.zero_grad()
            m(x).square().mean().backward()
        raw = [p.grad.clone() for p in a.parameters()]
        for q in b.parameters():
            if q.grad.dim() > 1:
                q.grad -= q.grad.mean(dim=tuple(range(1, q.grad.dim())), keepdim=True)
        ours.step()
        theirs.step()
        for p, r in zip(a.parameters(), raw):
            assert torch.equal(p.grad, r), "centralize must not modify p.grad"
    for p, q in zip(a.parameters(), b.parameters()):
        assert_close(p, q, 1e-5, 1e-4, what="centralized")


def test_nan_grad_propagates_like_torch():
    m = make_model()
    opt = pyoptk.optim.AdamW(m.parameters())
    for p in m.parameters():
        p.grad = torch.zeros_like(p)
    m[0].weight.grad[0, 0] = float("nan")
    opt.step()
    assert torch.isnan(m[0].weight[0, 0])
    assert torch.isfinite(m[2].weight).all()


def test_lr_tensor_and_scheduler():
    a, b = make_model(), make_model()
    ours = pyoptk.optim.AdamW(a.parameters(), lr=torch.tensor(1e-2))
    theirs = torch.optim.AdamW(b.parameters(), lr=1e-2)
    s1 = torch.optim.lr_scheduler.StepLR(ours, step_size=5, gamma=0.5)
    s2 = torch.optim.lr_scheduler.StepLR(theirs, step_size=5, gamma=0.5)
    gen = torch.Generator().manual_seed(3)
    for _ in range(20):
        x = torch.randn(17, 13, generator=gen)
        for m, o, s in ((a, ours, s1), (b, theirs, s2)):
            o.zero_grad()
            m(x).square().mean().backward()
            o.step()
            s.step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert_close(p, q, 1e-5, 1e-4, what="scheduled")


def test_closure_and_set_to_none():
    m = make_model()
    opt = pyoptk.optim.AdamW(m.parameters())
    x = torch.randn(4, 13)

    def closure():
        opt.zero_grad()
        loss = m(x).square().mean()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor)
    opt.zero_grad(set_to_none=True)
    assert all(p.grad is None for p in m.parameters())


@pytest.mark.parametrize("kw,msg", [
    (dict(lr=-1.0), "Invalid learning rate: -1.0"),
    (dict(betas=(1.2, 0.999)), "Invalid beta parameter at index 0: 1.2"),
    (dict(betas=(0.9, 1.0)), "Invalid beta parameter at index 1: 1.0"),
    (dict(eps=-1.0), "Invalid epsilon value: -1.0"),
    (dict(weight_decay=-0.1), "Invalid weight_decay value: -0.1"),
    (dict(differentiable=True), "does not support differentiable=True"),
])
def test_bad_arguments(kw, msg):
    with pytest.raises(ValueError, match=msg):
        pyoptk.optim.AdamW(make_model().parameters(), **kw)


def test_sparse_grad_rejected():
    emb = torch.nn.Embedding(10, 3, sparse=True)
    opt = pyoptk.optim.AdamW(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        opt.step()


def test_non_contiguous_param_message():
    base = torch.randn(6, 4)
    p = torch.nn.Parameter(base.t())  # (4, 6) view, not contiguous
    p.grad = torch.randn(6, 4).t()
    opt = pyoptk.optim.AdamW([p])
    with pytest.raises(ValueError, match=r"params\[0\] is not contiguous"):
        opt.step()


def test_mixed_devices_and_dtypes_are_bucketed():
    a = torch.nn.Parameter(torch.randn(5))
    b = torch.nn.Parameter(torch.randn(5, dtype=torch.bfloat16))
    a.grad, b.grad = torch.randn(5), torch.randn(5, dtype=torch.bfloat16)
    a0, b0 = a.detach().clone(), b.detach().clone()
    pyoptk.optim.AdamW([a, b], lr=0.1).step()
    assert not torch.equal(a, a0) and not torch.equal(b, b0)


def test_deepcopy_and_setstate_backfill():
    m = make_model()
    opt = pyoptk.optim.AdamW(m.parameters())
    train(m, opt, 2)
    state = opt.__getstate__()
    for g in state["param_groups"]:
        del g["centralize"]  # a checkpoint written before the option existed
    opt2 = copy.copy(opt)
    opt2.__setstate__(state)
    assert all(g["centralize"] is False for g in opt2.param_groups)
