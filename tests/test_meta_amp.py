"""MAML under float16 autocast with torch.amp.GradScaler: the scaled second-order
meta-gradient, unscaled, matches float32 (scaling the outer loss by S scales the exact
meta-gradient by S: the inner loop does not see S), and a non-finite meta-gradient
makes the scaler skip the step and lower its scale instead of corrupting the
initialization."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pyoptk.meta.maml import MAML
from pyoptk.tasks.sinusoid import SinusoidEpisodes

pytestmark = pytest.mark.usefixtures("one_thread")


def _setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(),
                          nn.Linear(32, 1))
    maml = MAML(model, F.mse_loss, inner_steps=2, inner_lr=0.01)
    return model, maml, SinusoidEpisodes(10, 10).batch(0, 4)


def test_fp16_grad_scaler_meta_gradient_matches_fp32():
    model, maml, batch = _setup()
    params = list(model.parameters())
    want = torch.autograd.grad(maml.meta_loss(batch), params)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    with torch.autocast("cpu", dtype=torch.float16):
        loss = maml.meta_loss(batch)
    scaler.scale(loss).backward()
    opt = torch.optim.SGD(params, lr=0.0)
    scaler.unscale_(opt)
    for p, w in zip(params, want):
        assert p.grad.dtype == torch.float32
        # fp16 activations (10-bit mantissa) through two second-order inner steps:
        # measured 7e-4 relative to the float32 meta-gradient on this model.
        assert (p.grad - w).norm() / w.norm() < 5e-3


def test_fp16_grad_scaler_skips_a_nonfinite_meta_step():
    model, maml, batch = _setup()
    opt = torch.optim.Adam(maml.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    before = [p.detach().clone() for p in maml.parameters()]
    sx, sy, qx, qy = batch
    qy = qy.clone()
    # A far-off query target: the scaled loss gradient (~1e5 * 2^10 / 40) overflows
    # fp16 in the backward of the autocast linear layers, an inf meta-gradient.
    qy[0, 0] = 1e5
    with torch.autocast("cpu", dtype=torch.float16):
        loss = maml.meta_loss((sx, sy, qx, qy))
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() < 2.0 ** 10
    assert all(torch.equal(a, p) for a, p in zip(before, maml.parameters()))
    # and a finite batch afterwards steps normally
    opt.zero_grad()
    with torch.autocast("cpu", dtype=torch.float16):
        loss = maml.meta_loss(batch)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    assert any(not torch.equal(a, p) for a, p in zip(before, maml.parameters()))
