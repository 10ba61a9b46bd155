"""pyoptk.optim.LAMB: against the op reference and pytorch-optimizer, resume."""

import io

import pytest
import torch

import pyoptk
from helpers import assert_close
from test_optim_adamw import feed_fixed_grads, make_model, train


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_matches_reference_backend(backend):
    steps = 10 if backend == "triton" else 60
    a, b = make_model(), make_model()
    kw = dict(lr=1e-2, weight_decay=0.01)
    oa, ob = pyoptk.optim.LAMB(a.parameters(), **kw), pyoptk.optim.LAMB(b.parameters(), **kw)
    with pyoptk.use_backend(backend):
        feed_fixed_grads(a, oa, steps)
    with pyoptk.use_backend("torch"):
        feed_fixed_grads(b, ob, steps)
    for p, q in zip(a.parameters(), b.parameters()):
        assert_close(p, q, 1e-6, 2e-5, what=backend)


def test_matches_pytorch_optimizer_lamb():
    pytorch_optimizer = pytest.importorskip("pytorch_optimizer")
    a, b = make_model(), make_model()
    lr = torch.tensor(1e-2)
    ours = pyoptk.optim.LAMB(a.parameters(), lr=lr, weight_decay=0.1, bias_correction=False)
    theirs = pytorch_optimizer.Lamb(b.parameters(), lr=1e-2, weight_decay=0.1,
                                    weight_decouple=False, max_grad_norm=0.0)
    gen = torch.Generator().manual_seed(1)
    for t in range(1, 41):
        lr.fill_(1e-2 / (1 - 0.9 ** t))  # their step size is lr / (1 - beta1^t)
        x = torch.randn(17, 13, generator=gen)
        for m, o in ((a, ours), (b, theirs)):
            o.zero_grad()
            m(x).square().mean().backward()
            o.step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert_close(p, q, 1e-5, 1e-4, what="vs pytorch_optimizer.Lamb")


def test_bit_exact_resume():
    full = make_model()
    opt = pyoptk.optim.LAMB(full.parameters(), lr=1e-2)
    train(full, opt, 40)
    part = make_model()
    opt1 = pyoptk.optim.LAMB(part.parameters(), lr=1e-2)
    train(part, opt1, 20)
    buf = io.BytesIO()
    torch.save(opt1.state_dict(), buf)
    buf.seek(0)
    opt2 = pyoptk.optim.LAMB(part.parameters(), lr=1e-2)
    opt2.load_state_dict(torch.load(buf))
    train(part, opt2, 20, start=20)
    for p, q in zip(part.parameters(), full.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("kw,msg", [
    (dict(clamp_value=0), "Invalid clamp_value"),
    (dict(lr=-0.1), "Invalid learning rate"),
    (dict(betas=(0.9, 2.0)), "Invalid beta parameter at index 1"),
])
def test_bad_arguments(kw, msg):
    with pytest.raises(ValueError, match=msg):
        pyoptk.optim.LAMB(make_model().parameters(), **kw)
