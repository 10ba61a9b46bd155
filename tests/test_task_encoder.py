"""Amortized task encoders: pure, hybrid and variational variants train on sinusoids
and their loss decreases; the variational loss is KL + λ·reconstruction; hybrid
refinement steps are differentiable; bad shapes get clear errors."""

import pytest
import torch

from pyoptk.meta.task_encoder import AmortizedLearner, ConditionedMLP, TaskEncoder, per_task_mse
from pyoptk.tasks.sinusoid import SinusoidEpisodes


pytestmark = pytest.mark.usefixtures("one_thread")


def learner(mode, variational=False, **kw):
    torch.manual_seed(0)
    return AmortizedLearner(TaskEncoder(1, 1, 8, hidden=32, variational=variational),
                            ConditionedMLP(1, 8, 1, hidden=32), per_task_mse, mode=mode, **kw)


@pytest.mark.parametrize("mode,variational", [("pure", False), ("hybrid", False),
                                              ("pure", True), ("hybrid", True)],
                         ids=["pure", "hybrid", "pure-variational", "hybrid-variational"])
def test_variants_train_and_loss_decreases(mode, variational):
    model = learner(mode, variational, inner_steps=2, inner_lr=0.05)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    eps = SinusoidEpisodes(10, 10, seed=0)
    held_out = SinusoidEpisodes(10, 10, seed=99).batch(0, 64)
    model.eval()
    with torch.no_grad():
        before = model(held_out)["recon"]
    model.train()
    for it in range(100):
        loss = model(eps.batch(it, 16))["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        after = model(held_out)["recon"]
    assert after < 0.85 * before, (before.item(), after.item())


def test_variational_loss_is_kl_plus_weighted_reconstruction():
    model = learner("pure", variational=True, recon_weight=10.0)
    out = model(SinusoidEpisodes(5, 5).batch(0, 4))
    assert out["kl"] > 0
    torch.testing.assert_close(out["loss"], out["kl"] + 10.0 * out["recon"])
    assert learner("pure", True, recon_weight=3.0).recon_weight == 3.0


def test_hybrid_refinement_is_differentiable_and_lowers_support_loss():
    model = learner("hybrid", inner_steps=3, inner_lr=0.1)
    b = SinusoidEpisodes(10, 10).batch(0, 4)
    z0 = model.encoder(b.support_x, b.support_y)
    z, _ = model.embed(b.support_x, b.support_y)
    assert z.requires_grad and not torch.equal(z, z0)
    loss = lambda zz: per_task_mse(model.decoder(b.support_x, zz), b.support_y).sum()  # noqa: E731
    assert loss(z) < loss(z0)
    params = list(model.encoder.parameters()) + list(model.decoder.parameters())
    g = torch.autograd.grad(z.sum(), params, allow_unused=True)
    assert all(gi is not None for gi in g[-2:]), "the decoder gets gradients through the refinement"


def test_bad_inputs():
    enc = TaskEncoder(1, 1, 4)
    with pytest.raises(ValueError, match=r"expected feature sizes x=1, y=1; got x=2"):
        enc(torch.randn(2, 5, 2), torch.randn(2, 5, 1))
    with pytest.raises(ValueError, match="support_x must be"):
        enc(torch.randn(5, 1), torch.randn(5, 1))
    with pytest.raises(ValueError, match="mode must be one of"):
        AmortizedLearner(enc, ConditionedMLP(1, 4, 1), per_task_mse, mode="both")
