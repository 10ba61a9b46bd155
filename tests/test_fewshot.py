"""Few-shot episodes: digits N-way K-shot and sinusoid regression are deterministic,
well formed, respect the class split, and reject impossible shapes clearly."""

import math

import pytest
import torch

from pyoptk.tasks.fewshot import DIGITS_SPLITS, DigitsEpisodes, load_digits, stack_episodes
from pyoptk.tasks.sinusoid import SinusoidEpisodes


pytestmark = pytest.mark.usefixtures("one_thread")


def test_digits_episode_shapes_and_labels():
    ep = DigitsEpisodes("train", n_way=5, k_shot=2, n_query=3, seed=0).episode(7)
    assert ep.support_x.shape == (10, 1, 8, 8) and ep.query_x.shape == (15, 1, 8, 8)
    assert ep.support_y.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert ep.query_y.tolist() == sum([[c] * 3 for c in range(5)], [])
    assert ep.support_x.dtype == torch.float32
    assert 0 <= ep.support_x.min() <= ep.support_x.max() <= 1
    flat = DigitsEpisodes("train", 5, 2, 3, seed=0, flatten=True).episode(7)
    assert torch.equal(flat.support_x, ep.support_x.flatten(1))


def test_digits_deterministic_and_varied():
    a = DigitsEpisodes("test", 5, 1, 5, seed=3)
    b = DigitsEpisodes("test", 5, 1, 5, seed=3)
    for i in range(3):
        assert all(torch.equal(u, v) for u, v in zip(a.episode(i), b.episode(i)))
    assert not torch.equal(a.episode(0).support_x, a.episode(1).support_x)
    other_seed = DigitsEpisodes("test", 5, 1, 5, seed=4)
    assert not torch.equal(a.episode(0).support_x, other_seed.episode(0).support_x)


def _class_of(img, x, y):
    hit = ((x - img).abs().flatten(1).sum(1) == 0).nonzero().flatten()
    return set(y[hit].tolist()), set(hit.tolist())


def test_digits_split_classes_and_train_valid_samples_disjoint():
    x, y = load_digits()
    seen = {}
    for split in ("train", "valid", "test"):
        eps = DigitsEpisodes(split, 5, 2, 4, seed=0)
        rows = set()
        for i in range(4):
            ep = eps.episode(i)
            imgs = torch.cat([ep.support_x, ep.query_x])
            for img in imgs:
                classes, hits = _class_of(img, x, y)
                assert classes <= set(DIGITS_SPLITS[split][0])
                rows |= hits
        seen[split] = rows
    assert not (seen["train"] & seen["valid"])


def test_batch_stacks_consecutive_episodes():
    eps = DigitsEpisodes("valid", 3, 1, 2, seed=1)
    b = eps.batch(2, 4)
    assert b.num_tasks == 4 and b.support_x.shape == (4, 3, 1, 8, 8)
    assert torch.equal(b.query_x[1], eps.episode(9).query_x)


def test_digits_bad_input():
    with pytest.raises(ValueError, match="n_way=6 but split 'train' has only 5"):
        DigitsEpisodes("train", n_way=6)
    with pytest.raises(ValueError,
                       match="k_shot \\+ n_query = 30 \\+ 20 exceeds the smallest class"):
        DigitsEpisodes("valid", 5, 30, 20)
    with pytest.raises(ValueError, match="split must be one of"):
        DigitsEpisodes("meta-test")
    with pytest.raises(ValueError, match="k_shot must be a positive int"):
        DigitsEpisodes("train", 5, 0)
    with pytest.raises(ValueError, match="different shapes"):
        stack_episodes([DigitsEpisodes("train", 5, 1, 2).episode(0),
                        DigitsEpisodes("train", 5, 2, 2).episode(0)])


def test_sinusoid_episode():
    eps = SinusoidEpisodes(k_shot=5, n_query=7, seed=0)
    ep = eps.episode(3)
    assert ep.support_x.shape == (5, 1) and ep.query_y.shape == (7, 1)
    amp, phase = eps.curve(3)
    assert 0.1 <= amp <= 5 and 0 <= phase <= math.pi
    x = torch.cat([ep.support_x, ep.query_x])
    assert x.min() >= -5 and x.max() <= 5
    torch.testing.assert_close(torch.cat([ep.support_y, ep.query_y]), amp * torch.sin(x - phase))
    assert all(torch.equal(u, v) for u, v in zip(ep, SinusoidEpisodes(5, 7, seed=0).episode(3)))
    assert eps.batch(1, 4).support_x.shape == (4, 5, 1)
    amps = torch.tensor([eps.curve(i)[0] for i in range(200)])
    assert amps.min() < 1 and amps.max() > 4
    with pytest.raises(ValueError, match="n_query must be a positive int"):
        SinusoidEpisodes(5, -1)
