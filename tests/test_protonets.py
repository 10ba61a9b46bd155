"""ProtoNets: prototypes and logits by their definition, bad shapes, and a seeded
5-way 1-shot digits run well above chance on held-out classes."""

import pytest
import torch
from torch import nn

from pyoptk.meta.protonets import ProtoNet, prototypes
from pyoptk.tasks.fewshot import DigitsEpisodes


pytestmark = pytest.mark.usefixtures("one_thread")


def test_logits_are_negative_squared_distances_to_class_means():
    torch.manual_seed(0)
    enc = nn.Linear(6, 4).double()
    net = ProtoNet(enc)
    sx, qx = torch.randn(2, 6, 6, dtype=torch.float64), torch.randn(2, 5, 6, dtype=torch.float64)
    sy = torch.tensor([[0, 1, 2, 0, 1, 2], [2, 2, 1, 0, 0, 1]])
    logits = net(sx, sy, qx)
    assert logits.shape == (2, 5, 3)
    for t in range(2):
        for j in range(3):
            c = enc(sx[t][sy[t] == j]).mean(0)
            torch.testing.assert_close(logits[t, :, j], -((enc(qx[t]) - c) ** 2).sum(-1))


def test_bad_inputs():
    net = ProtoNet(nn.Linear(6, 4))
    with pytest.raises(ValueError, match=r"support_y \(2, 5\) must be \[T, S\]"):
        net(torch.randn(2, 6, 6), torch.zeros(2, 5, dtype=torch.long), torch.randn(2, 3, 6))
    with pytest.raises(ValueError, match="must agree in tasks and example shape"):
        net(torch.randn(2, 6, 6), torch.zeros(2, 6, dtype=torch.long), torch.randn(2, 3, 7))
    with pytest.raises(ValueError, match="have no support example"):
        prototypes(torch.randn(1, 3, 4), torch.tensor([[0, 0, 2]]), 3)


def test_protonet_digits_5way_1shot_beats_chance():
    """Seeded: trained 80 iterations on classes 0-4, the held-out query loss drops and
    5-way 1-shot accuracy on the unseen classes 5-9 is > 60% (chance: 20%)."""
    torch.manual_seed(0)
    enc = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Flatten())
    net = ProtoNet(enc)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    train = DigitsEpisodes("train", 5, 1, 5, seed=0)
    test = DigitsEpisodes("test", 5, 1, 10, seed=0).batch(0, 40)
    with torch.no_grad():
        before, _ = net.loss(test)
    for it in range(80):
        loss, _ = net.loss(train.batch(it, 4))
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after, acc = net.loss(test)
    assert after < 0.9 * before, (before.item(), after.item())
    assert acc > 0.6, f"5-way 1-shot accuracy {acc:.3f} on held-out digits"
